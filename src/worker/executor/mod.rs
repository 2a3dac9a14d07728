//! Executors run task code for a worker. Python executors are child processes the worker
//! starts and watches; shell executors run command lines. Both report through the same
//! event channel, so the worker loop treats them alike.

mod python;
mod shell;

pub use python::{executor_id, PythonExecutor, PythonExecutorConfig};
pub use shell::ShellExecutor;

use crate::protocol::{
    BorrowFailure, FuncId, FunctionBlob, LoanToCopy, ObjectRef, Plugin, RunTask, TaskOutcome,
};
use crate::store::ProcessMemory;
use std::sync::Arc;
use tokio::sync::mpsc;

/// What executors tell the worker loop. `generation` counts restarts of a slot: events and
/// work from an earlier generation are stale.
#[derive(Debug)]
pub enum ExecutorEvent {
    Ready {
        slot: usize,
        generation: u64,
        /// Its process (0 for an executor that is not one), whose memory the worker counts.
        pid: u32,
        /// Its memory, where the worker may copy results out of it (`ObjectRef::Held`).
        memory: Option<Arc<ProcessMemory>>,
    },
    Results {
        slot: usize,
        outcomes: Vec<TaskOutcome>,
    },
    /// A lent result copied into the executor ([`Executor::borrow`]), or why not.
    Borrowed {
        slot: usize,
        request: u64,
        outcome: Result<ObjectRef, BorrowFailure>,
    },
    /// The executor died (crashed, was killed, or was restarted for the worker's memory);
    /// everything it had in flight is lost. A new generation follows.
    Died {
        slot: usize,
        reason: String,
        /// Where Python was when it crashed, if it could say (a fatal signal it caught).
        traceback: String,
        /// Generations in a row, this one included, that ended before they were ready (a
        /// Python that cannot import rankmesh, say); 0 when this one had been ready.
        failed_starts: u32,
    },
}

pub type EventSender = mpsc::UnboundedSender<ExecutorEvent>;

pub trait Executor: Send {
    /// Queues work for the executor's current generation; never blocks.
    fn run(&mut self, generation: u64, functions: Vec<FunctionBlob>, tasks: Vec<RunTask>);

    /// Drops functions no task uses any more (they are sent again if one does).
    fn release_functions(&mut self, generation: u64, ids: Vec<FuncId>);

    /// Ends this generation (it is reported `Died` with `reason`, and replaced).
    fn restart(&mut self, generation: u64, reason: String);

    /// Sets worker plugins up and tears them down, before the work queued after this.
    fn plugins(&mut self, generation: u64, setup: Vec<Plugin>, teardown: Vec<String>);

    /// Results in files were let go: the executor stops mapping those it kept mapped, and
    /// drops the results it holds under the `held` keys.
    fn objects_released(&mut self, generation: u64, held: Vec<u64>);

    /// The executor keeps its results (from a few KiB) in its memory (the worker can copy
    /// them out), or sends and writes them (`hold` false).
    fn hold_results(&mut self, generation: u64, hold: bool);

    /// The worker needs memory back: the executor gives back what it keeps only to go
    /// faster (freed heap).
    fn drop_reserves(&mut self, generation: u64);

    /// Copies a result a peer's executor lends into this one, which keeps it; answered
    /// with [`ExecutorEvent::Borrowed`].
    fn borrow(&mut self, generation: u64, copy: LoanToCopy);
}
