//! When an executor reports its finished tasks: a few together, at most
//! [`EXECUTOR_REPORT_INTERVAL`] after the oldest ended. Pure state: the executor's link
//! (`python/src/reports.rs`) passes the time in and sends what `ReportComm` is given.

use super::{TaskOutcome, EXECUTOR_REPORT_INTERVAL};
use std::time::Instant;

/// Where a report goes: the worker's link, or a recording fake in tests.
pub trait ReportComm {
    fn report(&mut self, outcomes: Vec<TaskOutcome>);
}

/// Results kept for the next report, each with when it was kept.
#[derive(Debug, Default)]
pub struct ReportQueue {
    kept: Vec<(Instant, TaskOutcome)>,
    /// When a result was kept last: the reporter watches for one interval after it before
    /// it sleeps until woken (a wake-up per report would cost what keeping them saves).
    last_kept: Option<Instant>,
}

/// What the reporter thread does next.
#[derive(Debug, PartialEq, Eq)]
pub enum ReporterNext {
    /// The oldest result is due: report what is kept.
    Report,
    /// Look again then.
    LookAt(Instant),
    /// Nothing kept lately: sleep until a result is.
    SleepUntilKept,
}

impl ReportQueue {
    /// Tasks ended at `now`.
    pub fn results_kept(&mut self, outcomes: Vec<TaskOutcome>, now: Instant) {
        self.kept.extend(outcomes.into_iter().map(|o| (now, o)));
        self.last_kept = Some(now);
    }

    /// Reports everything kept, each result with how long it waited.
    pub fn report(&mut self, now: Instant, comm: &mut impl ReportComm) {
        if self.kept.is_empty() {
            return;
        }
        let outcomes = self
            .kept
            .drain(..)
            .map(|(kept_at, outcome)| TaskOutcome {
                report_delay_us: now.duration_since(kept_at).as_micros() as u64,
                ..outcome
            })
            .collect();
        comm.report(outcomes);
    }

    pub fn reporter_next(&self, now: Instant) -> ReporterNext {
        if let Some((oldest, _)) = self.kept.first() {
            let due = *oldest + EXECUTOR_REPORT_INTERVAL;
            return match now >= due {
                true => ReporterNext::Report,
                false => ReporterNext::LookAt(due),
            };
        }
        match self.last_kept.map(|last| last + EXECUTOR_REPORT_INTERVAL) {
            Some(until) if until > now => ReporterNext::LookAt(until),
            _ => ReporterNext::SleepUntilKept,
        }
    }

    pub fn sanity_check(&self) {
        assert!(
            self.kept.windows(2).all(|w| w[0].0 <= w[1].0),
            "kept in the order they ended"
        );
        if let Some((newest, _)) = self.kept.last() {
            assert_eq!(Some(*newest), self.last_kept, "the newest is the last kept");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode, encode, FromExecutor, ObjectRef, TaskId};
    use bytes::Bytes;
    use std::time::Duration;

    /// Records reports as the worker reads them: through the real codec.
    #[derive(Default)]
    struct RecordingComm {
        reports: Vec<Vec<(TaskId, u64)>>,
    }

    impl ReportComm for RecordingComm {
        fn report(&mut self, outcomes: Vec<TaskOutcome>) {
            let bytes = encode(&FromExecutor::Results(outcomes)).expect("encodes");
            let Ok(FromExecutor::Results(read)) = decode(&bytes) else {
                panic!("a report reads back as results");
            };
            let read = read.iter().map(|o| (o.id, o.report_delay_us)).collect();
            self.reports.push(read);
        }
    }

    fn ended(id: u64) -> Vec<TaskOutcome> {
        vec![TaskOutcome {
            id: TaskId(id),
            duration_us: 3000,
            report_delay_us: 0,
            result: Ok(ObjectRef::Inline {
                data: Bytes::from_static(b"x"),
                layout: vec![1],
            }),
        }]
    }

    #[test]
    fn results_go_together_with_how_long_each_waited_and_the_reporter_then_sleeps() {
        let (t0, ms) = (Instant::now(), Duration::from_millis);
        let (mut queue, mut comm) = (ReportQueue::default(), RecordingComm::default());
        assert_eq!(queue.reporter_next(t0), ReporterNext::SleepUntilKept);
        queue.report(t0, &mut comm);
        assert!(comm.reports.is_empty(), "nothing kept, nothing sent");
        queue.results_kept(ended(1), t0);
        queue.results_kept(ended(2), t0 + ms(4));
        queue.sanity_check();
        assert_eq!(
            queue.reporter_next(t0 + ms(4)),
            ReporterNext::LookAt(t0 + ms(10))
        );
        assert_eq!(queue.reporter_next(t0 + ms(10)), ReporterNext::Report);
        queue.report(t0 + ms(10), &mut comm);
        queue.sanity_check();
        assert_eq!(
            comm.reports,
            [vec![(TaskId(1), 10_000), (TaskId(2), 6_000)]]
        );
        // Watching one interval after the last result kept, then asleep.
        assert_eq!(
            queue.reporter_next(t0 + ms(10)),
            ReporterNext::LookAt(t0 + ms(14))
        );
        assert_eq!(
            queue.reporter_next(t0 + ms(14)),
            ReporterNext::SleepUntilKept
        );
    }

    #[test]
    fn an_executor_about_to_wait_reports_at_once() {
        let t0 = Instant::now();
        let (mut queue, mut comm) = (ReportQueue::default(), RecordingComm::default());
        queue.results_kept(ended(7), t0);
        queue.report(t0, &mut comm);
        queue.sanity_check();
        assert_eq!(comm.reports, [vec![(TaskId(7), 0)]]);
        queue.report(t0, &mut comm);
        assert_eq!(comm.reports.len(), 1, "each result once");
    }
}
