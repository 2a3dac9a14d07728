//! Process hygiene every child needs: the cluster's workers and the workers' executors.

/// Makes the child die with its parent, so a killed worker or cluster leaves no orphan.
pub fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches nothing but the calling process.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The memory this process may use on its node: the machine's, or less where its cgroup
/// (a batch job's, a container's) caps it.
pub fn node_memory() -> u64 {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0);
    cgroup_memory_limit().map_or(machine, |cap| cap.min(machine))
}

/// A process's anonymous resident memory (`RssAnon`: heap, arrays, stacks). Left out:
/// shared memory (the worker counts its files once, mapped or not) and file pages
/// (libraries, mapped spilled results), which the kernel can drop and reread. The worker
/// and its executors share no anonymous pages (executors are exec'd, not forked), so this
/// is their PSS. 0 if it is gone.
///
/// Read from `statm`, whose counters cost nothing (`smaps_rollup`'s `Pss_Anon` walks every
/// page table, and took most of a worker's CPU at 20 samples a second with gigabytes
/// mapped), in one read: `status` (the same counter, as `RssAnon`) is 1.4 KB, which
/// `read_to_string` took in 8 reads after a stat, for each process at every sample.
pub fn anonymous_resident_bytes(pid: u32) -> u64 {
    use std::io::Read;
    let mut statm = [0u8; 256];
    let read = std::fs::File::open(format!("/proc/{pid}/statm"))
        .and_then(|mut file| file.read(&mut statm));
    let pages = read.ok().and_then(|n| anonymous_pages(&statm[..n]));
    pages.map_or(0, |pages| pages * page_size())
}

/// `statm`'s resident pages less its shared ones (file and shared-memory pages): the
/// anonymous ones.
fn anonymous_pages(statm: &[u8]) -> Option<u64> {
    let mut pages = std::str::from_utf8(statm).ok()?.split_ascii_whitespace();
    let resident: u64 = pages.nth(1)?.parse().ok()?;
    let shared: u64 = pages.next()?.parse().ok()?;
    Some(resident.saturating_sub(shared))
}

/// The size of a memory page.
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// The memory limit of this process's cgroup, v2 or v1, if it has one.
fn cgroup_memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read =
        |path: String| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let limit = match controllers {
            "" => read(format!("/sys/fs/cgroup{path}/memory.max")),
            c if c.split(',').any(|c| c == "memory") => {
                read(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
            }
            _ => None,
        };
        // "max" (v2) does not parse; v1's "no limit" is a huge number, which min() ignores.
        if limit.is_some() {
            return limit;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_memory_is_known_and_plausible() {
        let bytes = super::node_memory();
        assert!(bytes > 64 << 20 && bytes < 1 << 50, "{bytes}");
    }
}

/// For threads a library starts in someone else's process (the Python client's): blocks the
/// signals a program stops or steers by, so the kernel delivers them to a thread that does
/// not block them, the main one. Python runs its handlers in its main thread, but a signal
/// the kernel hands another thread does not wake the main thread from a blocking call: a
/// script in `time.sleep` went on sleeping through the SIGINT that `rankmesh local` sends
/// it to stop (test_cli's SIGTERM test, 1 run in about 30).
pub fn leave_signals_to_the_main_thread() {
    // SAFETY: a local signal set, filled, then applied to the calling thread alone.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGALRM,
        ] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[test]
fn a_thread_that_leaves_signals_to_the_main_thread_blocks_them() {
    let blocked = std::thread::spawn(|| {
        leave_signals_to_the_main_thread();
        // SAFETY: reads this thread's mask into a local set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
            [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1]
                .map(|signal| libc::sigismember(&set, signal) == 1)
        }
    });
    assert_eq!(blocked.join().unwrap(), [true; 3]);
}

#[test]
fn statm_s_anonymous_pages_are_its_resident_less_its_shared() {
    assert_eq!(
        anonymous_pages(b"31337 2500 900 120 0 5000 0\n"),
        Some(1600)
    );
    assert_eq!(anonymous_pages(b"31337 2500"), None, "cut short");
    assert_eq!(anonymous_pages(b"31337 x 900"), None);
    assert_eq!(anonymous_pages(b""), None);
}

#[test]
fn anonymous_resident_bytes_agree_with_status_s_rss_anon() {
    let rss_anon = |status: &str| -> u64 {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .unwrap();
        line.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    // 64 MiB touched, so the figure is far from any page a test thread touches meanwhile.
    let held = std::hint::black_box(vec![1u8; 64 << 20]);
    let before = rss_anon(&std::fs::read_to_string("/proc/self/status").unwrap());
    let read = anonymous_resident_bytes(std::process::id());
    let after = rss_anon(&std::fs::read_to_string("/proc/self/status").unwrap());
    let (low, high) = (before.min(after), before.max(after));
    assert!(
        read + (4 << 20) >= low && read <= high + (4 << 20),
        "statm gave {read}, status {before} then {after}"
    );
    assert!(read >= 64 << 20, "the 64 MiB held: {read}");
    drop(std::hint::black_box(held));
    assert_eq!(anonymous_resident_bytes(u32::MAX), 0, "no such process");
}
