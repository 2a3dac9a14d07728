//! A worker: holds task results, fetches missing inputs from peers, and runs tasks on its
//! executors. `run` is the whole process; `Worker` is its event loop's state.

pub mod executor;
pub mod store;
mod worker_loop;

pub use worker_loop::{run, run_with, ExecutorKind, WorkerConfig, WorkerError};
