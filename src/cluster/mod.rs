//! Starting clusters: the scheduler file that tells clients where to connect, the local
//! cluster, and the process hygiene every child needs (no orphans).

pub mod local;
mod scheduler_file;

pub use scheduler_file::{SchedulerFile, SCHEDULER_FILE_ENV};

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
