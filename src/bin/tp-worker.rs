use std::io::Write;
use std::net::SocketAddr;

use clap::Parser;

/// A tp worker: holds one shard of a model and computes its part of every step.
///
/// The coordinator (`tp-coordinator --workers hosts.toml`) connects to it, sends its shard plan
/// and drives it. Prints "listening on ADDR" once it accepts connections.
#[derive(Parser, Debug)]
#[command(
    name = "tp-worker",
    version,
    after_help = "Environment:\n  TP_KERNELS=scalar|avx2|avx512|neon  force a CPU kernel set (default: the best this CPU runs)"
)]
struct Args {
    /// Address for the control plane. Loopback unless you mean to expose it.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Compute threads (0: one per physical core of --numa-node, else one per CPU this
    /// process may use).
    #[arg(long, short = 't', default_value_t = 0)]
    threads: usize,
    /// Run only on these CPUs (e.g. `0-7` or `0,2,4`) and pin compute thread i to the i-th.
    /// Without it, threads are pinned only when the process was started on a restricted CPU set
    /// (taskset, numactl, systemd CPUAffinity=).
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
    /// Bind this worker's threads and memory to NUMA node N (its weights and buffers are
    /// allocated after binding, so their pages are local), with one compute thread per
    /// physical core of the node unless --threads says otherwise. Needs a build with
    /// `--features numa`.
    #[arg(long, value_name = "N")]
    numa_node: Option<usize>,
    /// Read the machine's layout from this hwloc XML file (`lstopo file.xml`) instead of
    /// discovering it; binding is then only pretended (for testing placement).
    #[arg(long, value_name = "FILE", requires = "numa_node")]
    topology_xml: Option<std::path::PathBuf>,
    /// Where to keep model bytes received from a coordinator when this host has no copy of the
    /// model (default: ~/.cache/tp/received). A restart loads from here instead of the network.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// Port of the data-plane socket, on the --listen address: other workers send activations
    /// there (0: any free port; the coordinator learns it from the worker).
    #[arg(long, default_value_t = 0)]
    data_port: u16,
    /// File holding the cluster's shared token (first line; at least 16 characters). Every
    /// control-plane request must carry it; give the coordinator the same file.
    #[arg(long, value_name = "FILE")]
    auth_token_file: Option<std::path::PathBuf>,
    /// This worker's TLS certificate (PEM, signed by --tls-ca, naming the host the coordinator
    /// uses for it); with --tls-key and --tls-ca the control plane is mutual TLS.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,
    /// The CA certificate (PEM) that signs the cluster's certificates: only a coordinator
    /// presenting a certificate it signed is served.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Accept control-plane requests without a token on a non-loopback address (only on a
    /// network where everyone may drive this worker).
    #[arg(long, conflicts_with = "auth_token_file")]
    no_auth: bool,
    /// Directory where the coordinator may save sequence slots' KV cache (`serve
    /// --slot-save-path`): this worker writes its own shard there as NAME.rankR. Without it,
    /// saving and restoring are refused.
    #[arg(long, value_name = "DIR")]
    slot_save_path: Option<std::path::PathBuf>,
    /// Log level filter (error, warn, info, debug, trace).
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // A panic anywhere ends the worker: a step cut short leaves its shard and its peers'
    // collectives in an unknown state, while a fresh process (systemd's Restart=) is one the
    // coordinator re-forms the cluster with. Staying up would only fail every request.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!(
            "tp-worker: exiting after a panic; the coordinator re-forms the cluster once it is back"
        );
        // SAFETY: _exit has no preconditions; it skips destructors, which a panicking
        // process must not rely on.
        unsafe { libc::_exit(101) }
    }));
    let kernels = match tp::kernels::cpu::select_kernels_from_env() {
        Ok(name) => name,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let tls = match tp::tls::TlsFiles::from_paths(
        args.tls_cert.as_ref(),
        args.tls_key.as_ref(),
        args.tls_ca.as_ref(),
    ) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let auth_token = match &args.auth_token_file {
        Some(path) => match tp::auth::Token::read(path) {
            Ok(token) => Some(token),
            Err(e) => {
                eprintln!("error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        },
        None if !args.listen.ip().is_loopback() && !args.no_auth => {
            eprintln!(
                "error: --listen {} is reachable from other hosts: give --auth-token-file FILE (the same file as the coordinator's), or --no-auth on a network you trust",
                args.listen
            );
            return std::process::ExitCode::FAILURE;
        }
        None => None,
    };
    let cpus = match args.cpus.as_deref().map(tp::kernels::pool::parse_cpu_list) {
        None => None,
        Some(Ok(cpus)) => Some(cpus),
        Some(Err(e)) => {
            eprintln!("error: --cpus: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Bind before any other thread exists and before anything is allocated, so that all
    // threads inherit the binding and the weights land in the node's memory.
    let mut node_cpus = None;
    let mut threads = args.threads;
    if let Some(index) = args.numa_node {
        match tp::numa::bind(index, args.topology_xml.as_deref()) {
            Ok(node) => {
                eprintln!(
                    "bound to NUMA node {index}: {} cores, CPUs {:?}, memory bound",
                    node.cores, node.cpus
                );
                if threads == 0 {
                    threads = node.cores.max(1);
                }
                // With a topology file the CPUs may not exist here: pin nothing.
                if args.topology_xml.is_none() {
                    node_cpus = Some(node.cpus);
                }
            }
            Err(e) => {
                eprintln!("error: --numa-node {index}: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let cpus = cpus.or(node_cpus);
    // Restrict the process before any other thread exists, so that all of them inherit it.
    if let Some(cpus) = &cpus
        && let Err(e) = tp::kernels::pool::set_affinity(cpus)
    {
        eprintln!("error: cannot run on CPUs {cpus:?}: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(args, threads, cpus, auth_token, tls, kernels))
}

/// The CPUs to pin compute threads to: those given, or the process's CPU set when it is a
/// strict subset of the machine's online CPUs.
fn pin_set(cpus: Option<Vec<usize>>) -> Option<Vec<usize>> {
    if cpus.is_some() {
        return cpus;
    }
    let allowed = tp::kernels::pool::allowed_cpus();
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    (!allowed.is_empty() && (allowed.len() as i64) < online).then_some(allowed)
}

async fn serve(
    args: Args,
    threads: usize,
    cpus: Option<Vec<usize>>,
    auth_token: Option<tp::auth::Token>,
    tls: Option<tp::tls::TlsFiles>,
    kernels: &str,
) -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    tracing::info!("CPU kernels: {kernels} (TP_KERNELS=scalar|avx2|avx512|neon forces a set)");
    if auth_token.is_none() {
        tracing::warn!(
            "the control plane accepts requests without a token (give --auth-token-file)"
        );
    }
    let options = tp::worker::WorkerOptions {
        listen: args.listen,
        threads,
        pin: pin_set(cpus),
        cache_dir: args.cache_dir.clone(),
        data_port: args.data_port,
        auth_token,
        tls,
        numa_node: args.numa_node,
        slot_save_path: args.slot_save_path,
    };
    let on_bound = |address: SocketAddr| {
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "listening on {address}");
        let _ = stdout.flush();
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        // A step blocked on a dead peer would hold a graceful shutdown until the collective
        // deadline; after a short grace period the worker leaves anyway.
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_secs(1));
            std::process::exit(0);
        });
    };
    match tp::worker::run(options, on_bound, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
