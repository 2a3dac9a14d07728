//! The batch systems' outputs, parsed: squeue, scontrol and qstat through Debian's
//! slurm-wlm-torque recorded from the local SLURM (scripts/local-slurm.sh); sacct, PBS Pro's
//! and Torque's `qstat -f` (and Torque's XML `qstat -x`) written in the formats their
//! documentation shows.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup should panic loudly

use rankmesh::batch::pbs::{parse_qstat_full, parse_qstat_xml};
use rankmesh::batch::slurm::{parse_sacct, parse_sbatch, parse_scontrol, parse_squeue};
use rankmesh::batch::{JobState, JobStatus};

fn data(name: &str) -> String {
    let path = format!("{}/tests/data/batch/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// (id, state, exit code) of each job.
fn summary(statuses: &[JobStatus]) -> Vec<(&str, JobState, Option<i32>)> {
    statuses
        .iter()
        .map(|s| (s.id.as_str(), s.state.clone(), s.exit_code))
        .collect()
}

#[test]
fn sbatch_parsable_gives_the_id_with_or_without_a_cluster() {
    assert_eq!(parse_sbatch("42\n").as_deref(), Some("42"));
    assert_eq!(parse_sbatch("42;cluster2\n").as_deref(), Some("42"));
    assert_eq!(parse_sbatch("Submitted batch job 42\n"), None);
}

#[test]
fn squeue_gives_states_reasons_and_nodes_but_no_exit_codes() {
    let jobs = parse_squeue(&data("squeue.txt")).unwrap();
    assert_eq!(
        summary(&jobs),
        [
            ("6", JobState::Cancelled, None),
            ("3", JobState::Failed, None),
            ("12", JobState::Failed, None),
            ("16", JobState::Pending(Some("JobHeldUser".into())), None),
            ("17", JobState::Running, None),
        ]
    );
    assert_eq!(jobs[4].nodes.as_deref(), Some("vm"));
    assert_eq!(jobs[3].nodes.as_deref(), Some("1 node(s)"));
    assert_eq!(jobs[4].name.as_deref(), Some("runner"));
    assert!(parse_squeue("1|RUNNING\n").is_err());
}

#[test]
fn sacct_gives_exit_codes_and_keeps_pipes_in_names() {
    let jobs = parse_sacct(&data("sacct.txt")).unwrap();
    assert_eq!(
        summary(&jobs),
        [
            ("4182", JobState::Completed, Some(0)),
            ("4183", JobState::Failed, Some(5)),
            ("4184", JobState::Cancelled, Some(143)),
            ("4185", JobState::Timeout, Some(0)),
            ("4186", JobState::Pending(None), None),
            ("4187", JobState::Failed, Some(75)),
        ]
    );
    assert_eq!(jobs[3].name.as_deref(), Some("long|run"));
    assert_eq!(jobs[0].nodes.as_deref(), Some("node[01-02]"));
    assert_eq!(jobs[4].nodes, None);
    // The drain exit code is recognized where the status is final.
    assert_eq!(
        jobs[5].clone().with_drain_recognized().state,
        JobState::Drained
    );
}

#[test]
fn scontrol_show_job_keeps_finished_jobs_with_exit_codes() {
    let jobs = parse_scontrol(&data("scontrol_show_job.txt"));
    assert_eq!(
        summary(&jobs),
        [
            ("3", JobState::Failed, Some(75)),
            ("6", JobState::Cancelled, Some(143)),
            ("16", JobState::Pending(Some("JobHeldUser".into())), None),
            ("17", JobState::Running, None),
        ]
    );
    assert_eq!(jobs[0].elapsed.as_deref(), Some("00:00:23"));
    assert_eq!(jobs[0].nodes.as_deref(), Some("vm"));
    assert_eq!(jobs[2].nodes, None); // NodeList=(null) while pending
}

#[test]
fn pbs_pro_qstat_f_running_and_queued() {
    let jobs = parse_qstat_full(&data("pbspro_qstat_f.txt"));
    assert_eq!(
        summary(&jobs),
        [
            ("1234.pbsserver", JobState::Running, None),
            (
                "1235.pbsserver",
                JobState::Pending(Some(
                    "Not Running: Insufficient amount of resource: ncpus".into()
                )),
                None
            ),
        ]
    );
    assert_eq!(jobs[0].nodes.as_deref(), Some("node01/0*4+node02/0*4"));
    assert_eq!(jobs[0].elapsed.as_deref(), Some("00:01:42"));
}

#[test]
fn pbs_pro_job_history_gives_exit_codes_and_signals() {
    let jobs = parse_qstat_full(&data("pbspro_qstat_xf.txt"));
    assert_eq!(
        summary(&jobs),
        [
            ("1230.pbsserver", JobState::Failed, Some(5)),
            // 271 = 256 + SIGTERM: qdel'ed (rankmesh's record says it cancelled it).
            ("1231.pbsserver", JobState::Failed, Some(143)),
            ("1232.pbsserver", JobState::Completed, Some(0)),
        ]
    );
}

#[test]
fn torque_qstat_f_completed_and_held() {
    let jobs = parse_qstat_full(&data("torque_qstat_f.txt"));
    assert_eq!(
        summary(&jobs),
        [
            ("5678.torque-server.cluster", JobState::Drained, Some(75)),
            ("5679.torque-server.cluster", JobState::Pending(None), None),
        ]
    );
    assert_eq!(jobs[0].nodes.as_deref(), Some("n001/0-3+n002/0-3"));
}

#[test]
fn torque_qstat_x_xml_says_what_qstat_f_says() {
    // The same two jobs as torque_qstat_f.txt, in the XML Torque prints for `qstat -x`.
    let xml = parse_qstat_xml(&data("torque_qstat_x.xml")).unwrap();
    let text = parse_qstat_full(&data("torque_qstat_f.txt"));
    assert_eq!(summary(&xml), summary(&text));
    assert_eq!(xml[0].elapsed.as_deref(), Some("00:00:31"));
    assert_eq!(xml[0].nodes.as_deref(), Some("n001/0-3+n002/0-3"));
    assert_eq!(xml[1].name.as_deref(), Some("held"));
    let broken = parse_qstat_xml("<Data><Job><Job_Id>1</Job_Id>").unwrap_err();
    assert!(broken.to_string().contains("qstat -x"), "{broken}");
}

#[test]
fn slurm_torque_wrapper_qstat_f_has_no_exit_status() {
    let jobs = parse_qstat_full(&data("slurm_torque_qstat_f.txt"));
    assert_eq!(
        summary(&jobs),
        [
            ("17", JobState::Running, None),
            ("16", JobState::Pending(None), None),
            // Finished, exit code unknown: rankmesh's exit-code file completes it.
            ("12", JobState::Other("finished".into()), None),
        ]
    );
    assert_eq!(jobs[0].name.as_deref(), Some("runner"));
}
