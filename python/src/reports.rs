//! The executor's side of `ReportQueue`: the thread that sends reports when due, and the
//! writer every message of the executor goes by.

use crate::{ConnectionLost, RankmeshError};
use pyo3::prelude::*;
use rankmesh::protocol::{
    BlockingFrameWriter, FromExecutor, ReportComm, ReportQueue, ReporterNext, TaskOutcome,
};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Instant;

/// Why a send failed, without Python: the reporter thread sends too.
pub enum SendError {
    Poisoned,
    Lost(String),
}

impl<T> From<PoisonError<T>> for SendError {
    fn from(_: PoisonError<T>) -> Self {
        SendError::Poisoned
    }
}

impl SendError {
    const POISONED: &str = "link poisoned";

    /// Why, for the next call to raise once the reporter thread failed.
    fn reason(self) -> String {
        match self {
            SendError::Poisoned => Self::POISONED.into(),
            SendError::Lost(why) => why,
        }
    }
}

impl From<SendError> for PyErr {
    fn from(e: SendError) -> PyErr {
        match e {
            SendError::Poisoned => RankmeshError::new_err(SendError::POISONED),
            SendError::Lost(why) => ConnectionLost::new_err(why),
        }
    }
}

/// Everything the executor sends goes by `writer`, under its lock: a report and a
/// borrow's answer never interleave, and the reporter thread can send while the main
/// thread runs a task.
pub struct Reports {
    writer: Mutex<BlockingFrameWriter>,
    kept: Mutex<Kept>,
    /// Wakes the reporter thread when a result is kept while it sleeps.
    kept_one: Condvar,
}

#[derive(Default)]
struct Kept {
    queue: ReportQueue,
    reporter_sleeps: bool,
    /// Why the reporter could not send (the worker is gone); the next call raises it.
    failed: Option<String>,
    closed: bool,
}

/// The one report taken out of the queue, sent once its lock is let go.
#[derive(Default)]
struct Taken(Option<Vec<TaskOutcome>>);

impl ReportComm for Taken {
    fn report(&mut self, outcomes: Vec<TaskOutcome>) {
        self.0 = Some(outcomes);
    }
}

impl Reports {
    pub fn new(writer: BlockingFrameWriter) -> Self {
        Reports {
            writer: Mutex::new(writer),
            kept: Mutex::new(Kept::default()),
            kept_one: Condvar::new(),
        }
    }

    pub fn keep(&self, outcomes: Vec<TaskOutcome>) -> Result<(), SendError> {
        let mut kept = self.kept.lock()?;
        if let Some(why) = &kept.failed {
            return Err(SendError::Lost(why.clone()));
        }
        kept.queue.results_kept(outcomes, Instant::now());
        if kept.reporter_sleeps {
            self.kept_one.notify_one();
        }
        Ok(())
    }

    pub fn send(&self, message: &FromExecutor) -> Result<(), SendError> {
        let mut writer = self.writer.lock()?;
        writer
            .send(message)
            .map_err(|e| SendError::Lost(e.to_string()))
    }

    /// Sends the results kept, if any. The writer is taken first, so reports go in the
    /// order their results were kept.
    pub fn send_kept(&self) -> Result<(), SendError> {
        let mut writer = self.writer.lock()?;
        let mut taken = Taken::default();
        {
            let mut kept = self.kept.lock()?;
            if let Some(why) = &kept.failed {
                return Err(SendError::Lost(why.clone()));
            }
            kept.queue.report(Instant::now(), &mut taken);
        }
        match taken.0 {
            None => Ok(()),
            Some(outcomes) => writer
                .send(&FromExecutor::Results(outcomes))
                .map_err(|e| SendError::Lost(e.to_string())),
        }
    }

    /// The reporter thread: sends kept results once they are due, while the main thread
    /// may be running a long task. Ends when the link closes or a send fails.
    pub fn report_when_due(&self) {
        rankmesh::process::leave_signals_to_the_main_thread();
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        loop {
            if kept.closed || kept.failed.is_some() {
                return;
            }
            let now = Instant::now();
            kept = match kept.queue.reporter_next(now) {
                ReporterNext::Report => {
                    drop(kept);
                    let sent = self.send_kept();
                    let Ok(mut relocked) = self.kept.lock() else {
                        return;
                    };
                    if let Err(e) = sent {
                        relocked.failed = Some(e.reason());
                    }
                    relocked
                }
                ReporterNext::LookAt(until) => {
                    match self.kept_one.wait_timeout(kept, until - now) {
                        Ok((kept, _)) => kept,
                        Err(_) => return,
                    }
                }
                ReporterNext::SleepUntilKept => {
                    kept.reporter_sleeps = true;
                    let Ok(mut woken) = self.kept_one.wait(kept) else {
                        return;
                    };
                    woken.reporter_sleeps = false;
                    woken
                }
            };
        }
    }

    pub fn close(&self) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.closed = true;
            self.kept_one.notify_one();
        }
    }
}
