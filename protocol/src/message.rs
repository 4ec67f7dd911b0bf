//! The closed set of helper requests and their answers.
//!
//! Adding an operation means adding a variant at the *end* of [`Request`] (and, if it needs one,
//! of [`Response`]); removing or changing one bumps [`crate::PROTOCOL_VERSION`]. Only what bangerd
//! uses is here: objects are made one by one and all go with [`Request::TeardownVms`]. The client never sends a path, a kernel name, a firewall rule or a command line: it names
//! objects by [`VmId`] and role, and the helper derives everything kernel-visible itself.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::error::HelperError;
use crate::ids::{InstallId, VmId};

/// One request from a daemon to the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The first frame of every connection: the client's protocol version and the install whose
    /// objects this connection manages.
    Hello {
        /// The client's [`crate::PROTOCOL_VERSION`].
        version: u32,
        /// The install that tags every object made on this connection.
        install_id: InstallId,
    },
    /// Health check; answered with [`Response::Pong`].
    Ping,
    /// Create the TAP of a VM (persistent, owned by the caller, host address set, link up).
    TapCreate {
        /// The VM.
        vm: VmId,
    },
    /// Install the VM's NAT and forwarding rules (idempotent).
    NatUp {
        /// The VM.
        vm: VmId,
    },
    /// Attach a loop device to the backing file passed *as a file descriptor* beside this frame.
    /// Read-write is granted only when `read_only` is false and the fd was opened for writing.
    LoopAttach {
        /// The VM the device belongs to.
        vm: VmId,
        /// What the device is for.
        role: LoopRole,
        /// Attach read-only.
        read_only: bool,
    },
    /// List every object the caller owns, across all of its installs.
    ListOwned,
    /// Tear down everything of several VMs of this install (rules, TAPs, loops) in one go: the
    /// one way every object goes.
    TeardownVms {
        /// The VMs; at most [`crate::MAX_TEARDOWN_VMS`].
        #[serde(deserialize_with = "bounded::vec")]
        vms: Vec<VmId>,
    },
    /// Make the VM's root block device: a dm-snapshot target over the caller's base and
    /// copy-on-write loop devices of this VM (both attached with [`Request::LoopAttach`]), named,
    /// built and given a device node by the helper. Answered with that node, the one device a
    /// user is handed; idempotent (the existing target is answered again).
    DmCreate {
        /// The VM.
        vm: VmId,
    },
    /// Launch the VM's VMM through Firecracker's jailer, as a uid of its own from the policy's
    /// range, in a chroot under the policy's base, with cgroup limits from `shape` under the
    /// caller's per-user cgroup. The files the VM needs travel beside this frame **as
    /// descriptors**, in the order [`JailFiles`] gives; the helper places them in the jail itself
    /// and answers with where they are ([`JailInfo`]). Never a path, uid, cgroup or command line.
    JailLaunch {
        /// The VM.
        vm: VmId,
        /// Its vCPUs and memory.
        shape: VmShape,
        /// Which optional descriptors come with the request.
        files: JailFiles,
    },
    /// Kill the VM's jailed VMM (only the process the ledger ties to this caller's VM, checked
    /// by pidfd), then remove its jail and cgroups. Answered with [`Response::Teardown`]: the VM
    /// in `torn_down` once nothing of its jail is left (also when it had none), else the failure.
    JailKill {
        /// The VM.
        vm: VmId,
    },
}

impl Request {
    /// How many file descriptors must travel beside this request. Any other count is refused
    /// and every received descriptor closed.
    pub fn expected_fds(&self) -> usize {
        match self {
            Request::LoopAttach { .. } => 1,
            Request::JailLaunch { files, .. } => files.count(),
            Request::Hello { .. }
            | Request::Ping
            | Request::TapCreate { .. }
            | Request::NatUp { .. }
            | Request::ListOwned
            | Request::TeardownVms { .. }
            | Request::DmCreate { .. }
            | Request::JailKill { .. } => 0,
        }
    }

    /// A short stable name of the operation, for audit records and errors.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Ping => "ping",
            Request::TapCreate { .. } => "tap-create",
            Request::NatUp { .. } => "nat-up",
            Request::LoopAttach { .. } => "loop-attach",
            Request::ListOwned => "list-owned",
            Request::TeardownVms { .. } => "teardown-vms",
            Request::DmCreate { .. } => "dm-create",
            Request::JailLaunch { .. } => "jail-launch",
            Request::JailKill { .. } => "jail-kill",
        }
    }
}

/// A VM's size, as the jailer's cgroup limits and the policy's per-user totals count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    /// vCPUs, 1 to [`crate::MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest memory in MiB, at least [`crate::MIN_MEM_MIB`].
    pub mem_mib: u32,
}

/// Which descriptors travel beside a [`Request::JailLaunch`], in this order: the kernel (always),
/// the initrd (when `initrd`), the root drive (always), the work drive (when `work`). A drive is
/// a regular file owned by the caller, or the block device of the VM's dm-snapshot target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailFiles {
    /// An initrd follows the kernel.
    pub initrd: bool,
    /// A work drive follows the root drive.
    pub work: bool,
}

impl JailFiles {
    /// How many descriptors this asks for.
    pub fn count(self) -> usize {
        2 + usize::from(self.initrd) + usize::from(self.work)
    }
}

/// Where a jail put the VM's files, as paths *inside* the jail (what the VMM is configured
/// with); fixed names, the same in every jail.
pub mod jail_paths {
    /// The kernel.
    pub const KERNEL: &str = "/vmlinux";
    /// The initrd.
    pub const INITRD: &str = "/initrd";
    /// The root drive.
    pub const ROOT_DRIVE: &str = "/rootfs";
    /// The work drive.
    pub const WORK_DRIVE: &str = "/work";
    /// Firecracker's API socket (`--api-sock`).
    pub const API_SOCKET: &str = "/run/firecracker.socket";
    /// The serial console's FIFO (Firecracker's `PUT /serial` `serial_out_path`): written by
    /// the VMM, readable by the caller and by nobody else.
    pub const SERIAL: &str = "/run/serial";
    /// The directory the VMM's other sockets go in (vsock): reachable by the caller, like the
    /// API socket, and by nobody else.
    pub const RUN_DIR: &str = "/run";
    /// The VM's hybrid vsock socket (`PUT /vsock`), in [`RUN_DIR`].
    pub const VSOCK: &str = "/run/vsock";
}

/// What a loop device is for; with the VM id it names the device within an install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LoopRole {
    /// The read-only base image.
    Base,
    /// The VM's copy-on-write file.
    Cow,
}

impl LoopRole {
    /// Every role, in a fixed order.
    pub const ALL: [LoopRole; 2] = [LoopRole::Base, LoopRole::Cow];

    /// The role's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            LoopRole::Base => "base",
            LoopRole::Cow => "cow",
        }
    }
}

/// One answer from the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The answer to a successful `Hello`.
    Hello(HelloReply),
    /// The answer to `Ping`.
    Pong,
    /// A TAP that exists now.
    Tap(TapInfo),
    /// NAT that is in place now.
    Nat(NatInfo),
    /// A loop device that is attached now.
    Loop(LoopInfo),
    /// Everything the caller owns.
    Owned(OwnedObjects),
    /// What a bulk teardown did.
    Teardown(TeardownReport),
    /// A dm-snapshot target that exists now.
    Dm(DmInfo),
    /// A jailed VMM that runs now.
    Jail(JailInfo),
    /// The request failed; nothing it would have made was left behind.
    Error(HelperError),
}

/// The helper's side of the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The helper's [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// The helper's release, e.g. `0.1.0`.
    pub helper_version: String,
    /// What this helper can do on this host.
    pub capabilities: Capabilities,
}

/// What a helper offers on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The helper can make dm-snapshot roots here ([`Request::DmCreate`]): the kernel has
    /// device-mapper with the snapshot target and the helper kept what it needs for it.
    pub device_mapper: bool,
    /// The helper can launch VMs through the jailer ([`Request::JailLaunch`]): the policy has a
    /// valid `[jailer]` section and the helper's launcher runs.
    pub jailer: bool,
    /// The kernel accepts `LOOP_CONFIGURE` (atomic loop attach).
    pub loop_configure: bool,
    /// The policy lets TAPs keep IPv6.
    pub ipv6: bool,
    /// The policy lets users run their VMMs themselves (direct mode). `false` when the policy
    /// forces the jailer: the helper then hands no TAP or dm node to a user, and a client
    /// launches every VM through [`Request::JailLaunch`].
    pub direct: bool,
    /// Which firewall the helper writes guests' rules with, chosen once at its start.
    pub firewall: FirewallBackend,
}

impl Default for Capabilities {
    /// Nothing optional offered; direct mode allowed (as by a policy without `[jailer]`).
    fn default() -> Self {
        Capabilities {
            device_mapper: false,
            jailer: false,
            loop_configure: false,
            ipv6: false,
            direct: true,
            firewall: FirewallBackend::Nftables,
        }
    }
}

/// The firewall a helper writes guests' rules with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FirewallBackend {
    /// The helper's own nftables table (`ip banger`), changed over netlink.
    Nftables,
    /// The helper's chains in iptables' `filter` and `nat` tables, changed with `iptables-restore`.
    Iptables,
}

impl std::fmt::Display for FirewallBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FirewallBackend::Nftables => "nftables",
            FirewallBackend::Iptables => "iptables",
        })
    }
}

/// A user's slice of the address pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The first address of the lease.
    pub network: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// A VM's TAP and its point-to-point subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapInfo {
    /// The install that owns it.
    pub install: InstallId,
    /// The VM.
    pub vm: VmId,
    /// The interface name (at most 15 bytes), derived by the helper.
    pub name: String,
    /// The host side's address: the gateway of the VM's subnet.
    pub host_ip: Ipv4Addr,
    /// The address the guest must use.
    pub guest_ip: Ipv4Addr,
    /// The prefix length of the VM's subnet.
    pub prefix_len: u8,
    /// The MAC the guest NIC should use, `xx:xx:xx:xx:xx:xx`.
    pub guest_mac: String,
}

/// A VM's NAT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatInfo {
    /// The install that owns it.
    pub install: InstallId,
    /// The VM.
    pub vm: VmId,
    /// The guest address being masqueraded.
    pub guest_ip: Ipv4Addr,
    /// The uplink interface.
    pub uplink: String,
}

/// An attached loop device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopInfo {
    /// The install that owns it.
    pub install: InstallId,
    /// The VM.
    pub vm: VmId,
    /// Its role.
    pub role: LoopRole,
    /// The device node, e.g. `/dev/loop7`: informational, it stays root's (0600). Whoever holds a
    /// loop device open can rebind it, so a loop node is never handed to a user.
    pub device: String,
    /// Whether it is read-only.
    pub read_only: bool,
}

/// A VM's dm-snapshot target: its root block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmInfo {
    /// The install that owns it.
    pub install: InstallId,
    /// The VM.
    pub vm: VmId,
    /// The device-mapper name, derived by the helper.
    pub name: String,
    /// The block device node the helper made for it, owned by the caller (mode 0600): the path
    /// the VMM opens as the VM's root drive.
    pub device: String,
    /// Its size in 512-byte sectors (the base image's size).
    pub sectors: u64,
}

/// A VM's jailed VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailInfo {
    /// The install that owns it.
    pub install: InstallId,
    /// The VM.
    pub vm: VmId,
    /// The jailer's `--id`, derived by the helper.
    pub id: String,
    /// The uid (and gid) the VMM runs as, from the policy's range.
    pub uid: u32,
    /// The VMM's host PID, when it runs.
    pub pid: Option<i32>,
    /// The jail's root directory on the host; every path in [`jail_paths`] is below it.
    pub root: String,
    /// The API socket's host path (reachable by the caller only).
    pub api_socket: String,
    /// Its shape.
    pub shape: VmShape,
}

/// Every object one uid owns, across its installs, with their tags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedObjects {
    /// The uid's lease, if it has one.
    pub lease: Option<LeaseInfo>,
    /// TAPs.
    #[serde(deserialize_with = "bounded::vec")]
    pub taps: Vec<TapInfo>,
    /// NAT rule sets.
    #[serde(deserialize_with = "bounded::vec")]
    pub nat: Vec<NatInfo>,
    /// Loop devices.
    #[serde(deserialize_with = "bounded::vec")]
    pub loops: Vec<LoopInfo>,
    /// dm-snapshot targets.
    #[serde(deserialize_with = "bounded::vec")]
    pub dms: Vec<DmInfo>,
    /// Jailed VMMs.
    #[serde(deserialize_with = "bounded::vec")]
    pub jails: Vec<JailInfo>,
}

/// The outcome of a bulk teardown: everything that could be removed was removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownReport {
    /// VMs of which nothing is left.
    #[serde(deserialize_with = "bounded::vec")]
    pub torn_down: Vec<VmId>,
    /// What could not be removed, and why.
    #[serde(deserialize_with = "bounded::vec")]
    pub failures: Vec<TeardownFailure>,
}

/// One object a teardown could not remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownFailure {
    /// The VM.
    pub vm: VmId,
    /// Which object, e.g. `tap bg1a2b3c4d5e6f`.
    pub object: String,
    /// Why.
    pub error: HelperError,
}

/// Deserialization of lists that never trusts a claimed length: more than [`crate::MAX_LIST_LEN`]
/// elements is an error before anything is allocated, so a hostile frame cannot make the decoder
/// reserve memory for elements it does not carry.
mod bounded {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

    use crate::MAX_LIST_LEN;

    pub(super) fn vec<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {MAX_LIST_LEN} elements")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let claimed = seq.size_hint().unwrap_or(0);
                if claimed > MAX_LIST_LEN {
                    return Err(A::Error::custom(format!(
                        "list of {claimed} elements is over the limit of {MAX_LIST_LEN}"
                    )));
                }
                let mut out = Vec::with_capacity(claimed);
                while let Some(item) = seq.next_element()? {
                    if out.len() == MAX_LIST_LEN {
                        return Err(A::Error::custom(format!("list is over the limit of {MAX_LIST_LEN}")));
                    }
                    out.push(item);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}
