//! `rankmesh submit`, `status`, `wait`, `cancel`, `logs`, `jobs` and `config`: batch jobs
//! from a login node (src/batch does the work; this module parses flags and prints).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rankmesh::batch::render::SubmitEnv;
use rankmesh::batch::{self, Config, JobSpec, JobStatus, Jobs, Profile, Setting, System, Walltime};
use rankmesh::worker::{MemoryLimit, Threshold};
use std::io::{Read, Seek, Write};
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum BatchCommand {
    /// Submit SCRIPT as a batch job (SLURM or PBS) that runs it on a rankmesh cluster.
    Submit(Box<SubmitArgs>),
    /// A job's state, exit code, elapsed time and nodes (without JOB: all of `rankmesh jobs`).
    Status {
        job: Option<String>,
        #[command(flatten)]
        system: SystemArg,
        #[arg(long)]
        json: bool,
    },
    /// Wait until JOB ends; exit with its exit code.
    Wait {
        job: String,
        #[command(flatten)]
        system: SystemArg,
        #[arg(long)]
        json: bool,
    },
    /// Cancel JOB.
    Cancel {
        job: String,
        #[command(flatten)]
        system: SystemArg,
    },
    /// Print JOB's output file.
    Logs {
        job: String,
        /// Keep printing what the job writes until it ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// The jobs `rankmesh submit` started for this user, oldest first.
    Jobs {
        #[arg(long)]
        json: bool,
    },
    /// Site profiles (~/.config/rankmesh/config.toml or $RANKMESH_CONFIG).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// The merged settings a job would get, and where each came from.
    Show {
        #[arg(long)]
        profile: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct SystemArg {
    /// The batch system (default: the job's record, else whichever CLI is on PATH).
    #[arg(long, value_parser = ["slurm", "pbs"])]
    system: Option<String>,
}

impl SystemArg {
    fn get(&self) -> Result<Option<System>> {
        self.system
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(anyhow::Error::msg)
    }
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Nodes to allocate.
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..))]
    nodes: Option<u32>,
    /// MPI tasks (rankmesh ranks) per node; rank 0 is the scheduler, the others workers.
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..))]
    ntasks_per_node: Option<u32>,
    /// CPUs per task (threads each rank may use).
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..))]
    cpus_per_task: Option<u32>,
    /// Memory per node, as the batch system writes it (e.g. 16G).
    #[arg(long)]
    mem: Option<String>,
    /// MM, MM:SS, HH:MM:SS or D-HH[:MM[:SS]].
    #[arg(long, value_parser = parse_walltime)]
    walltime: Option<String>,
    /// SLURM partition or PBS queue.
    #[arg(long, visible_alias = "queue")]
    partition: Option<String>,
    /// The account (allocation) to charge.
    #[arg(long)]
    account: Option<String>,
    /// SLURM quality of service.
    #[arg(long)]
    qos: Option<String>,
    /// GPUs per node.
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32))]
    gpus: Option<u32>,
    /// The job's name in the queue (default: rankmesh).
    #[arg(long)]
    job_name: Option<String>,
    /// The job's output file (SLURM expands %j to the job id).
    #[arg(long)]
    output: Option<String>,
    /// Memory per worker: auto, a size (4GiB) or a fraction of the node's (0.25).
    #[arg(long, value_parser = checked::<MemoryLimit>)]
    memory_limit: Option<String>,
    /// Spill results above this fraction of the memory limit (or false).
    #[arg(long, value_parser = checked::<Threshold>)]
    memory_target: Option<String>,
    /// Spill when process memory is above this fraction (or false).
    #[arg(long, value_parser = checked::<Threshold>)]
    memory_spill: Option<String>,
    /// Pause a worker above this fraction (or false).
    #[arg(long, value_parser = checked::<Threshold>)]
    memory_pause: Option<String>,
    /// Restart a worker's largest executor above this fraction (or false).
    #[arg(long, value_parser = checked::<Threshold>)]
    memory_terminate: Option<String>,
    /// Where workers spill on each node; quote it ('$TMPDIR') to have the job expand it.
    #[arg(long)]
    local_directory: Option<String>,
    /// A profile from the config file (default: its default_profile).
    #[arg(long)]
    profile: Option<String>,
    /// The batch system (auto: sbatch on PATH means SLURM, else qsub means PBS).
    #[arg(long, value_parser = ["slurm", "pbs", "auto"])]
    system: Option<String>,
    /// Write a report of the job (one self-contained HTML file) here when it ends.
    #[arg(long, value_name = "FILE.html")]
    report: Option<std::path::PathBuf>,
    /// Print the job script; submit nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the job id, system, output file and script as JSON.
    #[arg(long)]
    json: bool,
    /// The script to run, then its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    script: Vec<String>,
}

/// The text itself, once it parses as a `T` (the job spec checks it again, with the
/// profile's values).
fn checked<T: std::str::FromStr<Err = String>>(text: &str) -> Result<String, String> {
    T::from_str(text).map(|_| text.to_owned())
}

fn parse_walltime(text: &str) -> Result<String, String> {
    text.parse::<Walltime>()
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}

impl SubmitArgs {
    fn flags(&self) -> Profile {
        Profile {
            system: self.system.clone(),
            partition: self.partition.clone(),
            account: self.account.clone(),
            qos: self.qos.clone(),
            nodes: self.nodes,
            ntasks_per_node: self.ntasks_per_node,
            cpus_per_task: self.cpus_per_task,
            mem: self.mem.clone(),
            gpus: self.gpus,
            walltime: self.walltime.clone(),
            job_name: self.job_name.clone(),
            output: self.output.clone(),
            memory_limit: self.memory_limit.clone().map(Setting::Text),
            memory_target: self.memory_target.clone().map(Setting::Text),
            memory_spill: self.memory_spill.clone().map(Setting::Text),
            memory_pause: self.memory_pause.clone().map(Setting::Text),
            memory_terminate: self.memory_terminate.clone().map(Setting::Text),
            local_directory: self.local_directory.clone(),
            ..Profile::default()
        }
    }
}

pub fn run(command: BatchCommand) -> Result<i32> {
    match command {
        BatchCommand::Submit(args) => submit(*args),
        BatchCommand::Status { job, system, json } => {
            let jobs = Jobs::open()?;
            let statuses = match &job {
                Some(id) => vec![jobs.status(id, system.get()?)?],
                None => all_statuses(&jobs),
            };
            if json {
                match (&job, statuses.as_slice()) {
                    (Some(_), [status]) => println!("{}", serde_json::to_string(status)?),
                    _ => println!("{}", serde_json::to_string(&statuses)?),
                }
            } else {
                print_table(&statuses);
            }
            Ok(0)
        }
        BatchCommand::Jobs { json } => {
            let statuses = all_statuses(&Jobs::open()?);
            if json {
                println!("{}", serde_json::to_string(&statuses)?);
            } else {
                print_table(&statuses);
            }
            Ok(0)
        }
        BatchCommand::Wait { job, system, json } => {
            let status = Jobs::open()?.wait(&job, system.get()?)?;
            if json {
                println!("{}", serde_json::to_string(&status)?);
            }
            let code = exit_code(&status);
            eprintln!("rankmesh: job {job} {} (exit {code})", status.state);
            Ok(code)
        }
        BatchCommand::Cancel { job, system } => {
            Jobs::open()?.cancel(&job, system.get()?)?;
            eprintln!("rankmesh: cancelled job {job}");
            Ok(0)
        }
        BatchCommand::Logs { job, follow } => logs(&job, follow),
        BatchCommand::Config {
            command: ConfigCommand::Show { profile },
        } => {
            let config = Config::load()?;
            let resolved = config.resolve(profile.as_deref(), &Profile::default())?;
            println!("# config file: {}", config.path().display());
            print!("{}", resolved.show()?);
            Ok(0)
        }
    }
}

fn submit(args: SubmitArgs) -> Result<i32> {
    let config = Config::load()?;
    let resolved = config.resolve(args.profile.as_deref(), &args.flags())?;
    let system = match resolved.settings.system.as_deref() {
        None | Some("auto") => System::detect()?,
        Some(name) => {
            let system: System = name.parse().map_err(anyhow::Error::msg)?;
            if args.dry_run {
                system
            } else {
                system.ensure_available()?
            }
        }
    };
    let jobs = Jobs::open()?;
    let stamp = format!(
        "{}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        std::process::id()
    );
    let env = SubmitEnv {
        workdir: std::env::current_dir().context("cannot read the current folder")?,
        rankmesh: std::env::current_exe().context("cannot find this rankmesh binary")?,
        python: std::env::var("RANKMESH_PYTHON")
            .ok()
            .filter(|p| !p.is_empty())
            .or_else(|| batch::tool::on_path("python3").map(|p| p.display().to_string()))
            .unwrap_or_else(|| "python3".into()),
        state_dir: jobs.dir().to_path_buf(),
        stamp: stamp.clone(),
        umask: rankmesh::private_files::current_umask(),
    };
    let mut spec = JobSpec::new(&resolved, system, &args.script, &env)?;
    spec.report = match &args.report {
        Some(path) => Some(
            std::path::absolute(path)
                .with_context(|| format!("report path {}", path.display()))?
                .display()
                .to_string(),
        ),
        None => None,
    };
    let script = batch::render(&spec)?;
    if args.dry_run {
        if args.json {
            let dry = serde_json::json!({"system": system.name(), "script": script});
            println!("{dry}");
        } else {
            print!("{script}");
        }
        return Ok(0);
    }
    let record = jobs.submit(&spec, &script, &stamp)?;
    if args.json {
        let submitted = serde_json::json!({
            "id": record.id,
            "system": system.name(),
            "output": record.output,
            "script": script,
        });
        println!("{submitted}");
    } else {
        println!("{}", record.id);
        eprintln!(
            "rankmesh: submitted job {} to {system}; output: {}\n\
             rankmesh: follow it with `rankmesh status {0}`, `rankmesh logs -f {0}`, `rankmesh wait {0}`",
            record.id,
            record.output.display()
        );
    }
    Ok(0)
}

fn all_statuses(jobs: &Jobs) -> Vec<JobStatus> {
    jobs.list()
        .into_iter()
        .map(|record| {
            jobs.status(&record.id, Some(record.system))
                .unwrap_or_else(|e| JobStatus {
                    id: record.id.clone(),
                    state: batch::JobState::Other(format!("unknown: {e}")),
                    exit_code: None,
                    elapsed: None,
                    nodes: None,
                    name: Some(record.name.clone()),
                })
        })
        .collect()
}

/// What `wait` exits with: the job's code, else 0 only for a completed job.
fn exit_code(status: &JobStatus) -> i32 {
    status
        .exit_code
        .unwrap_or(if status.state == batch::JobState::Completed {
            0
        } else {
            1
        })
}

fn print_table(statuses: &[JobStatus]) {
    println!(
        "{:<12} {:<16} {:<28} {:>4}  {:<10} NODES",
        "JOB", "NAME", "STATE", "EXIT", "ELAPSED"
    );
    for status in statuses {
        let dash = || "-".to_owned();
        println!(
            "{:<12} {:<16} {:<28} {:>4}  {:<10} {}",
            status.id,
            status.name.clone().unwrap_or_else(dash),
            status.state.to_string(),
            status.exit_code.map_or_else(dash, |c| c.to_string()),
            status.elapsed.clone().unwrap_or_else(dash),
            status.nodes.clone().unwrap_or_else(dash),
        );
    }
}

fn logs(id: &str, follow: bool) -> Result<i32> {
    let jobs = Jobs::open()?;
    let record = jobs.load(id).with_context(|| {
        format!(
            "no record of job {id} in {}: `rankmesh logs` knows the jobs `rankmesh submit` started",
            jobs.dir().display()
        )
    })?;
    let mut stdout = std::io::stdout().lock();
    let mut offset = 0u64;
    let mut copy_new = |offset: &mut u64| -> Result<()> {
        let Ok(mut file) = std::fs::File::open(&record.output) else {
            return Ok(()); // not created yet: the job has not started
        };
        file.seek(std::io::SeekFrom::Start(*offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        *offset += bytes.len() as u64;
        stdout.write_all(&bytes)?;
        stdout.flush()?;
        Ok(())
    };
    if !follow {
        if !record.output.exists() {
            anyhow::bail!(
                "job {id} has written no output yet ({} does not exist)",
                record.output.display()
            );
        }
        copy_new(&mut offset)?;
        return Ok(0);
    }
    let mut checked = Instant::now();
    loop {
        copy_new(&mut offset)?;
        if checked.elapsed() >= Duration::from_secs(2) {
            checked = Instant::now();
            if jobs.status(id, Some(record.system))?.state.is_final() {
                // The system writes the last lines before it reports the end.
                copy_new(&mut offset)?;
                return Ok(0);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
