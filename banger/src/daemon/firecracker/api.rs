//! The request and answer bodies of Firecracker's API, as in its swagger (snake_case fields;
//! optional fields are left out when unset, because Firecracker rejects unknown and `null`
//! fields).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// 1..=32.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u32,
    /// Simultaneous multithreading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking (for diff snapshots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Huge pages backing guest memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// Huge page setting of [`MachineConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal pages.
    None,
    /// 2 MiB huge pages.
    #[serde(rename = "2M")]
    TwoMiB,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    /// The guest kernel (opened by Firecracker at PUT).
    pub kernel_image_path: PathBuf,
    /// The kernel command line (replaces Firecracker's default entirely).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// An initrd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// The id (letters, digits, `_`); also the path segment.
    pub drive_id: String,
    /// Whether this is the root device (`root=/dev/vda`).
    pub is_root_device: bool,
    /// The backing file or block device (opened by Firecracker at PUT).
    pub path_on_host: PathBuf,
    /// Read-only to the guest.
    pub is_read_only: bool,
    /// Cache policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Block I/O engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// Root partition UUID instead of the whole device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
}

/// Drive cache policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are ignored.
    Unsafe,
    /// Flushes reach the host file.
    Writeback,
}

/// Drive I/O engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous I/O.
    Sync,
    /// io_uring.
    Async,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    /// The id (letters, digits, `_`); also the path segment.
    pub iface_id: String,
    /// The host TAP (shorter than 16 bytes).
    pub host_dev_name: String,
    /// The guest NIC's MAC, `xx:xx:xx:xx:xx:xx`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// The guest's CID (at least 3).
    pub guest_cid: u32,
    /// The host side's unix socket (bound by Firecracker at PUT).
    pub uds_path: PathBuf,
}

/// `PUT /serial` (Firecracker 1.14 and later): where the guest's console goes instead of the
/// VMM's stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serial {
    /// A file or named pipe (opened by Firecracker when the guest boots).
    pub serial_out_path: PathBuf,
}

/// `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    /// Where Firecracker writes its log.
    pub log_path: PathBuf,
    /// Level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Prefix lines with the level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix lines with the source location.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
}

/// Firecracker log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings and up.
    Warning,
    /// Info and up.
    Info,
    /// Debug and up.
    Debug,
    /// Everything.
    Trace,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Where Firecracker writes metrics.
    pub metrics_path: PathBuf,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl+Alt+Del in the guest (needs the i8042 keyboard); the guest reboots and
    /// Firecracker exits.
    SendCtrlAltDel,
    /// Write metrics now.
    FlushMetrics,
}

#[derive(Serialize)]
pub(super) struct Action {
    pub(super) action_type: ActionType,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The `--id` given to Firecracker.
    pub id: String,
    /// The VM's state.
    pub state: InstanceState,
    /// Firecracker's version.
    pub vmm_version: String,
    /// `Firecracker`.
    pub app_name: String,
}

/// The state in [`InstanceInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configuring; InstanceStart not yet sent.
    #[serde(rename = "Not started")]
    NotStarted,
    /// Booted.
    Running,
    /// Paused.
    Paused,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

/// A VM's whole pre-boot configuration: what [`super::FirecrackerClient::configure`] sends, in
/// this order (the objects of Firecracker's `--config-file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// `PUT /logger`: Firecracker's own log, apart from the guest's console (none for a
    /// jailed VMM, which can reach no file of the user's).
    pub logger: Option<Logger>,
    /// `PUT /metrics` (the file must exist: Firecracker appends to it); none for a jailed VMM.
    pub metrics: Option<Metrics>,
    /// `PUT /serial`: the console into a named pipe, for a VMM whose stdout is not the
    /// daemon's (a jailed one); none: the console is the VMM's stdout.
    pub serial: Option<Serial>,
    /// `PUT /machine-config`.
    pub machine: MachineConfig,
    /// `PUT /boot-source`.
    pub boot_source: BootSource,
    /// `PUT /drives/{id}`, each.
    pub drives: Vec<Drive>,
    /// `PUT /network-interfaces/{id}`, each.
    pub network_interfaces: Vec<NetworkInterface>,
    /// `PUT /vsock`.
    pub vsock: Option<Vsock>,
}
