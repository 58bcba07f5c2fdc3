//! NUMA placement and binding. With `--features numa` (hwloc): a worker bound to node 0 shows
//! the node's CPUs in `Cpus_allowed_list` and a `bind:0` memory policy in `numa_maps`; a node
//! that does not exist is an error listing the nodes there are; `--local 2` on a two-socket
//! hwloc XML topology puts one worker on each node and says so. Without the feature,
//! `--numa-node` is an error that says how to build with it.

mod common;

use std::process::{Command, Stdio};

use common::*;

#[cfg(not(feature = "numa"))]
#[test]
fn without_the_feature_numa_node_says_how_to_build_it() {
    let output = Command::new(worker_binary())
        .args(["--numa-node", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("--features numa"), "{err}");
}

#[cfg(feature = "numa")]
fn proc_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} missing from /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[cfg(feature = "numa")]
#[test]
fn a_worker_bound_to_node_0_runs_and_allocates_there() {
    let node_cpus = std::fs::read_to_string("/sys/devices/system/node/node0/cpulist")
        .expect("node 0 in sysfs")
        .trim()
        .to_string();
    // Panics unless the worker says it listens.
    let (mut child, _) = common::server::spawn_listening(
        Command::new(worker_binary())
            .args([
                "--numa-node",
                "0",
                "--listen",
                "127.0.0.1:0",
                "--log",
                "warn",
            ])
            .stderr(Stdio::piped()),
    );
    let pid = child.id();
    let cpus = proc_field(pid, "Cpus_allowed_list:");
    let mems = proc_field(pid, "Mems_allowed_list:");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("Cpus_allowed_list: {cpus}; Mems_allowed_list: {mems}; node 0: {node_cpus}");
    assert_eq!(cpus, node_cpus);
    assert!(
        mems.split(',').next().is_some_and(|m| m.starts_with('0')),
        "{mems}"
    );
    // The heap and anonymous mappings made after binding carry the node-0 policy.
    let bound = maps.lines().filter(|l| l.contains(" bind:0")).count();
    eprintln!("{bound} mappings with policy bind:0");
    assert!(bound > 0, "no bind:0 mapping:\n{maps}");
}

#[cfg(feature = "numa")]
#[test]
fn a_missing_node_lists_the_nodes() {
    let output = Command::new(worker_binary())
        .args(["--numa-node", "42"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("no NUMA node 42") && err.contains("0 ("),
        "{err}"
    );
}

#[cfg(feature = "numa")]
#[test]
fn local_workers_go_one_per_node_of_a_two_socket_topology() {
    let Some(model) = model(SMOLLM2) else { return };
    let xml = golden_dir()
        .parent()
        .unwrap()
        .join("topology/two-socket.xml");
    let output = Command::new(coordinator_binary())
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args([
            "--local",
            "2",
            "-p",
            "Hello",
            "-n",
            "4",
            "--temperature",
            "0",
        ])
        .env("TP_TOPOLOGY_XML", &xml)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("worker 0 -> NUMA node 0"), "{err}");
    assert!(err.contains("worker 1 -> NUMA node 1"), "{err}");
}

#[cfg(feature = "numa")]
#[test]
fn a_worker_on_another_node_than_hosts_toml_says_is_an_error() {
    let Some(model) = model(SMOLLM2) else { return };
    let dir = std::env::temp_dir().join(format!("tp-numa-hosts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "numa-test-token-0123456789\n").unwrap();
    let (mut child, address) = common::server::spawn_listening(
        Command::new(worker_binary())
            .args([
                "--numa-node",
                "0",
                "--listen",
                "127.0.0.1:0",
                "--log",
                "warn",
            ])
            .arg("--auth-token-file")
            .arg(&token)
            .stderr(Stdio::null()),
    );
    let hosts = dir.join("hosts.toml");
    std::fs::write(
        &hosts,
        format!(
            "auth_token_file = \"token\"\n[[worker]]\naddress = \"{address}\"\nnuma_node = 1\n"
        ),
    )
    .unwrap();
    let output = Command::new(coordinator_binary())
        .args(["generate", "--model"])
        .arg(&model)
        .arg("--workers")
        .arg(&hosts)
        .args(["-p", "Hi", "-n", "1"])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        err.contains("is bound to NUMA node 0, but hosts.toml says numa_node = 1"),
        "{err}"
    );
}
