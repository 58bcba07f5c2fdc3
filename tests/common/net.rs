//! Hosts on one machine for tests: network namespaces joined to a bridge by veth pairs, a
//! worker in each (tests/netns.rs, tests/soak.rs).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use super::worker_binary;

pub fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces `hosts` joined by a bridge in the root namespace (which holds .1 of the subnet).
pub struct Net {
    pub namespaces: Vec<String>,
    /// Root-side end of each namespace's veth pair.
    pub veths: Vec<String>,
    bridge: String,
    pub subnet: String,
    /// Workers in start order (`start_worker`); each is the worker process itself, since
    /// `ip netns exec` execs it.
    pub workers: Vec<Child>,
}

impl Net {
    /// None (with a notice) when this process cannot make namespaces; a failure under CI.
    pub fn new(test: u8, hosts: usize) -> Option<Net> {
        let root = unsafe { libc::geteuid() } == 0;
        let ip = Command::new("ip").arg("-V").output().is_ok();
        if !root || !ip {
            let why = if root {
                "iproute2 is missing"
            } else {
                "not root"
            };
            if std::env::var_os("CI").is_some() {
                panic!("network-namespace tests cannot run: {why}");
            }
            eprintln!("skipping: network-namespace tests need root and iproute2 ({why})");
            return None;
        }
        let id = std::process::id() % 10_000;
        let subnet = format!("10.{}.{}", 100 + test, id % 250);
        let mut net = Net {
            namespaces: Vec::new(),
            veths: Vec::new(),
            bridge: format!("tpb{id}t{test}"),
            subnet,
            workers: Vec::new(),
        };
        let bridge = net.bridge.clone();
        let setup = || -> Result<(), String> {
            run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
            run(&[
                "ip",
                "addr",
                "add",
                &format!("{}.1/24", net.subnet),
                "dev",
                &bridge,
            ])?;
            run(&["ip", "link", "set", &bridge, "up"])?;
            Ok(())
        };
        setup().expect("bridge");
        for h in 0..hosts {
            let ns = format!("tp{id}t{test}h{h}");
            let (outer, inner) = (format!("tpv{id}t{test}h{h}"), format!("tpp{id}t{test}h{h}"));
            run(&["ip", "netns", "add", &ns]).expect("netns");
            net.namespaces.push(ns.clone());
            run(&[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])
            .expect("veth");
            net.veths.push(outer.clone());
            run(&["ip", "link", "set", &inner, "netns", &ns]).unwrap();
            run(&["ip", "link", "set", &outer, "master", &bridge]).unwrap();
            run(&["ip", "link", "set", &outer, "up"]).unwrap();
            let address = format!("{}/24", net.host_ip(h));
            for args in [
                vec!["addr", "add", &address, "dev", &inner],
                vec!["link", "set", &inner, "up"],
                vec!["link", "set", "lo", "up"],
            ] {
                let mut full = vec!["ip", "netns", "exec", &ns, "ip"];
                full.extend(args);
                run(&full).unwrap();
            }
        }
        Some(net)
    }

    pub fn host_ip(&self, host: usize) -> String {
        format!("{}.{}", self.subnet, host + 2)
    }

    /// Starts a worker in namespace `host` on `port`; returns its address.
    pub fn start_worker(&mut self, host: usize, port: u16) -> String {
        self.start_worker_with(host, port, &[])
    }

    pub fn start_worker_with(&mut self, host: usize, port: u16, extra: &[&str]) -> String {
        let address = format!("{}:{port}", self.host_ip(host));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[host]])
            .arg(worker_binary())
            .args([
                "--listen",
                &address,
                "--threads",
                "1",
                "--log",
                "warn",
                "--no-auth",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening on"), "worker said {line:?}");
        self.workers.push(child);
        address
    }

    /// SIGKILLs the `index`-th worker started (and reaps it).
    pub fn kill_worker(&mut self, index: usize) {
        let _ = self.workers[index].kill();
        let _ = self.workers[index].wait();
    }

    /// Starts a worker again in namespace `host` on `port` (as systemd would restart it),
    /// in place of the `index`-th one.
    pub fn restart_worker(&mut self, index: usize, host: usize, port: u16) -> String {
        let address = self.start_worker(host, port);
        let child = self.workers.pop().expect("just started");
        self.workers[index] = child;
        address
    }

    pub fn set_link(&self, host: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        run(&["ip", "link", "set", &self.veths[host], state]).unwrap();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for child in &mut self.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.namespaces {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
