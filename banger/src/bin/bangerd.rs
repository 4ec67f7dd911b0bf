//! `bangerd`: the per-user banger daemon. Usually started by `banger` on demand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The per-user banger daemon: keeps your VMs' state, talks to banger-helper and to each VMM.
/// `banger` starts it on demand; it serves on BANGER_HOME/run/bangerd.sock (or
/// $XDG_RUNTIME_DIR/banger/bangerd.sock) and logs to bangerd.log in its state directory.
#[derive(Debug, Parser)]
#[command(name = "bangerd", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Copy standard input into a size-capped log file until end of input (used for VMM
    /// serial consoles).
    #[command(hide = true)]
    SerialRelay {
        /// The log file.
        path: std::path::PathBuf,
        /// The cap in bytes.
        cap: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Some(Sub::SerialRelay { path, cap }) => {
            banger::daemon::logs::relay(std::io::stdin().lock(), &path, cap)
                .map(drop)
                .map_err(anyhow::Error::from)
        }
        None => banger::daemon::startup::run().map(drop),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bangerd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
