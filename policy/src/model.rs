//! The policy as data, after parsing and validation. Field docs say what an admin writes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use banger_protocol::IfName;
use ipnet::Ipv4Net;

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Who may connect to the helper.
    pub access: Access,
    /// Per-user limits.
    pub quotas: Quotas,
    /// Per-user overrides of [`Policy::quotas`], by user name.
    pub user_quotas: BTreeMap<String, Quotas>,
    /// Addresses, uplink and what guests may reach.
    pub network: Network,
    /// Where audit records go.
    pub audit: Audit,
    /// Launch through Firecracker's jailer; `None` without a `[jailer]` section (VMs then run
    /// only in direct mode).
    pub jailer: Option<Jailer>,
}

/// `[jailer]`: how the helper launches VMMs through Firecracker's jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jailer {
    /// The jailer binary (absolute; owned by root, not writable by group or others).
    pub jailer: PathBuf,
    /// The Firecracker binary the jailer copies into each jail (absolute; root-owned, not
    /// writable by group or others, statically linked).
    pub firecracker: PathBuf,
    /// The jailer's `--chroot-base-dir` (absolute, root-owned, not writable by others).
    pub chroot_base: PathBuf,
    /// The uids (each jail's gid is its uid) handed to jails, first and last inclusive; no real
    /// user or subordinate id range may overlap it.
    pub uids: (u32, u32),
    /// Which cgroup version the jailer is told to use.
    pub cgroup: CgroupVersion,
    /// The cgroup under which each user's parent cgroup (`<parent>/u<uid>`) is made. Default
    /// `banger`.
    pub cgroup_parent: String,
    /// Whether users may still run VMs in direct mode.
    pub mode: JailerMode,
}

impl Jailer {
    /// The cgroup of `uid`'s jails, relative to each hierarchy: `<cgroup_parent>/u<uid>`.
    pub fn user_cgroup(&self, uid: u32) -> String {
        format!("{}/u{uid}", self.cgroup_parent)
    }
}

impl Policy {
    /// Whether the policy forces every VM through the jailer (`[jailer] mode = "force"`): the
    /// helper then hands no TAP and no block device node to a user.
    pub fn force_jailer(&self) -> bool {
        self.jailer.as_ref().is_some_and(|j| j.mode == JailerMode::Force)
    }
}

impl CgroupVersion {
    /// As written in the policy: `auto`, `v1`, `v2`.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupVersion::Auto => "auto",
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        }
    }
}

impl JailerMode {
    /// As written in the policy: `allow`, `force`.
    pub fn as_str(self) -> &'static str {
        match self {
            JailerMode::Allow => "allow",
            JailerMode::Force => "force",
        }
    }
}

/// Which cgroup hierarchy jails' limits go in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// v2 where the unified hierarchy has the cpu and memory controllers, else v1.
    Auto,
    /// cgroup v1 (`cpu.cfs_quota_us`, `memory.limit_in_bytes`).
    V1,
    /// cgroup v2 (`cpu.max`, `memory.max`).
    V2,
}

/// Whether the jailer is one launch mode or the only one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailerMode {
    /// Users choose direct or jailer mode.
    Allow,
    /// Only jailed VMMs: the helper hands no TAP or block device to a user.
    Force,
}

/// `[access]`: who may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// User names (or decimal uids) allowed to connect.
    pub users: Vec<String>,
    /// Group names (or decimal gids) whose members may connect.
    pub groups: Vec<String>,
    /// The group that owns the helper socket (mode 0660). Default `banger`.
    pub socket_group: String,
}

/// `[quotas]`: per-user limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// VMs with any kernel object at once.
    pub max_vms: u32,
    /// TAP devices.
    pub max_taps: u32,
    /// Loop devices.
    pub max_loops: u32,
    /// vCPUs over all of the user's jailed VMMs (also the `cpu` limit of its cgroup).
    pub max_vcpus: u32,
    /// Guest memory in MiB over all of the user's jailed VMMs (also the `memory` limit of its
    /// cgroup).
    pub max_memory_mib: u32,
}

/// `[network]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The pool every lease is cut from. Default `172.30.0.0/16`.
    pub pool: Ipv4Net,
    /// Prefix length of one user's lease. Default 24.
    pub lease_prefix: u8,
    /// Prefix length of one VM's point-to-point subnet. Default 30.
    pub vm_prefix: u8,
    /// The interface guests' traffic leaves by.
    pub uplink: Uplink,
    /// Whether TAPs keep IPv6 (default false: disabled on each TAP).
    pub ipv6: bool,
    /// Whether a guest may reach other guests (default false).
    pub guest_to_guest: bool,
    /// What new connections a guest may open to the host itself.
    pub guest_to_host: GuestToHost,
    /// Which firewall the helper writes its rules with.
    pub firewall: FirewallChoice,
}

/// Which firewall the helper writes guests' rules with (`network.firewall`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FirewallChoice {
    /// nftables where the kernel has nf_tables, else the iptables tools (the default).
    #[default]
    Auto,
    /// banger's own nftables table, over netlink.
    Nftables,
    /// The `iptables` tools, in banger's chains of the `filter` and `nat` tables.
    Iptables,
}

/// Which interface is the uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uplink {
    /// The interface of the default route, looked up when NAT is set up.
    Auto,
    /// A named interface.
    Named(IfName),
}

/// What a guest may open to the host itself (replies to the host are always allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestToHost {
    /// Allow every new connection to the host (default false).
    pub allow_all: bool,
    /// Ports on the VM's gateway address a guest may reach, e.g. DNS (`udp/53`).
    pub allow: Vec<PortRule>,
}

/// One protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRule {
    /// The transport protocol.
    pub proto: Proto,
    /// The destination port.
    pub port: u16,
}

/// A transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// Where records go.
    pub target: AuditTarget,
}

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    /// One JSON line per record appended to this file.
    File(PathBuf),
    /// The helper's standard error (and so the journal under systemd).
    Stderr,
}

impl Proto {
    /// The protocol's lowercase name, as written in the policy (`tcp`, `udp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for PortRule {
    /// Written as in the policy: `udp/53`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.proto, self.port)
    }
}

impl std::fmt::Display for Uplink {
    /// `auto` or the interface name, as written in the policy.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uplink::Auto => f.write_str("auto"),
            Uplink::Named(name) => f.write_str(name.as_str()),
        }
    }
}
