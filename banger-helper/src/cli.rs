//! The command line: `serve`, `policy check`, `policy explain`, `--version`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use banger_protocol::DEFAULT_SOCKET;
/// Where the ledger lives unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/banger-helper";
/// Where the helper makes the device nodes of dm-snapshot targets unless told otherwise: on
/// devtmpfs, since `/run` and most other filesystems are mounted `nodev`.
pub const DEFAULT_NODE_DIR: &str = "/dev/banger";

/// The root helper of banger: typed, policy-checked kernel operations for unprivileged daemons.
#[derive(Debug, Parser)]
#[command(name = "banger-helper", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve requests on the helper socket (runs as root, drops what it does not need).
    Serve {
        /// The socket to listen on (ignored when systemd passes a listening socket).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The policy file.
        #[arg(long, default_value = banger_policy::DEFAULT_POLICY_PATH)]
        policy: PathBuf,
        /// The directory holding the ownership ledger.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Where the device nodes of dm-snapshot roots are made (root's, 0711; only the helper
        /// writes there). Must be on a filesystem that allows device nodes (not `nodev`).
        #[arg(long, default_value = DEFAULT_NODE_DIR)]
        node_dir: PathBuf,
    },
    /// Check or explain a policy file.
    Policy {
        /// What to do with the policy.
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file; exits non-zero with file:line and the reason on any error, or when
    /// the host does not fit its [jailer] (binaries root's and not writable by others, Firecracker
    /// statically linked, the chroot base root's, no account, group or subordinate id in the uid
    /// range), and warns (exiting zero) when it admits nobody or names a user or group this host
    /// does not have.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Describe in plain sentences what a policy lets each user do.
    Explain {
        /// The policy file.
        file: PathBuf,
        /// Only this user (a name or uid): whether it may connect, decided as the helper
        /// decides with its groups on this host, and why.
        #[arg(long)]
        user: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_defaults() {
        let cli = Cli::try_parse_from(["banger-helper", "serve"]).unwrap();
        let Command::Serve { socket, policy, state_dir, node_dir } = cli.command else { panic!() };
        assert_eq!(socket, PathBuf::from("/run/banger/helper.sock"));
        assert_eq!(policy, PathBuf::from("/etc/banger/policy.toml"));
        assert_eq!(state_dir, PathBuf::from("/var/lib/banger-helper"));
        assert_eq!(node_dir, PathBuf::from("/dev/banger"));
    }

    #[test]
    fn policy_subcommands() {
        let cli =
            Cli::try_parse_from(["banger-helper", "policy", "explain", "p.toml", "--user", "alice"]).unwrap();
        let Command::Policy { command: PolicyCommand::Explain { file, user } } = cli.command else {
            panic!()
        };
        assert_eq!((file, user.as_deref()), (PathBuf::from("p.toml"), Some("alice")));
        assert!(Cli::try_parse_from(["banger-helper", "policy", "check"]).is_err());
    }
}
