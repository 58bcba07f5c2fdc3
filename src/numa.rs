//! NUMA placement through hwloc (cargo feature `numa`): the nodes of this machine or of an hwloc
//! XML topology file, binding this process's threads and memory to one node, and placing
//! `--local` workers one per node.
//!
//! A worker binds before it allocates anything, so the weights it copies in and its buffers
//! land in the node's memory. Without the feature, asking for a node is an error that says
//! how to build with it.

use std::path::Path;

/// One NUMA node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The operating system's index (what `numactl -N` and `/sys/devices/system/node` use).
    pub index: usize,
    /// Its CPUs: the first hardware thread of every core, then the other hardware threads, so
    /// that the first `cores` of them give one compute thread per physical core.
    pub cpus: Vec<usize>,
    pub cores: usize,
}

/// Where a `--local` worker goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub node: usize,
    pub cpus: Vec<usize>,
}

/// Workers placed round-robin on the nodes; the workers sharing a node split its cores (each
/// gets whole cores, at least one, with their hardware threads after them).
pub fn place_local(nodes: &[Node], workers: usize) -> Vec<Placement> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let mut placements = Vec::with_capacity(workers);
    for worker in 0..workers {
        let node = &nodes[worker % nodes.len()];
        let sharing = (workers - 1 - worker % nodes.len()) / nodes.len() + 1;
        let slot = worker / nodes.len();
        let cores = node.cores.max(1);
        let per = (cores / sharing).max(1);
        let start = (slot * per).min(cores - 1);
        let end = if slot + 1 == sharing {
            cores
        } else {
            (start + per).min(cores)
        };
        // Cores start..end: their first threads, then their siblings (the same cores' other
        // hardware threads sit at the same offsets in each further block of `cores`).
        let mut cpus: Vec<usize> = Vec::new();
        let mut block = 0;
        while block * cores < node.cpus.len() {
            for core in start..end {
                if let Some(&cpu) = node.cpus.get(block * cores + core) {
                    cpus.push(cpu);
                }
            }
            block += 1;
        }
        placements.push(Placement {
            node: node.index,
            cpus,
        });
    }
    placements
}

#[cfg(feature = "numa")]
fn node_list(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("{} ({} cores)", n.index, n.cores))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(feature = "numa")]
mod hw {
    use super::*;
    use anyhow::Context;
    use hwlocality::Topology;
    use hwlocality::cpu::binding::CpuBindingFlags;
    use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
    use hwlocality::object::types::ObjectType;

    pub fn topology(xml: Option<&Path>) -> anyhow::Result<Topology> {
        match xml {
            Some(path) => Topology::builder()
                .from_xml_file(path)
                .with_context(|| format!("cannot read the hwloc topology {}", path.display()))?
                .build()
                .with_context(|| format!("cannot load the hwloc topology {}", path.display())),
            None => Topology::new().context("hwloc cannot discover this machine's topology"),
        }
    }

    pub fn nodes_of(topology: &Topology) -> Vec<Node> {
        let mut nodes = Vec::new();
        for node in topology.objects_with_type(ObjectType::NUMANode) {
            let Some(cpuset) = node.cpuset() else {
                continue;
            };
            let mut first = Vec::new();
            let mut others = Vec::new();
            for core in topology.objects_inside_cpuset_with_type(&*cpuset, ObjectType::Core) {
                let Some(core_set) = core.cpuset() else {
                    continue;
                };
                for (i, pu) in core_set.iter_set().enumerate() {
                    if i == 0 {
                        first.push(usize::from(pu));
                    } else {
                        others.push(usize::from(pu));
                    }
                }
            }
            if first.is_empty() {
                // No cores reported: every CPU counts as one.
                first = cpuset.iter_set().map(usize::from).collect();
            }
            let cores = first.len();
            first.extend(others);
            nodes.push(Node {
                index: node.os_index().unwrap_or(nodes.len()),
                cpus: first,
                cores,
            });
        }
        nodes
    }

    pub fn bind(topology: &Topology, index: usize) -> anyhow::Result<Node> {
        let nodes = nodes_of(topology);
        let node = nodes.iter().find(|n| n.index == index).with_context(|| {
            format!(
                "there is no NUMA node {index}; this machine has node{} {}",
                if nodes.len() == 1 { "" } else { "s" },
                node_list(&nodes)
            )
        })?;
        let object = topology
            .objects_with_type(ObjectType::NUMANode)
            .find(|o| o.os_index() == Some(index))
            .context("the node vanished from the topology")?;
        let cpuset = object.cpuset().context("the node has no CPU set")?;
        let nodeset = object.nodeset().context("the node has no node set")?;
        topology
            .bind_cpu(&*cpuset, CpuBindingFlags::PROCESS)
            .map_err(|e| anyhow::anyhow!("cannot bind to the CPUs of NUMA node {index}: {e}"))?;
        topology
            .bind_memory(
                &*nodeset,
                MemoryBindingPolicy::Bind,
                // Linux binds memory per thread; this runs before any other thread exists, and
                // threads inherit their creator's policy.
                MemoryBindingFlags::ASSUME_SINGLE_THREAD | MemoryBindingFlags::STRICT,
            )
            .map_err(|e| anyhow::anyhow!("cannot bind memory to NUMA node {index}: {e}"))?;
        Ok(node.clone())
    }
}

/// The NUMA nodes of this machine, or of the hwloc XML topology `xml`.
#[cfg(feature = "numa")]
pub fn nodes(xml: Option<&Path>) -> anyhow::Result<Vec<Node>> {
    Ok(hw::nodes_of(&hw::topology(xml)?))
}

/// Binds this process's threads and future memory to NUMA node `index` (call it before other
/// threads start and before allocating). With an XML topology, hwloc only pretends to bind.
#[cfg(feature = "numa")]
pub fn bind(index: usize, xml: Option<&Path>) -> anyhow::Result<Node> {
    hw::bind(&hw::topology(xml)?, index)
}

#[cfg(not(feature = "numa"))]
const NOT_BUILT: &str = "this build has no NUMA support: rebuild with `cargo build --release --features numa` (Debian packages libhwloc-dev, libudev-dev and pkg-config)";

#[cfg(not(feature = "numa"))]
pub fn nodes(_xml: Option<&Path>) -> anyhow::Result<Vec<Node>> {
    anyhow::bail!(NOT_BUILT)
}

#[cfg(not(feature = "numa"))]
pub fn bind(_index: usize, _xml: Option<&Path>) -> anyhow::Result<Node> {
    anyhow::bail!(NOT_BUILT)
}

/// Whether this build can place and bind.
pub const SUPPORTED: bool = cfg!(feature = "numa");

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(index: usize, first: usize, cores: usize) -> Node {
        // Two hardware threads per core, numbered core by core: (first, first+1), ...
        let firsts = (0..cores).map(|c| first + 2 * c);
        let seconds = (0..cores).map(|c| first + 2 * c + 1);
        Node {
            index,
            cpus: firsts.chain(seconds).collect(),
            cores,
        }
    }

    #[test]
    fn one_worker_per_node_then_shared_nodes_split_cores() {
        let nodes = [socket(0, 0, 4), socket(1, 8, 4)];
        let two = place_local(&nodes, 2);
        assert_eq!(two[0].node, 0);
        assert_eq!(two[0].cpus, vec![0, 2, 4, 6, 1, 3, 5, 7]);
        assert_eq!(two[1].node, 1);
        assert_eq!(two[1].cpus, vec![8, 10, 12, 14, 9, 11, 13, 15]);
        // Three workers: node 0 holds two, each with two cores and their siblings.
        let three = place_local(&nodes, 3);
        assert_eq!(
            three.iter().map(|p| p.node).collect::<Vec<_>>(),
            vec![0, 1, 0]
        );
        assert_eq!(three[0].cpus, vec![0, 2, 1, 3]);
        assert_eq!(three[2].cpus, vec![4, 6, 5, 7]);
        assert_eq!(three[1].cpus.len(), 8);
        // More workers than cores on a node: each still gets a core.
        let many = place_local(&[socket(0, 0, 2)], 3);
        assert!(many.iter().all(|p| !p.cpus.is_empty()));
    }

    #[cfg(feature = "numa")]
    #[test]
    fn an_xml_two_socket_topology_is_read_and_placed() {
        let xml = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/topology/two-socket.xml");
        let nodes = nodes(Some(&xml)).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].index, 0);
        assert_eq!(nodes[0].cores, 4);
        assert_eq!(nodes[0].cpus, vec![0, 2, 4, 6, 1, 3, 5, 7]);
        assert_eq!(nodes[1].cpus, vec![8, 10, 12, 14, 9, 11, 13, 15]);
        let e = bind(7, Some(&xml)).unwrap_err().to_string();
        assert!(
            e.contains("no NUMA node 7") && e.contains("0 (4 cores), 1 (4 cores)"),
            "{e}"
        );
    }
}
