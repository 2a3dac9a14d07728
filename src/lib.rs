//! rankmesh: runs Dask graphs on HPC clusters with a Rust scheduler and Rust workers.
//!
//! # Layout
//! - [`protocol`]: messages, framing, ids and the token handshake every connection
//!   starts with.
//! - [`scheduler`]: the task-graph state machine (no I/O, effects through `Comm`) and the
//!   server around it.
//! - [`worker`]: the worker's state machine (no I/O, effects through `WorkerComm`), its
//!   runtime, and executor supervision.
//! - [`store`]: task results in memory and shared memory, and where fetched objects are
//!   written (`Allocate`).
//! - [`transport`]: how results move between processes (TCP, MPI point-to-point) and how
//!   every TCP server accepts connections (`listen`).
//! - [`dashboard`]: the scheduler's HTTP port: live status page and metrics, from
//!   scheduler snapshots.
//! - [`cluster`]: scheduler files, the local cluster (`rankmesh local`), a scheduler on
//!   its own, hosting a script.
//! - [`launch`]: inside an MPI job (`mpirun rankmesh run`): rank roles and bootstrap.
//! - [`topology`]: hwloc topology, the placement plan of worker ranks, binding.
//! - [`batch`] (feature `batch`): job scripts, submission to SLURM and PBS, job records.
//! - [`private_files`]: files and folders only their owner can use (everything rankmesh
//!   creates on disk or in shared memory).
//! - [`doctor`]: `rankmesh doctor`, what this machine and environment offer rankmesh.
//! - [`heap`]: giving freed heap memory back to the system.
//! - [`process`]: what every child process needs (dying with its parent).
//!
//! The `rankmesh` binary (`src/main.rs`, feature `cli`) parses arguments and calls these.

#[cfg(feature = "batch")]
pub mod batch;
pub mod cluster;
pub mod dashboard;
pub mod doctor;
pub mod heap;
pub mod launch;
pub mod private_files;
pub mod process;
pub mod protocol;
pub mod scheduler;
pub mod store;
pub mod topology;
pub mod transport;
pub mod worker;
