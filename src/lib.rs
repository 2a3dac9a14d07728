//! rankmesh: runs Dask graphs on HPC clusters with a Rust scheduler and Rust workers.
//!
//! # Layout
//! - [`protocol`]: messages, framing and the token handshake every connection starts with.
//! - [`scheduler`]: the task-graph state machine (no I/O) and the server around it.
//! - [`worker`]: object store, peer data server and fetch, executor supervision.
//! - [`transport`]: how workers reach each other (TCP today).
//! - [`cluster`]: scheduler files, the local cluster (`rankmesh local`), hosting a script.
//! - [`topology`]: hwloc topology, the placement plan of worker ranks, binding.
//! - [`launch`]: inside an MPI job (`mpirun rankmesh run`): rank roles and bootstrap.
//! - [`batch`]: job scripts, submission to SLURM and PBS, job records.
//! - [`heap`]: giving freed heap memory back to the system.
//! - [`private_files`]: files and folders only their owner can use (everything rankmesh
//!   creates on disk or in shared memory).
//! - [`cli`]: the `rankmesh` command line.

pub mod batch;
pub mod cli;
pub mod cluster;
pub mod heap;
pub mod launch;
pub mod private_files;
pub mod protocol;
pub mod scheduler;
pub mod topology;
pub mod transport;
pub mod worker;
