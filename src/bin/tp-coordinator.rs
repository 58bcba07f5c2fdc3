use clap::Parser;
use tp::coordinator::cli::{Cli, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Die quietly on a closed pipe (`tp-coordinator ... | head`), as Unix tools do, instead of
    // panicking in println!.
    // SAFETY: resetting a signal disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse_from(tp::coordinator::cli::default_to_serve(std::env::args_os()));
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
