//! The `kabao` binary: parse the command line, start telemetry, run the subcommand.

use std::io::IsTerminal;

use clap::Parser;
use kabao::config::{Cli, Command, Config};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo prints its own report; a log line per push would drown it.
    let default_level = if matches!(cli.command, Command::Demo(_)) { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)))
        // Logs go to stderr; stdout carries only the announcements (port, generated token).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Serve(args) => kabao::app::serve(Config::load(args)?).await,
        Command::Demo(args) => kabao::app::demo(args).await,
        Command::FakePush(args) => kabao::fakepush::run(args).await,
        Command::Store(command) => kabao::app::store_command(command).await,
        Command::Loadgen(args) => kabao::loadgen::run(args).await,
    }
}
