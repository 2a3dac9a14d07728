//! From merged settings to a job script: check every value, then fill the system's
//! template from `jobscripts/` (built into the binary, so the script matches the binary).

use super::config::{ProfileSource, Resolved, Setting};
use super::{BatchError, System, Walltime, WALLTIME_DRAIN_EXIT};
use crate::worker::{MemoryLimit, Threshold};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::str::FromStr;

const SLURM_TEMPLATE: &str = include_str!("../../jobscripts/slurm.sh.j2");
const PBS_TEMPLATE: &str = include_str!("../../jobscripts/pbs.sh.j2");
const ENVIRONMENT_TEMPLATE: &str = include_str!("../../jobscripts/environment.sh.j2");

/// The longest warning before the walltime; shorter walltimes get half of theirs.
const MAX_DRAIN_SECONDS: u64 = 300;

/// What a job script needs from the machine `submit` runs on.
#[derive(Clone, Debug)]
pub struct SubmitEnv {
    /// Where the job runs (the folder `submit` was started in).
    pub workdir: PathBuf,
    /// This `rankmesh` binary: the job runs the same one.
    pub rankmesh: PathBuf,
    /// The interpreter `submit` runs with, unless a profile activates another environment.
    pub python: String,
    /// rankmesh's job records: the job writes its scheduler file and exit code there.
    pub state_dir: PathBuf,
    /// Makes PBS output file names unique (PBS does not expand a job-id pattern).
    pub stamp: String,
    /// The submitter's umask: the job's log is created private (the batch system is
    /// asked for 077), then the script restores this one for what the job itself writes.
    pub umask: u32,
}

/// A checked job: everything the templates use.
#[derive(Clone, Debug, Serialize)]
pub struct JobSpec {
    pub system: System,
    pub job_name: String,
    pub nodes: u32,
    pub ntasks_per_node: u32,
    pub cpus_per_task: Option<u32>,
    pub mem: Option<String>,
    pub gpus: Option<u32>,
    pub walltime: String,
    pub walltime_seconds: u64,
    pub drain_seconds: u64,
    pub drain_exit: i32,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// The output file; for SLURM it may hold `%j` (the job id).
    pub output: String,
    pub modules: Vec<String>,
    pub setup: Vec<String>,
    pub venv: Option<String>,
    pub conda_env: Option<String>,
    pub python: String,
    pub rankmesh: String,
    pub launcher: String,
    /// Flags the launcher always gets, before the site's `launcher_flags` (which may
    /// override them): srun's `--kill-on-bad-exit=1`.
    pub launcher_guards: Vec<String>,
    pub launcher_flags: Vec<String>,
    pub pbs_resources: String,
    pub workdir: String,
    pub state_dir: String,
    /// The submitter's umask in octal (`0022`), restored first thing in the script.
    pub umask: String,
    /// `rankmesh run` flags from the memory settings (`--memory-limit`, `4GiB`, ...).
    pub worker_flags: Vec<String>,
    /// Where workers spill, to be expanded by the job's shell.
    pub local_directory: Option<String>,
    /// Where the job writes its report (`rankmesh run --report`), an absolute path.
    pub report: Option<String>,
    /// The script (absolute path) and its arguments.
    pub command: Vec<String>,
}

impl JobSpec {
    /// Checks the merged settings; `script` is the user's script and its arguments.
    pub fn new(
        resolved: &Resolved,
        system: System,
        script: &[String],
        env: &SubmitEnv,
    ) -> Result<JobSpec, BatchError> {
        let settings = &resolved.settings;
        let fail = |key: &str, message: String| {
            let source = resolved
                .sources
                .get(key)
                .map_or_else(|| ProfileSource::Default.to_string(), ToString::to_string);
            BatchError::Config(format!("{key} (from {source}): {message}"))
        };
        let Some((path, args)) = script.split_first() else {
            return Err(BatchError::Config("no script given".into()));
        };
        let path = absolute(&env.workdir, Path::new(path));
        if !path.is_file() {
            return Err(BatchError::Config(format!(
                "the script {} does not exist",
                path.display()
            )));
        }
        let walltime_text = settings.walltime.clone().unwrap_or_default();
        let walltime: Walltime = walltime_text
            .parse()
            .map_err(|e: super::walltime::WalltimeError| fail("walltime", e.to_string()))?;
        let nodes = positive(settings.nodes).ok_or_else(|| fail("nodes", "must be ≥ 1".into()))?;
        let ntasks_per_node = positive(settings.ntasks_per_node)
            .ok_or_else(|| fail("ntasks_per_node", "must be ≥ 1".into()))?;
        if nodes * ntasks_per_node < 2 {
            return Err(fail(
                "ntasks_per_node",
                "a rankmesh job needs at least 2 tasks (rank 0: scheduler and script, the \
                 others: workers); nodes × ntasks-per-node is 1"
                    .into(),
            ));
        }
        if settings.cpus_per_task == Some(0) {
            return Err(fail("cpus_per_task", "must be ≥ 1".into()));
        }
        let drain_seconds = settings
            .drain_seconds
            .unwrap_or_else(|| (walltime.as_secs() / 2).min(MAX_DRAIN_SECONDS));
        if drain_seconds >= walltime.as_secs() {
            return Err(fail(
                "drain_seconds",
                format!("{drain_seconds} s is not shorter than the walltime ({walltime})"),
            ));
        }
        if system == System::Pbs && settings.qos.is_some() {
            return Err(fail("qos", "PBS has no QOS; use a queue (--queue)".into()));
        }
        let pbs_resources = settings.pbs_resources.clone().unwrap_or("select".into());
        if !["select", "nodes"].contains(&pbs_resources.as_str()) {
            return Err(fail(
                "pbs_resources",
                format!(
                    "'{pbs_resources}' is neither 'select' (PBS Pro, OpenPBS) nor 'nodes' (Torque)"
                ),
            ));
        }
        let job_name = settings.job_name.clone().unwrap_or("rankmesh".into());
        let output = match &settings.output {
            Some(output) => absolute(&env.workdir, Path::new(output)),
            None => env.workdir.join(match system {
                System::Slurm => format!("{job_name}-%j.out"),
                System::Pbs => format!("{job_name}-{}.out", env.stamp),
            }),
        };
        let (launcher, default_flags): (&str, &[&str]) = match system {
            // pmix: Debian's and most sites' Open MPI speak it; rankmesh places its own
            // workers, so no CPU binding.
            System::Slurm => ("srun", &["--mpi=pmix", "--cpu-bind=none"]),
            System::Pbs => ("mpiexec", &[]),
        };
        let launcher = settings.launcher.clone().unwrap_or(launcher.into());
        let activates_environment = settings.venv.is_some() || settings.conda_env.is_some();
        let python = match &settings.python {
            Some(python) => python.clone(),
            None if activates_environment => "python3".into(),
            None => env.python.clone(),
        };
        let spec = JobSpec {
            system,
            job_name,
            nodes,
            ntasks_per_node,
            cpus_per_task: settings.cpus_per_task,
            mem: settings.mem.clone(),
            gpus: settings.gpus.filter(|g| *g > 0),
            walltime: walltime.to_string(),
            walltime_seconds: walltime.as_secs(),
            drain_seconds,
            drain_exit: WALLTIME_DRAIN_EXIT,
            partition: settings.partition.clone(),
            account: settings.account.clone(),
            qos: settings.qos.clone(),
            output: output.display().to_string(),
            modules: settings.modules.clone().unwrap_or_default(),
            setup: settings.setup.clone().unwrap_or_default(),
            venv: settings.venv.clone(),
            conda_env: settings.conda_env.clone(),
            python,
            rankmesh: env.rankmesh.display().to_string(),
            launcher_guards: launcher_guards(system, &launcher),
            launcher,
            launcher_flags: settings
                .launcher_flags
                .clone()
                .unwrap_or_else(|| default_flags.iter().map(|f| f.to_string()).collect()),
            pbs_resources,
            workdir: env.workdir.display().to_string(),
            state_dir: env.state_dir.display().to_string(),
            umask: format!("{:04o}", env.umask & 0o777),
            worker_flags: worker_flags(settings, &fail)?,
            local_directory: settings.local_directory.clone(),
            report: None,
            command: std::iter::once(path.display().to_string())
                .chain(args.iter().cloned())
                .collect(),
        };
        spec.check_directive_values(&fail)?;
        Ok(spec)
    }

    /// Directive lines (`#SBATCH --x=VALUE`) cannot quote: a value with a line break or
    /// (where the batch system splits on it) a space would change the script.
    fn check_directive_values(
        &self,
        fail: &dyn Fn(&str, String) -> BatchError,
    ) -> Result<(), BatchError> {
        let single_words = [
            ("job_name", Some(&self.job_name)),
            ("partition", self.partition.as_ref()),
            ("account", self.account.as_ref()),
            ("qos", self.qos.as_ref()),
            ("mem", self.mem.as_ref()),
            ("output", Some(&self.output)),
            ("launcher", Some(&self.launcher)),
        ];
        for (key, value) in single_words {
            if let Some(value) = value {
                if value.is_empty() || value.chars().any(char::is_whitespace) {
                    return Err(fail(
                        key,
                        format!("'{value}' must be one word, without spaces"),
                    ));
                }
            }
        }
        if let Some(line) = self.setup.iter().find(|line| line.contains('\n')) {
            return Err(fail("setup", format!("one line per entry, got {line:?}")));
        }
        if let Some(dir) = self.local_directory.as_ref().filter(|d| d.contains('\n')) {
            return Err(fail("local_directory", format!("one line, got {dir:?}")));
        }
        Ok(())
    }
}

/// A rank that dies before MPI is up (a crash in start-up) leaves the others waiting for
/// it in MPI until the walltime: srun ends the whole step when any rank fails. mpirun and
/// mpiexec do so by default; another launcher is left alone.
fn launcher_guards(system: System, launcher: &str) -> Vec<String> {
    let is_srun = Path::new(launcher).file_name() == Some("srun".as_ref());
    match system {
        System::Slurm if is_srun => vec!["--kill-on-bad-exit=1".into()],
        _ => Vec::new(),
    }
}

/// The memory settings as `rankmesh run` flags, each checked as `run` would parse it, so
/// that a typo fails at submission rather than in the queue.
fn worker_flags(
    settings: &super::Profile,
    fail: &dyn Fn(&str, String) -> BatchError,
) -> Result<Vec<String>, BatchError> {
    type Check = fn(&str) -> Result<(), String>;
    fn parses<T: FromStr<Err = String>>(text: &str) -> Result<(), String> {
        T::from_str(text).map(drop)
    }
    let settings_and_checks: [(&str, &Option<Setting>, Check); 5] = [
        (
            "memory_limit",
            &settings.memory_limit,
            parses::<MemoryLimit>,
        ),
        (
            "memory_target",
            &settings.memory_target,
            parses::<Threshold>,
        ),
        ("memory_spill", &settings.memory_spill, parses::<Threshold>),
        ("memory_pause", &settings.memory_pause, parses::<Threshold>),
        (
            "memory_terminate",
            &settings.memory_terminate,
            parses::<Threshold>,
        ),
    ];
    let mut flags = Vec::new();
    for (key, value, check) in settings_and_checks {
        if let Some(value) = value {
            let text = value.to_string();
            check(&text).map_err(|e| fail(key, e))?;
            flags.push(format!("--{}", key.replace('_', "-")));
            flags.push(text);
        }
    }
    Ok(flags)
}

fn positive(value: Option<u32>) -> Option<u32> {
    value.filter(|v| *v >= 1)
}

fn absolute(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.into()
    } else {
        base.join(path)
    }
}

/// The job script for `spec`, from its system's template.
pub fn render(spec: &JobSpec) -> Result<String, BatchError> {
    let mut templates = minijinja::Environment::new();
    templates.set_keep_trailing_newline(true);
    templates.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    templates.add_filter("sh", shell_quote);
    templates.add_filter("sh_expand", shell_quote_expanding);
    let render_error = |e: minijinja::Error| BatchError::Render(format!("{e:#}"));
    templates
        .add_template("environment.sh.j2", ENVIRONMENT_TEMPLATE)
        .map_err(render_error)?;
    let (name, source) = match spec.system {
        System::Slurm => ("slurm.sh.j2", SLURM_TEMPLATE),
        System::Pbs => ("pbs.sh.j2", PBS_TEMPLATE),
    };
    templates.add_template(name, source).map_err(render_error)?;
    templates
        .get_template(name)
        .and_then(|template| template.render(spec))
        .map_err(render_error)
}

/// Quotes a value for the shell (the `sh` filter in the templates); plain words stay as
/// they are, so the script reads as if written by hand.
fn shell_quote(value: String) -> Result<String, minijinja::Error> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !value.is_empty() && value.chars().all(plain) {
        return Ok(value);
    }
    shlex::try_quote(&value)
        .map(|quoted| quoted.into_owned())
        .map_err(|e| {
            minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("cannot quote {value:?} for the shell: {e}"),
            )
        })
}

/// Double-quotes a value for the shell but leaves `$` alone (the `sh_expand` filter): the
/// job's shell expands `$TMPDIR` and friends, on the node, and nothing else.
fn shell_quote_expanding(value: String) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\' | '`') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}
