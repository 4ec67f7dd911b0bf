//! The daemon's JSON API: the bodies the CLI and `bangerd` exchange over the daemon socket.
//!
//! Endpoints (HTTP/1.1 on `bangerd.sock`, one per verb; `curl --unix-socket` works):
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | `/v1/status[?checks=false]` | | [`Status`] |
//! | POST | `/v1/daemon/stop` | | `{}` |
//! | GET | `/v1/vms` | | `[VmView]` |
//! | POST | `/v1/vms` | [`CreateVm`] | [`VmView`] (201) |
//! | GET | `/v1/vms/{name}` | | [`VmView`] |
//! | POST | `/v1/vms/{name}/start` | | [`VmView`] |
//! | POST | `/v1/vms/{name}/start?progress=true` | | [`StartEvent`]s, one JSON object a line |
//! | POST | `/v1/vms/{name}/stop?timeout=SECS\|force=true` | | [`VmView`] |
//! | POST | `/v1/vms/{name}/restart` | | [`VmView`] |
//! | DELETE | `/v1/vms/{name}?timeout=SECS\|force=true` | | `{}` |
//! | GET | `/v1/vms/{name}/logs?bytes=N[&vmm=true][&run=current]` | | log tail (text) |
//! | GET | `/v1/images` | | `[ImageView]` |
//! | POST | `/v1/images` | [`ImportImage`] | [`ImageView`] (201) |
//! | POST | `/v1/images?progress=true` | [`ImportImage`] | [`ImportEvent`]s, one JSON object a line |
//! | DELETE | `/v1/images/{name}` | | `{}` |
//!
//! A stop, and a delete of a running VM, ask the guest to shut down (Ctrl-Alt-Del) and kill its
//! VMM if it still runs after a grace period: `timeout` seconds (0 to 3600), else the daemon's
//! (10 s); `force=true` kills it at once.
//!
//! A VM's logs: its serial console, or with `vmm=true` Firecracker's own log; the last `bytes`
//! (default 16 KiB) across the current run and the one before, or with `run=current` only of
//! the current run (since the last start), from a line's start.
//!
//! A start or an import with `progress=true` answers 200 at once and then streams one
//! [`ProgressEvent`] a line (`application/x-ndjson`): each step as it begins (an import's copies
//! and hashes followed by the bytes done), then the VM or the image, or the error, which carries
//! the status the plain request would have answered with. A request refused before any work
//! (an unknown VM; a bad body, an invalid or taken image name) is answered at once, as without
//! `progress=true`.
//!
//! Errors answer 4xx/5xx with [`ErrorBody`].

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `POST /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// The VM's name.
    pub name: String,
    /// Image name; the configured default when absent.
    #[serde(default)]
    pub image: Option<String>,
    /// vCPUs; the configured default when absent.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory in MiB; the configured default when absent.
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// The size of a work disk to give the VM, in bytes; none when absent.
    #[serde(default)]
    pub work_disk_bytes: Option<u64>,
}

/// A VM as the API shows it: intent plus what is live now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    /// Name.
    pub name: String,
    /// Id.
    pub id: String,
    /// Intended state (`running` only while the VMM is alive).
    pub state: String,
    /// The guest's address while the VM runs (absent otherwise).
    pub guest_ip: Option<Ipv4Addr>,
    /// Why the last start failed or why it was stopped behind the user's back.
    pub last_error: Option<String>,
    /// Why its network and disk devices are not removed yet, when a teardown failed (bangerd
    /// retries it in the background). Absent: nothing pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_pending: Option<String>,
    /// Image.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The VMM's pid while alive.
    pub pid: Option<i32>,
    /// The TAP while it exists.
    pub tap: Option<String>,
    /// How the root disk was made (`dm-snapshot`, `reflink`, `sparse-copy`), once made.
    pub storage: Option<String>,
    /// How its VMM is launched (`direct`, `jailer`), once it first started.
    #[serde(default)]
    pub launch: Option<String>,
    /// The uid a jailed VMM runs as, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_uid: Option<u32>,
    /// The work disk (mounted by the guest at `/work`), if any.
    #[serde(default)]
    pub work_disk: Option<PathBuf>,
    /// The work disk's size in bytes.
    #[serde(default)]
    pub work_disk_bytes: Option<u64>,
    /// The VM's directory.
    pub vm_dir: PathBuf,
    /// The serial console log.
    pub log_path: PathBuf,
    /// Firecracker's own log.
    #[serde(default)]
    pub vmm_log_path: PathBuf,
    /// The API socket (a jailed VMM's: inside its jail).
    pub api_socket: PathBuf,
    /// Seconds since the epoch.
    pub created_at: i64,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The `storage` setting this daemon makes new roots with.
    #[serde(default)]
    pub storage: String,
    /// The `launch` setting this daemon starts new VMs with (empty from a daemon before it).
    #[serde(default)]
    pub launch: String,
    /// The daemon's pid.
    pub pid: i32,
    /// The daemon's release.
    pub version: String,
    /// The install id sent to the helper.
    pub install_id: String,
    /// The helper socket this daemon uses.
    pub helper_socket: PathBuf,
    /// The VMM binary this daemon starts.
    pub firecracker: PathBuf,
    /// Whether the helper answered a ping just now; `None` when asked with `checks=false` (the
    /// CLI's probe before each command, which neither pings the helper nor looks at any VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helper_reachable: Option<bool>,
    /// When it did not: why (not running, no permission on its socket, refused by its policy,
    /// no answer in time) and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helper_problem: Option<String>,
    /// How many VMs are running; `None` when asked with `checks=false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_vms: Option<usize>,
}

/// `POST /v1/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    /// The image's name.
    pub name: String,
    /// An uncompressed kernel (ELF vmlinux), absolute path.
    pub kernel: PathBuf,
    /// An ext4 root filesystem image, absolute path.
    pub rootfs: PathBuf,
    /// An initrd the kernel boots with, absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
}

/// An image as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageView {
    /// Name.
    pub name: String,
    /// Kernel sha256.
    pub kernel_sha256: String,
    /// Rootfs sha256.
    pub rootfs_sha256: String,
    /// Initrd sha256, if the image has an initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_sha256: Option<String>,
    /// Total bytes.
    pub size_bytes: u64,
    /// Seconds since the epoch.
    pub created_at: i64,
}

/// One line of a progress stream (a start's or an import's): steps, then the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressEvent<T> {
    /// A step begins (e.g. `setting up the network`).
    Step(String),
    /// The current step is `done` bytes through `total` (a copy or a hash).
    Bytes {
        /// Bytes done.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// The work is done: the VM runs, or the image is imported.
    Done(Box<T>),
    /// The work failed.
    Failed {
        /// The status the request without `progress=true` would have answered with.
        status: u16,
        /// What went wrong and what to do.
        error: String,
    },
}

/// One line of a start's progress stream.
pub type StartEvent = ProgressEvent<VmView>;

/// One line of an import's progress stream.
pub type ImportEvent = ProgressEvent<ImageView>;

/// Every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}
