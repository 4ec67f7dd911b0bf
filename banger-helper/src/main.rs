//! The `banger-helper` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use banger_helper::cli::{Cli, Command, PolicyCommand};
use banger_helper::policy_cmd::{self, SystemAccounts, SystemHost};
use banger_helper::serve::{ServeOptions, load_policy, serve};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The devicemapper crate reports at `error` that it cannot reach the SysV semaphores it
    // would wait on udev with; the helper's seccomp filter refuses them on purpose (see
    // hardening/seccomp.rs), so that is not worth a line.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,devicemapper::core::dm_udev_sync=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Serve { socket, policy, state_dir, node_dir } => {
            serve(&ServeOptions { socket, policy, state_dir, node_dir }).map_err(anyhow::Error::from)
        }
        Command::Policy { command: PolicyCommand::Check { file } } => {
            load_policy(&file).map_err(anyhow::Error::from).and_then(|p| {
                for warning in policy_cmd::check_warnings(&p, &SystemAccounts) {
                    eprintln!("{}: warning: {warning}", file.display());
                }
                policy_cmd::check_host(&p, &SystemHost).map_err(|e| {
                    for problem in &e.0 {
                        eprintln!("{}: {}: {}", file.display(), problem.key, problem.reason);
                    }
                    anyhow::anyhow!("{}: the host does not fit [jailer]", file.display())
                })?;
                println!("{}: ok", file.display());
                Ok(())
            })
        }
        Command::Policy { command: PolicyCommand::Explain { file, user } } => load_policy(&file)
            .map(|p| match user {
                Some(user) => print!("{}", policy_cmd::explain_user(&p, &user, &SystemAccounts)),
                None => print!("{}", banger_policy::explain(&p, None)),
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("banger-helper: {e:#}");
            ExitCode::FAILURE
        }
    }
}
