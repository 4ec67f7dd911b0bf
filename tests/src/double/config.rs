//! Request bodies of the Firecracker API, with Firecracker's field names, field order, optional
//! fields and `deny_unknown_fields`, so that serde's error texts ("unknown field `x`, expected one
//! of ...", "missing field `y`") come out exactly as Firecracker 1.16's do.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// `PUT /boot-source`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// Path of the kernel image.
    pub kernel_image_path: String,
    /// Path of the initrd, if there is one.
    pub initrd_path: Option<String>,
    /// Kernel command line; Firecracker's default when absent.
    pub boot_args: Option<String>,
}

/// Static CPU templates Firecracker 1.16 knows on x86_64 (deprecated field).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum StaticCpuTemplate {
    /// C3.
    C3,
    /// T2.
    T2,
    /// T2S.
    T2S,
    /// No template.
    None,
    /// T2CL.
    T2CL,
    /// T2A.
    T2A,
}

/// Guest memory page size.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum HugePageConfig {
    /// 4 KiB pages.
    #[default]
    None,
    /// 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `PUT /machine-config` body, also the `GET /machine-config` answer.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (1..=32).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading.
    #[serde(default)]
    pub smt: bool,
    /// Deprecated static CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// Dirty page tracking.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Page size backing guest memory.
    #[serde(default)]
    pub huge_pages: HugePageConfig,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePageConfig::None,
        }
    }
}

/// `PATCH /machine-config` body: every field optional, at least one present.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs.
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    #[serde(default)]
    pub mem_size_mib: Option<usize>,
    /// SMT.
    #[serde(default)]
    pub smt: Option<bool>,
    /// Deprecated static CPU template.
    #[serde(default)]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// Dirty page tracking.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Page size.
    #[serde(default)]
    pub huge_pages: Option<HugePageConfig>,
}

impl From<MachineConfig> for MachineConfigUpdate {
    fn from(c: MachineConfig) -> Self {
        MachineConfigUpdate {
            vcpu_count: Some(c.vcpu_count),
            mem_size_mib: Some(c.mem_size_mib),
            smt: Some(c.smt),
            cpu_template: c.cpu_template,
            track_dirty_pages: Some(c.track_dirty_pages),
            huge_pages: Some(c.huge_pages),
        }
    }
}

/// One token bucket of a rate limiter.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct TokenBucketConfig {
    /// Bucket size.
    pub size: u64,
    /// Initial burst.
    pub one_time_burst: Option<u64>,
    /// Refill time in ms.
    pub refill_time: u64,
}

/// A rate limiter (accepted and stored; the double does not throttle).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes bucket.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations bucket.
    pub ops: Option<TokenBucketConfig>,
}

/// Block device cache mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum CacheType {
    /// Flushes are not advertised.
    #[default]
    Unsafe,
    /// Flushes are honoured with fsync.
    Writeback,
}

/// Block device I/O engine.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum FileEngineType {
    /// io_uring.
    Async,
    /// Blocking syscalls.
    #[default]
    Sync,
}

/// `PUT /drives/{id}`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceConfig {
    /// Drive id (must equal the path id).
    pub drive_id: String,
    /// Root partition UUID.
    pub partuuid: Option<String>,
    /// Whether this is the root device.
    pub is_root_device: bool,
    /// Cache mode.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Open read-only.
    pub is_read_only: Option<bool>,
    /// Backing file.
    pub path_on_host: Option<String>,
    /// Rate limiter.
    pub rate_limiter: Option<RateLimiterConfig>,
    /// I/O engine.
    #[serde(rename = "io_engine")]
    pub file_engine_type: Option<FileEngineType>,
    /// vhost-user socket.
    pub socket: Option<String>,
}

/// `PATCH /drives/{id}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceUpdateConfig {
    /// Drive id.
    pub drive_id: String,
    /// New backing file.
    pub path_on_host: Option<String>,
    /// New rate limiter.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// A MAC address in `aa:bb:cc:dd:ee:ff` form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(());
        }
        let mut bytes = [0u8; 6];
        for (b, p) in bytes.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| ())?;
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MacAddr::from_str(&s).map_err(|_| serde::de::Error::custom("The provided MAC address is invalid."))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// `PUT /network-interfaces/{id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    /// Interface id (must equal the path id).
    pub iface_id: String,
    /// Host TAP device name.
    pub host_dev_name: String,
    /// Guest MAC address.
    pub guest_mac: Option<MacAddr>,
    /// MTU advertised to the guest.
    pub mtu: Option<u16>,
    /// RX rate limiter.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// TX rate limiter.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /network-interfaces/{id}`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdateConfig {
    /// Interface id.
    pub iface_id: String,
    /// New RX rate limiter.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New TX rate limiter.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockDeviceConfig {
    /// Deprecated device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// Guest context id.
    pub guest_cid: u32,
    /// Host-side Unix socket.
    pub uds_path: String,
}

/// Log level filter, accepted case-insensitively like Firecracker's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LevelFilter {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Informational (the default).
    Info,
    /// Debug.
    Debug,
    /// Everything.
    Trace,
}

impl FromStr for LevelFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(Self::Off),
            "trace" => Ok(Self::Trace),
            "debug" => Ok(Self::Debug),
            "info" => Ok(Self::Info),
            "warn" | "warning" => Ok(Self::Warn),
            "error" => Ok(Self::Error),
            _ => Err(s.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for LevelFilter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| serde::de::Error::custom("Invalid LevelFilter"))
    }
}

/// `PUT /serial` (Firecracker's `SerialConfig`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file or named pipe the guest's console goes to instead of the VMM's stdout; opened
    /// (created if missing, read-write, non-blocking) when the guest boots.
    pub serial_out_path: Option<String>,
    /// Accepted, not enforced.
    pub rate_limiter: Option<TokenBucketConfig>,
}

/// `PUT /logger`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File or FIFO for log lines.
    pub log_path: Option<String>,
    /// Level filter.
    pub level: Option<LevelFilter>,
    /// Show the level in each line.
    pub show_level: Option<bool>,
    /// Show the source location in each line.
    pub show_log_origin: Option<bool>,
    /// Module filter (accepted, ignored).
    pub module: Option<String>,
}

/// `PUT /metrics` (Firecracker does not deny unknown fields here).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct MetricsConfig {
    /// File or FIFO for metrics lines.
    pub metrics_path: String,
}

/// `PUT /actions` action types (x86_64).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum ActionType {
    /// Write metrics now.
    FlushMetrics,
    /// Boot the guest.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
}

/// `PUT /actions`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// The action.
    pub action_type: ActionType,
}

/// Target state of `PATCH /vm`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum VmStateRequest {
    /// Pause the vCPUs.
    Paused,
    /// Resume the vCPUs.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmBody {
    /// Target state.
    pub state: VmStateRequest,
}

/// The `--config-file` document: the same objects under kebab-case keys (unknown keys ignored,
/// as Firecracker's `VmmConfig` does not deny them).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct VmmConfig {
    /// Drives.
    #[serde(default)]
    pub drives: Vec<BlockDeviceConfig>,
    /// Boot source (required).
    pub boot_source: BootSourceConfig,
    /// Logger.
    pub logger: Option<LoggerConfig>,
    /// Machine configuration.
    pub machine_config: Option<MachineConfig>,
    /// Metrics.
    pub metrics: Option<MetricsConfig>,
    /// Network interfaces.
    #[serde(default)]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    /// Vsock.
    pub vsock: Option<VsockDeviceConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_errors_read_like_firecracker() {
        let e = serde_json::from_str::<BootSourceConfig>(r#"{"kernel_image_path":"k","foo":1}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown field `foo`, expected one of `kernel_image_path`, `initrd_path`, `boot_args` at line 1 column 30"
        );
        let e = serde_json::from_str::<MachineConfig>(r#"{"vcpu_count":2}"#).unwrap_err();
        assert_eq!(e.to_string(), "missing field `mem_size_mib` at line 1 column 16");
        let e = serde_json::from_str::<NetworkInterfaceConfig>(
            r#"{"iface_id":"a","host_dev_name":"t","guest_mac":"zz"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("The provided MAC address is invalid."), "{e}");
    }

    #[test]
    fn machine_config_serialises_like_firecracker() {
        let json = serde_json::to_string(&MachineConfig::default()).unwrap();
        assert_eq!(
            json,
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}"#
        );
    }

    #[test]
    fn mac_round_trip() {
        let m: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(m.to_string(), "06:00:ac:10:00:02");
        assert!("06:00:ac:10:00".parse::<MacAddr>().is_err());
        assert!("06:00:ac:10:00:2".parse::<MacAddr>().is_err());
    }
}
