//! The `banger` command line: what users type, with the help text they read.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run Firecracker microVMs as yourself: `banger vm run --name dev -- cat /etc/hostname`.
///
/// banger talks to your own daemon (bangerd, started on demand), which asks the host's
/// banger-helper for network and disk devices. Set BANGER_HOME to keep a separate install
/// under one directory. Settings are in ~/.config/banger/config.toml; `launch = "jailer"` there
/// has banger-helper start each new VM's Firecracker through Firecracker's jailer (a uid of its
/// own, a chroot, CPU and memory limits) instead of as you (`launch = "direct"`, the default).
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
    /// Print a completion script for SHELL, e.g. `banger completions bash >
    /// ~/.local/share/bash-completion/completions/banger`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (banger.1, banger-vm.1, banger-vm-create.1, ...) into DIR.
    #[command(hide = true)]
    Man {
        /// Where to write them (made if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Connect to ADDR and hand the connection to the ssh that runs this as its ProxyCommand
    /// (`ProxyUseFdpass`), with Nagle's algorithm off; `banger vm ssh` and `vm run` use it.
    #[command(hide = true)]
    SshDial {
        /// The guest's SSH address, IP:PORT.
        addr: std::net::SocketAddr,
    },
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

/// How `vm stop` and `vm delete` end a running guest.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct ShutdownArgs {
    /// Seconds the guest gets to shut down after Ctrl-Alt-Del before its VMM is killed
    /// (default 10, at most 3600).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub timeout: Option<u64>,
    /// Kill the VMM at once, without asking the guest to shut down (what it has not written to
    /// its disks is lost). A jailed VMM is killed by banger-helper.
    #[arg(long, conflicts_with = "timeout")]
    pub force: bool,
}

/// `banger vm ...`.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM (nothing runs until `vm start`; its root disk is made at the first start,
    /// a work disk at once).
    Create {
        /// The VM's name: 1–63 lowercase letters, digits or '-'.
        #[arg(required_unless_present = "name_flag", conflicts_with = "name_flag")]
        name: Option<String>,
        /// The VM's name, as a flag (the same as NAME).
        #[arg(long = "name", id = "name_flag", value_name = "NAME")]
        name_flag: Option<String>,
        #[command(flatten)]
        shape: VmShape,
        /// Print the VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Boot a VM, showing its steps on standard error (one line redrawn on a terminal, one
    /// plain line per step otherwise, nothing with --json). Its first start fixes how its
    /// Firecracker runs (the `launch` setting: direct, or through the jailer).
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
        #[command(flatten)]
        shutdown: ShutdownArgs,
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
    /// Remove a VM and its disks (stopping it first if it runs, as `vm stop` does).
    Delete {
        /// The VM's name.
        name: String,
        #[command(flatten)]
        shutdown: ShutdownArgs,
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
    /// Print the end of a VM's serial console (its last run and the one before), or of
    /// Firecracker's own log.
    Logs {
        /// The VM's name.
        name: String,
        /// How many bytes from the end.
        #[arg(long, default_value_t = 16384)]
        bytes: u64,
        /// Keep printing what is written, until interrupted (Ctrl-C).
        #[arg(long, short = 'f')]
        follow: bool,
        /// Firecracker's own log (its messages about the VM) instead of the guest's console
        /// (a VM launched through the jailer has none).
        #[arg(long)]
        vmm: bool,
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

impl VmCommand {
    /// The name `vm create` was given, as NAME or `--name`.
    pub fn create_name(name: Option<String>, name_flag: Option<String>) -> String {
        name.or(name_flag).expect("clap requires NAME or --name")
    }
}

/// `banger image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Copy a kernel and a root filesystem into your banger state under a name, read-only (an
    /// imported image must never change: VM disks are built on it). Shows on standard error the
    /// check, copy and hash of each file: one line redrawn on a terminal, with the bytes done;
    /// one plain line per step otherwise; nothing with --json.
    Import {
        /// The image's name.
        name: String,
        /// An uncompressed x86_64 kernel (vmlinux).
        #[arg(long)]
        kernel: PathBuf,
        /// An ext4 root filesystem image.
        #[arg(long)]
        rootfs: PathBuf,
        /// An initrd the kernel boots with (for a kernel whose drivers are modules, as
        /// Debian's).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Print the image as JSON, and no progress.
        #[arg(long)]
        json: bool,
    },
    /// Build a Debian image as you, without root, and import it: Debian's kernel (as an ELF
    /// vmlinux) with an initrd, and an ext4 root filesystem with systemd, an SSH server and its
    /// network from the kernel command line. Uses mmdebstrap (unshare mode, which needs your
    /// subordinate ids in /etc/subuid and /etc/subgid) with this host's apt sources and
    /// options. `vm run` and `vm create` build it when no image exists yet. Shows on standard
    /// error the stages mmdebstrap reports, the kernel's extraction, the checks, the resize and
    /// the import (as `image import` does); mmdebstrap's own output goes to image-build.log in
    /// your banger state directory.
    Build {
        /// The image's name (default: debian).
        name: Option<String>,
        /// Print the image as JSON, and no progress.
        #[arg(long)]
        json: bool,
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
        let cli = Cli::try_parse_from(["banger", "vm", "create", "dev", "--disk", "10G"]).unwrap();
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
    fn create_takes_the_name_as_an_argument_or_a_flag() {
        for args in [&["banger", "vm", "create", "dev"][..], &["banger", "vm", "create", "--name", "dev"]] {
            match Cli::try_parse_from(args).unwrap().command {
                Command::Vm(VmCommand::Create { name, name_flag, .. }) => {
                    assert_eq!(VmCommand::create_name(name, name_flag), "dev")
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(Cli::try_parse_from(["banger", "vm", "create"]).is_err(), "a name is needed");
        assert!(Cli::try_parse_from(["banger", "vm", "create", "a", "--name", "b"]).is_err(), "one name");
    }

    #[test]
    fn stop_and_delete_take_a_timeout_or_force() {
        let cli = Cli::try_parse_from(["banger", "vm", "stop", "dev", "--timeout", "30"]).unwrap();
        match cli.command {
            Command::Vm(VmCommand::Stop { shutdown, .. }) => {
                assert_eq!((shutdown.timeout, shutdown.force), (Some(30), false))
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["banger", "vm", "delete", "dev", "--force"]).unwrap();
        match cli.command {
            Command::Vm(VmCommand::Delete { shutdown, .. }) => assert!(shutdown.force),
            other => panic!("{other:?}"),
        }
        for bad in [
            &["banger", "vm", "stop", "dev", "--timeout", "5", "--force"][..],
            &["banger", "vm", "stop", "dev", "--timeout", "3601"],
            &["banger", "vm", "delete", "dev", "--timeout", "-1"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
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
