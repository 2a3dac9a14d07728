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
