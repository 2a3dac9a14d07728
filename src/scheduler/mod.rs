//! The scheduler: a task-graph state machine with no I/O in it.
//!
//! `state` holds tasks, workers and clients and reacts to events; what it wants sent is
//! handed to a [`Comm`], which the server (`server`) implements over sockets and tests
//! implement as a recorder. `placement` picks workers; `coordination` keeps the locks,
//! events, variables and queues clients share; `monitor` hands snapshots of the state to
//! the dashboard.

mod coordination;
pub mod monitor;
mod placement;
pub mod server;
mod state;

pub use state::{Departure, Scheduler, SchedulerConfig};

use crate::protocol::{ClientId, ToClient, ToWorker, WorkerId};

/// Outbound effects of the state machine. Implementations only queue: the state machine
/// calls these while it holds its own state, so they must not block.
pub trait Comm {
    fn send_worker(&mut self, worker: WorkerId, msg: ToWorker);
    fn send_client(&mut self, client: ClientId, msg: ToClient);
}
