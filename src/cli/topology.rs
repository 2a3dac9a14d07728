//! `rankmesh topology`: the placement plan of worker ranks for this node or a saved hwloc
//! XML, as `rankmesh run --worker-per ...` would apply it.

use anyhow::Result;
use rankmesh::topology::{self, GpuVendor, NodeTopology, Place, Source, WorkerPer};
use std::fmt::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TopologyArgs {
    /// A saved hwloc topology (`lstopo node.xml`) instead of this machine's.
    #[arg(long)]
    xml: Option<PathBuf>,
    /// Worker ranks on the node (default: one per place).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    ranks_per_node: Option<u32>,
    /// What each worker is placed on.
    #[arg(long, value_enum, default_value_t = WorkerPer::Numa)]
    worker_per: WorkerPer,
}

pub fn run(args: TopologyArgs) -> Result<i32> {
    let source = args.xml.map_or(Source::ThisMachine, Source::Xml);
    let node = topology::read(&source)?;
    let ranks = match args.ranks_per_node {
        Some(ranks) => ranks as usize,
        None => topology::place_count(&node, args.worker_per)?,
    };
    let places = topology::plan(&node, ranks, args.worker_per)?;
    print!("{}", render(&node, &source, args.worker_per, &places));
    Ok(0)
}

/// The plan as a table: one line per worker rank (its index among the node's workers).
fn render(node: &NodeTopology, source: &Source, per: WorkerPer, places: &[Place]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node ({source}): {} packages, {} NUMA nodes, {} cores, {} CPUs, {} GPUs",
        node.packages,
        node.numa_nodes.len(),
        node.cores.len(),
        node.pu_count(),
        node.gpus.len()
    );
    let _ = writeln!(
        out,
        "plan: {} worker ranks, --worker-per {per}",
        places.len()
    );
    let _ = writeln!(
        out,
        "{:<5} {:>7} {:<9} {:<12} cpus",
        "rank", "threads", "numa", "gpus"
    );
    for (rank, place) in places.iter().enumerate() {
        let numa: Vec<String> = place.numa_nodes.iter().map(usize::to_string).collect();
        let gpus: Vec<String> = place
            .gpus
            .iter()
            .filter_map(|&g| node.gpus.get(g))
            .map(|gpu| {
                let vendor = match gpu.vendor {
                    GpuVendor::Nvidia => "cuda",
                    GpuVendor::Amd => "rocm",
                };
                format!("{vendor}:{}", gpu.index)
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<5} {:>7} {:<9} {:<12} {}{}",
            rank,
            place.threads(),
            numa.join(","),
            if gpus.is_empty() {
                "-".into()
            } else {
                gpus.join(",")
            },
            place.cpu_list(),
            if place.shared { " (shared)" } else { "" }
        );
    }
    if places.iter().any(|p| p.shared) {
        let _ = writeln!(
            out,
            "(shared): more ranks than cores, so some ranks share cores"
        );
    }
    out
}
