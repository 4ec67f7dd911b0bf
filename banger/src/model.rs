//! What a VM is (durable intent, [`VmRuntime`], kept in SQLite) and what is true about it right
//! now (momentary reality, [`VmHandles`], kept in memory and mirrored to `handles.json`).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use banger_protocol::VmId;
use serde::{Deserialize, Serialize};

/// The intended state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, never started.
    Created,
    /// A start is in progress.
    Starting,
    /// Should be running.
    Running,
    /// A stop is in progress.
    Stopping,
    /// Stopped (by the user, or demoted by reconcile with a reason in `last_error`).
    Stopped,
    /// A start failed; `last_error` says why.
    Failed,
}

impl VmState {
    /// The lowercase name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }

    /// Whether the intent is for the VM to be up (reconcile checks these).
    pub fn wants_running(self) -> bool {
        matches!(self, VmState::Starting | VmState::Running | VmState::Stopping)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "created" => VmState::Created,
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "stopping" => VmState::Stopping,
            "stopped" => VmState::Stopped,
            "failed" => VmState::Failed,
            other => return Err(format!("unknown vm state {other:?}")),
        })
    }
}

/// How the VM's root disk was made (see [`crate::daemon::storage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StorageKind {
    /// A reflink clone of the image's rootfs.
    Reflink,
    /// A sparse copy of the image's rootfs.
    SparseCopy,
    /// A dm-snapshot over loop devices.
    DmSnapshot,
}

impl StorageKind {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Reflink => "reflink",
            StorageKind::SparseCopy => "sparse-copy",
            StorageKind::DmSnapshot => "dm-snapshot",
        }
    }
}

impl fmt::Display for StorageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StorageKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "reflink" => StorageKind::Reflink,
            "sparse-copy" => StorageKind::SparseCopy,
            "dm-snapshot" => StorageKind::DmSnapshot,
            other => return Err(format!("unknown storage kind {other:?}")),
        })
    }
}

/// How a VM's VMM is launched (the `launch` setting; fixed per VM at its first start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LaunchMode {
    /// bangerd starts Firecracker itself, as the user.
    #[default]
    Direct,
    /// banger-helper starts Firecracker through its jailer, as a uid of the VM's own, in a
    /// chroot, with cgroup limits from the VM's shape.
    Jailer,
}

impl LaunchMode {
    /// Every mode, in the order they are listed to users.
    pub const ALL: [LaunchMode; 2] = [LaunchMode::Direct, LaunchMode::Jailer];

    /// The name stored, configured and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            LaunchMode::Direct => "direct",
            LaunchMode::Jailer => "jailer",
        }
    }
}

impl fmt::Display for LaunchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LaunchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        LaunchMode::ALL.into_iter().find(|m| m.as_str() == s).ok_or_else(|| {
            let all: Vec<&str> = LaunchMode::ALL.iter().map(|m| m.as_str()).collect();
            format!("one of {}", all.join(", "))
        })
    }
}

/// The name of a VM's Firecracker log in its directory.
pub const VMM_LOG: &str = "vmm.log";

/// A VM's durable intent: one row of the `vms` table. Everything here is durable or
/// deterministic from the id; never a PID, TAP, loop or dm name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRuntime {
    /// Generated id (16 hex digits).
    pub id: VmId,
    /// The name users type (a DNS label, unique per install).
    pub name: String,
    /// Intended state.
    pub state: VmState,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Image name.
    pub image: String,
    /// Guest address, once the helper assigned one.
    pub guest_ip: Option<Ipv4Addr>,
    /// The host side of the VM's subnet (its gateway), once assigned.
    pub gateway_ip: Option<Ipv4Addr>,
    /// Firecracker API socket.
    pub api_socket: PathBuf,
    /// Hybrid vsock socket.
    pub vsock_path: PathBuf,
    /// Guest vsock CID.
    pub vsock_cid: u32,
    /// Serial console log.
    pub log_path: PathBuf,
    /// Firecracker metrics file.
    pub metrics_path: PathBuf,
    /// DNS name (`NAME.banger.internal`-style, informational).
    pub dns_name: String,
    /// The VM's directory.
    pub vm_dir: PathBuf,
    /// The VM's own part of its root disk: its full copy of the image's rootfs (reflink or
    /// sparse copy), or the copy-on-write file of its dm-snapshot. Set when the root is first
    /// made ([`VmRuntime::storage`]).
    pub overlay_path: PathBuf,
    /// The work disk (an ext4 file the guest mounts at `/work`), when the VM has one.
    pub work_disk_path: Option<PathBuf>,
    /// The work disk's size in bytes.
    pub work_disk_bytes: Option<u64>,
    /// How the root disk was made, once made: fixed from then on.
    pub storage: Option<StorageKind>,
    /// How its VMM is launched, once it first started: fixed from then on (except that a
    /// helper whose policy forces the jailer turns a direct VM into a jailed one).
    pub launch: Option<LaunchMode>,
    /// Why the last start failed or why reconcile stopped it.
    pub last_error: Option<String>,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Seconds since the epoch.
    pub updated_at: i64,
    /// Why the VM's kernel objects (NAT, TAP, loops) are not removed yet, when a teardown failed:
    /// it is retried in the background and by the next command on the VM. `None`: nothing
    /// pending.
    pub cleanup_pending: Option<String>,
}

impl VmRuntime {
    /// Firecracker's own log (its `PUT /logger` file), beside the serial log.
    pub fn vmm_log_path(&self) -> PathBuf {
        self.vm_dir.join(VMM_LOG)
    }

    /// The VM's SSH host key (private half; `.pub` beside it): made at create, written into
    /// its root at every start.
    pub fn host_key_path(&self) -> PathBuf {
        self.vm_dir.join("ssh_host_ed25519_key")
    }

    /// A new VM in state `created`: every path is derived from its id under `paths`.
    pub fn new_created(
        paths: &crate::paths::Paths,
        id: VmId,
        name: &str,
        image: &str,
        vcpus: u32,
        memory_mib: u32,
        now: i64,
    ) -> VmRuntime {
        VmRuntime {
            name: name.to_owned(),
            state: VmState::Created,
            vcpus,
            memory_mib,
            image: image.to_owned(),
            guest_ip: None,
            gateway_ip: None,
            api_socket: paths.vm_api_socket(&id),
            vsock_path: paths.vm_vsock(&id),
            vsock_cid: 3,
            log_path: paths.vm_serial_log(&id),
            metrics_path: paths.vm_metrics(&id),
            dns_name: format!("{name}.vm.banger.internal"),
            vm_dir: paths.vm_dir(&id),
            overlay_path: paths.vm_root(&id),
            work_disk_path: None,
            work_disk_bytes: None,
            storage: None,
            launch: None,
            last_error: None,
            created_at: now,
            updated_at: now,
            cleanup_pending: None,
            id,
        }
    }
}

/// The format version of `handles.json`: 3 since it holds a jailed VMM's jail (`jail`);
/// 2 named a dm-snapshot root's device `dm_dev` (version 1 had `dm_device`, never set); both
/// still read.
pub const HANDLES_VERSION: u32 = 3;

/// Where a VM's jailed VMM runs, as banger-helper answered its launch (or lists it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailHandles {
    /// The jailer's `--id` (the helper's).
    pub id: String,
    /// The uid (and gid) the VMM runs as: a uid only this jail has.
    pub uid: u32,
    /// The jail's root directory on the host.
    pub root: PathBuf,
    /// The VMM's API socket on the host (below `root`, reachable by the user only).
    pub api_socket: PathBuf,
}

impl JailHandles {
    /// The host path of a path inside the jail (one of [`banger_protocol::jail_paths`]).
    pub fn host_path(&self, in_jail: &str) -> PathBuf {
        self.root.join(in_jail.trim_start_matches('/'))
    }
}

impl From<&banger_protocol::JailInfo> for JailHandles {
    fn from(j: &banger_protocol::JailInfo) -> Self {
        JailHandles {
            id: j.id.clone(),
            uid: j.uid,
            root: PathBuf::from(&j.root),
            api_socket: PathBuf::from(&j.api_socket),
        }
    }
}

/// What is true about a running VM right now. Never stored in SQLite.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandles {
    /// Format version ([`HANDLES_VERSION`]); newer fields default when absent.
    #[serde(default)]
    pub version: u32,
    /// The VMM's pid.
    #[serde(default)]
    pub pid: Option<i32>,
    /// The TAP device.
    #[serde(default)]
    pub tap: Option<String>,
    /// The loop device over the image's rootfs (read-only), of a dm-snapshot root.
    #[serde(default)]
    pub base_loop: Option<String>,
    /// The loop device over the VM's copy-on-write file, of a dm-snapshot root.
    #[serde(default)]
    pub cow_loop: Option<String>,
    /// The dm-snapshot's device-mapper name (the helper's).
    #[serde(default)]
    pub dm_name: Option<String>,
    /// The dm-snapshot's device node (the VM's root drive), owned by the user.
    #[serde(default, alias = "dm_device")]
    pub dm_dev: Option<String>,
    /// The jail of a VMM launched through the jailer (`pid` is then its host PID, running as
    /// the jail's uid).
    #[serde(default)]
    pub jail: Option<JailHandles>,
}

impl VmHandles {
    /// Whether no handle is held.
    pub fn is_empty(&self) -> bool {
        self.pid.is_none()
            && self.tap.is_none()
            && self.base_loop.is_none()
            && self.cow_loop.is_none()
            && self.dm_name.is_none()
            && self.dm_dev.is_none()
            && self.jail.is_none()
    }
}
