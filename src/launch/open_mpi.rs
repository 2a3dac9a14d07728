//! Open MPI settings (MCA parameters) that rankmesh fills in for its own ranks before
//! `MPI_Init`, where nobody else chose them: not the user's environment, not the launcher
//! (`mpirun --mca` arrives as `OMPI_MCA_*` variables), not a parameter file.
//!
//! - `pml = ^cm` on a node with no fabric the cm PML drives (InfiniBand/RoCE, Omni-Path,
//!   Slingshot, Aries): Open MPI would settle on ob1 there anyway, but first opens the
//!   libfabric, PSM and PSM2 libraries to find out, a quarter of a second of every
//!   rank's `MPI_Init` on the test VM (0.42 s → 0.16 s to a barrier under `mpirun -np 4`).
//!   It changes no decision, only what the decision costs.
//! - `btl_vader_single_copy_mechanism = none`: on-node messages go through vader's shared
//!   buffers, copied in and out by both ranks at once, instead of one `process_vm_readv`
//!   copy. rankmesh's objects live in shared memory of 4 KiB pages, which the single copy
//!   pins page by page: 64 MiB moved at 4.3 GB/s that way on the test VM, at 7.7 GB/s
//!   copied in and out (docs/mpi.md has the measurements).
//! - `btl_vader_max_send_size = 131072`: where messages are copied in and out, they go in
//!   fragments of this size instead of 32 KiB; a quarter of the fragments to hand over,
//!   and 64 MiB between two workers moved 9-12% faster on the test VM. Each rank's vader
//!   segment keeps its size (4 MiB), so this costs no memory.
//! - `mpi_yield_when_idle = 0`: with more ranks than cores Open MPI yields the core in
//!   every MPI call that finds nothing to do, and a worker's progress thread tests its
//!   transfers in such calls. Beside two busy loops on the test VM one 64 MiB transfer
//!   over ob1 took 0.69-1.0 s yielding, 0.0063 s not. The progress thread sleeps on its
//!   own when nothing moves (docs/mpi.md), so MPI's yield buys nothing.
//!
//! Only Open MPI 4 reads these names (Open MPI 5 renamed its shared-memory transport);
//! MPICH ignores `OMPI_MCA_*`. `rankmesh run --no-mpi-tuning` sets nothing.

use std::path::{Path, PathBuf};

/// A parameter rankmesh sets, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The MCA parameter name (the variable is `OMPI_MCA_{name}`).
    pub name: &'static str,
    pub value: String,
    pub why: &'static str,
}

/// What the choice depends on, read from the node and the environment.
#[derive(Clone, Debug, Default)]
struct Circumstances {
    /// `MPI_Get_library_version`'s text.
    library: String,
    /// High-speed network devices found on this node (names, for the log).
    fabric_devices: Vec<String>,
    /// MCA parameters somebody set, with their values: `OMPI_MCA_*` variables first
    /// (they win over files, as in Open MPI), then parameter-file entries.
    chosen: Vec<(String, String)>,
}

/// Fabric devices show up here: RDMA devices (InfiniBand, RoCE, EFA, iWARP) in the class
/// folder, Omni-Path (hfi1), QLogic (ipath), Slingshot (cxi) and Aries (kgni) in /dev.
const RDMA_CLASS: &str = "/sys/class/infiniband";
const FABRIC_DEVICE_PREFIXES: [&str; 4] = ["hfi1", "ipath", "cxi", "kgni"];

impl Circumstances {
    /// Reads this node and this process's environment.
    fn of_this_node(library: String) -> Circumstances {
        let mut fabric_devices = entries(Path::new(RDMA_CLASS));
        fabric_devices.extend(
            entries(Path::new("/dev"))
                .into_iter()
                .filter(|name| FABRIC_DEVICE_PREFIXES.iter().any(|p| name.starts_with(p))),
        );
        let mut chosen: Vec<(String, String)> = std::env::vars()
            .filter_map(|(name, value)| Some((name.strip_prefix("OMPI_MCA_")?.into(), value)))
            .collect();
        for file in parameter_files() {
            if let Ok(text) = std::fs::read_to_string(&file) {
                chosen.extend(parameters(&text));
            }
        }
        Circumstances {
            library,
            fabric_devices,
            chosen,
        }
    }

    /// The value in effect for `name`, if somebody set it.
    fn chosen(&self, name: &str) -> Option<&str> {
        self.chosen
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The fragment size for large on-node messages (Open MPI's default is 32 KiB).
const LARGE_FRAGMENT: usize = 128 * 1024;

/// Whether an MCA component list excludes rather than selects (`^a,b`).
fn excludes(list: &str) -> bool {
    list.trim_start().starts_with('^')
}

/// The settings to make, given the circumstances.
fn choose(circumstances: &Circumstances) -> Vec<Setting> {
    if !circumstances.library.starts_with("Open MPI v4") {
        return Vec::new();
    }
    let mut settings = Vec::new();
    // Somebody who names the PMLs or MTLs to use made the choice; one who only excludes
    // some (Debian's own parameter file says `pml = ^ucx`) left it to Open MPI, and cm
    // joins the excluded.
    let pml = circumstances.chosen("pml");
    let selects_mtl = circumstances.chosen("mtl").is_some_and(|m| !excludes(m));
    let pml = match pml {
        None => Some("^cm".to_string()),
        Some(list) if excludes(list) && !list.split([',', '^']).any(|c| c.trim() == "cm") => {
            Some(format!("{},cm", list.trim()))
        }
        Some(_) => None,
    };
    if let (Some(value), true, false) = (pml, circumstances.fabric_devices.is_empty(), selects_mtl)
    {
        settings.push(Setting {
            name: "pml",
            value,
            why: "no fabric device on this node: skip opening the cm PML's fabric libraries",
        });
    }
    let copy_mechanism = circumstances.chosen("btl_vader_single_copy_mechanism");
    if copy_mechanism.is_none() {
        settings.push(Setting {
            name: "btl_vader_single_copy_mechanism",
            value: "none".into(),
            why: "objects in 4 KiB-page shared memory move faster copied in and out",
        });
    }
    let copies_in_and_out = copy_mechanism.is_none_or(|m| m.trim() == "none");
    if copies_in_and_out && circumstances.chosen("btl_vader_max_send_size").is_none() {
        settings.push(Setting {
            name: "btl_vader_max_send_size",
            value: LARGE_FRAGMENT.to_string(),
            why: "large messages copied in and out move faster in larger fragments",
        });
    }
    if circumstances.chosen("mpi_yield_when_idle").is_none() {
        settings.push(Setting {
            name: "mpi_yield_when_idle",
            value: "0".into(),
            why: "a busy node's transfers stall if every idle MPI call yields the core",
        });
    }
    settings
}

/// What `rankmesh doctor` shows: the node's fabric devices, the parameters somebody chose
/// (variables, then parameter files) and the settings `run` would add.
pub struct Explained {
    pub fabric_devices: Vec<String>,
    pub chosen: Vec<(String, String)>,
    pub settings: Vec<Setting>,
}

pub fn explain_this_node() -> Explained {
    let library = mpi::environment::library_version().unwrap_or_default();
    let circumstances = Circumstances::of_this_node(library);
    Explained {
        settings: choose(&circumstances),
        fabric_devices: circumstances.fabric_devices,
        chosen: circumstances.chosen,
    }
}

/// The settings to make on this node, given this process's environment.
pub fn for_this_node() -> Vec<Setting> {
    let library = mpi::environment::library_version().unwrap_or_default();
    choose(&Circumstances::of_this_node(library))
}

/// Sets the chosen parameters in this process's environment, where Open MPI reads them.
/// Call before `MPI_Init` and before any thread that reads the environment starts.
pub fn apply(settings: &[Setting]) {
    for setting in settings {
        std::env::set_var(format!("OMPI_MCA_{}", setting.name), &setting.value);
        tracing::info!(
            parameter = setting.name,
            value = setting.value,
            "Open MPI setting: {}",
            setting.why
        );
    }
}

fn entries(folder: &Path) -> Vec<String> {
    std::fs::read_dir(folder)
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The parameter files Open MPI reads: those `mca_base_param_files` names, else the
/// user's and the installation's.
fn parameter_files() -> Vec<PathBuf> {
    if let Ok(list) = std::env::var("OMPI_MCA_mca_base_param_files") {
        return std::env::split_paths(&list).collect();
    }
    let mut files = vec![PathBuf::from("/etc/openmpi/openmpi-mca-params.conf")];
    if let Some(home) = std::env::var_os("HOME") {
        files.push(Path::new(&home).join(".openmpi/mca-params.conf"));
    }
    if let Some(prefix) = std::env::var_os("OPAL_PREFIX") {
        files.push(Path::new(&prefix).join("etc/openmpi-mca-params.conf"));
    }
    files
}

/// What a parameter file sets (`name = value` lines; `#` starts a comment).
fn parameters(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .filter(|(name, _)| !name.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(library: &str, devices: &[&str], chosen: &[(&str, &str)]) -> Vec<(&'static str, String)> {
        let circumstances = Circumstances {
            library: library.into(),
            fabric_devices: devices.iter().map(|d| d.to_string()).collect(),
            chosen: chosen
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        };
        choose(&circumstances)
            .into_iter()
            .map(|s| (s.name, s.value))
            .collect()
    }

    const OPEN_MPI_4: &str = "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4";
    const COPY: (&str, &str) = ("btl_vader_single_copy_mechanism", "none");
    const FRAGMENT: (&str, &str) = ("btl_vader_max_send_size", "131072");
    const NO_YIELD: (&str, &str) = ("mpi_yield_when_idle", "0");

    /// These, then `NO_YIELD` (always, unless chosen).
    fn settings(expected: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        (expected.iter().chain([&NO_YIELD]))
            .map(|(n, v)| (*n, v.to_string()))
            .collect()
    }

    #[test]
    fn a_node_without_fabric_skips_the_cm_pml_and_copies_in_and_out() {
        assert_eq!(
            on(OPEN_MPI_4, &[], &[]),
            settings(&[("pml", "^cm"), COPY, FRAGMENT])
        );
    }

    #[test]
    fn a_node_with_a_fabric_keeps_open_mpis_pml_choice() {
        for device in ["mlx5_0", "hfi1_0", "cxi0"] {
            assert_eq!(on(OPEN_MPI_4, &[device], &[]), settings(&[COPY, FRAGMENT]));
        }
    }

    #[test]
    fn a_chosen_pml_or_mtl_is_kept_and_an_exclusion_extended() {
        assert_eq!(
            on(OPEN_MPI_4, &[], &[("pml", "ucx")]),
            settings(&[COPY, FRAGMENT])
        );
        assert_eq!(
            on(OPEN_MPI_4, &[], &[("mtl", "psm2")]),
            settings(&[COPY, FRAGMENT])
        );
        // Debian's own parameter file excludes ucx and ofi: that chooses nothing.
        assert_eq!(
            on(OPEN_MPI_4, &[], &[("pml", "^ucx"), ("mtl", "^ofi")]),
            settings(&[("pml", "^ucx,cm"), COPY, FRAGMENT])
        );
        assert_eq!(
            on(OPEN_MPI_4, &[], &[("pml", "^cm,ucx")]),
            settings(&[COPY, FRAGMENT])
        );
    }

    #[test]
    fn a_chosen_copy_mechanism_is_kept_and_fragments_follow_it() {
        let single_copy = [("btl_vader_single_copy_mechanism", "cma")];
        assert_eq!(
            on(OPEN_MPI_4, &[], &single_copy),
            settings(&[("pml", "^cm")])
        );
        let copy_in_out = [("btl_vader_single_copy_mechanism", "none")];
        let expected = settings(&[("pml", "^cm"), FRAGMENT]);
        assert_eq!(on(OPEN_MPI_4, &[], &copy_in_out), expected);
    }

    #[test]
    fn a_chosen_fragment_size_is_kept() {
        let chosen = [("btl_vader_max_send_size", "65536")];
        assert_eq!(
            on(OPEN_MPI_4, &[], &chosen),
            settings(&[("pml", "^cm"), COPY])
        );
    }

    #[test]
    fn a_chosen_yield_when_idle_is_kept() {
        let chosen = [("mpi_yield_when_idle", "1")];
        let mut expected = settings(&[("pml", "^cm"), COPY, FRAGMENT]);
        expected.pop();
        assert_eq!(on(OPEN_MPI_4, &[], &chosen), expected);
    }

    #[test]
    fn other_mpi_libraries_get_nothing() {
        assert!(on("Open MPI v5.0.3, package: Open MPI", &[], &[]).is_empty());
        assert!(on("MPICH Version:      4.0\nMPICH Release date: ...", &[], &[]).is_empty());
    }

    #[test]
    fn parameter_files_name_what_they_set() {
        let text =
            "# site defaults\npml = ^ucx\n  btl_vader_single_copy_mechanism=cma # fast\n\n=x\n";
        let expected = [("pml", "^ucx"), ("btl_vader_single_copy_mechanism", "cma")];
        let expected: Vec<_> = expected
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(parameters(text), expected);
    }
}
