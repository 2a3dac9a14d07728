//! The environment a worker's executors get from its place: thread counts for OpenMP and
//! the BLAS libraries, and the GPUs they may see.

use super::{GpuVendor, NodeTopology, Place};

/// Thread-count variables of OpenMP, Intel MKL and OpenBLAS.
pub const THREAD_VARS: [&str; 3] = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"];

/// Threads each executor's numerical libraries may use: the place's cores shared among the
/// worker's executors (one per task slot), so that together they fill the place and no
/// more. With the default of one executor per core, that is 1.
pub fn threads_per_executor(place: &Place, executors: u32) -> u32 {
    (place.threads() / executors.max(1)).max(1)
}

/// Variables to set in the executors of a worker without a place (`rankmesh worker`, local
/// clusters): one thread for each numerical library whose count the environment leaves
/// unset, as Dask's nanny does. Each executor runs one task at a time and a node runs one
/// executor per worker thread, so a library that started a thread per core in each of them
/// would run cores × executors threads (a tall-skinny SVD on 2 cores ran 0.67 s or 7.3 s
/// without this). A count the user set is kept.
pub fn unplaced_executor_env(set: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    THREAD_VARS
        .iter()
        .filter(|var| !set(var))
        .map(|var| (var.to_string(), "1".to_string()))
        .collect()
}

/// Variables to set in every executor of a worker at `place` with `executors` executors.
pub fn executor_env(
    topology: &NodeTopology,
    place: &Place,
    executors: u32,
) -> Vec<(String, String)> {
    let threads = threads_per_executor(place, executors).to_string();
    let mut env: Vec<(String, String)> = THREAD_VARS
        .iter()
        .map(|var| (var.to_string(), threads.clone()))
        .collect();
    let visible = |vendor| {
        let indexes: Vec<String> = place
            .gpus
            .iter()
            .filter_map(|&g| topology.gpus.get(g))
            .filter(|gpu| gpu.vendor == vendor)
            .map(|gpu| gpu.index.to_string())
            .collect();
        (!indexes.is_empty()).then(|| indexes.join(","))
    };
    if let Some(devices) = visible(GpuVendor::Nvidia) {
        // Indexes count GPUs in PCI bus order; CUDA's default order is "fastest first".
        env.push(("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()));
        env.push(("CUDA_VISIBLE_DEVICES".into(), devices));
    }
    if let Some(devices) = visible(GpuVendor::Amd) {
        env.push(("ROCR_VISIBLE_DEVICES".into(), devices));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unplaced_executors_get_one_thread_unless_the_user_chose() {
        let env = unplaced_executor_env(|var| var == "OMP_NUM_THREADS");
        assert_eq!(
            env,
            [
                ("MKL_NUM_THREADS".to_string(), "1".to_string()),
                ("OPENBLAS_NUM_THREADS".to_string(), "1".to_string())
            ]
        );
    }
    use crate::topology::{Core, Gpu, NumaNode};

    fn node_with_gpus(gpus: Vec<Gpu>) -> NodeTopology {
        NodeTopology {
            packages: 1,
            numa_nodes: vec![NumaNode {
                os_index: 0,
                memory: 0,
            }],
            cores: (0..8)
                .map(|c| Core {
                    package: 0,
                    numa: 0,
                    pus: vec![c],
                })
                .collect(),
            gpus,
        }
    }

    fn gpu(vendor: GpuVendor, index: usize) -> Gpu {
        Gpu {
            vendor,
            index,
            pci_bus_id: String::new(),
            local_cores: vec![],
        }
    }

    fn var<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn executors_share_the_place_s_cores() {
        let topology = node_with_gpus(vec![]);
        let place = Place::of_cores(&topology, (0..8).collect(), vec![], false);
        assert_eq!(threads_per_executor(&place, 8), 1);
        assert_eq!(threads_per_executor(&place, 3), 2);
        assert_eq!(threads_per_executor(&place, 1), 8);
        assert_eq!(threads_per_executor(&place, 20), 1);
        let env = executor_env(&topology, &place, 2);
        for name in THREAD_VARS {
            assert_eq!(var(&env, name), Some("4"));
        }
        assert_eq!(var(&env, "CUDA_VISIBLE_DEVICES"), None);
    }

    #[test]
    fn gpus_are_made_visible_by_vendor() {
        let topology = node_with_gpus(vec![
            gpu(GpuVendor::Nvidia, 0),
            gpu(GpuVendor::Nvidia, 1),
            gpu(GpuVendor::Amd, 0),
        ]);
        let place = Place::of_cores(&topology, vec![0], vec![1, 2], false);
        let env = executor_env(&topology, &place, 1);
        assert_eq!(var(&env, "CUDA_VISIBLE_DEVICES"), Some("1"));
        assert_eq!(var(&env, "CUDA_DEVICE_ORDER"), Some("PCI_BUS_ID"));
        assert_eq!(var(&env, "ROCR_VISIBLE_DEVICES"), Some("0"));
    }
}
