//! The `kabao` binary: parse the command line, start telemetry, run the subcommand.

use std::io::IsTerminal;

use clap::Parser;
use kabao::config::{Cli, Command, Config};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        // Logs go to stderr; stdout carries only the announcements (port, generated token).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Serve(args) => kabao::app::serve(Config::load(args)?).await,
        Command::Demo(args) => kabao::app::demo(args).await,
    }
}
