use std::io::Write;
use std::net::SocketAddr;

use clap::Parser;

/// A tp worker: holds one shard of a model and computes its part of every step.
///
/// The coordinator (`tp-coordinator --workers hosts.toml`) connects to it, sends its shard plan
/// and drives it. Prints "listening on ADDR" once it accepts connections.
#[derive(Parser, Debug)]
#[command(name = "tp-worker", version)]
struct Args {
    /// Address for the control plane. Loopback unless you mean to expose it.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Compute threads (0: one per available core).
    #[arg(long, short = 't', default_value_t = 0)]
    threads: usize,
    /// Log level filter (error, warn, info, debug, trace).
    #[arg(long, default_value = "info")]
    log: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let options = tp::worker::WorkerOptions {
        listen: args.listen,
        threads: args.threads,
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
