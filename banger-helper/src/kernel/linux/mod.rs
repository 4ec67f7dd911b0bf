//! The Linux implementation of the kernel traits.

pub mod dm;
pub mod iptables;
pub mod jails;
pub mod links;
pub mod loops;
pub mod nftables;
pub mod sysctl;

use std::collections::BTreeSet;

use banger_policy::{FirewallChoice, Network};
use banger_protocol::FirewallBackend;

use super::{Firewall, KResult, Kernel};
use crate::firewall::VmRules;
use crate::names::VmKey;
pub use dm::LinuxDm;
pub use iptables::Iptables;
pub use jails::LinuxJails;
pub use links::NetlinkLinks;
pub use loops::LinuxLoops;
pub use nftables::Nftables;
pub use sysctl::ProcSysctl;

/// The real kernel: rtnetlink and tun ioctls, nf_tables over netlink or the iptables tools,
/// loop ioctls, device-mapper ioctls and nodes, `/proc/sys`, and the jail launcher.
#[derive(Debug)]
pub struct LinuxKernel {
    links: NetlinkLinks,
    firewall: LinuxFirewall,
    loops: LinuxLoops,
    dm: LinuxDm,
    sysctl: ProcSysctl,
    jails: LinuxJails,
}

/// Why the Linux kernel access could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinuxKernelError {
    /// No rtnetlink socket.
    #[error("cannot open an rtnetlink socket")]
    Netlink(#[source] std::io::Error),
    /// The iptables tools are missing.
    #[error(transparent)]
    Tools(#[from] iptables::ToolMissing),
    /// The policy asks for nftables and the kernel has none.
    #[error(
        "network.firewall is \"nftables\", but nf_tables cannot be used here ({0}); load the nf_tables \
         module, or set network.firewall to \"iptables\" or \"auto\""
    )]
    NoNftables(#[source] super::KernelError),
}

/// The firewall backend chosen at start.
#[derive(Debug)]
pub enum LinuxFirewall {
    /// nf_tables over netlink.
    Nftables(Nftables),
    /// The iptables tools.
    Iptables(Iptables),
}

impl LinuxFirewall {
    /// The backend `net.firewall` asks for. `auto`: nftables where the kernel has nf_tables and
    /// everything the rules use, else the iptables tools — and the iptables tools while
    /// `running_nat` (the ledger holds NAT of VMs whose TAP is there) and the helper's nftables
    /// table is not (or cannot be read):
    /// those VMs' rules are iptables rules (a helper of an earlier release, or one told to use
    /// iptables), which stay theirs until they go; the next start without them moves to nftables.
    pub fn choose(net: &Network, running_nat: bool) -> Result<Self, LinuxKernelError> {
        match net.firewall {
            FirewallChoice::Iptables => Ok(LinuxFirewall::Iptables(Iptables::locate()?)),
            FirewallChoice::Nftables => {
                Nftables::open(net).map(LinuxFirewall::Nftables).map_err(LinuxKernelError::NoNftables)
            }
            FirewallChoice::Auto => match Nftables::open(net) {
                Ok(nft) if running_nat && !nft.table_present().unwrap_or(false) => match Iptables::locate() {
                    Ok(iptables) => {
                        tracing::info!(
                            "VMs' NAT is in the ledger and banger's nftables table is not there: keeping the iptables tools until no VM runs"
                        );
                        Ok(LinuxFirewall::Iptables(iptables))
                    }
                    Err(_) => Ok(LinuxFirewall::Nftables(nft)),
                },
                Ok(nft) => Ok(LinuxFirewall::Nftables(nft)),
                Err(e) => {
                    tracing::info!(
                        "nf_tables cannot be used here ({e}); the firewall goes through the iptables tools"
                    );
                    Ok(LinuxFirewall::Iptables(Iptables::locate()?))
                }
            },
        }
    }

    /// The iptables tools' backend is the legacy one (which locks `/run/xtables.lock`).
    pub fn legacy_iptables(&self) -> bool {
        matches!(self, LinuxFirewall::Iptables(i) if i.legacy())
    }
}

impl Firewall for LinuxFirewall {
    fn backend(&self) -> FirewallBackend {
        match self {
            LinuxFirewall::Nftables(f) => f.backend(),
            LinuxFirewall::Iptables(f) => f.backend(),
        }
    }

    async fn vms(&self) -> KResult<BTreeSet<VmKey>> {
        match self {
            LinuxFirewall::Nftables(f) => f.vms().await,
            LinuxFirewall::Iptables(f) => f.vms().await,
        }
    }

    async fn update(&self, net: &Network, up: &[VmRules], down: &[VmKey]) -> KResult<bool> {
        match self {
            LinuxFirewall::Nftables(f) => f.update(net, up, down).await,
            LinuxFirewall::Iptables(f) => f.update(net, up, down).await,
        }
    }
}

impl LinuxKernel {
    /// Opens everything in the calling thread's network namespace, with the firewall chosen at
    /// start ([`LinuxFirewall::choose`]) and device-mapper as found at start
    /// ([`LinuxDm::detect`]) and jails as the launcher started at start makes them
    /// ([`LinuxJails::new`], or [`LinuxJails::unavailable`]); must run inside the tokio runtime
    /// (the rtnetlink connection is a task on it).
    pub fn new(firewall: LinuxFirewall, dm: LinuxDm, jails: LinuxJails) -> Result<Self, LinuxKernelError> {
        Ok(LinuxKernel {
            links: NetlinkLinks::new().map_err(LinuxKernelError::Netlink)?,
            firewall,
            loops: LinuxLoops::new("/dev"),
            dm,
            sysctl: ProcSysctl::new("/proc/sys"),
            jails,
        })
    }
}

impl Kernel for LinuxKernel {
    type Links = NetlinkLinks;
    type Firewall = LinuxFirewall;
    type Loops = LinuxLoops;
    type Dm = LinuxDm;
    type Sysctl = ProcSysctl;
    type Jails = LinuxJails;
    fn links(&self) -> &NetlinkLinks {
        &self.links
    }
    fn firewall(&self) -> &LinuxFirewall {
        &self.firewall
    }
    fn loops(&self) -> &LinuxLoops {
        &self.loops
    }
    fn dm(&self) -> &LinuxDm {
        &self.dm
    }
    fn sysctl(&self) -> &ProcSysctl {
        &self.sysctl
    }
    fn jails(&self) -> &LinuxJails {
        &self.jails
    }
}
