//! The VMM state machine: what each API action does before and after `InstanceStart`, with
//! Firecracker 1.16's checks and error texts (`rpc_interface.rs`, `resources.rs`,
//! `vmm_config/*.rs`).
//!
//! Resources are opened when they are configured, as Firecracker opens them: the kernel (and
//! initrd) at `PUT /boot-source`, a drive's backing file at `PUT /drives/{id}` (read-only or
//! read-write), the TAP at `PUT /network-interfaces/{id}`, the vsock socket bound at `PUT
//! /vsock`. `InstanceStart` checks the kernel image, builds the guest command line and hands the
//! open resources to a [`GuestLauncher`]; the running guest is then driven through
//! [`RunningGuest`]. Both are traits so the state machine is tested with a recording fake.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use super::cmdline::{self, CmdlineError};
use super::config::{
    BlockDeviceConfig, BlockDeviceUpdateConfig, BootSourceConfig, LoggerConfig, MachineConfig,
    MachineConfigUpdate, MetricsConfig, NetworkInterfaceConfig, NetworkInterfaceUpdateConfig, SerialConfig,
    VsockDeviceConfig,
};
use super::elf::{self, ElfError};
use super::logger::{Level, Logger, Metrics, MetricsError};
use super::tap::{NetError, TapOpener};

/// The Firecracker release whose behaviour the double reproduces.
pub const FIRECRACKER_VERSION: &str = "1.16.1";
/// Most vCPUs a Firecracker guest may have.
pub const MAX_SUPPORTED_VCPUS: u8 = 32;

/// One API operation, already parsed and validated by the HTTP layer.
#[derive(Debug)]
pub enum VmmAction {
    /// `PUT /boot-source`.
    ConfigureBootSource(BootSourceConfig),
    /// `PUT /logger`.
    ConfigureLogger(LoggerConfig),
    /// `PUT /metrics`.
    ConfigureMetrics(MetricsConfig),
    /// `PUT /serial`.
    ConfigureSerial(SerialConfig),
    /// `PUT /actions` FlushMetrics.
    FlushMetrics,
    /// `GET /machine-config`.
    GetVmMachineConfig,
    /// `GET /`.
    GetVmInstanceInfo,
    /// `GET /version`.
    GetVmmVersion,
    /// `PUT /drives/{id}`.
    InsertBlockDevice(BlockDeviceConfig),
    /// `PUT /network-interfaces/{id}`.
    InsertNetworkDevice(NetworkInterfaceConfig),
    /// `PATCH /vm` Paused.
    Pause,
    /// `PATCH /vm` Resumed.
    Resume,
    /// `PUT /actions` SendCtrlAltDel.
    SendCtrlAltDel,
    /// `PUT /vsock`.
    SetVsockDevice(VsockDeviceConfig),
    /// `PUT /actions` InstanceStart.
    StartMicroVm,
    /// `PATCH /drives/{id}`.
    UpdateBlockDevice(BlockDeviceUpdateConfig),
    /// `PATCH /network-interfaces/{id}`.
    UpdateNetworkInterface(NetworkInterfaceUpdateConfig),
    /// `PUT` or `PATCH /machine-config`.
    UpdateMachineConfiguration(MachineConfigUpdate),
    /// `PUT /snapshot/create`.
    CreateSnapshot,
    /// `PUT /snapshot/load`.
    LoadSnapshot,
    /// `DELETE /drives|pmem|network-interfaces/{id}`.
    HotUnplugDevice,
    /// An operation Firecracker has that the double does not emulate (named for the fault).
    NotEmulated(String),
}

/// What a successful action returns.
#[derive(Debug, PartialEq, Eq)]
pub enum VmmData {
    /// 204, no body.
    Empty,
    /// 200 with this JSON body (serialised in Firecracker's field order).
    Json(String),
}

/// `PUT /boot-source` errors.
#[derive(Debug, thiserror::Error)]
pub enum BootSourceError {
    /// Kernel file not openable.
    #[error("The kernel file cannot be opened: {0}")]
    InvalidKernelPath(io::Error),
    /// Initrd file not openable.
    #[error("The initrd file cannot be opened due to invalid path or invalid permissions. {0}")]
    InvalidInitrdPath(io::Error),
    /// Bad boot arguments.
    #[error("The kernel command line is invalid: {0}")]
    InvalidKernelCommandLine(CmdlineError),
}

/// `PUT /machine-config` errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MachineConfigError {
    /// Memory size 0 or not a multiple of the page size.
    #[error("The memory size (MiB) is either 0, or not a multiple of the configured page size.")]
    InvalidMemorySize,
    /// vCPU count out of range.
    #[error(
        "The number of vCPUs must be greater than 0, less than {MAX_SUPPORTED_VCPUS} and must be 1 or an even number if SMT is enabled."
    )]
    InvalidVcpuCount,
}

/// `PUT /drives` errors.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The block device could not be created.
    #[error("Unable to create the virtio block device: {0}")]
    CreateBlockDevice(BlockError),
    /// A second root device.
    #[error("A root block device already exists!")]
    RootBlockDeviceAlreadyAdded,
    /// A post-boot update failed.
    #[error("Unable to patch the block device: {0} Please verify the request arguments.")]
    DeviceUpdate(String),
}

/// Block device creation errors.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Neither a virtio nor a vhost-user configuration.
    #[error("Invalid block config.")]
    InvalidBlockConfig,
    /// The backing file could not be opened.
    #[error("Virtio backend error: Error manipulating the backing file: {0} {1}")]
    BackingFile(io::Error, String),
    /// vhost-user drives are not emulated.
    #[error("Vhost user backend error: vhost-user block devices are not emulated by firecracker-double")]
    VhostUser,
}

/// `PUT /network-interfaces` errors.
#[derive(Debug, thiserror::Error)]
pub enum NetworkInterfaceError {
    /// The TAP could not be opened.
    #[error("Could not create the network device: {0}")]
    CreateNetworkDevice(NetError),
    /// Another interface has this MAC.
    #[error("The MAC address is already in use: {0}")]
    GuestMacAddressInUse(String),
    /// A post-boot update of an unknown interface.
    #[error("Unable to update the net device: {0}")]
    DeviceUpdate(String),
}

/// `InstanceStart` errors.
#[derive(Debug, thiserror::Error)]
pub enum StartMicrovmError {
    /// No `PUT /boot-source` yet.
    #[error("Cannot start microvm without kernel configuration.")]
    MissingKernelConfig,
    /// The kernel image was refused.
    #[error(
        "System configuration error: Cannot load kernel due to invalid memory configuration or invalid kernel image: Kernel Loader: failed to load ELF kernel image: {0}"
    )]
    KernelLoader(ElfError),
    /// The final command line does not fit.
    #[error("Invalid kernel command line: {0}")]
    KernelCmdline(CmdlineError),
    /// The emulated guest could not be started.
    #[error("Internal error while starting microVM: {0}")]
    Internal(String),
    /// The serial output (`PUT /serial`) could not be opened.
    #[error("Failed to create device manager: Legacy device manager error: Failed to create EventFd: {0}")]
    SerialOutput(std::io::Error),
}

/// Every error an action can answer, worded as Firecracker's `VmmActionError`.
#[derive(Debug, thiserror::Error)]
pub enum VmmActionError {
    /// Boot source.
    #[error("Boot source error: {0}")]
    BootSource(BootSourceError),
    /// Drive.
    #[error("Drive config error: {0}")]
    DriveConfig(DriveError),
    /// Internal.
    #[error("Internal VMM error: {0}")]
    InternalVmm(String),
    /// Snapshot load after boot-specific configuration.
    #[error(
        "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
    )]
    LoadSnapshotNotAllowed,
    /// Logger.
    #[error("Logger error: Failed to open target file: {0}")]
    Logger(io::Error),
    /// Machine configuration.
    #[error("Machine config error: {0}")]
    MachineConfig(MachineConfigError),
    /// Metrics.
    #[error("Metrics error: {0}")]
    Metrics(MetricsError),
    /// Network.
    #[error("Network config error: {0}")]
    NetworkConfig(NetworkInterfaceError),
    /// A pre-boot operation after boot.
    #[error("The requested operation is not supported after starting the microVM.")]
    OperationNotSupportedPostBoot,
    /// A post-boot operation before boot.
    #[error("The requested operation is not supported before starting the microVM.")]
    OperationNotSupportedPreBoot,
    /// Hotplug without `--enable-pci`.
    #[error("PCI is not enabled")]
    PciNotEnabled,
    /// Start.
    #[error("Start microvm error: {0}")]
    StartMicrovm(StartMicrovmError),
    /// Vsock.
    #[error(
        "Vsock config error: Cannot create backend for vsock device: Error binding to the host-side Unix socket: {0}"
    )]
    VsockBind(io::Error),
    /// Something Firecracker does that the double does not.
    #[error("firecracker-double does not emulate {0}")]
    NotEmulated(String),
}

/// A configured drive and its open backing file.
#[derive(Debug)]
pub struct Drive {
    /// The configuration as given.
    pub config: BlockDeviceConfig,
    /// The backing file, opened at PUT.
    pub file: File,
}

impl Drive {
    /// Whether the guest sees it read-only.
    pub fn read_only(&self) -> bool {
        self.config.is_read_only.unwrap_or(false)
    }
}

/// A configured network interface and its open host TAP.
#[derive(Debug)]
pub struct NetDevice {
    /// The configuration as given.
    pub config: NetworkInterfaceConfig,
    /// The TAP, opened at PUT with a vnet header.
    pub tap: OwnedFd,
}

/// A configured vsock device and its bound listener.
#[derive(Debug)]
pub struct VsockDevice {
    /// The configuration as given.
    pub config: VsockDeviceConfig,
    /// Listener on `uds_path`, bound at PUT.
    pub listener: UnixListener,
}

/// Everything the guest gets at `InstanceStart`.
#[derive(Debug)]
pub struct GuestSpec<'a> {
    /// Where the guest's console goes (`PUT /serial`); `None`: the VMM's stdout.
    pub serial: Option<File>,
    /// Instance id (`--id`).
    pub instance_id: &'a str,
    /// vCPUs and memory.
    pub machine: &'a MachineConfig,
    /// The full kernel command line.
    pub cmdline: String,
    /// Drives, root first.
    pub drives: &'a [Drive],
    /// Network interfaces in configuration order (eth0, eth1, ...).
    pub nets: &'a [NetDevice],
    /// Vsock device, if configured.
    pub vsock: Option<&'a VsockDevice>,
}

/// A running guest.
pub trait RunningGuest: Send {
    /// Freezes the guest.
    fn pause(&mut self) -> io::Result<()>;
    /// Thaws the guest.
    fn resume(&mut self) -> io::Result<()>;
    /// Presses Ctrl+Alt+Del: the guest reboots, which ends the VMM.
    fn ctrl_alt_del(&mut self) -> io::Result<()>;
}

/// Starts the emulated guest.
pub trait GuestLauncher: Send + 'static {
    /// Boots a guest with `spec`; devices are borrowed and duplicated as needed, so a failed
    /// start leaves the configuration intact, as in Firecracker.
    fn launch(&mut self, spec: GuestSpec<'_>) -> Result<Box<dyn RunningGuest>, String>;
}

/// Runtime state reported by `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Before `InstanceStart`.
    NotStarted,
    /// Running.
    Running,
    /// Paused with `PATCH /vm`.
    Paused,
}

impl VmState {
    fn as_str(self) -> &'static str {
        match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
        }
    }
}

/// `GET /` body, fields in Firecracker's order.
#[derive(serde::Serialize)]
struct InstanceInfo<'a> {
    id: &'a str,
    state: &'a str,
    vmm_version: &'a str,
    app_name: &'a str,
}

fn json_body<T: serde::Serialize>(v: &T) -> VmmData {
    VmmData::Json(serde_json::to_string(v).expect("plain data serialises"))
}

struct BootSource {
    config: BootSourceConfig,
    kernel: File,
    cmdline: String,
    _initrd: Option<File>,
}

/// The VMM: configuration before boot, the running guest after.
pub struct Vmm {
    instance_id: String,
    state: VmState,
    machine: MachineConfig,
    boot: Option<BootSource>,
    drives: Vec<Drive>,
    nets: Vec<NetDevice>,
    vsock: Option<VsockDevice>,
    serial_out_path: Option<String>,
    boot_path: bool,
    taps: Box<dyn TapOpener>,
    launcher: Box<dyn GuestLauncher>,
    guest: Option<Box<dyn RunningGuest>>,
    logger: Arc<Mutex<Logger>>,
    metrics: Arc<Mutex<Metrics>>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm").field("instance_id", &self.instance_id).field("state", &self.state).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vmm {
    /// A fresh VMM for instance `instance_id`.
    pub fn new(
        instance_id: &str,
        taps: Box<dyn TapOpener>,
        launcher: Box<dyn GuestLauncher>,
        logger: Arc<Mutex<Logger>>,
        metrics: Arc<Mutex<Metrics>>,
    ) -> Self {
        Vmm {
            instance_id: instance_id.to_string(),
            state: VmState::NotStarted,
            machine: MachineConfig::default(),
            boot: None,
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            serial_out_path: None,
            boot_path: false,
            taps,
            launcher,
            guest: None,
            logger,
            metrics,
        }
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Runs one action, dispatching on the boot state as Firecracker's pre-boot and runtime
    /// controllers do.
    pub fn handle(&mut self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        use VmmAction::*;
        match action {
            GetVmInstanceInfo => Ok(json_body(&InstanceInfo {
                id: &self.instance_id,
                state: self.state.as_str(),
                vmm_version: FIRECRACKER_VERSION,
                app_name: "Firecracker",
            })),
            GetVmmVersion => {
                Ok(json_body(&serde_json::json!({ "firecracker_version": FIRECRACKER_VERSION })))
            }
            GetVmMachineConfig => Ok(json_body(&self.machine)),
            NotEmulated(what) => Err(VmmActionError::NotEmulated(what)),
            _ if self.state == VmState::NotStarted => self.handle_preboot(action),
            _ => self.handle_runtime(action),
        }
    }

    fn handle_preboot(&mut self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        use VmmAction::*;
        match action {
            ConfigureBootSource(c) => {
                self.boot_path = true;
                self.set_boot_source(c).map_err(VmmActionError::BootSource)
            }
            ConfigureLogger(c) => {
                let path = c.log_path.as_deref().map(std::path::Path::new);
                lock(&self.logger).update(path, c.level, c.show_level).map_err(VmmActionError::Logger)?;
                Ok(VmmData::Empty)
            }
            ConfigureSerial(c) => {
                // Firecracker only keeps it; the path is opened at boot.
                self.serial_out_path = c.serial_out_path;
                Ok(VmmData::Empty)
            }
            ConfigureMetrics(c) => {
                lock(&self.metrics)
                    .init(std::path::Path::new(&c.metrics_path))
                    .map_err(VmmActionError::Metrics)?;
                Ok(VmmData::Empty)
            }
            InsertBlockDevice(c) => {
                self.boot_path = true;
                self.insert_drive(c).map_err(VmmActionError::DriveConfig)
            }
            InsertNetworkDevice(c) => {
                self.boot_path = true;
                self.insert_net(c).map_err(VmmActionError::NetworkConfig)
            }
            SetVsockDevice(c) => {
                self.boot_path = true;
                self.set_vsock(c)
            }
            UpdateMachineConfiguration(u) => {
                self.boot_path = true;
                self.machine =
                    update_machine_config(&self.machine, &u).map_err(VmmActionError::MachineConfig)?;
                Ok(VmmData::Empty)
            }
            StartMicroVm => self.start().map_err(VmmActionError::StartMicrovm),
            LoadSnapshot if self.boot_path => Err(VmmActionError::LoadSnapshotNotAllowed),
            LoadSnapshot => Err(VmmActionError::NotEmulated("snapshot load".into())),
            CreateSnapshot
            | FlushMetrics
            | Pause
            | Resume
            | UpdateBlockDevice(_)
            | UpdateNetworkInterface(_)
            | HotUnplugDevice
            | SendCtrlAltDel => Err(VmmActionError::OperationNotSupportedPreBoot),
            GetVmInstanceInfo | GetVmmVersion | GetVmMachineConfig | NotEmulated(_) => {
                unreachable!("answered in any state")
            }
        }
    }

    fn handle_runtime(&mut self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        use VmmAction::*;
        let guest = self.guest.as_mut().expect("a started VMM has a guest");
        match action {
            FlushMetrics => {
                lock(&self.metrics).write().map_err(|e| {
                    VmmActionError::InternalVmm(format!("Metrics error: Failed to write metrics: {e}"))
                })?;
                Ok(VmmData::Empty)
            }
            Pause => {
                guest
                    .pause()
                    .map_err(|_| VmmActionError::InternalVmm("Failed to pause the vCPUs.".into()))?;
                self.state = VmState::Paused;
                Ok(VmmData::Empty)
            }
            Resume => {
                guest
                    .resume()
                    .map_err(|_| VmmActionError::InternalVmm("Failed to resume the vCPUs.".into()))?;
                self.state = VmState::Running;
                Ok(VmmData::Empty)
            }
            SendCtrlAltDel => {
                guest.ctrl_alt_del().map_err(|e| VmmActionError::InternalVmm(format!("I8042 error: {e}")))?;
                Ok(VmmData::Empty)
            }
            UpdateBlockDevice(u) => self.update_drive(u).map_err(VmmActionError::DriveConfig),
            UpdateNetworkInterface(u) => {
                if self.nets.iter().any(|n| n.config.iface_id == u.iface_id) {
                    Ok(VmmData::Empty)
                } else {
                    Err(VmmActionError::NetworkConfig(NetworkInterfaceError::DeviceUpdate(format!(
                        "Failed perform action on device: Device {} not found",
                        u.iface_id
                    ))))
                }
            }
            InsertBlockDevice(_) | InsertNetworkDevice(_) | HotUnplugDevice => {
                Err(VmmActionError::PciNotEnabled)
            }
            CreateSnapshot => Err(VmmActionError::NotEmulated("snapshot create".into())),
            ConfigureBootSource(_)
            | ConfigureLogger(_)
            | ConfigureMetrics(_)
            | ConfigureSerial(_)
            | LoadSnapshot
            | SetVsockDevice(_)
            | StartMicroVm
            | UpdateMachineConfiguration(_) => Err(VmmActionError::OperationNotSupportedPostBoot),
            GetVmInstanceInfo | GetVmmVersion | GetVmMachineConfig | NotEmulated(_) => {
                unreachable!("answered in any state")
            }
        }
    }

    fn set_boot_source(&mut self, c: BootSourceConfig) -> Result<VmmData, BootSourceError> {
        let kernel = File::open(&c.kernel_image_path).map_err(BootSourceError::InvalidKernelPath)?;
        let initrd = match &c.initrd_path {
            Some(p) => Some(File::open(p).map_err(BootSourceError::InvalidInitrdPath)?),
            None => None,
        };
        let cmdline =
            cmdline::validate(c.boot_args.as_deref()).map_err(BootSourceError::InvalidKernelCommandLine)?;
        self.boot = Some(BootSource { config: c, kernel, cmdline, _initrd: initrd });
        Ok(VmmData::Empty)
    }

    fn insert_drive(&mut self, c: BlockDeviceConfig) -> Result<VmmData, DriveError> {
        let position = self.drives.iter().position(|d| d.config.drive_id == c.drive_id);
        let has_root = self.drives.first().is_some_and(|d| d.config.is_root_device);
        if c.is_root_device && has_root && position != Some(0) {
            return Err(DriveError::RootBlockDeviceAlreadyAdded);
        }
        let path = match (&c.path_on_host, &c.socket) {
            (Some(path), None) => path.clone(),
            (None, Some(_)) => return Err(DriveError::CreateBlockDevice(BlockError::VhostUser)),
            _ => return Err(DriveError::CreateBlockDevice(BlockError::InvalidBlockConfig)),
        };
        let read_only = c.is_read_only.unwrap_or(false);
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| DriveError::CreateBlockDevice(BlockError::BackingFile(e, path.clone())))?;
        let is_root = c.is_root_device;
        let drive = Drive { config: c, file };
        match position {
            None if is_root => self.drives.insert(0, drive),
            None => self.drives.push(drive),
            Some(i) => {
                self.drives[i] = drive;
                if i != 0 && is_root {
                    self.drives.swap(0, i);
                }
            }
        }
        Ok(VmmData::Empty)
    }

    fn update_drive(&mut self, u: BlockDeviceUpdateConfig) -> Result<VmmData, DriveError> {
        let Some(drive) = self.drives.iter_mut().find(|d| d.config.drive_id == u.drive_id) else {
            return Err(DriveError::DeviceUpdate(format!(
                "Failed perform action on device: Device {} not found",
                u.drive_id
            )));
        };
        if let Some(path) = u.path_on_host {
            let file = OpenOptions::new().read(true).write(!drive.read_only()).open(&path).map_err(|e| {
                DriveError::DeviceUpdate(format!(
                    "Block: Virtio backend error: Error manipulating the backing file: {e} {path}"
                ))
            })?;
            drive.file = file;
            drive.config.path_on_host = Some(path);
        }
        if u.rate_limiter.is_some() {
            drive.config.rate_limiter = u.rate_limiter;
        }
        Ok(VmmData::Empty)
    }

    fn insert_net(&mut self, c: NetworkInterfaceConfig) -> Result<VmmData, NetworkInterfaceError> {
        if let Some(mac) = c.guest_mac
            && self.nets.iter().any(|n| n.config.guest_mac == Some(mac) && n.config.iface_id != c.iface_id)
        {
            return Err(NetworkInterfaceError::GuestMacAddressInUse(mac.to_string()));
        }
        // An update replaces the old device, whose TAP is closed before the new one is opened.
        if let Some(i) = self.nets.iter().position(|n| n.config.iface_id == c.iface_id) {
            self.nets.swap_remove(i);
        }
        let tap =
            self.taps.open(&c.host_dev_name, c.mtu).map_err(NetworkInterfaceError::CreateNetworkDevice)?;
        self.nets.push(NetDevice { config: c, tap });
        Ok(VmmData::Empty)
    }

    fn set_vsock(&mut self, c: VsockDeviceConfig) -> Result<VmmData, VmmActionError> {
        if let Some(old) = self.vsock.take() {
            std::fs::remove_file(&old.config.uds_path).map_err(VmmActionError::VsockBind)?;
        }
        let listener = UnixListener::bind(&c.uds_path).map_err(VmmActionError::VsockBind)?;
        self.vsock = Some(VsockDevice { config: c, listener });
        Ok(VmmData::Empty)
    }

    fn start(&mut self) -> Result<VmmData, StartMicrovmError> {
        let boot = self.boot.as_mut().ok_or(StartMicrovmError::MissingKernelConfig)?;
        elf::check_kernel(&mut boot.kernel, self.machine.mem_size_mib as u64)
            .map_err(StartMicrovmError::KernelLoader)?;
        let root = self
            .drives
            .first()
            .filter(|d| d.config.is_root_device)
            .map(|d| (d.config.partuuid.as_deref(), d.read_only()));
        let cmdline = cmdline::guest_cmdline(&boot.cmdline, root);
        if cmdline.len() + 1 > cmdline::CMDLINE_MAX_SIZE {
            return Err(StartMicrovmError::KernelCmdline(CmdlineError::TooLarge));
        }
        lock(&self.logger).log(
            Level::Debug,
            "fc_vmm",
            &format!("Booting kernel {} with command line: {cmdline}", boot.config.kernel_image_path),
        );
        // As Firecracker's `open_file_nonblock`: created if missing, read-write, non-blocking
        // (a named pipe with no reader yet does not block the boot).
        let serial = match &self.serial_out_path {
            Some(path) => Some(
                OpenOptions::new()
                    .custom_flags(libc::O_NONBLOCK)
                    .create(true)
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(StartMicrovmError::SerialOutput)?,
            ),
            None => None,
        };
        let spec = GuestSpec {
            serial,
            instance_id: &self.instance_id,
            machine: &self.machine,
            cmdline,
            drives: &self.drives,
            nets: &self.nets,
            vsock: self.vsock.as_ref(),
        };
        let guest = self.launcher.launch(spec).map_err(StartMicrovmError::Internal)?;
        self.guest = Some(guest);
        self.state = VmState::Running;
        lock(&self.logger).log(
            Level::Info,
            "fc_vmm",
            "Successfully started microvm that was configured from the API",
        );
        Ok(VmmData::Empty)
    }
}

/// Applies a machine configuration update with Firecracker's checks.
pub fn update_machine_config(
    current: &MachineConfig,
    u: &MachineConfigUpdate,
) -> Result<MachineConfig, MachineConfigError> {
    let vcpu_count = u.vcpu_count.unwrap_or(current.vcpu_count);
    let smt = u.smt.unwrap_or(current.smt);
    if vcpu_count == 0 || vcpu_count > MAX_SUPPORTED_VCPUS {
        return Err(MachineConfigError::InvalidVcpuCount);
    }
    if smt && vcpu_count > 1 && vcpu_count % 2 == 1 {
        return Err(MachineConfigError::InvalidVcpuCount);
    }
    let mem_size_mib = u.mem_size_mib.unwrap_or(current.mem_size_mib);
    let huge_pages = u.huge_pages.unwrap_or(current.huge_pages);
    let divisor = match huge_pages {
        super::config::HugePageConfig::None => 1,
        super::config::HugePageConfig::Hugetlbfs2M => 2,
    };
    if mem_size_mib == 0 || !mem_size_mib.is_multiple_of(divisor) {
        return Err(MachineConfigError::InvalidMemorySize);
    }
    let cpu_template = match u.cpu_template {
        None => current.cpu_template,
        Some(super::config::StaticCpuTemplate::None) => None,
        Some(t) => Some(t),
    };
    Ok(MachineConfig {
        vcpu_count,
        mem_size_mib,
        smt,
        cpu_template,
        track_dirty_pages: u.track_dirty_pages.unwrap_or(current.track_dirty_pages),
        huge_pages,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct Record {
        launches: Vec<(String, usize, usize)>,
        events: Vec<&'static str>,
        serial: Option<File>,
    }

    struct FakeLauncher(Arc<Mutex<Record>>);
    struct FakeGuest(Arc<Mutex<Record>>);

    impl RunningGuest for FakeGuest {
        fn pause(&mut self) -> io::Result<()> {
            lock(&self.0).events.push("pause");
            Ok(())
        }
        fn resume(&mut self) -> io::Result<()> {
            lock(&self.0).events.push("resume");
            Ok(())
        }
        fn ctrl_alt_del(&mut self) -> io::Result<()> {
            lock(&self.0).events.push("ctrl-alt-del");
            Ok(())
        }
    }

    impl GuestLauncher for FakeLauncher {
        fn launch(&mut self, spec: GuestSpec<'_>) -> Result<Box<dyn RunningGuest>, String> {
            let mut rec = lock(&self.0);
            rec.launches.push((spec.cmdline, spec.drives.len(), spec.nets.len()));
            rec.serial = spec.serial;
            drop(rec);
            Ok(Box::new(FakeGuest(self.0.clone())))
        }
    }

    struct FakeTaps(AtomicUsize);

    impl TapOpener for FakeTaps {
        fn open(&self, name: &str, _mtu: Option<u16>) -> Result<OwnedFd, NetError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            if name == "denied" {
                return Err(NetError::TapOpen(super::super::tap::TapError::IfreqExecuteError(
                    io::Error::from_raw_os_error(libc::EPERM),
                    name.into(),
                )));
            }
            Ok(File::open("/dev/null").unwrap().into())
        }
    }

    fn vmm() -> (Vmm, Arc<Mutex<Record>>) {
        let rec = Arc::new(Mutex::new(Record::default()));
        let v = Vmm::new(
            "t1",
            Box::new(FakeTaps(AtomicUsize::new(0))),
            Box::new(FakeLauncher(rec.clone())),
            Arc::new(Mutex::new(Logger::new("t1"))),
            Arc::new(Mutex::new(Metrics::default())),
        );
        (v, rec)
    }

    fn err(r: Result<VmmData, VmmActionError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn serial_output_is_kept_until_boot_then_opened_like_firecracker_and_refused_after() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        elf::write_test_kernel(&kernel).unwrap();
        let boot = || BootSourceConfig {
            kernel_image_path: kernel.display().to_string(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        };
        let serial = |path: &std::path::Path| SerialConfig {
            serial_out_path: Some(path.display().to_string()),
            rate_limiter: None,
        };

        // A path that cannot be opened is only found out at boot.
        let (mut v, _) = vmm();
        v.handle(VmmAction::ConfigureBootSource(boot())).unwrap();
        v.handle(VmmAction::ConfigureSerial(serial(&dir.path().join("missing/serial")))).unwrap();
        assert_eq!(
            err(v.handle(VmmAction::StartMicroVm)),
            "Start microvm error: Failed to create device manager: Legacy device manager error: Failed to create EventFd: No such file or directory (os error 2)"
        );

        // A named pipe nobody reads yet does not block the boot; the guest's console is it.
        let fifo = dir.path().join("serial");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (mut v, rec) = vmm();
        v.handle(VmmAction::ConfigureBootSource(boot())).unwrap();
        v.handle(VmmAction::ConfigureSerial(serial(&fifo))).unwrap();
        v.handle(VmmAction::StartMicroVm).unwrap();
        let console = lock(&rec).serial.take().expect("the console goes to the pipe");
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&console.metadata().unwrap().file_type()));
        assert_eq!(
            err(v.handle(VmmAction::ConfigureSerial(serial(&fifo)))),
            "The requested operation is not supported after starting the microVM."
        );

        // Without it, the console is the VMM's stdout; a missing file is created.
        let (mut v, rec) = vmm();
        v.handle(VmmAction::ConfigureBootSource(boot())).unwrap();
        v.handle(VmmAction::StartMicroVm).unwrap();
        assert!(lock(&rec).serial.is_none());
        let (mut v, _) = vmm();
        v.handle(VmmAction::ConfigureBootSource(boot())).unwrap();
        v.handle(VmmAction::ConfigureSerial(serial(&dir.path().join("console.log")))).unwrap();
        v.handle(VmmAction::StartMicroVm).unwrap();
        assert!(dir.path().join("console.log").is_file());
    }

    #[test]
    fn boot_sequence_and_state_rules() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        elf::write_test_kernel(&kernel).unwrap();
        let disk = dir.path().join("root.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let (mut v, rec) = vmm();

        assert_eq!(
            err(v.handle(VmmAction::StartMicroVm)),
            "Start microvm error: Cannot start microvm without kernel configuration."
        );
        assert_eq!(
            err(v.handle(VmmAction::Pause)),
            "The requested operation is not supported before starting the microVM."
        );
        v.handle(VmmAction::ConfigureBootSource(BootSourceConfig {
            kernel_image_path: kernel.display().to_string(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        }))
        .unwrap();
        v.handle(VmmAction::InsertBlockDevice(BlockDeviceConfig {
            drive_id: "rootfs".into(),
            is_root_device: true,
            path_on_host: Some(disk.display().to_string()),
            ..Default::default()
        }))
        .unwrap();
        let second_root = BlockDeviceConfig {
            drive_id: "other".into(),
            is_root_device: true,
            path_on_host: Some(disk.display().to_string()),
            ..Default::default()
        };
        assert_eq!(
            err(v.handle(VmmAction::InsertBlockDevice(second_root))),
            "Drive config error: A root block device already exists!"
        );
        v.handle(VmmAction::InsertNetworkDevice(NetworkInterfaceConfig {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }))
        .unwrap();
        v.handle(VmmAction::StartMicroVm).unwrap();
        assert_eq!(v.state(), VmState::Running);
        assert_eq!(lock(&rec).launches, vec![("console=ttyS0 pci=off root=/dev/vda rw".to_string(), 1, 1)]);
        assert_eq!(
            err(v.handle(VmmAction::StartMicroVm)),
            "The requested operation is not supported after starting the microVM."
        );
        v.handle(VmmAction::Pause).unwrap();
        assert_eq!(v.state(), VmState::Paused);
        v.handle(VmmAction::Resume).unwrap();
        v.handle(VmmAction::SendCtrlAltDel).unwrap();
        assert_eq!(lock(&rec).events, vec!["pause", "resume", "ctrl-alt-del"]);
    }

    #[test]
    fn configuration_errors_read_like_firecracker() {
        let (mut v, _) = vmm();
        let e = err(v.handle(VmmAction::InsertBlockDevice(BlockDeviceConfig {
            drive_id: "d".into(),
            path_on_host: Some("/nonexistent/disk".into()),
            ..Default::default()
        })));
        assert_eq!(
            e,
            "Drive config error: Unable to create the virtio block device: Virtio backend error: \
             Error manipulating the backing file: No such file or directory (os error 2) /nonexistent/disk"
        );
        let e = err(v.handle(VmmAction::InsertNetworkDevice(NetworkInterfaceConfig {
            iface_id: "n".into(),
            host_dev_name: "denied".into(),
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        })));
        assert!(
            e.starts_with(
                "Network config error: Could not create the network device: Open tap device failed: "
            ),
            "{e}"
        );
        let e = err(v.handle(VmmAction::UpdateMachineConfiguration(MachineConfigUpdate {
            vcpu_count: Some(33),
            ..Default::default()
        })));
        assert_eq!(
            e,
            "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled."
        );
        let e = err(v.handle(VmmAction::ConfigureBootSource(BootSourceConfig {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            initrd_path: None,
            boot_args: None,
        })));
        assert_eq!(
            e,
            "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"
        );
        assert_eq!(
            err(v.handle(VmmAction::LoadSnapshot)),
            "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
        );
    }

    #[test]
    fn bad_kernel_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, [b'M'; 128]).unwrap();
        let (mut v, rec) = vmm();
        v.handle(VmmAction::ConfigureBootSource(BootSourceConfig {
            kernel_image_path: kernel.display().to_string(),
            initrd_path: None,
            boot_args: None,
        }))
        .unwrap();
        assert_eq!(
            err(v.handle(VmmAction::StartMicroVm)),
            "Start microvm error: System configuration error: Cannot load kernel due to invalid memory \
             configuration or invalid kernel image: Kernel Loader: failed to load ELF kernel image: \
             Kernel Loader: Invalid Elf magic number"
        );
        assert!(lock(&rec).launches.is_empty());
        assert_eq!(v.state(), VmState::NotStarted);
    }
}
