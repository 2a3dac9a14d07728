//! Golden job scripts: each profile in tests/data/batch/profiles.toml rendered for one
//! script, compared with tests/data/batch/NAME.golden.sh. After an intended template
//! change: `UPDATE_GOLDEN=1 cargo test --test batch_golden`, then review the diff.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup should panic loudly

use rankmesh::batch::render::SubmitEnv;
use rankmesh::batch::{render, Config, JobSpec, Profile, System};
use std::path::{Path, PathBuf};

const WORKDIR: &str = "/home/alice/project";

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/batch")
}

/// The script as rendered in the data folder, with that folder shown as WORKDIR.
fn rendered(profile: Option<&str>, system: System, flags: Profile) -> String {
    let config = Config::read(&data_dir().join("profiles.toml"), true).unwrap();
    let resolved = config.resolve(profile, &flags).unwrap();
    let env = SubmitEnv {
        workdir: data_dir(),
        rankmesh: "/opt/rankmesh/bin/rankmesh".into(),
        python: "/home/alice/.venv/bin/python3".into(),
        state_dir: "/home/alice/.local/state/rankmesh/jobs".into(),
        stamp: "1700000000-4242".into(),
        umask: 0o022,
    };
    let script = [
        "analysis.py".to_owned(),
        "--year".into(),
        "2020 2021".into(),
    ];
    let spec = JobSpec::new(&resolved, system, &script, &env).unwrap();
    render(&spec)
        .unwrap()
        .replace(&data_dir().display().to_string(), WORKDIR)
}

fn check(name: &str, text: &str) {
    let path = data_dir().join(format!("{name}.golden.sh"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    assert_eq!(
        text, golden,
        "{name}: the rendered script differs from {path:?}"
    );
}

#[test]
fn slurm_with_defaults() {
    check(
        "slurm_defaults",
        &rendered(None, System::Slurm, Profile::default()),
    );
}

#[test]
fn slurm_site_profile_with_modules_venv_and_every_resource() {
    check(
        "slurm_site",
        &rendered(Some("site"), System::Slurm, Profile::default()),
    );
}

#[test]
fn slurm_conda_profile_with_its_own_launcher_flags_and_a_flag_override() {
    let flags = Profile {
        nodes: Some(2),
        ..Profile::default()
    };
    check(
        "slurm_conda",
        &rendered(Some("conda"), System::Slurm, flags),
    );
}

/// The srun line of a SLURM job rendered with `launcher`.
fn slurm_launch_line(launcher: &str) -> String {
    let flags = Profile {
        launcher: Some(launcher.into()),
        ..Profile::default()
    };
    let script = rendered(None, System::Slurm, flags);
    let line = script.lines().find(|l| l.starts_with(launcher));
    line.unwrap_or_else(|| panic!("no line starts with {launcher}:\n{script}"))
        .to_owned()
}

#[test]
fn srun_ends_the_step_when_a_rank_fails_and_other_launchers_get_no_srun_flag() {
    for srun in ["srun", "/usr/bin/srun"] {
        let line = slurm_launch_line(srun);
        assert!(line.contains(" --kill-on-bad-exit=1 --mpi=pmix"), "{line}");
    }
    for other in ["mpirun", "/opt/openmpi/bin/mpiexec"] {
        let line = slurm_launch_line(other);
        assert!(!line.contains("kill-on-bad-exit"), "{line}");
    }
}

#[test]
fn pbs_pro_select_syntax() {
    check(
        "pbspro",
        &rendered(Some("pbspro"), System::Pbs, Profile::default()),
    );
}

#[test]
fn torque_nodes_syntax() {
    check(
        "torque",
        &rendered(Some("torque"), System::Pbs, Profile::default()),
    );
}
