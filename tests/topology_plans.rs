//! Placement plans for saved topologies of large nodes (tests/data/topology, made by
//! hwloc's tools): every `--worker-per` mode at 1, 2, 8 and 16 ranks per node.
#![allow(clippy::unwrap_used)] // tests: a failed setup should panic loudly

use rankmesh::topology::{self, NodeTopology, Place, PlanError, Source, WorkerPer};

fn load(name: &str) -> NodeTopology {
    let path = format!("{}/tests/data/topology/{name}", env!("CARGO_MANIFEST_DIR"));
    topology::read(&Source::Xml(path.into())).unwrap()
}

fn plan(node: &NodeTopology, ranks: usize, per: WorkerPer) -> Vec<Place> {
    topology::plan(node, ranks, per).unwrap()
}

/// (cpus, numa nodes, gpus as CUDA indexes, shared) per rank.
fn summary(node: &NodeTopology, places: &[Place]) -> Vec<(String, Vec<usize>, Vec<usize>, bool)> {
    places
        .iter()
        .map(|p| {
            let gpus = p.gpus.iter().map(|&g| node.gpus[g].index).collect();
            (p.cpu_list(), p.numa_nodes.clone(), gpus, p.shared)
        })
        .collect()
}

#[test]
fn the_128_core_node_is_read_as_hwloc_describes_it() {
    let node = load("synthetic-2pack-8numa-128core.xml");
    assert_eq!(node.packages, 2);
    assert_eq!(node.numa_nodes.len(), 8);
    assert_eq!(node.cores.len(), 128);
    assert_eq!(node.pu_count(), 256);
    assert!(node.gpus.is_empty());
    assert_eq!(node.cores[17].numa, 1);
    assert_eq!(node.cores[64].package, 1);
    assert_eq!(node.cores[17].pus, [34, 35]);
}

#[test]
fn the_128_core_node_splits_evenly_in_every_mode() {
    let node = load("synthetic-2pack-8numa-128core.xml");
    // The node is regular (16 cores per NUMA node, 4 NUMA nodes per package), so every
    // mode cuts it at the same boundaries for these rank counts.
    for per in [
        WorkerPer::Numa,
        WorkerPer::Socket,
        WorkerPer::Core,
        WorkerPer::Node,
    ] {
        for ranks in [1, 2, 8, 16] {
            let places = plan(&node, ranks, per);
            let cores_each = 128 / ranks;
            assert_eq!(places.len(), ranks, "{per} x{ranks}");
            for (rank, place) in places.iter().enumerate() {
                let first = rank * cores_each;
                assert_eq!(
                    place.cores,
                    (first..first + cores_each).collect::<Vec<_>>(),
                    "{per} x{ranks} rank {rank}"
                );
                assert_eq!(place.threads() as usize, cores_each);
                let numa: Vec<usize> = (first / 16..=(first + cores_each - 1) / 16).collect();
                assert_eq!(place.numa_nodes, numa, "{per} x{ranks} rank {rank}");
                assert!(!place.shared);
            }
        }
    }
    let sixteen = summary(&node, &plan(&node, 16, WorkerPer::Numa));
    assert_eq!(sixteen[3], ("48-63".to_string(), vec![1], vec![], false));
    let two = summary(&node, &plan(&node, 2, WorkerPer::Socket));
    assert_eq!(two[1].0, "128-255");
    assert_eq!(two[1].1, [4, 5, 6, 7]);
    assert_eq!(
        topology::plan(&node, 8, WorkerPer::Gpu),
        Err(PlanError::NoGpus)
    );
}

#[test]
fn the_dgx2_gpus_are_found_by_pci_locality() {
    let node = load("nvidia-dgx2-16gpu.xml");
    // hwloc's saved DGX-2 keeps 2 cores (P#0-1, P#24-25) of each package's 24.
    assert_eq!(
        (node.packages, node.cores.len(), node.gpus.len()),
        (2, 4, 16)
    );
    let near: Vec<Vec<usize>> = node.gpus.iter().map(|g| g.local_cores.clone()).collect();
    assert!(near[..8].iter().all(|cores| cores == &[0, 1]));
    assert!(near[8..].iter().all(|cores| cores == &[2, 3]));
    let indexes: Vec<usize> = node.gpus.iter().map(|g| g.index).collect();
    assert_eq!(indexes, (0..16).collect::<Vec<_>>(), "PCI bus order");
    assert_eq!(node.gpus[0].pci_bus_id, "0000:34:00.0");
    assert_eq!(node.gpus[15].pci_bus_id, "0000:e7:00.0");
}

#[test]
fn the_dgx2_gpu_plans() {
    let node = load("nvidia-dgx2-16gpu.xml");
    let gpu = |ranks| summary(&node, &plan(&node, ranks, WorkerPer::Gpu));
    assert_eq!(
        gpu(1),
        [("0-1,24-25".into(), vec![0, 1], (0..16).collect(), false)]
    );
    assert_eq!(
        gpu(2),
        [
            ("0-1".into(), vec![0], (0..8).collect(), false),
            ("24-25".into(), vec![1], (8..16).collect(), false)
        ]
    );
    // Eight ranks: two GPUs each; the four ranks of a package share its two cores.
    let eight = gpu(8);
    for (rank, (cpus, numa, gpus, shared)) in eight.iter().enumerate() {
        let package = rank / 4;
        assert_eq!(cpus, ["0-1", "24-25"][package], "rank {rank}");
        assert_eq!(numa, &[package]);
        assert_eq!(gpus, &[2 * rank, 2 * rank + 1]);
        assert!(shared);
    }
    // Sixteen ranks: one GPU each; 8 GPUs per package on 2 cores, so cores are shared.
    let sixteen = gpu(16);
    for (rank, (cpus, _, gpus, shared)) in sixteen.iter().enumerate() {
        let cpu = [0, 1, 24, 25][2 * (rank / 8) + rank % 2];
        assert_eq!(cpus, &cpu.to_string(), "rank {rank}");
        assert_eq!(gpus, &[rank]);
        assert!(shared);
    }
}

#[test]
fn the_dgx2_cpu_plans() {
    let node = load("nvidia-dgx2-16gpu.xml");
    let cpus = |ranks, per| -> Vec<String> {
        plan(&node, ranks, per)
            .iter()
            .map(Place::cpu_list)
            .collect()
    };
    for per in [WorkerPer::Numa, WorkerPer::Socket] {
        assert_eq!(cpus(1, per), ["0-1,24-25"]);
        assert_eq!(cpus(2, per), ["0-1", "24-25"]);
        assert_eq!(cpus(8, per), ["0", "1", "0", "1", "24", "25", "24", "25"]);
        assert_eq!(cpus(16, per).len(), 16);
    }
    assert_eq!(cpus(2, WorkerPer::Core), ["0-1", "24-25"]);
    assert_eq!(
        cpus(8, WorkerPer::Core),
        ["0", "0", "1", "1", "24", "24", "25", "25"]
    );
    assert_eq!(cpus(2, WorkerPer::Node), ["0-1", "24-25"]);
    assert!(plan(&node, 2, WorkerPer::Numa)
        .iter()
        .all(|p| p.gpus.is_empty()));
}

#[test]
fn the_power8_gpu_plans() {
    let node = load("power8-4gpu.xml");
    let gpu = |ranks| summary(&node, &plan(&node, ranks, WorkerPer::Gpu));
    assert_eq!(gpu(1)[0].2, [0, 1, 2, 3]);
    assert_eq!(
        gpu(2),
        [
            ("0-1,8-9,16-17,24-25".into(), vec![0], vec![0, 1], false),
            (
                "80-81,88-89,96-97,104-105".into(),
                vec![1],
                vec![2, 3],
                false
            )
        ]
    );
    let eight = gpu(8);
    let gpus: Vec<usize> = eight.iter().map(|p| p.2[0]).collect();
    assert_eq!(gpus, [0, 0, 1, 1, 2, 2, 3, 3], "two ranks per GPU");
    assert_eq!(eight[1].0, "8-9", "but each on its own core");
    assert!(eight.iter().all(|p| !p.3));
    assert_eq!(gpu(16).iter().filter(|p| p.3).count(), 16);
}

#[test]
fn a_missing_or_broken_xml_is_a_clear_error() {
    let missing = topology::read(&Source::Xml("/nonexistent/node.xml".into()));
    let message = missing.unwrap_err().to_string();
    assert!(
        message.contains("/nonexistent/node.xml") && message.contains("no such file"),
        "{message}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.xml");
    std::fs::write(&bad, "<html/>").unwrap();
    let message = topology::read(&Source::Xml(bad.clone()))
        .unwrap_err()
        .to_string();
    assert!(message.contains(&bad.display().to_string()), "{message}");
}
