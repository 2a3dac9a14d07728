//! Python executor processes: `python -m rankmesh.executor`, one per thread of the worker,
//! connected over a Unix socket that only the token opens. A dead or over-limit executor
//! is replaced by a new generation.

use super::{EventSender, Executor, ExecutorEvent};
use crate::protocol::{
    self, FrameReader, FrameWriter, FromExecutor, FuncId, FunctionBlob, LoanToCopy, Plugin, Role,
    RunTask, ToExecutor, Token, TOKEN_ENV,
};
use crate::store::ProcessMemory;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a new executor may take to import and connect.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an executor asked to stop may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// After this long without a message, the link's buffers kept while busy go back (as the
/// worker's heap is trimmed when idle).
const LINK_IDLE: Duration = crate::heap::TRIM_WHEN_IDLE_AFTER;

#[derive(Clone, Debug)]
pub struct PythonExecutorConfig {
    pub python: String,
    pub token: Token,
    /// The worker's private folder: objects, and the executors' sockets.
    pub shm_dir: PathBuf,
    /// Set in the executor's environment.
    pub env: Vec<(String, String)>,
}

pub struct PythonExecutor {
    tx: mpsc::UnboundedSender<Work>,
}

/// What the worker asks of a generation (work for an earlier generation is dropped).
enum Work {
    Send(u64, ToExecutor),
    Restart(u64, String),
}

impl PythonExecutor {
    pub fn start(
        slot: usize,
        config: PythonExecutorConfig,
        events: EventSender,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(supervise(slot, config, rx, events, shutdown));
        PythonExecutor { tx }
    }
}

impl Executor for PythonExecutor {
    fn run(&mut self, generation: u64, functions: Vec<FunctionBlob>, tasks: Vec<RunTask>) {
        if !functions.is_empty() {
            let _ = self
                .tx
                .send(Work::Send(generation, ToExecutor::Functions(functions)));
        }
        let _ = self.tx.send(Work::Send(generation, ToExecutor::Run(tasks)));
    }

    fn release_functions(&mut self, generation: u64, ids: Vec<FuncId>) {
        let _ = self
            .tx
            .send(Work::Send(generation, ToExecutor::ReleaseFunctions(ids)));
    }

    fn restart(&mut self, generation: u64, reason: String) {
        let _ = self.tx.send(Work::Restart(generation, reason));
    }

    fn plugins(&mut self, generation: u64, setup: Vec<Plugin>, teardown: Vec<String>) {
        let plugins = ToExecutor::Plugins { setup, teardown };
        let _ = self.tx.send(Work::Send(generation, plugins));
    }

    fn objects_released(&mut self, generation: u64, held: Vec<u64>) {
        let released = ToExecutor::ObjectsReleased { held };
        let _ = self.tx.send(Work::Send(generation, released));
    }

    fn hold_results(&mut self, generation: u64, hold: bool) {
        let _ = self
            .tx
            .send(Work::Send(generation, ToExecutor::HoldResults(hold)));
    }

    fn drop_reserves(&mut self, generation: u64) {
        let _ = self
            .tx
            .send(Work::Send(generation, ToExecutor::DropReserves));
    }

    fn borrow(&mut self, generation: u64, copy: LoanToCopy) {
        let _ = self
            .tx
            .send(Work::Send(generation, ToExecutor::Borrow(copy)));
    }
}

/// Starts, serves and restarts one executor slot until shutdown.
async fn supervise(
    slot: usize,
    config: PythonExecutorConfig,
    mut work: mpsc::UnboundedReceiver<Work>,
    events: EventSender,
    shutdown: CancellationToken,
) {
    let socket = config.shm_dir.join(format!("executor-{slot}.sock"));
    // The folder is private already; the socket itself is too, should it ever move.
    let bound = UnixListener::bind(&socket).and_then(|listener| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    });
    let listener = match bound {
        Ok(listener) => listener,
        Err(e) => {
            // No generation can ever start here.
            let _ = events.send(ExecutorEvent::Died {
                slot,
                reason: format!("cannot listen on {}: {e}", socket.display()),
                traceback: String::new(),
                failed_starts: u32::MAX,
            });
            return;
        }
    };
    let mut generation = 0u64;
    let mut failed_starts = 0u32;
    // What `import_check` said, once per run of generations that never became ready.
    let mut diagnosis = None;
    while !shutdown.is_cancelled() {
        generation += 1;
        let mut ready = false;
        let reason = match run_generation(
            slot, generation, &config, &socket, &listener, &mut work, &events, &shutdown,
            &mut ready,
        )
        .await
        {
            Ok(()) => return,
            Err(reason) => reason,
        };
        failed_starts = if ready { 0 } else { failed_starts + 1 };
        if failed_starts == 1 {
            diagnosis = tokio::select! {
                _ = shutdown.cancelled() => return,
                said = import_check(&config) => said,
            };
        }
        let reason = match diagnosis.as_ref().filter(|_| !ready) {
            Some(said) => format!(
                "{reason}; `{} -c 'import rankmesh.executor'` says: {said}",
                config.python
            ),
            None => reason,
        };
        tracing::warn!(slot, "executor died: {reason}");
        let traceback = take_fault_report(&config.shm_dir, &executor_id(slot, generation));
        let died = ExecutorEvent::Died {
            slot,
            reason,
            traceback,
            failed_starts,
        };
        if events.send(died).is_err() {
            return;
        }
        if failed_starts > 0 {
            // One that cannot start (a Python without rankmesh) is tried again ever
            // more slowly, not thousands of times a second.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(start_backoff(failed_starts)) => {}
            }
        }
    }
}

/// Lines of what `import_check` printed that a reason quotes, at most.
const IMPORT_CHECK_LINES: usize = 4;
/// How long `import_check` may take.
const IMPORT_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The last lines `python -c "import rankmesh.executor"` printed, when that fails: after
/// an executor ended before it was ready, what usually tells why (a Python without
/// rankmesh where the worker runs), which its exit status alone does not.
async fn import_check(config: &PythonExecutorConfig) -> Option<String> {
    let mut command = Command::new(&config.python);
    command
        .args(["-c", "import rankmesh.executor"])
        .envs(config.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(IMPORT_CHECK_TIMEOUT, command.output())
        .await
        .ok()?
        .ok()?;
    if output.status.success() {
        return None;
    }
    let printed = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = printed.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(IMPORT_CHECK_LINES)..].join(" / ");
    Some(if tail.is_empty() {
        format!("it {}", output.status)
    } else {
        tail
    })
}

/// How long to wait before starting an executor again after `failed_starts` generations
/// in a row ended before they were ready: 0.1 s, doubling, at most 5 s.
fn start_backoff(failed_starts: u32) -> Duration {
    let doublings = failed_starts.saturating_sub(1).min(6);
    (Duration::from_millis(100) * 2u32.pow(doublings)).min(Duration::from_secs(5))
}

#[allow(clippy::too_many_arguments)]
async fn run_generation(
    slot: usize,
    generation: u64,
    config: &PythonExecutorConfig,
    socket: &std::path::Path,
    listener: &UnixListener,
    work: &mut mpsc::UnboundedReceiver<Work>,
    events: &EventSender,
    shutdown: &CancellationToken,
    ready: &mut bool,
) -> Result<(), String> {
    let mut child = spawn(slot, generation, config, socket)
        .map_err(|e| format!("cannot start `{} -m rankmesh.executor`: {e}", config.python))?;
    let pid = child.id().unwrap_or(0);
    let connected = tokio::select! {
        _ = shutdown.cancelled() => return stop(child).await,
        status = child.wait() => return Err(describe_exit(pid, status, "before connecting")),
        _ = tokio::time::sleep(START_TIMEOUT) => Err(format!("did not connect within {START_TIMEOUT:?}")),
        accepted = listener.accept() => accepted.map_err(|e| e.to_string()),
    };
    let (stream, _) = match connected {
        Ok(c) => c,
        Err(e) => {
            let _ = child.kill().await;
            return Err(format!("executor (pid {pid}) {e}"));
        }
    };
    let (r, w) = stream.into_split();
    let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
    // Batches of inline inputs and results would otherwise each fault in a fresh buffer.
    reader.keep_buffers(protocol::EXECUTOR_LINK_BUFFER);
    writer.keep_buffers_while_busy(protocol::EXECUTOR_LINK_BUFFER, LINK_IDLE);
    let hello = async {
        protocol::accept(&mut reader, &mut writer, &config.token, &[Role::Executor]).await?;
        protocol::welcome(&mut writer, None).await?;
        Ok::<_, protocol::HandshakeError>(())
    };
    if let Err(e) = hello.await {
        let _ = child.kill().await;
        return Err(format!("executor (pid {pid}) failed its handshake: {e}"));
    }
    let probe = match tokio::time::timeout(START_TIMEOUT, reader.recv::<FromExecutor>()).await {
        Ok(Ok(Some(FromExecutor::Ready { probe, .. }))) => probe,
        other => {
            let _ = child.kill().await;
            return Err(format!(
                "executor (pid {pid}) did not say it was ready: {other:?}"
            ));
        }
    };
    let memory = match ProcessMemory::open(pid, probe, &protocol::EXECUTOR_PROBE) {
        Ok(memory) => Some(Arc::new(memory)),
        Err(e) => {
            tracing::debug!(
                slot,
                "the executor's memory cannot be read, so it writes its results: {e}"
            );
            None
        }
    };
    if events
        .send(ExecutorEvent::Ready {
            slot,
            generation,
            pid,
            memory,
        })
        .is_err()
    {
        return stop(child).await;
    }
    *ready = true;
    // Writing runs on its own task: an executor blocked sending results must never wait
    // on a worker blocked sending it work.
    let (to_executor, mut outgoing) = mpsc::unbounded_channel::<ToExecutor>();
    let mut writing = tokio::spawn(async move {
        match writer.forward(&mut outgoing).await {
            Ok(()) => String::new(),
            Err(e) => format!("lost its connection ({e})"),
        }
    });
    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = to_executor.send(ToExecutor::Shutdown);
                drop(to_executor);
                let _ = tokio::time::timeout(STOP_GRACE, &mut writing).await;
                return stop(child).await;
            }
            item = work.recv() => match item {
                None => return stop(child).await,
                // Work meant for an executor that died is dropped.
                Some(Work::Send(for_generation, msg)) if for_generation == generation => {
                    let _ = to_executor.send(msg);
                }
                Some(Work::Restart(for_generation, reason)) if for_generation == generation => {
                    let _ = child.kill().await;
                    break format!("executor (pid {pid}) {reason}");
                }
                Some(_) => {}
            },
            written = &mut writing => break reap(child, pid, &written.unwrap_or_default()).await,
            frame = reader.recv::<FromExecutor>() => match frame {
                Ok(Some(FromExecutor::Results(outcomes))) => {
                    let _ = events.send(ExecutorEvent::Results { slot, outcomes });
                }
                Ok(Some(FromExecutor::Borrowed { request, outcome })) => {
                    let _ = events.send(ExecutorEvent::Borrowed { slot, request, outcome });
                }
                Ok(Some(FromExecutor::Ready { .. })) => {
                    break reap(child, pid, "said it was ready twice").await;
                }
                Ok(None) => break reap(child, pid, "closed its connection").await,
                Err(e) => break reap(child, pid, &format!("sent a bad frame ({e})")).await,
            },
            status = child.wait() => break describe_exit(pid, status, "while running tasks"),
            _ = tokio::time::sleep(LINK_IDLE), if reader.keeps_large_buffer() => {
                reader.give_back_buffer();
            }
        }
    };
    writing.abort();
    Err(ended)
}

fn spawn(
    slot: usize,
    generation: u64,
    config: &PythonExecutorConfig,
    socket: &std::path::Path,
) -> std::io::Result<Child> {
    let mut command = Command::new(&config.python);
    command
        .args(["-m", "rankmesh.executor"])
        .env("RANKMESH_EXECUTOR_SOCKET", socket)
        .env(TOKEN_ENV, config.token.as_str())
        .env("RANKMESH_SHM_DIR", &config.shm_dir)
        // Names its objects: a replacement must not collide with what a dead one left.
        .env("RANKMESH_EXECUTOR_ID", executor_id(slot, generation))
        .envs(config.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    crate::process::die_with_parent(&mut command);
    command.spawn()
}

/// Names one executor generation's files in the worker's folder: its results are
/// `<id>-<n>` until the worker takes them over, its crash report `<id>.fault`.
pub fn executor_id(slot: usize, generation: u64) -> String {
    format!("{slot}.{generation}")
}

/// After a generation died: the traceback it dumped on a fatal signal, if any (the file
/// is removed). Its unreported results are the worker's to remove, once it has handled
/// the results reported before the death ([`super::super::WorkerComm`]).
fn take_fault_report(folder: &std::path::Path, id: &str) -> String {
    let fault = folder.join(format!("{id}.fault"));
    let traceback = std::fs::read_to_string(&fault).unwrap_or_default();
    let _ = std::fs::remove_file(&fault);
    traceback.trim_end().to_string()
}

/// Asks nothing more of the child: waits briefly for it to leave, then kills it.
async fn stop(mut child: Child) -> Result<(), String> {
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    Ok(())
}

/// The executor's connection failed: find out how the process ended.
async fn reap(mut child: Child, pid: u32, what: &str) -> String {
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(status) => describe_exit(pid, status, "while running tasks"),
        Err(_) => {
            let _ = child.kill().await;
            format!("executor (pid {pid}) {what} and was killed")
        }
    }
}

fn describe_exit(pid: u32, status: std::io::Result<ExitStatus>, when: &str) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (_, Some(sig)) => format!(
                "executor process (pid {pid}) was killed by signal {sig} ({}) {when}",
                signal_name(sig)
            ),
            (Some(code), _) => {
                format!("executor process (pid {pid}) exited with status {code} {when}")
            }
            _ => format!("executor process (pid {pid}) ended {when}"),
        },
        Err(e) => format!("executor process (pid {pid}) could not be waited for: {e}"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGKILL => "SIGKILL, e.g. the kernel's out-of-memory killer",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        _ => "signal",
    }
}
