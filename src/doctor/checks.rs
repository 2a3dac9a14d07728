//! The doctor's checks, one function per part of the environment.

use super::{mpi_probe, run_within, Check, Status};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// How long a batch tool or `ompi_info` may take to answer.
const TOOL_DEADLINE: Duration = Duration::from_secs(15);
/// Below this many descriptors a process may open, a large cluster runs out: each worker
/// holds a connection to the scheduler and to the peers it fetches from.
const LOW_OPEN_FILES: u64 = 4096;
/// Less free space than this where results are spilled or shared is worth a warning.
const LOW_SPACE: u64 = 1 << 30;

/// What this binary was built with.
pub fn build() -> Check {
    let features: Vec<&str> = [
        ("mpi", cfg!(feature = "mpi")),
        ("hwloc", cfg!(feature = "hwloc")),
        ("batch", cfg!(feature = "batch")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let binary = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Check::new(
        "build",
        Status::Ok,
        format!(
            "rankmesh {} with {}",
            env!("CARGO_PKG_VERSION"),
            features.join(", ")
        ),
    )
    .fact("features", features)
    .fact("binary", binary)
}

/// The MPI library, started as `rankmesh run` starts it, in a child process.
pub fn mpi(rankmesh: &Path, required: bool) -> Check {
    if !cfg!(feature = "mpi") {
        return Check::new(
            "mpi",
            Check::missing(required),
            "this rankmesh was built without MPI: `rankmesh run` cannot start",
        )
        .hint(
            "load your site's MPI module and reinstall (`pip install .` finds it through \
             mpicc or pkg-config); see docs/install.md",
        );
    }
    // Under a launcher the probe is this process, one rank of the launch (a child would
    // claim the same rank); alone, a child starts MPI as a singleton.
    let probed = if crate::launch::under_mpi_launcher() {
        mpi_probe::probe().ok_or_else(|| "built without MPI".to_string())
    } else {
        mpi_probe::run(rankmesh)
    };
    match probed {
        Ok(probe) => {
            let status = if probe.threading_suffices {
                Status::Ok
            } else {
                Status::Warn
            };
            let check = Check::new(
                "mpi",
                status,
                format!(
                    "{} (MPI {}), threading {} granted",
                    probe.library.split(',').next().unwrap_or_default(),
                    probe.standard,
                    probe.threading
                ),
            )
            .fact("library", probe.library)
            .fact("standard", probe.standard)
            .fact("threading", probe.threading)
            .fact("processes", probe.processes)
            .fact("launched", crate::launch::under_mpi_launcher());
            if probe.threading_suffices {
                check
            } else {
                check.hint(
                    "rankmesh needs MPI_THREAD_SERIALIZED for worker data over MPI; with \
                     less it moves worker data over TCP (an MPI built with thread support \
                     grants it)",
                )
            }
        }
        Err(why) => Check::new("mpi", Check::missing(required), "MPI does not start here")
            .fact("error", why)
            .hint(
                "check that the MPI module loaded at run time is the one rankmesh was \
                 built against, and try `mpirun -n 2 rankmesh doctor` inside a job",
            ),
    }
}

/// Open MPI's transports: what is installed, what somebody chose, what `run` adds.
pub fn open_mpi(library: &str, ucx_required: bool) -> Option<Check> {
    #[cfg(feature = "mpi")]
    {
        if !library.contains("Open MPI") {
            return None;
        }
        let components = ompi_components();
        let has = |framework: &str, name: &str| {
            components
                .iter()
                .any(|(f, n)| f.as_str() == framework && n.as_str() == name)
        };
        let list = |framework: &str| -> Vec<String> {
            components
                .iter()
                .filter(|(f, _)| f.as_str() == framework)
                .map(|(_, n)| n.clone())
                .collect()
        };
        let explained = crate::launch::open_mpi::explain_this_node();
        let ucx_built = has("pml", "ucx");
        // Sites (and Debian's own parameter file) may exclude it: `pml=^ucx`, or a list
        // without it.
        let ucx_excluded = explained
            .chosen
            .iter()
            .find(|(name, _)| name == "pml")
            .is_some_and(|(_, value)| {
                let value = value.trim();
                let named = value
                    .trim_start_matches('^')
                    .split(',')
                    .any(|c| c.trim() == "ucx");
                if value.starts_with('^') {
                    named
                } else {
                    !named
                }
            });
        let ucx = ucx_built && !ucx_excluded;
        let ucx_version = run_within(
            {
                let mut command = Command::new("ucx_info");
                command.arg("-v");
                command
            },
            TOOL_DEADLINE,
        )
        .ok()
        .and_then(|ran| {
            ran.stdout
                .lines()
                .find(|l| l.contains("Version"))
                .map(|l| l.trim_start_matches(['#', ' ']).to_string())
        });
        let chosen: Vec<String> = explained
            .chosen
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        let added: Vec<String> = explained
            .settings
            .iter()
            .map(|s| format!("{}={} ({})", s.name, s.value, s.why))
            .collect();
        let status = if ucx || !ucx_required {
            Status::Ok
        } else {
            Status::Fail
        };
        let mut check = Check::new(
            "open_mpi",
            status,
            format!(
                "PMLs {}; BTLs {}; UCX {}",
                list("pml").join(","),
                list("btl").join(","),
                match (ucx_built, ucx_excluded) {
                    (false, _) => "not built in",
                    (true, true) => "built in, excluded by the pml parameter",
                    (true, false) => "available",
                }
            ),
        )
        .fact("pml", list("pml"))
        .fact("btl", list("btl"))
        .fact("mtl", list("mtl"))
        .fact("ucx", ucx)
        .fact("ucx_built_in", ucx_built)
        .fact("fabric_devices", explained.fabric_devices)
        .fact("chosen", chosen)
        .fact("rankmesh_run_adds", added);
        if let Some(version) = ucx_version {
            check = check.fact("ucx_info", version);
        }
        if !ucx && ucx_required {
            check = check.hint(if ucx_built {
                "the pml parameter excludes UCX (see `chosen`): set OMPI_MCA_pml=ucx in the \
                 job script"
            } else {
                "this Open MPI has no UCX PML: load an Open MPI module built with UCX \
                 (ompi_info lists `pml: ucx`)"
            });
        }
        Some(check)
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = (library, ucx_required);
        None
    }
}

/// (framework, component) pairs `ompi_info --parsable` lists.
#[cfg(feature = "mpi")]
fn ompi_components() -> Vec<(String, String)> {
    let mut command = Command::new("ompi_info");
    command.arg("--parsable");
    let Ok(ran) = run_within(command, TOOL_DEADLINE) else {
        return Vec::new();
    };
    let mut found: Vec<(String, String)> = ran
        .stdout
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            match (fields.next(), fields.next(), fields.next(), fields.next()) {
                (Some("mca"), Some(framework), Some(component), Some("version")) => {
                    Some((framework.to_string(), component.to_string()))
                }
                _ => None,
            }
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The node as hwloc sees it, and where `rankmesh run` would put its workers by default.
pub fn topology(required: bool, gpu_required: bool) -> Check {
    #[cfg(feature = "hwloc")]
    {
        use crate::topology::{self, Source, WorkerPer};
        let node = match topology::read(&Source::ThisMachine) {
            Ok(node) => node,
            Err(e) => {
                return Check::new(
                    "topology",
                    Check::missing(required || gpu_required),
                    "hwloc cannot read this node",
                )
                .fact("error", e.to_string())
            }
        };
        let per = WorkerPer::Numa;
        let plan =
            topology::place_count(&node, per).and_then(|ranks| topology::plan(&node, ranks, per));
        let places: Vec<String> = match &plan {
            Ok(places) => places
                .iter()
                .map(|place| {
                    format!(
                        "{} threads on cpus {}, numa {:?}, gpus {:?}",
                        place.threads(),
                        topology::cpu_list(&place.pus),
                        place.numa_nodes,
                        place.gpus
                    )
                })
                .collect(),
            Err(e) => vec![format!("no plan: {e}")],
        };
        let gpus = node.gpus.len();
        let status = if gpu_required && gpus == 0 {
            Status::Fail
        } else {
            Status::Ok
        };
        let check = Check::new(
            "topology",
            status,
            format!(
                "{} packages, {} NUMA nodes, {} cores, {} CPUs, {gpus} GPUs; by default {} \
                 worker ranks per node (--worker-per numa)",
                node.packages,
                node.numa_nodes.len(),
                node.cores.len(),
                node.pu_count(),
                places.len()
            ),
        )
        .fact("packages", node.packages)
        .fact("numa_nodes", node.numa_nodes.len())
        .fact("cores", node.cores.len())
        .fact("cpus", node.pu_count())
        .fact("gpus", gpus)
        .fact("default_plan", places);
        if status == Status::Fail {
            check.hint("hwloc sees no GPU here: run the doctor on a GPU node (inside a job)")
        } else {
            check
        }
    }
    #[cfg(not(feature = "hwloc"))]
    {
        Check::new(
            "topology",
            Check::missing(required || gpu_required),
            "this rankmesh was built without hwloc: workers are neither placed nor bound",
        )
        .hint("install hwloc's development files (pkg-config hwloc) and reinstall")
    }
}

/// The batch systems' commands, and the job this runs in, if any.
pub fn batch(slurm_required: bool, pbs_required: bool) -> Check {
    let version = |tool: &str| -> Option<String> {
        let mut command = Command::new(tool);
        command.arg("--version");
        let ran = run_within(command, TOOL_DEADLINE)
            .ok()
            .filter(|ran| ran.status.success())?;
        let text = if ran.stdout.trim().is_empty() {
            ran.stderr
        } else {
            ran.stdout
        };
        Some(text.lines().next().unwrap_or_default().trim().to_string())
    };
    let found = |tool: &str| {
        which(tool).map(|path| version(tool).unwrap_or_else(|| path.display().to_string()))
    };
    let (slurm, pbs) = (found("sbatch"), found("qsub"));
    let job: Vec<String> = [
        "SLURM_JOB_ID",
        "SLURM_JOB_NUM_NODES",
        "SLURM_NTASKS",
        "SLURM_CPUS_ON_NODE",
        "SLURM_TMPDIR",
        "PBS_JOBID",
        "PBS_NODEFILE",
    ]
    .iter()
    .filter_map(|name| Some(format!("{name}={}", std::env::var(name).ok()?)))
    .collect();
    let missing_required = (slurm_required && slurm.is_none()) || (pbs_required && pbs.is_none());
    let status = if missing_required {
        Status::Fail
    } else if slurm.is_none() && pbs.is_none() {
        Status::Warn
    } else {
        Status::Ok
    };
    let summary = match (&slurm, &pbs) {
        (Some(s), Some(p)) => format!("SLURM ({s}) and PBS ({p}) commands"),
        (Some(s), None) => format!("SLURM ({s})"),
        (None, Some(p)) => format!("PBS ({p})"),
        (None, None) => "no batch system here (no sbatch, no qsub)".into(),
    };
    let summary = if job.is_empty() {
        summary
    } else {
        format!("{summary}; inside a job")
    };
    let check = Check::new("batch", status, summary)
        .fact("slurm", slurm.unwrap_or_default())
        .fact("pbs", pbs.unwrap_or_default())
        .fact("job", job);
    if status == Status::Ok {
        check
    } else {
        check.hint(
            "`rankmesh submit` needs sbatch (SLURM) or qsub (PBS) on PATH: run it on a login \
             node, or load the batch system's module",
        )
    }
}

/// The shared-memory base (/dev/shm, or `$RANKMESH_SHM_BASE`): where workers keep results
/// that executors on the node share, and whether its tmpfs gives them huge pages.
pub fn shared_memory() -> Check {
    let base = crate::store::shm_base();
    let why = "workers keep results there for their executors: without it they cannot start \
               (set $RANKMESH_SHM_BASE to another tmpfs folder)";
    // Where the host takes free memory back, executors get numpy's 4 KiB pages; elsewhere,
    // malloc's heap on huge pages (memory.md).
    let check = folder_check("shared_memory", &base, why).fact(
        "free_page_reporting",
        crate::topology::page_reporting::active(),
    );
    if let Err(e) = crate::private_files::check_base(&base) {
        return Check {
            status: Status::Fail,
            ..check
        }
        .fact("error", e.to_string())
        .hint(why);
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let shmem_enabled =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default();
    let Some((mount_point, huge)) = mount_of(&mountinfo, &base).and_then(|mount| {
        let huge = huge_pages(mount.kind, mount.options, &shmem_enabled)?;
        Some((mount.point, huge))
    }) else {
        return check.fact("huge_pages", "not a tmpfs");
    };
    let check = Check {
        summary: format!("{}, huge pages: {huge}", check.summary),
        ..check.fact("huge_pages", huge)
    };
    match huge {
        "within_size" | "always" => check,
        _ => check.hint(format!(
            "its tmpfs gives 4 KiB pages to files written: mounted with huge=within_size (an \
             administrator's `mount -o remount,huge=within_size {}`), results move between \
             processes on the node several times faster (docs/memory.md)",
            mount_point.display()
        )),
    }
}

/// How a mount of file-system `kind` with super-block `options` gives files huge pages
/// (its `huge=` option, unless the kernel's `shmem_enabled` denies or forces them for all),
/// or None when it is not a tmpfs.
fn huge_pages(kind: &str, options: &str, shmem_enabled: &str) -> Option<&'static str> {
    if kind != "tmpfs" {
        return None;
    }
    if shmem_enabled.contains("[deny]") {
        return Some("never");
    }
    if shmem_enabled.contains("[force]") {
        return Some("always");
    }
    let huge = options.split(',').find_map(|o| o.strip_prefix("huge="));
    Some(match huge {
        Some("always") => "always",
        Some("within_size") => "within_size",
        Some("advise") => "advise",
        _ => "never",
    })
}

/// A line of /proc/self/mountinfo.
struct Mount<'a> {
    point: std::path::PathBuf,
    kind: &'a str,
    source: &'a str,
    options: &'a str,
}

/// The mount `folder` is on. The last of the longest mount points above it is the one on
/// top.
fn mount_of<'a>(mountinfo: &'a str, folder: &Path) -> Option<Mount<'a>> {
    let folder = std::fs::canonicalize(folder).unwrap_or_else(|_| folder.to_path_buf());
    mountinfo
        .lines()
        .filter_map(|line| {
            // id parent major:minor root point options [optional...] - type source options
            let mut fields = line.split(' ');
            let point = fields.nth(4)?.replace("\\040", " ");
            let mut after = fields.skip_while(|field| *field != "-").skip(1);
            Some(Mount {
                point: std::path::PathBuf::from(point),
                kind: after.next()?,
                source: after.next()?,
                options: after.next().unwrap_or(""),
            })
        })
        .filter(|mount| folder.starts_with(&mount.point))
        .max_by_key(|mount| mount.point.as_os_str().len())
}

/// Whether the ext4 on block device `source` has a journal, as the kernel says
/// (`/sys/fs/ext4/<device>/journal_task` reads `<none>` without one); None if unknown.
fn ext4_has_journal(source: &str) -> Option<bool> {
    let device = std::fs::canonicalize(source).ok()?;
    let name = device.file_name()?.to_str()?;
    let task = std::fs::read_to_string(format!("/sys/fs/ext4/{name}/journal_task")).ok()?;
    Some(task.trim() != "<none>")
}

/// Where workers spill results by default.
pub fn local_directory() -> Check {
    let folder = crate::worker::local_directory_default();
    let check = folder_check(
        "local_directory",
        &folder,
        "workers spill there: pass --local-directory a writable node-local folder",
    );
    match network_file_system(&folder) {
        Some(kind) if check.status == Status::Ok => Check {
            status: Status::Warn,
            ..check
        }
        .fact("file_system", kind)
        .hint(format!(
            "{} is on {kind}, shared with other nodes: spilling there is slow and loads the \
             file system; set $TMPDIR or --local-directory to a node-local disk",
            folder.display()
        )),
        _ if check.status == Status::Ok => journal_hint(check, &folder),
        _ => check,
    }
}

/// Notes an ext4 without a journal: its inode allocator skips the inodes deleted in the
/// last minutes one by one on each create, and spilling makes and removes a file per
/// result (docs/memory.md).
fn journal_hint(check: Check, folder: &Path) -> Check {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(mount) = mount_of(&mountinfo, folder).filter(|mount| mount.kind == "ext4") else {
        return check;
    };
    match ext4_has_journal(mount.source) {
        Some(false) => check.fact("file_system", "ext4 without a journal").hint(
            "spill files are made slowly there once many were removed (an ext4 without a \
             journal): a journaled ext4 or XFS local disk spills faster (docs/memory.md)",
        ),
        _ => check,
    }
}

/// The open-file limit a worker or scheduler gets.
pub fn open_files() -> Check {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Check::new(
            "open_files",
            Status::Warn,
            "cannot read the open-file limit",
        );
    }
    let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
    let status = if soft < LOW_OPEN_FILES {
        Status::Warn
    } else {
        Status::Ok
    };
    let check = Check::new(
        "open_files",
        status,
        format!("{soft} open files allowed (hard limit {hard})"),
    )
    .fact("soft", soft)
    .fact("hard", hard);
    if status == Status::Warn {
        check.hint(format!(
            "a scheduler of many workers needs more: `ulimit -n {hard}` in the job script \
             (up to the hard limit)"
        ))
    } else {
        check
    }
}

/// A folder rankmesh writes private files into: there, writable, with space left.
fn folder_check(name: &'static str, folder: &Path, why: &str) -> Check {
    let writable = tempfile::Builder::new()
        .prefix(".rankmesh-doctor-")
        .tempfile_in(folder)
        .map(drop);
    let space = free_space(folder);
    let summary = match space {
        Some((total, free)) => {
            format!("{}: {} free of {}", folder.display(), gib(free), gib(total))
        }
        None => format!("{}: cannot read its size", folder.display()),
    };
    let mut check =
        Check::new(name, Status::Ok, summary).fact("path", folder.display().to_string());
    if let Some((total, free)) = space {
        check = check.fact("total_bytes", total).fact("free_bytes", free);
    }
    match writable {
        Err(e) => Check {
            status: Status::Fail,
            ..check
        }
        .fact("error", e.to_string())
        .hint(why),
        Ok(()) if space.is_some_and(|(_, free)| free < LOW_SPACE) => Check {
            status: Status::Warn,
            ..check
        }
        .hint(format!("less than {} free: {why}", gib(LOW_SPACE))),
        Ok(()) => check,
    }
}

/// (total, available) bytes of the file system holding `folder`.
fn free_space(folder: &Path) -> Option<(u64, u64)> {
    let path = std::ffi::CString::new(folder.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes only the struct it is given; `path` is a valid C string.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    let unit = stats.f_frsize;
    Some((stats.f_blocks * unit, stats.f_bavail * unit))
}

/// The name of the shared file system `folder` is on, if it is one.
fn network_file_system(folder: &Path) -> Option<&'static str> {
    const KINDS: [(i64, &str); 5] = [
        (0x6969, "NFS"),
        (0x0BD0_0BD0, "Lustre"),
        (0x4750_4653, "GPFS"),
        (0x0102_1997, "9P"),
        (0xFE53_4D42, "SMB2"),
    ];
    let path = std::ffi::CString::new(folder.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes only the struct it is given; `path` is a valid C string.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    let kind = stats.f_type as i64;
    KINDS
        .iter()
        .find(|(magic, _)| *magic == kind)
        .map(|(_, name)| *name)
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(tool))
            .find(|candidate| candidate.is_file())
    })
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
25 22 0:23 / /dev rw - devtmpfs devtmpfs rw,size=10k
26 25 0:24 / /dev/shm rw,relatime shared:3 - tmpfs tmpfs rw,size=100k
40 26 0:30 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=100k,huge=within_size
41 22 0:31 / /scratch/fast\\040shm rw - tmpfs tmpfs rw,huge=advise
";

    /// What the check reads for `folder`: how the tmpfs it is on gives huge pages.
    fn tmpfs_huge_pages(mountinfo: &str, enabled: &str, folder: &str) -> Option<&'static str> {
        let mount = mount_of(mountinfo, Path::new(folder))?;
        huge_pages(mount.kind, mount.options, enabled)
    }

    #[test]
    fn the_tmpfs_on_top_says_how_it_gives_huge_pages() {
        let on = |folder: &str, enabled: &str| tmpfs_huge_pages(MOUNTINFO, enabled, folder);
        let madvise = "always within_size advise [never] deny force";
        assert_eq!(on("/dev/shm/a-worker", madvise), Some("within_size"));
        assert_eq!(on("/scratch/fast shm/x", madvise), Some("advise"));
        assert_eq!(on("/scratch/fast", madvise), None, "on the root's ext4");
        assert_eq!(on("/dev/null", madvise), None, "devtmpfs is not tmpfs");
        assert_eq!(on("/dev/shm", "always [deny] force"), Some("never"));
        assert_eq!(
            on("/scratch/fast shm", "never deny [force]"),
            Some("always")
        );
        let older = MOUNTINFO.replace("40 26", "#");
        let older = older
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(tmpfs_huge_pages(&older, madvise, "/dev/shm"), Some("never"));
        let shm = mount_of(MOUNTINFO, Path::new("/dev/shm/x")).unwrap();
        assert_eq!(
            (shm.point.as_path(), shm.source),
            (Path::new("/dev/shm"), "tmpfs")
        );
        let root = mount_of(MOUNTINFO, Path::new("/scratch/fast")).unwrap();
        assert_eq!((root.kind, root.source), ("ext4", "/dev/vda"));
    }
}
