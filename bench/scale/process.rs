//! The scheduler's process: a `rankmesh scheduler` child, so its CPU time and memory are
//! its own, or this process itself when the scheduler runs in-process; and what
//! /proc says about it.

use crate::sim::Target;
use anyhow::{bail, Context, Result};
use rankmesh::cluster::SchedulerFile;
use rankmesh::protocol::{Token, TOKEN_ENV};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::time::{sleep, timeout_at, Instant};

/// How often the scheduler file is looked for while the child starts.
const POLL: Duration = Duration::from_millis(20);
/// How long the child gets to stop after SIGTERM before it is killed. Generous: with 10^7
/// tasks the client's departure (its futures dropped, every task forgotten) takes the
/// scheduler several seconds, and SIGTERM is handled after it.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// A `rankmesh scheduler` child process, killed if this process goes away.
pub struct ChildScheduler {
    child: tokio::process::Child,
    pub pid: u32,
    pub target: Target,
    /// Holds the scheduler file and the child's log until the child is stopped.
    folder: tempfile::TempDir,
}

impl ChildScheduler {
    pub async fn start(deadline: Instant) -> Result<ChildScheduler> {
        let folder = tempfile::tempdir()?;
        let scheduler_file = folder.path().join("scheduler.json");
        let log = std::fs::File::create(folder.path().join("scheduler.log"))?;
        let token = Token::generate()?;
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rankmesh"));
        command
            .args(["scheduler", "--host", "127.0.0.1", "--no-dashboard"])
            .arg("--scheduler-file")
            .arg(&scheduler_file)
            .env(TOKEN_ENV, token.as_str())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        rankmesh::process::die_with_parent(&mut command);
        let child = command
            .spawn()
            .context("cannot start `rankmesh scheduler`")?;
        let pid = child.id().context("the scheduler exited at once")?;
        let mut scheduler = ChildScheduler {
            child,
            pid,
            target: Target {
                address: String::new(),
                token,
            },
            folder,
        };
        scheduler.target.address = timeout_at(deadline, scheduler.address(scheduler_file))
            .await
            .context("timed out: the scheduler wrote no scheduler file")??;
        Ok(scheduler)
    }

    /// The address from the scheduler file, once the child has written it.
    async fn address(&mut self, scheduler_file: PathBuf) -> Result<String> {
        loop {
            if scheduler_file.exists() {
                return Ok(SchedulerFile::read(&scheduler_file)?.address);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the scheduler exited ({status}): {}", self.log_tail());
            }
            sleep(POLL).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.folder.path().join("scheduler.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails, with the end of its log, if the child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("the scheduler exited ({status}): {}", self.log_tail()),
            None => Ok(()),
        }
    }

    /// SIGTERM, as an operator stops it; killed if it does not stop in time.
    pub async fn stop(mut self) -> Result<()> {
        // SAFETY: kill only sends a signal, to a child this process has not reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("the scheduler did not stop within {STOP_GRACE:?} of SIGTERM");
            }
        }
        Ok(())
    }
}

/// The process /proc describes: this one or a child.
#[derive(Clone, Copy, Debug)]
pub enum Process {
    Own,
    Child(u32),
}

/// CPU time and memory of a process at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// User and system CPU time since the process started.
    pub cpu: Duration,
    pub rss_bytes: u64,
    /// Peak resident memory since the process started or [`Process::reset_peak`].
    pub peak_rss_bytes: u64,
}

impl Process {
    fn proc_path(self, file: &str) -> String {
        match self {
            Process::Own => format!("/proc/self/{file}"),
            Process::Child(pid) => format!("/proc/{pid}/{file}"),
        }
    }

    pub fn sample(self) -> Result<Sample> {
        let stat = std::fs::read_to_string(self.proc_path("stat"))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("malformed /proc stat")?
            .1
            .split_whitespace()
            .collect();
        // utime and stime, fields 14 and 15 of the line, are at 11 and 12 here.
        let ticks =
            |at: usize| -> Result<u64> { Ok(fields.get(at).context("short /proc stat")?.parse()?) };
        // SAFETY: sysconf only reads a system constant.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu = (ticks(11)? + ticks(12)?) as f64 / ticks_per_second;

        let status = std::fs::read_to_string(self.proc_path("status"))?;
        let kib = |key: &str| -> Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(key))
                .with_context(|| format!("no {key} in /proc status"))?;
            let value = line[key.len()..].trim().trim_end_matches("kB").trim();
            Ok(value.parse::<u64>()? * 1024)
        };
        Ok(Sample {
            cpu: Duration::from_secs_f64(cpu),
            rss_bytes: kib("VmRSS:")?,
            peak_rss_bytes: kib("VmHWM:")?,
        })
    }

    /// Starts the peak (VmHWM) over from the current RSS, so a peak measured later
    /// belongs to what came after (Linux: writing 5 to `clear_refs`). False where the
    /// kernel refuses; the peak then counts from the process start.
    pub fn reset_peak(self) -> bool {
        std::fs::write(self.proc_path("clear_refs"), "5").is_ok()
    }
}
