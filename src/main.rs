//! The `kabao` binary: parse the command line, start telemetry, run the subcommand, flush
//! telemetry.

use clap::Parser;
use kabao::config::{Cli, Command, Config};

/// mimalloc rather than glibc's malloc: the request path makes many small, short-lived
/// allocations (hyper's heads, JSON, spans), on which glibc's spent ≈ 15 % of a single ping's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo prints its own report; a log line per push would drown it.
    let default_level = if matches!(cli.command, Command::Demo(_)) { "warn" } else { "info" };
    let telemetry = kabao::telemetry::init(cli.log_format, default_level, cli.otlp_endpoint.as_deref())?;
    let result = match cli.command {
        Command::Serve(args) => kabao::app::serve(Config::load(args)?).await,
        Command::Demo(args) => kabao::app::demo(args).await,
        Command::FakePush(args) => kabao::fakepush::run(args).await,
        Command::Store(command) => kabao::app::store_command(command).await,
        Command::Loadgen(args) => kabao::loadgen::run(args).await,
    };
    // After the command: `serve` returns once its requests are drained, so their spans are in.
    telemetry.shutdown().await;
    result
}
