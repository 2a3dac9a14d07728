//! Reads a [`NodeTopology`] from hwloc: the live machine or a saved XML (`lstopo out.xml`).

use super::{Core, Gpu, GpuVendor, NodeTopology, NumaNode};
use hwlocality::bitmap::BitmapRef;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::ObjectType;
use hwlocality::object::TopologyObject;
use hwlocality::topology::builder::TypeFilter;
use hwlocality::Topology;
use std::path::{Path, PathBuf};

const PCI_VENDOR_NVIDIA: u16 = 0x10de;
const PCI_VENDOR_AMD: u16 = 0x1002;
/// PCI base class "display controller" (VGA, 3D, other).
const PCI_CLASS_DISPLAY: u16 = 0x03;

/// PCI domain, bus, device, function: sorting by it gives the PCI bus order.
type PciAddress = (u16, u8, u8, u8);

/// Where a topology comes from.
#[derive(Clone, Debug)]
pub enum Source {
    ThisMachine,
    Xml(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read the topology of {origin}: {reason}")]
    Load { origin: String, reason: String },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::ThisMachine => f.write_str("this machine"),
            Source::Xml(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Loads the hwloc topology, I/O devices included (GPUs are PCI devices to hwloc).
pub fn load(source: &Source) -> Result<Topology, TopologyError> {
    let failed = |reason: String| TopologyError::Load {
        origin: source.to_string(),
        reason,
    };
    let mut builder = Topology::builder();
    if let Source::Xml(path) = source {
        if !Path::new(path).is_file() {
            return Err(failed("no such file".into()));
        }
        builder = builder
            .from_xml_file(path)
            .map_err(|e| failed(e.to_string()))?;
    }
    builder
        .with_io_type_filter(TypeFilter::KeepImportant)
        .map_err(|e| failed(e.to_string()))?
        .build()
        .map_err(|e| failed(e.to_string()))
}

/// Reads the summary that placement needs.
pub fn read(source: &Source) -> Result<NodeTopology, TopologyError> {
    Ok(summarize(&load(source)?))
}

/// The summary of a loaded topology.
pub fn summarize(topology: &Topology) -> NodeTopology {
    let numa_objects: Vec<&TopologyObject> =
        topology.objects_with_type(ObjectType::NUMANode).collect();
    let numa_nodes = numa_objects
        .iter()
        .map(|n| NumaNode {
            os_index: n.os_index().unwrap_or(0),
            memory: match n.attributes() {
                Some(ObjectAttributes::NUMANode(attrs)) => {
                    attrs.local_memory().map_or(0, |m| m.get())
                }
                _ => 0,
            },
        })
        .collect();
    let core_objects: Vec<&TopologyObject> = topology.objects_with_type(ObjectType::Core).collect();
    let cores: Vec<Core> = core_objects
        .iter()
        .map(|core| {
            let cpuset = core.cpuset();
            Core {
                package: core
                    .first_ancestor_with_type(ObjectType::Package)
                    .map_or(0, |p| p.logical_index()),
                numa: cpuset
                    .as_ref()
                    .and_then(|set| {
                        numa_objects.iter().position(|n| {
                            n.cpuset()
                                .is_some_and(|numa_set| numa_set.includes(set.as_ref()))
                        })
                    })
                    .unwrap_or(0),
                pus: cpuset.map(|set| os_numbers(&set)).unwrap_or_default(),
            }
        })
        .collect();
    let packages = topology.objects_with_type(ObjectType::Package).count();
    let mut found: Vec<(GpuVendor, PciAddress, Vec<usize>)> = topology
        .pci_devices()
        .filter_map(|device| {
            let Some(ObjectAttributes::PCIDevice(pci)) = device.attributes() else {
                return None;
            };
            if pci.class_id() >> 8 != PCI_CLASS_DISPLAY {
                return None;
            }
            let vendor = match pci.vendor_id() {
                PCI_VENDOR_NVIDIA => GpuVendor::Nvidia,
                PCI_VENDOR_AMD => GpuVendor::Amd,
                _ => return None, // e.g. a server's on-board VGA chip
            };
            let address = (pci.domain(), pci.bus_id(), pci.bus_device(), pci.function());
            let local_pus = device
                .first_non_io_ancestor()
                .and_then(TopologyObject::cpuset)
                .map(|set| os_numbers(&set))
                .unwrap_or_default();
            Some((vendor, address, local_pus))
        })
        .collect();
    found.sort_by_key(|(vendor, address, _)| (*vendor, *address));
    let mut node = NodeTopology {
        packages,
        numa_nodes,
        cores,
        gpus: Vec::with_capacity(found.len()),
    };
    for (vendor, (domain, bus, device, function), local_pus) in found {
        let index = node.gpus.iter().filter(|g| g.vendor == vendor).count();
        let local_cores = node.cores_within(&local_pus);
        node.gpus.push(Gpu {
            vendor,
            index,
            pci_bus_id: format!("{domain:04x}:{bus:02x}:{device:02x}.{function:x}"),
            local_cores,
        });
    }
    node
}

/// OS numbers of the PUs in `set`.
pub fn os_numbers(set: &BitmapRef<'_, CpuSet>) -> Vec<usize> {
    set.iter_set().map(usize::from).collect()
}
