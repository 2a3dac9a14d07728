//! Applies a planned place to this process: CPU binding for all of its threads (inherited
//! by the executors it starts later) and memory binding to the place's NUMA nodes.
//!
//! A launcher may have bound the rank already (`srun --cpu-bind`, `mpirun --bind-to`): the
//! rank then runs on fewer CPUs than the node allows it. That binding is kept rather than
//! overridden, and a warning says when it differs from the plan.

use super::{cpu_list, NodeTopology, Place};
use hwlocality::bitmap::BitmapIndex;
use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
use hwlocality::memory::nodeset::NodeSet;
use hwlocality::Topology;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot read this process's CPU binding: {0}")]
    Query(String),
    #[error("cannot bind this process to CPUs {cpus}: {reason}")]
    Cpu { cpus: String, reason: String },
}

/// What to do with the binding a rank started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing bound the rank: bind it to the planned place.
    Apply(Place),
    /// The launcher bound the rank: keep its CPUs. `place` is the plan's place cut to
    /// them; `conflicts` says the launcher's CPUs are not the plan's.
    Keep { place: Place, conflicts: bool },
}

/// Decides between the plan and a launcher's binding. `current` is the rank's CPU
/// affinity and `allowed` what the node allows it (OS numbers, any order).
pub fn decide(
    topology: &NodeTopology,
    planned: Place,
    current: &[usize],
    allowed: &[usize],
) -> Decision {
    let sorted = |cpus: &[usize]| {
        let mut cpus = cpus.to_vec();
        cpus.sort_unstable();
        cpus.dedup();
        cpus
    };
    let current = sorted(current);
    if current == sorted(allowed) {
        return Decision::Apply(planned);
    }
    let conflicts = sorted(&planned.pus) != current;
    let mut place = Place::of_cores(
        topology,
        topology.cores_within(&current),
        planned.gpus,
        planned.shared,
    );
    // The launcher may have bound single hardware threads of a core: those are the CPUs.
    place.pus = current;
    Decision::Keep { place, conflicts }
}

/// Binds this process to `planned`, or keeps a launcher's binding (with a warning when it
/// conflicts with the plan). Returns the place the process ends up on.
pub fn bind_this_process(
    hwloc: &Topology,
    topology: &NodeTopology,
    planned: Place,
) -> Result<Place, BindError> {
    let current = hwloc
        .cpu_binding(CpuBindingFlags::PROCESS)
        .map_err(|e| BindError::Query(e.to_string()))?;
    let current: Vec<usize> = current.iter_set().map(usize::from).collect();
    let allowed: Vec<usize> = hwloc.allowed_cpuset().iter_set().map(usize::from).collect();
    match decide(topology, planned, &current, &allowed) {
        Decision::Keep { place, conflicts } => {
            if conflicts {
                tracing::warn!(
                    "the launcher bound this rank to CPUs {}, not to the plan's; keeping the \
                     launcher's binding (start with `mpirun --bind-to none` or \
                     `srun --cpu-bind=none` to bind by the plan)",
                    place.cpu_list()
                );
            } else {
                tracing::info!(cpus = %place.cpu_list(), "the launcher's binding matches the plan");
            }
            Ok(place)
        }
        Decision::Apply(place) => {
            let cpus: CpuSet = bitmap_indexes(&place.pus).collect();
            hwloc
                .bind_cpu(&cpus, CpuBindingFlags::PROCESS)
                .map_err(|e| BindError::Cpu {
                    cpus: cpu_list(&place.pus),
                    reason: e.to_string(),
                })?;
            let nodes: NodeSet = bitmap_indexes(&place.numa_nodes).collect();
            // Memory policy is per thread, inherited by threads and processes started
            // later: the runtime's threads and the executors.
            if let Err(e) = hwloc.bind_memory(
                &nodes,
                MemoryBindingPolicy::Bind,
                MemoryBindingFlags::THREAD,
            ) {
                tracing::warn!("memory stays unbound (the OS refused NUMA binding: {e})");
            }
            tracing::info!(cpus = %place.cpu_list(), "bound to the planned place");
            Ok(place)
        }
    }
}

fn bitmap_indexes(numbers: &[usize]) -> impl Iterator<Item = BitmapIndex> + '_ {
    // OS numbers come from hwloc's own bitmaps, so every one converts.
    numbers
        .iter()
        .filter_map(|&n| BitmapIndex::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{plan, Core, NumaNode, WorkerPer};

    fn two_cores() -> NodeTopology {
        NodeTopology {
            packages: 1,
            numa_nodes: vec![NumaNode {
                os_index: 0,
                memory: 0,
            }],
            cores: (0..2)
                .map(|c| Core {
                    package: 0,
                    numa: 0,
                    pus: vec![c],
                })
                .collect(),
            gpus: vec![],
        }
    }

    #[test]
    fn an_unbound_rank_takes_the_plan() {
        let topology = two_cores();
        let planned = plan(&topology, 2, WorkerPer::Core).unwrap().remove(1);
        assert_eq!(
            decide(&topology, planned.clone(), &[1, 0], &[0, 1]),
            Decision::Apply(planned)
        );
    }

    #[test]
    fn a_launchers_binding_is_kept_and_a_conflict_reported() {
        let topology = two_cores();
        let planned = plan(&topology, 2, WorkerPer::Core).unwrap().remove(1);
        match decide(&topology, planned.clone(), &[0], &[0, 1]) {
            Decision::Keep { place, conflicts } => {
                assert!(conflicts);
                assert_eq!((place.cores, place.pus), (vec![0], vec![0]));
            }
            other => panic!("expected Keep, got {other:?}"),
        }
        assert!(matches!(
            decide(&topology, planned, &[1], &[0, 1]),
            Decision::Keep {
                conflicts: false,
                ..
            }
        ));
    }
}
