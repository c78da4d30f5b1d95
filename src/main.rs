//! The `kabao` binary: parse the command line, start telemetry, run the subcommand.

use clap::Parser;
use kabao::config::{Cli, Command, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo prints its own report; a log line per push would drown it.
    let default_level = if matches!(cli.command, Command::Demo(_)) { "warn" } else { "info" };
    kabao::telemetry::init_logs(cli.log_format, default_level);
    match cli.command {
        Command::Serve(args) => kabao::app::serve(Config::load(args)?).await,
        Command::Demo(args) => kabao::app::demo(args).await,
        Command::FakePush(args) => kabao::fakepush::run(args).await,
        Command::Store(command) => kabao::app::store_command(command).await,
        Command::Loadgen(args) => kabao::loadgen::run(args).await,
    }
}
