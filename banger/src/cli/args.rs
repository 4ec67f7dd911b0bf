//! The `banger` command line: what users type, with the help text they read.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run Firecracker microVMs as yourself: `banger vm run --name dev -- cat /etc/hostname`.
///
/// banger talks to your own daemon (bangerd, started on demand), which asks the host's
/// banger-helper for network and disk devices. Set BANGER_HOME to keep a separate install
/// under one directory.
#[derive(Debug, Parser)]
#[command(name = "banger", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, start, inspect and remove VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Import and remove the kernel + root filesystem pairs VMs boot from.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Inspect or stop your bangerd daemon.
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Check that this host and your user can run VMs: one line per check, with the fix for
    /// each failure; exits non-zero when a required check fails.
    Doctor {
        /// Print a JSON array of the checks.
        #[arg(long)]
        json: bool,
    },
}

/// The shape of a VM at creation.
#[derive(Debug, Clone, Args)]
pub struct VmShape {
    /// Image to boot (see `banger image list`); the configured default when omitted.
    #[arg(long)]
    pub image: Option<String>,
    /// Number of vCPUs (1–32).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long = "memory")]
    pub memory_mib: Option<u32>,
    /// Give the VM a work disk of SIZE (e.g. 10G, 512M): a sparse ext4 file of its own, mounted
    /// by the guest at /work, kept across stops, deleted with the VM.
    #[arg(long = "disk", value_name = "SIZE", value_parser = crate::size::parse_size)]
    pub disk_bytes: Option<u64>,
}

/// `banger vm ...`.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM (nothing runs until `vm start`; its root disk is made at the first start,
    /// a work disk at once).
    Create {
        /// The VM's name: 1–63 lowercase letters, digits or '-'.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        shape: VmShape,
        /// Print the VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Boot a VM.
    Start {
        /// The VM's name.
        name: String,
        /// Print the VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shut a VM down (Ctrl-Alt-Del, then a kill after a grace period) and free its devices.
    Stop {
        /// The VM's name.
        name: String,
        /// Print the VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop, then start a VM.
    Restart {
        /// The VM's name.
        name: String,
        /// Print the VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a VM and its disks (stopping it first if it runs).
    Delete {
        /// The VM's name.
        name: String,
    },
    /// List your VMs.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM.
    Show {
        /// The VM's name.
        name: String,
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the end of a VM's serial console log.
    Logs {
        /// The VM's name.
        name: String,
        /// How many bytes from the end.
        #[arg(long, default_value_t = 16384)]
        bytes: u64,
    },
    /// Open a shell in a running VM, or run a command there.
    Ssh {
        /// The VM's name.
        name: String,
        /// Command to run instead of a shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Create and start a VM if needed, wait until it accepts SSH, run a command, exit with its
    /// exit code.
    Run {
        /// The VM's name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        shape: VmShape,
        /// Delete the VM afterwards.
        #[arg(long)]
        rm: bool,
        /// Seconds to wait for SSH.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// The command (a shell when omitted).
        #[arg(last = true)]
        command: Vec<String>,
    },
}

/// `banger image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Copy a kernel and a root filesystem into your banger state under a name, read-only (an
    /// imported image must never change: VM disks are built on it).
    Import {
        /// The image's name.
        name: String,
        /// An uncompressed x86_64 kernel (vmlinux).
        #[arg(long)]
        kernel: PathBuf,
        /// An ext4 root filesystem image.
        #[arg(long)]
        rootfs: PathBuf,
    },
    /// List imported images.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image no VM uses (refused, naming them, while VMs use it).
    Rm {
        /// The image's name.
        name: String,
    },
}

/// `banger daemon ...`.
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Show whether bangerd runs and what it uses.
    Status {
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Stop bangerd (VMs keep running; the next command starts it again).
    Stop,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_dashes() {
        let cli =
            Cli::try_parse_from(["banger", "vm", "run", "--name", "dev", "--rm", "--", "sh", "-c", "exit 7"])
                .unwrap();
        match cli.command {
            Command::Vm(VmCommand::Run { name, rm, command, .. }) => {
                assert_eq!(name, "dev");
                assert!(rm);
                assert_eq!(command, ["sh", "-c", "exit 7"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn disk_sizes_are_parsed_with_their_unit() {
        let cli = Cli::try_parse_from(["banger", "vm", "create", "--name", "dev", "--disk", "10G"]).unwrap();
        match cli.command {
            Command::Vm(VmCommand::Create { shape, .. }) => assert_eq!(shape.disk_bytes, Some(10 << 30)),
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["banger", "vm", "run", "--name", "dev", "--disk", "512M"]).unwrap();
        match cli.command {
            Command::Vm(VmCommand::Run { shape, .. }) => assert_eq!(shape.disk_bytes, Some(512 << 20)),
            other => panic!("{other:?}"),
        }
        let err =
            Cli::try_parse_from(["banger", "vm", "create", "--name", "dev", "--disk", "10"]).unwrap_err();
        assert!(err.to_string().contains("like 512M or 10G"), "{err}");
    }

    #[test]
    fn every_command_has_help() {
        let mut cmd = Cli::command();
        for sub in cmd.get_subcommands_mut() {
            assert!(sub.get_about().is_some(), "{} has no help", sub.get_name());
            for leaf in sub.get_subcommands() {
                assert!(leaf.get_about().is_some(), "{} {} has no help", sub.get_name(), leaf.get_name());
            }
        }
    }
}
