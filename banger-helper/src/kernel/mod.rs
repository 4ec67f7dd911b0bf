//! The kernel as the helper's operations see it: six narrow traits, one per domain, each with a
//! Linux implementation ([`linux`]) and, for the unit tests only, a recording fake (`fake`),
//! passed in by the caller. Every kernel and filesystem probe goes through them.
//!
//! - [`Links`]: TAP creation (tun ioctls), addresses, neighbour entries, a guest's route, link
//!   state and deletion (rtnetlink), the default route's interface;
//! - [`Firewall`]: guests' NAT and filter rules, by VM: which VMs have rules, and one atomic
//!   change that puts some VMs' rules in place and takes others' out;
//! - [`Loops`]: loop devices and their nodes, and inspecting a backing file descriptor;
//! - [`Dm`]: device-mapper snapshot targets and the block device nodes the helper makes for them;
//! - [`Sysctl`]: reading and writing `/proc/sys` keys;
//! - [`Jails`]: jailed VMMs: building a jail, starting Firecracker's jailer in it, killing its VMM
//!   and removing the jail and its cgroups.
//!
//! The traits take only names the helper derived itself; no method accepts a client's string.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::{BorrowedFd, OwnedFd};

use banger_policy::Network;
use banger_protocol::{FirewallBackend, HelperError, JailFiles, VmShape};
use nix::errno::Errno;

use crate::firewall::VmRules;
use crate::names::VmKey;
use crate::sysctl_key::SysctlKey;

#[cfg(test)]
pub mod fake;
pub mod linux;

pub use banger_policy::{BackingFile, DevNum, FdAccess};

/// A kernel operation that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// A syscall failed.
    #[error("{op} on {object} failed")]
    Errno {
        /// The operation, e.g. `TUNSETIFF`.
        op: &'static str,
        /// What it was applied to.
        object: String,
        /// The errno.
        #[source]
        errno: Errno,
    },
    /// A tool or protocol failed without an errno (e.g. `iptables-restore` exited non-zero).
    #[error("{op} on {object} failed: {detail}")]
    Other {
        /// The operation.
        op: &'static str,
        /// What it was applied to.
        object: String,
        /// What went wrong.
        detail: String,
    },
}

impl KernelError {
    /// Shorthand for [`KernelError::Errno`].
    pub fn errno(op: &'static str, object: impl Into<String>, errno: Errno) -> Self {
        KernelError::Errno { op, object: object.into(), errno }
    }

    /// Shorthand for [`KernelError::Other`].
    pub fn other(op: &'static str, object: impl Into<String>, detail: impl Into<String>) -> Self {
        KernelError::Other { op, object: object.into(), detail: detail.into() }
    }

    /// An I/O error: [`KernelError::Errno`] when it has an errno, else [`KernelError::Other`].
    pub fn io(op: &'static str, object: impl Into<String>, e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(n) => KernelError::errno(op, object, Errno::from_raw(n)),
            None => KernelError::other(op, object, e.to_string()),
        }
    }

    /// The errno, if the failure has one.
    pub fn errno_value(&self) -> Option<Errno> {
        match self {
            KernelError::Errno { errno, .. } => Some(*errno),
            KernelError::Other { .. } => None,
        }
    }
}

impl From<KernelError> for HelperError {
    fn from(e: KernelError) -> HelperError {
        match e {
            KernelError::Errno { op, object, errno } => HelperError::Kernel {
                op: op.to_owned(),
                errno: errno as i32,
                detail: format!("{object}: {}", errno.desc()),
            },
            // A tool or protocol failure has no errno: the code stays 0 ("none"), as documented.
            KernelError::Other { op, object, detail } => {
                HelperError::Kernel { op: op.to_owned(), errno: 0, detail: format!("{object}: {detail}") }
            }
        }
    }
}

/// Result of a kernel call.
pub type KResult<T> = Result<T, KernelError>;

/// Network links: TAPs, addresses, link state, routes.
pub trait Links: Send + Sync {
    /// Creates a persistent TAP `name` owned by `owner`, with the flags Firecracker opens it with
    /// (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, single queue). Fails if the name exists.
    fn create_tap(&self, name: &str, owner: u32) -> impl Future<Output = KResult<()>> + Send;
    /// Adds `addr/prefix` to the link.
    fn add_address(&self, name: &str, addr: Ipv4Addr, prefix: u8)
    -> impl Future<Output = KResult<()>> + Send;
    /// Sets the link up.
    fn set_up(&self, name: &str) -> impl Future<Output = KResult<()>> + Send;
    /// Adds a permanent neighbour entry on the link: `addr` is at `mac` (the host never asks).
    fn add_neighbour(
        &self,
        name: &str,
        addr: Ipv4Addr,
        mac: [u8; 6],
    ) -> impl Future<Output = KResult<()>> + Send;
    /// Adds a route to `guest` alone through the (up) link, from `host`, with quick
    /// acknowledgements (`RTAX_QUICKACK`): the host acknowledges each segment the guest sends at
    /// once, so a guest's small write held back by Nagle's algorithm is not held for the host's
    /// delayed acknowledgement.
    fn add_guest_route(
        &self,
        name: &str,
        guest: Ipv4Addr,
        host: Ipv4Addr,
    ) -> impl Future<Output = KResult<()>> + Send;
    /// The names of every link.
    fn list(&self) -> impl Future<Output = KResult<Vec<String>>> + Send;
    /// Hands the existing TAP `name` to `owner` (`TUNSETOWNER`); a link that is not there counts
    /// as done. `EBUSY` while a process has it open.
    fn set_owner(&self, name: &str, owner: u32) -> impl Future<Output = KResult<()>> + Send;
    /// Who owns the link `name` as a TUN/TAP device (`/sys/class/net/<name>/owner`).
    fn owner(&self, name: &str) -> impl Future<Output = KResult<LinkOwner>> + Send;
    /// Deletes these links, together where the kernel allows it (one RCU grace period for all).
    /// A link that does not exist counts as deleted. One result per name, in order.
    fn delete(&self, names: &[String]) -> impl Future<Output = Vec<KResult<()>>> + Send;
    /// The interface of the IPv4 default route, if there is one.
    fn default_route_interface(&self) -> impl Future<Output = KResult<Option<String>>> + Send;
}

/// The owner of a link, as the tun driver records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOwner {
    /// No link of that name.
    Absent,
    /// A link without an owner (not a TUN/TAP, or one nobody owns).
    Unowned,
    /// A TUN/TAP owned by this uid.
    Uid(u32),
}

/// Guests' firewall rules, by VM.
pub trait Firewall: Send + Sync {
    /// Which backend this is.
    fn backend(&self) -> FirewallBackend;
    /// The VMs that have rules now.
    fn vms(&self) -> impl Future<Output = KResult<BTreeSet<VmKey>>> + Send;
    /// Makes the firewall hold exactly the rules of each VM in `up` (as `net` says guests' rules
    /// look) and none of each VM in `down`, in one atomic change that leaves every other VM's
    /// rules alone. Returns whether anything changed: nothing does when the rules already are so.
    fn update(
        &self,
        net: &Network,
        up: &[VmRules],
        down: &[VmKey],
    ) -> impl Future<Output = KResult<bool>> + Send;
}

/// An attached loop device's backing file, as `LOOP_GET_STATUS64` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopStatus {
    /// Backing file's device.
    pub backing_dev: u64,
    /// Backing file's inode.
    pub backing_ino: u64,
}

/// Loop devices.
pub trait Loops: Send + Sync {
    /// Inspects a backing file descriptor (`statx` from cached attributes, the mount table,
    /// `F_GETFL`), never calling into the file's filesystem.
    fn inspect(&self, fd: BorrowedFd<'_>) -> KResult<BackingFile>;
    /// Removes device `n` (`LOOP_CTL_REMOVE`), its node with it. `EBUSY` while it is attached or
    /// anyone holds it open: the proof that nobody does.
    fn remove(&self, n: u32) -> KResult<()>;
    /// Creates a device with the lowest unused number (`LOOP_CTL_ADD`), with a new node; returns
    /// its number.
    fn add(&self) -> KResult<u32>;
    /// Gives `/dev/loopN` to `root:root`, mode 0600: a loop node is never anyone else's.
    fn make_root_only(&self, n: u32) -> KResult<()>;
    /// Attaches `fd` to device `n` in one step where the kernel can (`LOOP_CONFIGURE`), never
    /// with autoclear. `EBUSY` means another attach won the device.
    fn attach(&self, n: u32, fd: BorrowedFd<'_>, read_only: bool) -> KResult<()>;
    /// What device `n` is attached to; `None` when it is free.
    fn status(&self, n: u32) -> KResult<Option<LoopStatus>>;
    /// Detaches device `n` (`LOOP_CLR_FD`); a free device counts as detached.
    fn detach(&self, n: u32) -> KResult<()>;
    /// The device number of `/dev/loopN` (its node must be a block device).
    fn device_number(&self, n: u32) -> KResult<DevNum>;
    /// Whether the kernel has `LOOP_CONFIGURE`.
    fn has_configure(&self) -> bool;
}

/// The parameters of a persistent dm-snapshot of `origin` over `cow`, with the helper's fixed
/// chunk size: `<origin maj:min> <cow maj:min> P 8`. Devices are named by number, never by a path.
pub fn snapshot_params(origin: DevNum, cow: DevNum) -> String {
    format!("{origin} {cow} P {}", banger_protocol::SNAPSHOT_CHUNK_SECTORS)
}

/// The mode of a node the helper hands out (its owner's alone), and of one it takes back.
pub const NODE_MODE: u32 = 0o600;

/// A device-mapper target as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmStatus {
    /// Its device number.
    pub dev: DevNum,
    /// Its uuid (empty when it has none).
    pub uuid: String,
}

/// A device node as `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeStatus {
    /// It is a block device node.
    pub block: bool,
    /// The device it names.
    pub rdev: DevNum,
    /// Its owner.
    pub uid: u32,
    /// Its permission bits.
    pub mode: u32,
}

/// Device-mapper snapshot targets and the nodes of their block devices. The nodes live in one
/// directory only the helper writes; they are named like their targets.
pub trait Dm: Send + Sync {
    /// Whether the helper can make a snapshot target now: device-mapper answers through
    /// `/dev/mapper/control` with the helper's capabilities, the snapshot target is present, and
    /// the node directory and the capability to make nodes were kept.
    fn probe(&self) -> bool;
    /// Creates target `name` with `uuid`, loads a `snapshot` table of `sectors` sectors over
    /// `origin` and `cow` ([`snapshot_params`]) and resumes it; returns its device number. A
    /// failure removes what was made.
    fn create_snapshot(
        &self,
        name: &str,
        uuid: &str,
        sectors: u64,
        origin: DevNum,
        cow: DevNum,
    ) -> KResult<DevNum>;
    /// Removes target `name`. `ENXIO` when there is none; `EBUSY` while anyone holds it open.
    fn remove(&self, name: &str) -> KResult<()>;
    /// Target `name`, if it exists.
    fn info(&self, name: &str) -> KResult<Option<DmStatus>>;
    /// The names of every target.
    fn list(&self) -> KResult<Vec<String>>;
    /// The path of the node of target `name`.
    fn node_path(&self, name: &str) -> String;
    /// Makes the node of target `name`: a block device node for `dev`, then given to `owner`,
    /// mode 0600. Whatever was at the path before goes first (through [`Dm::release_node`]).
    fn make_node(&self, name: &str, dev: DevNum, owner: u32) -> KResult<()>;
    /// The node of target `name`, if there is one.
    fn node(&self, name: &str) -> KResult<Option<NodeStatus>>;
    /// Gives the node of target `name` back to `root:root` 0600 (every hard link of it with it),
    /// then unlinks it; a missing node counts as released.
    fn release_node(&self, name: &str) -> KResult<()>;
    /// The names of every node in the node directory.
    fn nodes(&self) -> KResult<Vec<String>>;
}

/// `/proc/sys`.
pub trait Sysctl: Send + Sync {
    /// Reads a key's value (trimmed).
    fn read(&self, key: &SysctlKey) -> KResult<String>;
    /// Writes a key. `NotFound` keys are an error.
    fn write(&self, key: &SysctlKey, value: &str) -> KResult<()>;
    /// Whether a key exists.
    fn exists(&self, key: &SysctlKey) -> bool;
}

/// What the helper decided for one jailed VMM: every value derived by the helper or taken from
/// the policy, none written by a client. It travels to the launcher as it is (both ends are
/// this binary), where [`crate::launcher::message::Order::check`] checks it again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailOrder {
    /// The jailer's `--id` (1–64 of `[a-z0-9-]`), derived from the caller, install and VM.
    pub id: String,
    /// The uid and gid the VMM runs as, from the policy's range, already recorded in the ledger.
    pub uid: u32,
    /// The caller: the one user (besides root) who may reach the jail's sockets.
    pub caller: u32,
    /// The VM's shape: its cgroup's limits.
    pub shape: VmShape,
    /// The caller's per-user parent cgroup, relative to each hierarchy (e.g. `banger/u1000`).
    pub user_cgroup: String,
    /// The caller's per-user totals, the limits of [`JailOrder::user_cgroup`].
    pub user_limits: UserLimits,
    /// The VM's TAP, handed to [`JailOrder::uid`] for the VMM to open.
    pub tap: Option<String>,
    /// Which descriptors came with the order ([`JailFiles`] order).
    pub files: JailFiles,
}

/// A user's totals over all of their jailed VMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserLimits {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub mem_mib: u64,
}

/// A jail found under the chroot base.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailState {
    /// Its id (the directory's name).
    pub id: String,
    /// The PID its pid file names, if it has one.
    pub pid: Option<i32>,
    /// Whether that process still runs as the jail's uid.
    pub alive: bool,
    /// The jail's uid, as the owner the jailer gave its root directory, when it is one of the
    /// policy's range (a jail whose jailer never ran has none).
    pub uid: Option<u32>,
}

/// Jailed VMMs under the policy's `[jailer]`: the jailer and Firecracker binaries, the chroot
/// base and the cgroup hierarchy all come from the policy the implementation was built with.
pub trait Jails: Send + Sync {
    /// Whether jails can be made here: the policy has a valid `[jailer]` and its launcher runs.
    fn available(&self) -> bool;
    /// The host path of jail `id`'s root directory.
    fn root(&self, id: &str) -> String;
    /// Builds the jail of `order` (the files of `fds`, in [`JailFiles`] order, placed inside it
    /// owned or readable by the jail's uid; its sockets reachable by the caller only; the cgroups)
    /// and starts the jailer, daemonized, in it; returns the VMM's host PID. On failure nothing
    /// of the jail is left.
    fn launch(&self, order: &JailOrder, fds: Vec<OwnedFd>) -> impl Future<Output = KResult<i32>> + Send;
    /// Kills jail `id`'s VMM when `pid` still names a process running as `uid` (checked through a
    /// pidfd, then signalled through it), waits until it is gone, then removes the jail's files,
    /// directory and cgroups (and the user's parent cgroup when it is left empty). A jail that is
    /// not there counts as removed. `uid` 0 means the jail's uid is not known: then nothing is
    /// killed, and a jail whose cgroups still hold a process is left alone (an error).
    fn remove(&self, id: &str, uid: u32, pid: Option<i32>) -> impl Future<Output = KResult<()>> + Send;
    /// Every jail under the chroot base, for the start-up reconcile.
    fn list(&self) -> KResult<Vec<JailState>>;
}

/// The six domains together, as the helper's operations receive them.
pub trait Kernel: Send + Sync + 'static {
    /// Links.
    type Links: Links;
    /// Firewall.
    type Firewall: Firewall;
    /// Loops.
    type Loops: Loops;
    /// Device-mapper.
    type Dm: Dm;
    /// Sysctls.
    type Sysctl: Sysctl;
    /// Jailed VMMs.
    type Jails: Jails;
    /// Links.
    fn links(&self) -> &Self::Links;
    /// Firewall.
    fn firewall(&self) -> &Self::Firewall;
    /// Loops.
    fn loops(&self) -> &Self::Loops;
    /// Device-mapper.
    fn dm(&self) -> &Self::Dm;
    /// Sysctls.
    fn sysctl(&self) -> &Self::Sysctl;
    /// Jailed VMMs.
    fn jails(&self) -> &Self::Jails;
}
