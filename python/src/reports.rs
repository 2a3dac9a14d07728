//! Results an executor keeps for one report, the thread that sends them when due, and the
//! writer every message of the executor goes by.

use crate::{ConnectionLost, RankmeshError};
use pyo3::prelude::*;
use rankmesh::protocol::{
    BlockingFrameWriter, FromExecutor, TaskOutcome, EXECUTOR_REPORT_INTERVAL,
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

impl From<SendError> for PyErr {
    fn from(e: SendError) -> PyErr {
        match e {
            SendError::Poisoned => RankmeshError::new_err("link poisoned"),
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
    /// Each with when it was kept, for its `report_delay_us`.
    outcomes: Vec<(Instant, TaskOutcome)>,
    /// When the oldest of `outcomes` was kept: they are due an interval later.
    since: Option<Instant>,
    /// When a result was kept last: the reporter watches for one interval after it before
    /// it sleeps until woken (a wake-up per report would cost what keeping them saves).
    last_kept: Option<Instant>,
    reporter_sleeps: bool,
    /// Why the reporter could not send (the worker is gone); the next call raises it.
    failed: Option<String>,
    closed: bool,
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
        let now = Instant::now();
        kept.outcomes.extend(outcomes.into_iter().map(|o| (now, o)));
        kept.since.get_or_insert(now);
        kept.last_kept = Some(now);
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
        let outcomes = {
            let mut kept = self.kept.lock()?;
            if let Some(why) = &kept.failed {
                return Err(SendError::Lost(why.clone()));
            }
            kept.since = None;
            std::mem::take(&mut kept.outcomes)
        };
        if outcomes.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let outcomes = outcomes
            .into_iter()
            .map(|(kept_at, outcome)| TaskOutcome {
                report_delay_us: now.duration_since(kept_at).as_micros() as u64,
                ..outcome
            })
            .collect();
        writer
            .send(&FromExecutor::Results(outcomes))
            .map_err(|e| SendError::Lost(e.to_string()))
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
            let wait_until = match kept.since {
                Some(since) if now >= since + EXECUTOR_REPORT_INTERVAL => {
                    drop(kept);
                    let sent = self.send_kept();
                    let Ok(relocked) = self.kept.lock() else {
                        return;
                    };
                    kept = relocked;
                    match sent {
                        Ok(()) => {}
                        Err(SendError::Lost(why)) => kept.failed = Some(why),
                        Err(SendError::Poisoned) => kept.failed = Some("link poisoned".into()),
                    }
                    continue;
                }
                Some(since) => Some(since + EXECUTOR_REPORT_INTERVAL),
                None => kept
                    .last_kept
                    .map(|last| last + EXECUTOR_REPORT_INTERVAL)
                    .filter(|&until| until > now),
            };
            kept = match wait_until {
                Some(until) => match self.kept_one.wait_timeout(kept, until - now) {
                    Ok((kept, _)) => kept,
                    Err(_) => return,
                },
                None => {
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
