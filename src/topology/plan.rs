//! The placement plan: which cores, NUMA nodes and GPUs each worker rank on a node owns.
//!
//! The node is cut into places of the chosen kind (one per NUMA node, package, core, GPU,
//! or the whole node), then the ranks share them out so that together they cover the node
//! without overlapping:
//! - fewer ranks than places: each rank gets a run of neighbouring places (the first
//!   ranks one more when they do not divide evenly);
//! - more ranks than places: each place is split among its ranks by cores; only when a
//!   place has fewer cores than ranks do ranks share a core (marked [`Place::shared`]);
//!   likewise GPUs that outnumber the cores near them.
//!
//! Rank 0 of a job (scheduler and script) gets no place: the worker ranks on its node
//! cover the whole node, and rank 0 floats. Its work is mostly waiting on sockets.

use super::{cpu_list, NodeTopology};
use std::collections::BTreeMap;
use std::fmt;

/// What one worker is placed on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum WorkerPer {
    /// A NUMA node (memory domain): the default, since it decides memory bandwidth.
    Numa,
    /// A package (socket).
    Socket,
    /// A core (all of its hardware threads).
    Core,
    /// A GPU and the cores nearest to it.
    Gpu,
    /// The whole node.
    Node,
}

impl fmt::Display for WorkerPer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerPer::Numa => "numa",
            WorkerPer::Socket => "socket",
            WorkerPer::Core => "core",
            WorkerPer::Gpu => "gpu",
            WorkerPer::Node => "node",
        })
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("a placement plan needs at least one worker rank on the node")]
    NoRanks,
    #[error("the topology has no cores")]
    NoCores,
    #[error("--worker-per gpu, but the topology has no NVIDIA or AMD GPU")]
    NoGpus,
}

/// One worker rank's share of its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// Indexes into [`NodeTopology::cores`].
    pub cores: Vec<usize>,
    /// OS numbers of the cores' hardware threads: the CPU binding.
    pub pus: Vec<usize>,
    /// OS numbers of the NUMA nodes the cores are local to: the memory binding.
    pub numa_nodes: Vec<usize>,
    /// Indexes into [`NodeTopology::gpus`].
    pub gpus: Vec<usize>,
    /// Other ranks on the node were given some of these cores (more ranks than cores).
    pub shared: bool,
}

impl Place {
    /// The place made of `cores` (indexes into `topology.cores`).
    pub fn of_cores(
        topology: &NodeTopology,
        cores: Vec<usize>,
        gpus: Vec<usize>,
        shared: bool,
    ) -> Place {
        let pus = cores
            .iter()
            .flat_map(|&c| topology.cores[c].pus.iter().copied())
            .collect();
        let mut numa_nodes: Vec<usize> = cores
            .iter()
            .filter_map(|&c| topology.numa_nodes.get(topology.cores[c].numa))
            .map(|n| n.os_index)
            .collect();
        numa_nodes.sort_unstable();
        numa_nodes.dedup();
        Place {
            cores,
            pus,
            numa_nodes,
            gpus,
            shared,
        }
    }

    /// Worker threads (task slots) the place holds: one per core.
    pub fn threads(&self) -> u32 {
        self.cores.len().max(1) as u32
    }

    /// The CPU binding in the kernel's list format.
    pub fn cpu_list(&self) -> String {
        cpu_list(&self.pus)
    }
}

/// A part of the node of the chosen kind, before ranks are given out.
struct Unit {
    cores: Vec<usize>,
    gpus: Vec<usize>,
}

impl Unit {
    fn of_cores(cores: Vec<usize>) -> Unit {
        Unit {
            cores,
            gpus: Vec::new(),
        }
    }
}

/// Plans `ranks` worker ranks on a node with `topology`: one [`Place`] per rank, in the
/// order of the ranks' node-local index.
pub fn plan(
    topology: &NodeTopology,
    ranks: usize,
    per: WorkerPer,
) -> Result<Vec<Place>, PlanError> {
    if ranks == 0 {
        return Err(PlanError::NoRanks);
    }
    if topology.cores.is_empty() {
        return Err(PlanError::NoCores);
    }
    let units = units(topology, per)?;
    let places = if ranks <= units.len() {
        split_evenly(units.len(), ranks)
            .into_iter()
            .map(|range| {
                let group = &units[range];
                let mut cores: Vec<usize> =
                    group.iter().flat_map(|u| u.cores.iter().copied()).collect();
                // Units that share cores would list them twice.
                let mut seen = std::collections::HashSet::new();
                cores.retain(|&c| seen.insert(c));
                let gpus = group.iter().flat_map(|u| u.gpus.iter().copied()).collect();
                Place::of_cores(topology, cores, gpus, false)
            })
            .collect()
    } else {
        let ranks_per_unit = split_evenly(ranks, units.len());
        units
            .iter()
            .zip(ranks_per_unit)
            .flat_map(|(unit, its_ranks)| {
                share_cores(&unit.cores, its_ranks.len())
                    .into_iter()
                    .map(|cores| Place::of_cores(topology, cores, unit.gpus.clone(), false))
            })
            .collect()
    };
    Ok(mark_shared(places))
}

/// Marks the places that have a core in common with another place.
fn mark_shared(mut places: Vec<Place>) -> Vec<Place> {
    let mut holders = vec![
        0u32;
        places
            .iter()
            .flat_map(|p| &p.cores)
            .max()
            .map_or(0, |&c| c + 1)
    ];
    for &core in places.iter().flat_map(|p| &p.cores) {
        holders[core] += 1;
    }
    for place in &mut places {
        place.shared = place.cores.iter().any(|&c| holders[c] > 1);
    }
    places
}

/// How many places of kind `per` the node has: the natural number of worker ranks.
pub fn place_count(topology: &NodeTopology, per: WorkerPer) -> Result<usize, PlanError> {
    Ok(units(topology, per)?.len())
}

/// The node cut into parts of kind `per`, in hwloc's logical order.
fn units(topology: &NodeTopology, per: WorkerPer) -> Result<Vec<Unit>, PlanError> {
    let all_cores = 0..topology.cores.len();
    let group_by = |key: &dyn Fn(usize) -> usize| {
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for core in all_cores.clone() {
            groups.entry(key(core)).or_default().push(core);
        }
        groups.into_values().map(Unit::of_cores).collect()
    };
    Ok(match per {
        WorkerPer::Node => vec![Unit::of_cores(all_cores.collect())],
        WorkerPer::Socket => group_by(&|c| topology.cores[c].package),
        WorkerPer::Numa => group_by(&|c| topology.cores[c].numa),
        WorkerPer::Core => all_cores.map(|c| Unit::of_cores(vec![c])).collect(),
        WorkerPer::Gpu => gpu_units(topology)?,
    })
}

/// One unit per GPU. GPUs with the same locality (say, four behind one package) split
/// their local cores between them.
fn gpu_units(topology: &NodeTopology) -> Result<Vec<Unit>, PlanError> {
    if topology.gpus.is_empty() {
        return Err(PlanError::NoGpus);
    }
    let mut by_locality: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
    for (gpu, info) in topology.gpus.iter().enumerate() {
        // A GPU without locality information is near every core.
        let local = if info.local_cores.is_empty() {
            (0..topology.cores.len()).collect()
        } else {
            info.local_cores.clone()
        };
        match by_locality.iter_mut().find(|(cores, _)| *cores == local) {
            Some((_, gpus)) => gpus.push(gpu),
            None => by_locality.push((local, vec![gpu])),
        }
    }
    Ok(by_locality
        .into_iter()
        .flat_map(|(cores, gpus)| {
            share_cores(&cores, gpus.len())
                .into_iter()
                .zip(gpus)
                .map(|(cores, gpu)| Unit {
                    cores,
                    gpus: vec![gpu],
                })
                .collect::<Vec<_>>()
        })
        .collect())
}

/// Splits `0..items` into `parts` neighbouring ranges whose lengths differ by at most one,
/// the longer ones first. `parts` must be at least 1.
fn split_evenly(items: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let (base, extra) = (items / parts, items % parts);
    let mut start = 0;
    (0..parts)
        .map(|part| {
            let len = base + usize::from(part < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// Gives `cores` out to `ranks` ranks: disjoint runs when there are enough cores, else one
/// core each, round robin (those ranks share cores).
fn share_cores(cores: &[usize], ranks: usize) -> Vec<Vec<usize>> {
    if cores.len() >= ranks {
        split_evenly(cores.len(), ranks)
            .into_iter()
            .map(|range| cores[range].to_vec())
            .collect()
    } else {
        (0..ranks)
            .map(|rank| vec![cores[rank % cores.len()]])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Core, Gpu, GpuVendor, NumaNode};

    /// `packages` × `numa_per_package` × `cores_per_numa`, 2 hardware threads per core
    /// numbered like Linux does (the second threads after all first ones).
    fn node(packages: usize, numa_per_package: usize, cores_per_numa: usize) -> NodeTopology {
        let numa_count = packages * numa_per_package;
        let core_count = numa_count * cores_per_numa;
        NodeTopology {
            packages,
            numa_nodes: (0..numa_count)
                .map(|os_index| NumaNode {
                    os_index,
                    memory: 1 << 30,
                })
                .collect(),
            cores: (0..core_count)
                .map(|c| Core {
                    package: c / (numa_per_package * cores_per_numa),
                    numa: c / cores_per_numa,
                    pus: vec![c, c + core_count],
                })
                .collect(),
            gpus: Vec::new(),
        }
    }

    fn cores_of(places: &[Place]) -> Vec<Vec<usize>> {
        places.iter().map(|p| p.cores.clone()).collect()
    }

    #[test]
    fn fewer_ranks_than_places_take_runs_of_places() {
        let topology = node(2, 2, 2); // 4 NUMA nodes of 2 cores
        let places = plan(&topology, 3, WorkerPer::Numa).unwrap();
        assert_eq!(
            cores_of(&places),
            [vec![0, 1, 2, 3], vec![4, 5], vec![6, 7]]
        );
        assert_eq!(places[0].numa_nodes, [0, 1]);
        assert_eq!(places[0].pus, [0, 8, 1, 9, 2, 10, 3, 11]);
        assert_eq!(places[0].cpu_list(), "0-3,8-11");
        assert_eq!(places[0].threads(), 4);
    }

    #[test]
    fn more_ranks_than_places_split_each_place_by_cores() {
        let topology = node(1, 2, 3); // 2 NUMA nodes of 3 cores
        let places = plan(&topology, 4, WorkerPer::Numa).unwrap();
        assert_eq!(
            cores_of(&places),
            [vec![0, 1], vec![2], vec![3, 4], vec![5]]
        );
        assert!(places.iter().all(|p| !p.shared));
        assert_eq!(places[2].numa_nodes, [1]);
    }

    #[test]
    fn more_ranks_than_cores_share_cores_round_robin() {
        let topology = node(1, 1, 2);
        let places = plan(&topology, 3, WorkerPer::Numa).unwrap();
        assert_eq!(cores_of(&places), [vec![0], vec![1], vec![0]]);
        let shared: Vec<bool> = places.iter().map(|p| p.shared).collect();
        assert_eq!(shared, [true, false, true]);
    }

    #[test]
    fn each_mode_cuts_the_node_its_way() {
        let topology = node(2, 2, 2);
        let count = |per| plan(&topology, 64, per).unwrap().len();
        assert_eq!(count(WorkerPer::Core), 64);
        let places = |per| place_count(&topology, per).unwrap();
        assert_eq!(places(WorkerPer::Core), 8);
        assert_eq!(places(WorkerPer::Numa), 4);
        assert_eq!(places(WorkerPer::Socket), 2);
        assert_eq!(places(WorkerPer::Node), 1);
        let one_each = |per| cores_of(&plan(&topology, 1, per).unwrap());
        for per in [
            WorkerPer::Node,
            WorkerPer::Socket,
            WorkerPer::Numa,
            WorkerPer::Core,
        ] {
            assert_eq!(one_each(per), [(0..8).collect::<Vec<_>>()], "{per}");
        }
        let two = |per| cores_of(&plan(&topology, 2, per).unwrap());
        assert_eq!(two(WorkerPer::Socket), [vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(two(WorkerPer::Node), [vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    }

    #[test]
    fn gpus_sharing_a_locality_split_its_cores() {
        let mut topology = node(2, 1, 4);
        topology.gpus = (0..4)
            .map(|index| Gpu {
                vendor: GpuVendor::Nvidia,
                index,
                pci_bus_id: format!("0000:{index:02x}:00.0"),
                local_cores: if index < 2 {
                    vec![0, 1, 2, 3]
                } else {
                    vec![4, 5, 6, 7]
                },
            })
            .collect();
        let places = plan(&topology, 4, WorkerPer::Gpu).unwrap();
        assert_eq!(
            cores_of(&places),
            [vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]
        );
        let gpus: Vec<_> = places.iter().map(|p| p.gpus.clone()).collect();
        assert_eq!(gpus, [[0], [1], [2], [3]]);
        let halves = plan(&topology, 2, WorkerPer::Gpu).unwrap();
        assert_eq!(halves[1].gpus, [2, 3]);
    }

    #[test]
    fn bad_requests_are_refused() {
        let topology = node(1, 1, 2);
        assert_eq!(plan(&topology, 0, WorkerPer::Numa), Err(PlanError::NoRanks));
        assert_eq!(plan(&topology, 1, WorkerPer::Gpu), Err(PlanError::NoGpus));
        assert_eq!(
            plan(&NodeTopology::default(), 1, WorkerPer::Node),
            Err(PlanError::NoCores)
        );
    }
}
