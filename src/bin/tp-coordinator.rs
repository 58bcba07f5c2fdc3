use clap::Parser;
use tp::coordinator::cli::{Cli, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Stop quietly when stdout is a closed pipe (`tp-coordinator ... | head`), as Unix tools do.
    // SIGPIPE itself stays ignored (Rust's default): sockets written with writev would raise
    // it too, and a worker or client going away must be an error, not the coordinator's death.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    let cli = Cli::parse_from(tp::coordinator::cli::default_to_serve(std::env::args_os()));
    // In-process workers (`--local N`) and the coordinator's own products use these kernels.
    if let Err(e) = tp::kernels::cpu::select_kernels_from_env() {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
