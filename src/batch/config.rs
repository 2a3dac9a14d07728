//! Site profiles: `~/.config/rankmesh/config.toml` (or `$RANKMESH_CONFIG`) holds named
//! profiles of job settings. A job's settings are layered: built-in defaults, then the
//! profile, then command-line flags; each value remembers which layer it came from.
//!
//! ```toml
//! default_profile = "cpu"
//! [profile.cpu]
//! system = "slurm"
//! partition = "compute"
//! modules = ["openmpi/4.1"]
//! memory_limit = "4GiB"        # per worker; memory_target/spill/pause/terminate too
//! local_directory = "$TMPDIR"  # where workers spill; expanded in the job
//! ```

use super::BatchError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CONFIG_ENV: &str = "RANKMESH_CONFIG";

/// Job settings, as a profile or the command line gives them; every field is optional so
/// that layers can be merged. Unknown keys are an error (a typo must not be ignored).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `slurm`, `pbs` or `auto` (whichever submit command is on PATH).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ntasks_per_node: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus_per_task: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub walltime: Option<String>,
    /// Seconds before the walltime at which the job is asked to drain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// `module load` each of these, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modules: Option<Vec<String>>,
    /// Shell lines run after the modules, before the launch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup: Option<Vec<String>>,
    /// A virtual environment to activate (its bin/activate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub venv: Option<String>,
    /// A conda environment to activate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conda_env: Option<String>,
    /// The Python interpreter in the job (default: the one `submit` runs with, unless a
    /// venv or conda environment is activated, whose `python3` then is used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
    /// The MPI launcher: `srun` (SLURM's default), `mpiexec` (PBS's default) or `mpirun`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launcher: Option<String>,
    /// Flags for the launcher, replacing the defaults (srun: --mpi=pmix --cpu-bind=none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launcher_flags: Option<Vec<String>>,
    /// PBS resource syntax: `select` (PBS Pro, OpenPBS) or `nodes` (Torque).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pbs_resources: Option<String>,
    /// Each worker's memory limit: `auto`, a size (`"4GiB"`), a fraction of the node's
    /// memory (`0.25`) or 0 (docs/memory.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<Setting>,
    /// Thresholds, as fractions of the memory limit or `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_target: Option<Setting>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_spill: Option<Setting>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_pause: Option<Setting>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_terminate: Option<Setting>,
    /// Where workers spill; environment variables in it are expanded in the job, so that
    /// `$TMPDIR` is the node's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_directory: Option<String>,
}

/// A setting TOML may give as text, a number or a boolean (`memory_limit = "4GiB"` or
/// `0.25`, `memory_pause = false`); the job spec checks what it means.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    Text(String),
    // Integers before floats: `1` (bytes) and `1.0` (a fraction) are different limits.
    Integer(i64),
    Float(f64),
    Switch(bool),
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setting::Text(text) => f.write_str(text),
            Setting::Integer(n) => write!(f, "{n}"),
            Setting::Float(x) => write!(f, "{x:?}"),
            Setting::Switch(b) => write!(f, "{b}"),
        }
    }
}

/// The config file: named profiles and which one applies by default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    default_profile: Option<String>,
    #[serde(default)]
    profile: BTreeMap<String, Profile>,
}

/// Where a setting came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileSource {
    Default,
    Profile { name: String, file: PathBuf },
    Flag,
}

impl std::fmt::Display for ProfileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProfileSource::Default => f.write_str("default"),
            ProfileSource::Profile { name, file } => {
                write!(f, "profile {name} ({})", file.display())
            }
            ProfileSource::Flag => f.write_str("command line"),
        }
    }
}

/// The loaded config file (or none).
#[derive(Debug)]
pub struct Config {
    path: PathBuf,
    file: Option<ConfigFile>,
}

/// Merged settings and the source of each.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub settings: Profile,
    pub sources: BTreeMap<String, ProfileSource>,
    /// The profile used, if any.
    pub profile: Option<String>,
}

impl Config {
    /// Reads `$RANKMESH_CONFIG` (which must exist when set) or the user's config file (which
    /// may be absent).
    pub fn load() -> Result<Config, BatchError> {
        match std::env::var_os(CONFIG_ENV) {
            Some(path) => Config::read(Path::new(&path), true),
            None => Config::read(&default_path(), false),
        }
    }

    pub fn read(path: &Path, must_exist: bool) -> Result<Config, BatchError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Config {
                    path: path.into(),
                    file: None,
                })
            }
            Err(source) => {
                return Err(BatchError::File {
                    path: path.into(),
                    source,
                })
            }
        };
        let file: ConfigFile = toml::from_str(&text)
            .map_err(|e| BatchError::Config(format!("{}: {e}", path.display())))?;
        Ok(Config {
            path: path.into(),
            file: Some(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Layers defaults, the profile (`name`, else the file's default_profile) and `flags`.
    pub fn resolve(&self, name: Option<&str>, flags: &Profile) -> Result<Resolved, BatchError> {
        let name = name
            .map(str::to_owned)
            .or_else(|| self.file.as_ref()?.default_profile.clone());
        let mut layers = vec![(defaults(), ProfileSource::Default)];
        if let Some(name) = &name {
            layers.push((self.profile(name)?.clone(), self.source_of(name)));
        }
        layers.push((flags.clone(), ProfileSource::Flag));
        let mut merged = toml::Table::new();
        let mut sources = BTreeMap::new();
        for (layer, source) in layers {
            for (key, value) in to_table(&layer)? {
                merged.insert(key.clone(), value);
                sources.insert(key, source.clone());
            }
        }
        let settings = toml::Value::Table(merged)
            .try_into()
            .map_err(|e| BatchError::Config(format!("cannot merge settings: {e}")))?;
        Ok(Resolved {
            settings,
            sources,
            profile: name,
        })
    }

    fn profile(&self, name: &str) -> Result<&Profile, BatchError> {
        let Some(file) = &self.file else {
            return Err(BatchError::Config(format!(
                "unknown profile '{name}': there is no config file at {} (set {CONFIG_ENV} \
                 to use another)",
                self.path.display()
            )));
        };
        file.profile.get(name).ok_or_else(|| {
            let known: Vec<&str> = file.profile.keys().map(String::as_str).collect();
            BatchError::Config(format!(
                "unknown profile '{name}' in {} (it has: {})",
                self.path.display(),
                if known.is_empty() {
                    "no profiles".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })
    }

    fn source_of(&self, name: &str) -> ProfileSource {
        ProfileSource::Profile {
            name: name.into(),
            file: self.path.clone(),
        }
    }
}

/// What a job gets when neither profile nor flag says otherwise.
fn defaults() -> Profile {
    Profile {
        system: Some("auto".into()),
        nodes: Some(1),
        ntasks_per_node: Some(2),
        walltime: Some("01:00:00".into()),
        job_name: Some("rankmesh".into()),
        ..Profile::default()
    }
}

fn to_table(profile: &Profile) -> Result<toml::Table, BatchError> {
    match toml::Value::try_from(profile) {
        Ok(toml::Value::Table(table)) => Ok(table),
        Ok(_) => Err(BatchError::Config("a profile must be a table".into())),
        Err(e) => Err(BatchError::Config(e.to_string())),
    }
}

fn default_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".config"));
    base.join("rankmesh").join("config.toml")
}

pub(crate) fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

impl Resolved {
    /// `key = value  # source` lines, one per set value, in the settings' order.
    pub fn show(&self) -> Result<String, BatchError> {
        let mut out = String::new();
        if let Some(name) = &self.profile {
            out.push_str(&format!("# profile: {name}\n"));
        }
        for (key, value) in to_table(&self.settings)? {
            let source = self
                .sources
                .get(&key)
                .map_or_else(String::new, ToString::to_string);
            let line = format!("{key} = {value}");
            out.push_str(&format!("{line:<40} # {source}\n"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> (tempfile::TempDir, Result<Config, BatchError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::read(&path, true);
        (dir, config)
    }

    const SITE: &str = r#"
default_profile = "cpu"
[profile.cpu]
system = "slurm"
partition = "compute"
nodes = 2
modules = ["openmpi/4.1"]
[profile.big]
nodes = 8
walltime = "12:00:00"
"#;

    #[test]
    fn flags_override_the_profile_which_overrides_defaults() {
        let (_dir, config) = config(SITE);
        let config = config.unwrap();
        let flags = Profile {
            nodes: Some(3),
            ..Profile::default()
        };
        let resolved = config.resolve(None, &flags).unwrap();
        assert_eq!(resolved.profile.as_deref(), Some("cpu"));
        assert_eq!(resolved.settings.nodes, Some(3));
        assert_eq!(resolved.sources["nodes"], ProfileSource::Flag);
        assert_eq!(resolved.settings.partition.as_deref(), Some("compute"));
        assert!(matches!(
            &resolved.sources["partition"],
            ProfileSource::Profile { name, .. } if name == "cpu"
        ));
        assert_eq!(resolved.settings.walltime.as_deref(), Some("01:00:00"));
        assert_eq!(resolved.sources["walltime"], ProfileSource::Default);
        let shown = resolved.show().unwrap();
        assert!(shown.contains("nodes = 3"), "{shown}");
        assert!(shown.contains("# command line"), "{shown}");
        assert!(shown.contains("# profile cpu ("), "{shown}");
    }

    #[test]
    fn a_named_profile_replaces_the_default_one() {
        let (_dir, config) = config(SITE);
        let resolved = config
            .unwrap()
            .resolve(Some("big"), &Profile::default())
            .unwrap();
        assert_eq!(resolved.settings.nodes, Some(8));
        assert_eq!(resolved.settings.partition, None);
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        let (dir, config) = config("[profile.cpu]\npartitoin = \"x\"\n");
        let error = config.unwrap_err().to_string();
        assert!(error.contains("partitoin"), "{error}");
        assert!(
            error.contains(&dir.path().join("config.toml").display().to_string()),
            "{error}"
        );
        let (_dir, config) = config_top_level();
        assert!(config.unwrap_err().to_string().contains("profiles"));
    }

    fn config_top_level() -> (tempfile::TempDir, Result<Config, BatchError>) {
        config("[profiles.cpu]\nnodes = 1\n")
    }

    #[test]
    fn an_unknown_profile_lists_the_known_ones() {
        let (_dir, config) = config(SITE);
        let error = config
            .unwrap()
            .resolve(Some("gpu"), &Profile::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown profile 'gpu'"), "{error}");
        assert!(error.contains("big, cpu"), "{error}");
    }

    #[test]
    fn a_profile_without_a_config_file_says_where_it_looked() {
        let config = Config::read(Path::new("/nonexistent/rankmesh.toml"), false).unwrap();
        let error = config
            .resolve(Some("cpu"), &Profile::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/rankmesh.toml"), "{error}");
        assert!(Config::read(Path::new("/nonexistent/rankmesh.toml"), true).is_err());
    }
}
