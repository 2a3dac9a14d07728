//! Node topology and worker placement.
//!
//! - [`NodeTopology`]: what placement needs to know about one node (cores, NUMA nodes,
//!   packages, GPUs), read from hwloc ([`read`]) from the live machine or a saved XML.
//! - [`plan`]: a pure function from a topology, the number of worker ranks on the node
//!   and a [`WorkerPer`] mode to one [`Place`] per rank, so it is tested without hwloc.
//! - [`bind`]: the I/O edge that applies a place to the running process: CPU and memory
//!   binding, respecting a binding the launcher already made.
//! - [`env`]: the environment executors get from a place (BLAS threads, visible GPUs).
//! - [`page_reporting`]: whether the host takes the node's free memory back, and numpy's
//!   huge-page advice turned off in executors where it does.

#[cfg(feature = "hwloc")]
pub mod bind;
pub mod env;
#[cfg(feature = "hwloc")]
mod hwloc;
pub mod page_reporting;
pub mod plan;

#[cfg(feature = "hwloc")]
pub use hwloc::{load, read, summarize, Source, TopologyError};
pub use plan::{place_count, plan, Place, PlanError, WorkerPer};

/// The parts of a node's hwloc topology that placement uses. Indexes into `cores`,
/// `numa_nodes` and `gpus` are logical (hwloc's order); PUs and NUMA nodes also carry the
/// operating system's numbers, which binding and `/proc` use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeTopology {
    pub packages: usize,
    pub numa_nodes: Vec<NumaNode>,
    pub cores: Vec<Core>,
    pub gpus: Vec<Gpu>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Core {
    /// Logical index of its package.
    pub package: usize,
    /// Index into [`NodeTopology::numa_nodes`] of the NUMA node it is local to.
    pub numa: usize,
    /// OS numbers of its hardware threads (what `Cpus_allowed_list` shows).
    pub pus: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    pub os_index: usize,
    /// Local memory in bytes.
    pub memory: u64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GpuVendor {
    Nvidia,
    Amd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub vendor: GpuVendor,
    /// Position among the vendor's GPUs in PCI bus order: the number CUDA (with
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`) and ROCm give the device.
    pub index: usize,
    /// PCI address, `domain:bus:device.function`.
    pub pci_bus_id: String,
    /// Indexes into [`NodeTopology::cores`] of the cores nearest to it (its PCI locality).
    pub local_cores: Vec<usize>,
}

impl NodeTopology {
    /// Hardware threads in the whole node.
    pub fn pu_count(&self) -> usize {
        self.cores.iter().map(|c| c.pus.len()).sum()
    }

    /// The cores whose hardware threads lie inside `pus` (OS numbers), in order.
    pub fn cores_within(&self, pus: &[usize]) -> Vec<usize> {
        let inside: std::collections::BTreeSet<_> = pus.iter().collect();
        (0..self.cores.len())
            .filter(|&c| self.cores[c].pus.iter().any(|pu| inside.contains(pu)))
            .collect()
    }
}

/// Formats OS CPU numbers as the kernel's list format (`0-3,8,10-11`), the one
/// `/proc/<pid>/status` uses for `Cpus_allowed_list`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut iter = sorted.into_iter().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_matches_the_kernels_format() {
        assert_eq!(cpu_list(&[]), "");
        assert_eq!(cpu_list(&[3]), "3");
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(cpu_list(&[5, 4, 4, 0]), "0,4-5");
    }
}
