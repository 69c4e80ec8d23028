//! The `halfguard` command: `run`, `check`, `--version`. Thin on purpose: everything it
//! does is a library call that tests make too.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Where the config is looked for when neither `-c` nor `HALFGUARD_CONFIG` says.
const DEFAULT_CONFIG: &str = "config/halfguard.toml";

/// Exit code for a config that does not load or validate.
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "halfguard",
    version,
    about = "A reverse TCP proxy where every connection state has a cap and a clock"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The TOML config file.
        #[arg(short, long, env = "HALFGUARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config and print the effective settings (exit 0), or name the file and
    /// the key that is wrong (exit 2).
    Check {
        /// The TOML config file.
        #[arg(short, long, env = "HALFGUARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = match &cli.command {
        Command::Run { config } | Command::Check { config } => config,
    };
    let config = match halfguard::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("halfguard: invalid config: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match cli.command {
        Command::Check { .. } => {
            println!("{config}");
            for w in config.warnings() {
                println!("warning: {w}");
            }
            println!("ok");
            ExitCode::SUCCESS
        }
        Command::Run { .. } => match serve(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("halfguard: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(config: halfguard::Config) -> anyhow::Result<()> {
    halfguard::logging::init(&config.log);
    match halfguard::sockopt::raise_nofile() {
        Ok(limit) => {
            // Two descriptors per proxied connection, plus listeners and slack.
            let need: u64 = config
                .listeners
                .iter()
                .map(|l| 2 * u64::from(l.limits.max_conns) + 1)
                .sum::<u64>()
                + 64;
            if need > limit {
                tracing::warn!(
                    open_files_limit = limit,
                    needed = need,
                    "max_conns needs more descriptors than the open-files limit allows; \
                     raise LimitNOFILE / ulimit -n or lower limits.max_conns"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    for line in config.to_string().lines() {
        tracing::info!("{line}");
    }
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime.worker_threads())
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let server = halfguard::Server::bind(config).await?;
        tokio::spawn(halfguard::shutdown::reload_on_sighup(server.handle()));
        server.run(halfguard::shutdown::signal()).await;
        anyhow::Ok(())
    })
}
