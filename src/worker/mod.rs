//! A worker: holds task results, fetches missing inputs from peers, and runs tasks on its
//! executors. `WorkerState` is the state machine (no I/O, effects through `WorkerComm`);
//! `run` is the whole process around it.

pub mod executor;
mod memory;
mod memory_settings;
mod runtime;
mod state;

pub use memory::{MemoryLimit, MemoryPolicy, MemorySample, MemoryThresholds};
pub use memory_settings::Threshold;
pub use runtime::{
    local_directory_default, run, run_with, sweep_node, ExecutorKind, WorkerConfig, WorkerEnd,
    WorkerError, RETIRED_EXIT_CODE,
};
pub use state::{SpillOutcome, Stats, Wake, WorkerComm, WorkerSettings, WorkerState};
