//! The Linux implementation of the kernel traits.

pub mod dm;
pub mod iptables;
pub mod jails;
pub mod links;
pub mod loops;
pub mod sysctl;

use super::Kernel;
pub use dm::LinuxDm;
pub use iptables::Iptables;
pub use jails::LinuxJails;
pub use links::NetlinkLinks;
pub use loops::LinuxLoops;
pub use sysctl::ProcSysctl;

/// The real kernel: rtnetlink and tun ioctls, the iptables tools, loop ioctls, device-mapper
/// ioctls and nodes, `/proc/sys`, and the jail launcher.
#[derive(Debug)]
pub struct LinuxKernel {
    links: NetlinkLinks,
    firewall: Iptables,
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
}

impl LinuxKernel {
    /// Opens everything in the calling thread's network namespace, with the firewall tools
    /// located at start ([`Iptables::locate`]) and device-mapper as found at start
    /// ([`LinuxDm::detect`]) and jails as the launcher started at start makes them
    /// ([`LinuxJails::new`], or [`LinuxJails::unavailable`]); must run inside the tokio runtime
    /// (the rtnetlink connection is a task on it).
    pub fn new(firewall: Iptables, dm: LinuxDm, jails: LinuxJails) -> Result<Self, LinuxKernelError> {
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
    type Firewall = Iptables;
    type Loops = LinuxLoops;
    type Dm = LinuxDm;
    type Sysctl = ProcSysctl;
    type Jails = LinuxJails;
    fn links(&self) -> &NetlinkLinks {
        &self.links
    }
    fn firewall(&self) -> &Iptables {
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
