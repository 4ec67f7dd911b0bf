//! `start`, as named steps, each paired with the undo that takes it back.
//!
//! The row goes to `starting` before the first step and to `running` after the last. When a
//! step fails, the steps made so far (the failed one included, since it may have done part of
//! its work) are undone in reverse order, and the row goes to `failed` with the reason in
//! `last_error` (and, if an undo failed, why in `cleanup_pending`, retried later). A store that
//! cannot record `running` fails the boot step like any other cause: a VM is never left running
//! while its row says otherwise.
//!
//! | step | does | undo |
//! | --- | --- | --- |
//! | image | both files of the VM's image checked as imported ([`images::verify`]: an unchanged identity is trusted, a changed one re-hashed, a changed digest refuses); identities that moved recorded | none: nothing is made |
//! | network | the launch mode decided ([`launch::choose`]: the helper's policy, the VM's recorded mode, the `launch` setting; recorded in the row at the first start); the TAP (helper), recorded in the VM's handles; NAT (helper); the guest's address | the helper's teardown (below) |
//! | root disk | the first time: the kind chosen ([`storage::choose`]: the `storage` setting and the helper's `device_mapper` capability) and the VM's own part of its root made (a copy-on-write file sized with `min_cow_bytes` of the image, or a whole copy), kind and path recorded in the row; later: kept (a COW file grown if smaller than its image needs) | none: the root is the VM's own disk, made once and kept across starts |
//! | base loop | dm-snapshot only: the image's rootfs opened read-only and attached read-only (helper), recorded | the helper's teardown |
//! | cow loop | dm-snapshot only: the COW file opened read-write and attached read-write (helper), recorded | the helper's teardown |
//! | snapshot | dm-snapshot only: the helper's snapshot over both loops (`DmCreate`); its name and node (the user's) recorded | the helper's teardown |
//! | personalize | the user's key and the VM's host key read (both made at create; a VM made before host keys were kept gets its own here); hostname, keys, the host key and the work disk's mount written into the root (its file, or its dm node), unless all that and the root are as at the last personalization (the stamp in the VM's directory); the host key pinned unless it already is | the pin is removed, if this start wrote it |
//! | spawn | the serial log and the VMM log begun again ([`logs::begin_run`]); direct: the VMM started, its API socket answering; jailer: the kernel, initrd, root drive (file or dm node) and work disk opened and sent as descriptors with `JailLaunch` (the VM's vCPUs and memory as its shape), the jail's API socket answering; its PID (and jail) recorded in the handles | direct: the VMM killed (if it still serves the VM's socket) and its sockets removed; jailer: `JailKill` |
//! | configure | direct: the VMM's own log (`PUT /logger`, apart from the console) and the metrics file; jailer: the console into the jail's named pipe (`PUT /serial`); machine, kernel and boot arguments, root drive (the root file or the dm node), the work disk as second drive, network interface, vsock sent through the VMM's API, with paths inside the jail in jailer mode ([`jail_paths`]) | none of its own: the configuration dies with the VMM |
//! | boot | `InstanceStart`; jailer: the serial relay started on the jail's console pipe; the row says `running` | none of its own: as above |
//!
//! The helper removes a VM's kernel objects only all together (`TeardownVms`: NAT and TAP, the
//! dm-snapshot, then its loops), so the undo of every step that made some is that one teardown,
//! sent by the latest such step (the undos before it have nothing left to do), after which the
//! handles are forgotten. A step whose helper request certainly made nothing (the helper was not
//! reached, or refused) has nothing to undo.
//!
//! The image, root disk and personalize steps run host tools (hashing, copies, `debugfs`) on a
//! blocking thread, the last two through [`GuestPrep`](crate::daemon::guest_prep::GuestPrep).
//!
//! A start writes to disk durably (fsync) only what must survive a crash before the next kernel
//! object or process exists: the row going `starting`, `handles.json` with each object, and the
//! row going `running`; the host key's pin only when it changes.
//!
//! How long each phase took is logged when the start succeeds (`start timings`, `phases.rs`).

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use banger_protocol::{Capabilities, LoopRole, TapInfo, jail_paths, min_cow_bytes};

use super::phases::Phases;
use super::touch;
use crate::api_types::VmView;
use crate::config::StorageMode;
use crate::daemon::firecracker::{
    BootSource, Drive, LogLevel, Logger, MachineConfig, Metrics, NetworkInterface, Serial, VmConfig, Vsock,
};
use crate::daemon::guest_prep::GuestPrep;
use crate::daemon::helper_client::HelperClientError;
use crate::daemon::images;
use crate::daemon::launch;
use crate::daemon::liveness::vm_alive;
use crate::daemon::personalize::{self, Personalization, RootForm};
use crate::daemon::resolvers;
use crate::daemon::storage::{self, RootPlan, StorageError};
use crate::daemon::store::{ImageRecord, unix_now};
use crate::daemon::vmm::{self, Api, SpawnSpec};
use crate::daemon::{Daemon, DaemonError, chain, logs};
use crate::model::{JailHandles, LaunchMode, StorageKind, VmHandles, VmRuntime, VmState};
use crate::ssh;

/// The steps of a start, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StartStep {
    /// The image's files, as imported.
    Image,
    /// TAP and NAT through the helper.
    Network,
    /// The VM's own part of its root: its copy-on-write file or its whole copy.
    RootDisk,
    /// dm-snapshot: the read-only loop device over the image.
    BaseLoop,
    /// dm-snapshot: the loop device over the copy-on-write file.
    CowLoop,
    /// dm-snapshot: the snapshot target, the VM's root drive.
    Snapshot,
    /// Hostname, keys, host key and the work disk's mount in the root.
    Personalize,
    /// The VMM process.
    Spawn,
    /// The VMM's configuration.
    Configure,
    /// `InstanceStart`.
    Boot,
}

impl StartStep {
    /// Every step, in order.
    pub const ALL: [StartStep; 10] = [
        StartStep::Image,
        StartStep::Network,
        StartStep::RootDisk,
        StartStep::BaseLoop,
        StartStep::CowLoop,
        StartStep::Snapshot,
        StartStep::Personalize,
        StartStep::Spawn,
        StartStep::Configure,
        StartStep::Boot,
    ];
}

impl fmt::Display for StartStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StartStep::Image => "checking the image",
            StartStep::Network => "setting up the network",
            StartStep::RootDisk => "preparing the root disk",
            StartStep::BaseLoop => "attaching the image",
            StartStep::CowLoop => "attaching the copy-on-write file",
            StartStep::Snapshot => "making the dm-snapshot",
            StartStep::Personalize => "personalizing the root disk",
            StartStep::Spawn => "spawning the vmm",
            StartStep::Configure => "configuring the vmm",
            StartStep::Boot => "booting the guest",
        })
    }
}

/// The kernel command line: console, reboot on Ctrl-Alt-Del, the kernel's interface names
/// (`net.ifnames=0`: udev, in an initrd too, would otherwise rename `eth0`), and the guest's
/// address and hostname on `eth0` (`ip=`, which the default image applies in userspace with
/// systemd-network-generator and systemd-networkd).
pub fn boot_args(hostname: &str, guest: Ipv4Addr, gateway: Ipv4Addr, prefix_len: u8) -> String {
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0));
    format!(
        "console=ttyS0 reboot=k panic=1 pci=off net.ifnames=0 ip={guest}::{gateway}:{mask}:{hostname}:eth0:off"
    )
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static, E: Into<DaemonError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(f).await.map_err(DaemonError::Task)?.map_err(Into::into)
}

/// What a start tells as it goes: each step as it begins (the dm-snapshot steps only where the
/// VM's root is one).
pub type Progress = dyn Fn(StartStep) + Send + Sync;

impl Daemon {
    /// `POST /v1/vms/{name}/start`.
    pub async fn start(&self, name: &str) -> Result<VmView, DaemonError> {
        self.start_reporting(name, &|_| {}).await
    }

    /// `POST /v1/vms/{name}/start?progress=true`: a start that tells `progress` each step as
    /// it begins.
    pub async fn start_reporting(&self, name: &str, progress: &Progress) -> Result<VmView, DaemonError> {
        let phases = Phases::begin();
        let lock = self.vm_lock(name);
        let _guard = lock.lock().await;
        let mut vm = self.find(name)?;
        let handles = self.handles_of(&vm);
        if vm_alive(&vm, &handles, self.procs.as_ref()) {
            return Ok(self.view(&vm));
        }
        let vmm_bin = self.firecracker.clone().map_err(DaemonError::VmmBinary)?;
        let image = self.image(&vm.image)?;
        // Whatever a previous run left (a crash, a teardown that failed) goes first.
        if !handles.is_empty() || vm.state.wants_running() || vm.cleanup_pending.is_some() {
            self.finish_teardown(&mut vm).await?;
        }
        self.record(&mut vm, VmState::Starting, None, None)?;

        let mut run = Start::new(self, &mut vm, image, &vmm_bin, progress, phases);
        run.phases.record("row starting", run.phases.total());
        let failed = match run.run_all().await {
            Ok(()) => {
                tracing::info!(vm = %name, total_us = run.phases.total().as_micros(), phases = %run.phases.render(), "start timings");
                None
            }
            Err((step, cause)) => {
                tracing::warn!(vm = %name, %step, error = %chain(&cause), "start failed; undoing");
                let undo = run.rollback(step).await.err().map(|e| chain(&e));
                Some((step, cause, undo))
            }
        };
        drop(run);

        let Some((step, cause, undo)) = failed else {
            tracing::info!(vm = %vm.name, id = %vm.id, storage = ?vm.storage, "running");
            return Ok(self.view(&vm));
        };
        let last_error = format!("{step} failed: {}", chain(&cause));
        // A store that refuses is logged by `record`, and a row left `starting` is settled by the
        // background refresh; the start's own error is the answer.
        let _ = self.record(&mut vm, VmState::Failed, Some(last_error), undo.clone());
        Err(DaemonError::Start { vm: vm.name, step, undo, source: Box::new(cause) })
    }
}

/// One start in progress: what its steps made so far, for their undos.
struct Start<'a> {
    daemon: &'a Daemon,
    vm: &'a mut VmRuntime,
    image: ImageRecord,
    vmm_bin: &'a Path,
    /// The VM's handles as recorded so far (cache and `handles.json`).
    handles: VmHandles,
    /// The TAP, once made.
    tap: Option<TapInfo>,
    /// The steps after which the helper may hold kernel objects of this VM.
    kernel_made: BTreeSet<StartStep>,
    /// Whether an undo sent the helper's teardown.
    released: bool,
    /// Whether this start pinned a host key.
    pinned: bool,
    /// What the helper offers, once asked in this start.
    caps: Option<Capabilities>,
    /// How this start launches the VMM (decided by the network step).
    launch: LaunchMode,
    /// Told each step as it begins.
    progress: &'a Progress,
    /// How long each phase took.
    phases: Phases,
}

impl<'a> Start<'a> {
    fn new(
        daemon: &'a Daemon,
        vm: &'a mut VmRuntime,
        image: ImageRecord,
        vmm_bin: &'a Path,
        progress: &'a Progress,
        phases: Phases,
    ) -> Self {
        Start {
            daemon,
            vm,
            image,
            vmm_bin,
            handles: VmHandles::default(),
            tap: None,
            kernel_made: BTreeSet::new(),
            released: false,
            pinned: false,
            caps: None,
            launch: LaunchMode::Direct,
            progress,
            phases,
        }
    }

    /// Runs every step in order; the first failure is returned with its step.
    async fn run_all(&mut self) -> Result<(), (StartStep, DaemonError)> {
        for step in StartStep::ALL {
            let dm_step = matches!(step, StartStep::BaseLoop | StartStep::CowLoop | StartStep::Snapshot);
            if !dm_step || self.is_dm() {
                (self.progress)(step);
            }
            let at = Instant::now();
            let done = match step {
                StartStep::Image => self.check_image().await,
                StartStep::Network => self.network().await,
                StartStep::RootDisk => self.root_disk().await,
                StartStep::BaseLoop => self.base_loop().await,
                StartStep::CowLoop => self.cow_loop().await,
                StartStep::Snapshot => self.snapshot().await,
                StartStep::Personalize => self.personalize().await,
                StartStep::Spawn => self.spawn().await,
                StartStep::Configure => self.configure().await,
                StartStep::Boot => self.boot().await,
            };
            if let Some(phase) = phase_of(step) {
                self.phases.record(phase, at.elapsed());
            }
            done.map_err(|e| (step, e))?;
        }
        Ok(())
    }

    /// Undoes `last` and every step before it, in reverse order. Every undo runs; the first
    /// failure is returned (the others are logged).
    async fn rollback(&mut self, last: StartStep) -> Result<(), DaemonError> {
        let mut first = None;
        for step in StartStep::ALL.into_iter().rev().filter(|s| *s <= last) {
            let undone = match step {
                StartStep::Network | StartStep::BaseLoop | StartStep::CowLoop | StartStep::Snapshot => {
                    self.undo_kernel(step).await
                }
                StartStep::Image | StartStep::RootDisk | StartStep::Configure | StartStep::Boot => Ok(()),
                StartStep::Personalize => self.undo_personalize(),
                StartStep::Spawn => {
                    self.undo_spawn().await;
                    Ok(())
                }
            };
            if let Err(e) = undone {
                tracing::warn!(vm = %self.vm.name, %step, error = %chain(&e), "cannot undo a start step");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Notes that `step` may have left kernel objects, unless its helper request `r` certainly
    /// made nothing.
    fn note_kernel<T>(&mut self, step: StartStep, r: &Result<T, HelperClientError>) {
        if !matches!(r, Err(e) if left_nothing(e)) {
            self.kernel_made.insert(step);
        }
    }

    /// The undo of a step that asked the helper for kernel objects: the helper's teardown of
    /// the VM, sent once (see the module docs).
    async fn undo_kernel(&mut self, step: StartStep) -> Result<(), DaemonError> {
        if !self.kernel_made.contains(&step) || self.released {
            return Ok(());
        }
        self.released = true;
        self.daemon.release(self.vm).await
    }

    /// Records the handles so far, in the cache and `handles.json`.
    fn record_handles(&self) -> Result<(), DaemonError> {
        Ok(self.daemon.cache.record(&self.vm.id, &self.vm.vm_dir, self.handles.clone())?)
    }

    /// What the helper offers here (its `Hello` capabilities), asked once per start.
    async fn capabilities(&mut self) -> Result<Capabilities, DaemonError> {
        if let Some(known) = &self.caps {
            return Ok(known.clone());
        }
        let known = self.daemon.helper.capabilities().await?;
        self.caps = Some(known.clone());
        Ok(known)
    }

    /// Whether the helper can make dm-snapshots this daemon can use: only where it hands the
    /// user the dm node. A helper whose policy forces the jailer keeps every dm node root's, so
    /// the VM's root could be neither personalized nor sent to its jail: such VMs get a root
    /// file of their own instead.
    async fn device_mapper(&mut self) -> Result<bool, DaemonError> {
        let caps = self.capabilities().await?;
        Ok(caps.device_mapper && caps.direct)
    }

    /// The launch mode of this start (see [`launch`]), recorded in the row when it changes.
    async fn decide_launch(&mut self) -> Result<(), DaemonError> {
        let caps = self.capabilities().await?;
        let config = &self.daemon.config;
        let mode = launch::choose(config.launch, &config.launch_origin, self.vm.launch, &caps)?;
        if mode == LaunchMode::Jailer {
            launch::shape(self.vm.vcpus, self.vm.memory_mib)?;
        }
        if self.vm.launch != Some(mode) {
            if self.vm.launch.is_some() {
                tracing::info!(vm = %self.vm.name, from = ?self.vm.launch, to = %mode, "banger-helper's policy forces the jailer; the vm is launched through it from now on");
            }
            self.vm.launch = Some(mode);
            self.vm.updated_at = unix_now();
            self.daemon.with_store(|s| s.update_vm(self.vm))?;
        }
        self.launch = mode;
        Ok(())
    }

    /// The API socket of this start's VMM: its jail's, or the VM's own.
    fn api_socket(&self) -> PathBuf {
        crate::daemon::liveness::api_socket(self.vm, &self.handles).to_owned()
    }

    fn is_dm(&self) -> bool {
        self.vm.storage == Some(StorageKind::DmSnapshot)
    }

    /// The VM's root drive as the VMM and personalization see it: its dm-snapshot's node, or
    /// its root file.
    fn root(&self) -> (PathBuf, RootForm) {
        match (&self.handles.dm_dev, self.is_dm()) {
            (Some(dev), true) => (PathBuf::from(dev), RootForm::BlockDevice),
            _ => (self.vm.overlay_path.clone(), RootForm::File),
        }
    }

    /// The size of the image's rootfs (the dm-snapshot's origin).
    fn origin_bytes(&self) -> Result<u64, DaemonError> {
        let path = &self.image.rootfs_path;
        std::fs::metadata(path).map(|m| m.len()).map_err(|source| DaemonError::Io {
            action: "read the size of",
            path: path.clone(),
            source,
        })
    }

    /// Image: both files as imported; identities that moved recorded.
    async fn check_image(&mut self) -> Result<(), DaemonError> {
        let image = self.image.clone();
        let verified = blocking(move || images::verify(&image)).await?;
        if verified.apply(&mut self.image) {
            let img = &self.image;
            self.daemon.with_store(|s| {
                s.set_image_identity(
                    &img.name,
                    img.kernel_identity.as_ref(),
                    img.rootfs_identity.as_ref(),
                    img.initrd.as_ref().and_then(|i| i.identity.as_ref()),
                )
            })?;
        }
        Ok(())
    }

    /// Network: TAP, recorded; NAT; the guest's address.
    async fn network(&mut self) -> Result<(), DaemonError> {
        self.decide_launch().await?;
        let d = self.daemon;
        let tap = d.helper.tap_create(&self.vm.id).await;
        self.note_kernel(StartStep::Network, &tap);
        let tap = tap?;
        self.handles.tap = Some(tap.name.clone());
        self.record_handles()?;
        d.helper.nat_up(&self.vm.id).await?;
        self.vm.guest_ip = Some(tap.guest_ip);
        self.vm.gateway_ip = Some(tap.host_ip);
        self.tap = Some(tap);
        Ok(())
    }

    /// Root disk: made once, of the kind this host gives (see the module docs).
    async fn root_disk(&mut self) -> Result<(), DaemonError> {
        let d = self.daemon;
        let plan = match self.vm.storage {
            Some(kind) if self.vm.overlay_path.exists() => {
                if kind == StorageKind::DmSnapshot {
                    let (path, bytes) = (self.vm.overlay_path.clone(), min_cow_bytes(self.origin_bytes()?));
                    let vm_dir = self.vm.vm_dir.clone();
                    blocking(move || {
                        // A COW file without a snapshot's header holds none of the guest's
                        // writes (made again, or emptied): its root is the image's, unwritten.
                        if !storage::cow_has_header(&path).unwrap_or(false) {
                            personalize::forget_stamp(&vm_dir)?;
                        }
                        Ok::<_, DaemonError>(storage::ensure_cow_len(&path, bytes)?)
                    })
                    .await?;
                }
                return Ok(());
            }
            Some(kind) => {
                tracing::warn!(vm = %self.vm.name, path = %self.vm.overlay_path.display(), %kind, "the vm's root is missing; making it again (what its guest wrote is gone)");
                storage::plan_for(kind)
            }
            None => {
                let config = &d.config;
                let asks_helper = matches!(config.storage, StorageMode::Auto | StorageMode::DmSnapshot);
                let device_mapper = asks_helper && self.device_mapper().await?;
                storage::choose(config.storage, &config.storage_origin, device_mapper)?
            }
        };
        // A root whose kind is not recorded (or is missing) never booted: what is there goes,
        // and with it the record of its personalization.
        let vm_dir = self.vm.vm_dir.clone();
        blocking(move || personalize::forget_stamp(&vm_dir)).await?;
        let (file, cow) = (d.paths.vm_root(&self.vm.id), d.paths.vm_cow(&self.vm.id));
        let (leftover_file, leftover_cow) = (file.clone(), cow.clone());
        blocking(move || {
            storage::remove_root(&leftover_file).and_then(|()| storage::remove_root(&leftover_cow))
        })
        .await?;
        let (path, kind) = match plan {
            RootPlan::DmSnapshot => {
                let bytes = min_cow_bytes(self.origin_bytes()?);
                let path = cow.clone();
                blocking(move || storage::create_cow(&path, bytes)).await?;
                (cow, StorageKind::DmSnapshot)
            }
            RootPlan::File(strategy) => {
                let prep: Arc<dyn GuestPrep> = d.prep.clone();
                let (rootfs, dest) = (self.image.rootfs_path.clone(), file.clone());
                let kind = blocking(move || prep.prepare_root(strategy, &rootfs, &dest)).await?;
                (file, kind)
            }
        };
        tracing::info!(vm = %self.vm.name, %kind, path = %path.display(), "made the vm's root");
        self.vm.overlay_path = path;
        self.vm.storage = Some(kind);
        self.vm.updated_at = unix_now();
        d.with_store(|s| s.update_vm(self.vm))?;
        Ok(())
    }

    /// Base loop (dm-snapshot): the image, read-only.
    async fn base_loop(&mut self) -> Result<(), DaemonError> {
        if !self.is_dm() {
            return Ok(());
        }
        let d = self.daemon;
        if !self.device_mapper().await? {
            return Err(StorageError::DmRootUnavailable.into());
        }
        let path = &self.image.rootfs_path;
        let file = File::open(path).map_err(|source| DaemonError::Io {
            action: "open the image",
            path: path.clone(),
            source,
        })?;
        let attached = d.helper.loop_attach(&self.vm.id, LoopRole::Base, true, file.into()).await;
        self.note_kernel(StartStep::BaseLoop, &attached);
        self.handles.base_loop = Some(attached?.device);
        self.record_handles()
    }

    /// COW loop (dm-snapshot): the VM's copy-on-write file, read-write.
    async fn cow_loop(&mut self) -> Result<(), DaemonError> {
        if !self.is_dm() {
            return Ok(());
        }
        let d = self.daemon;
        let path = self.vm.overlay_path.clone();
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|source| {
            DaemonError::Io { action: "open the copy-on-write file", path: path.clone(), source }
        })?;
        let attached = d.helper.loop_attach(&self.vm.id, LoopRole::Cow, false, file.into()).await;
        self.note_kernel(StartStep::CowLoop, &attached);
        let attached = attached?;
        self.handles.cow_loop = Some(attached.device.clone());
        self.record_handles()?;
        if attached.read_only {
            return Err(StorageError::CowReadOnly { path, device: attached.device }.into());
        }
        Ok(())
    }

    /// Snapshot (dm-snapshot): the target over both loops; its node is the root drive.
    async fn snapshot(&mut self) -> Result<(), DaemonError> {
        if !self.is_dm() {
            return Ok(());
        }
        let made = self.daemon.helper.dm_create(&self.vm.id).await;
        self.note_kernel(StartStep::Snapshot, &made);
        let dm = made?;
        self.handles.dm_name = Some(dm.name);
        self.handles.dm_dev = Some(dm.device);
        self.record_handles()
    }

    /// Personalize: the user's key and the VM's identity in its root; the host key pinned.
    async fn personalize(&mut self) -> Result<(), DaemonError> {
        let d = self.daemon;
        let prep = d.prep.clone();
        let key_path = d.paths.ssh_key();
        let (host_key_path, comment) = (self.vm.host_key_path(), format!("root@{}", self.vm.name));
        // Both made at create (a VM made before host keys were kept gets its own now): read.
        let at = Instant::now();
        let (user_key, host_key) = blocking(move || {
            let user = prep.user_key(&key_path)?;
            prep.host_key(&host_key_path, &comment).map(|host| (user, host))
        })
        .await?;
        self.phases.record("keys", at.elapsed());
        let at = Instant::now();
        let prep = d.prep.clone();
        let (root, form) = self.root();
        let (hostname, scratch) = (self.vm.name.clone(), self.vm.vm_dir.clone());
        let work_disk = self.vm.work_disk_path.is_some();
        let (overlay, stamp_path) =
            (self.vm.overlay_path.clone(), self.vm.vm_dir.join(personalize::STAMP_FILE));
        let host_public = blocking(move || {
            let keys = [user_key.public_key];
            let resolv = resolvers::guest_resolv_conf(
                Path::new("/etc/resolv.conf"),
                Path::new(resolvers::RESOLVED_UPSTREAM),
            );
            if resolv.is_none() {
                tracing::warn!(
                    "the host names no DNS resolver a guest can reach: the guest gets no /etc/resolv.conf"
                );
            }
            let p = Personalization {
                hostname: &hostname,
                authorized_keys: &keys,
                work_disk,
                form,
                scratch: &scratch,
                resolv_conf: resolv.as_deref(),
                host_key: &host_key,
            };
            // Nothing to write has changed since the last personalization of this root.
            let stamp = personalize::stamp(&overlay, &p);
            if stamp.is_some() && std::fs::read_to_string(&stamp_path).ok() == stamp {
                return ssh::check_public_key(&host_key.public).map_err(DaemonError::from);
            }
            personalize::forget_stamp(&scratch)?;
            let public = prep.personalize(&root, &p)?;
            if let Some(stamp) = stamp
                && let Err(e) = crate::atomic_file::write(&stamp_path, stamp.as_bytes(), 0o600)
            {
                tracing::warn!("cannot record the personalization in {}: {e}", stamp_path.display());
            }
            Ok(public)
        })
        .await?;
        self.phases.record("personalization", at.elapsed());
        // The pin changes only when the key does (the first start, or a host key made again).
        let at = Instant::now();
        let known_hosts = d.paths.known_hosts();
        if ssh::pinned_host_key(&known_hosts, &self.vm.id)?.as_deref() != Some(&key_blob(&host_public)) {
            ssh::pin_host_key(&known_hosts, &self.vm.id, &host_public)?;
            self.pinned = true;
        }
        // Nothing of the row changed that must be durable before the VMM runs (the guest's
        // address is recorded with `running`, and found again from the TAP after a crash): no
        // store write, no fsync, here.
        self.phases.record("pin", at.elapsed());
        Ok(())
    }

    fn undo_personalize(&mut self) -> Result<(), DaemonError> {
        if self.pinned {
            ssh::unpin_host_key(&self.daemon.paths.known_hosts(), &self.vm.id)?;
            self.pinned = false;
        }
        Ok(())
    }

    /// Spawn: the VMM, its PID (and jail) recorded.
    async fn spawn(&mut self) -> Result<(), DaemonError> {
        if self.launch == LaunchMode::Jailer {
            return self.spawn_jailed().await;
        }
        let d = self.daemon;
        // The vsock socket is bound at PUT /vsock; one left by a killed VMM would make it fail.
        vmm::remove_stale_socket(&self.vm.vsock_path)?;
        // This run's console and VMM log start afresh (the last run's stay as `<log>.1`):
        // Firecracker writes its log from the file's start without truncating it.
        for log in [self.vm.log_path.clone(), self.vm.vmm_log_path()] {
            logs::begin_run(&log).map_err(|source| DaemonError::Io {
                action: "begin a new log at",
                path: log.clone(),
                source,
            })?;
        }
        let spawned = d
            .vmm
            .spawn(SpawnSpec {
                vmm: self.vmm_bin,
                id: self.vm.id.as_str(),
                api_socket: &self.vm.api_socket,
                serial_log: &self.vm.log_path,
                serial_cap: logs::SERIAL_LOG_CAP,
            })
            .await?;
        self.handles.pid = Some(spawned.pid);
        self.record_handles()
    }

    /// Spawn in jailer mode: the VM's files sent as descriptors with `JailLaunch`; the helper's
    /// answer (PID and jail) recorded; its API socket answering.
    async fn spawn_jailed(&mut self) -> Result<(), DaemonError> {
        let d = self.daemon;
        // Only the console is written here: a jailed VMM reaches no file of the user's, so it
        // keeps no log or metrics of its own.
        logs::begin_run(&self.vm.log_path).map_err(|source| DaemonError::Io {
            action: "begin a new log at",
            path: self.vm.log_path.clone(),
            source,
        })?;
        let shape = launch::shape(self.vm.vcpus, self.vm.memory_mib)?;
        let open = |action: &'static str, path: &Path, write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .map(std::os::fd::OwnedFd::from)
                .map_err(|source| DaemonError::Io { action, path: path.to_owned(), source })
        };
        let initrd = self.image.initrd.as_ref().map(|i| i.path.clone());
        let work = self.vm.work_disk_path.clone();
        let mut fds = vec![open("open the kernel", &self.image.kernel_path, false)?];
        if let Some(initrd) = &initrd {
            fds.push(open("open the initrd", initrd, false)?);
        }
        fds.push(open("open the root drive", &self.root().0, true)?);
        if let Some(work) = &work {
            fds.push(open("open the work disk", work, true)?);
        }
        let files = launch::files(initrd.is_some(), work.is_some());
        let launched = d.helper.jail_launch(&self.vm.id, shape, files, fds).await;
        self.note_kernel(StartStep::Spawn, &launched);
        let jail = launched?;
        tracing::info!(vm = %self.vm.name, jail = %jail.id, uid = jail.uid, pid = ?jail.pid, "launched through the jailer");
        self.handles.pid = jail.pid;
        self.handles.jail = Some(JailHandles::from(&jail));
        self.record_handles()?;
        self.wait_for_jail_api().await
    }

    /// Waits (bounded) until the jail's API socket answers: the helper answers once the socket
    /// exists, but a VMM may still be setting up.
    async fn wait_for_jail_api(&self) -> Result<(), DaemonError> {
        let socket = self.api_socket();
        let deadline = Instant::now() + vmm::API_SOCKET_TIMEOUT;
        loop {
            match self.daemon.procs.socket_answers(&socket) {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await
                }
                Ok(false) => {
                    return Err(vmm::VmmError::SocketTimeout {
                        path: socket,
                        secs: vmm::API_SOCKET_TIMEOUT.as_secs(),
                        tail: logs::run_tail(&self.vm.log_path, 2048).unwrap_or_default(),
                    }
                    .into());
                }
                Err(e) => return Err(DaemonError::Liveness(e)),
            }
        }
    }

    async fn undo_spawn(&mut self) {
        self.daemon.kill_vmm(self.vm, &self.handles).await;
    }

    /// Configure: everything the VMM needs before it boots.
    async fn configure(&mut self) -> Result<(), DaemonError> {
        let vm = &*self.vm;
        let tap = self.tap.as_ref().expect("the network step ran");
        let jailed = self.handles.jail.is_some();
        if !jailed {
            // Firecracker appends to the metrics file; it must exist.
            touch(&vm.metrics_path).map_err(|source| DaemonError::Io {
                action: "create",
                path: vm.metrics_path.clone(),
                source,
            })?;
        }
        // A jailed VMM opens every file by its path inside the jail, where the helper put it.
        let at = |host: PathBuf, in_jail: &str| if jailed { PathBuf::from(in_jail) } else { host };
        let drive = |drive_id: &str, path_on_host: PathBuf, is_root_device| Drive {
            drive_id: drive_id.into(),
            is_root_device,
            path_on_host,
            is_read_only: false,
            cache_type: None,
            io_engine: None,
            partuuid: None,
        };
        let mut drives = vec![drive("rootfs", at(self.root().0, jail_paths::ROOT_DRIVE), true)];
        if let Some(work) = &vm.work_disk_path {
            // Firecracker would only say "Drive config error"; say which file is missing.
            std::fs::metadata(work).map_err(|source| DaemonError::Io {
                action: "find the work disk",
                path: work.clone(),
                source,
            })?;
            drives.push(drive("work", at(work.clone(), jail_paths::WORK_DRIVE), false));
        }
        let config = VmConfig {
            logger: (!jailed).then(|| Logger {
                log_path: vm.vmm_log_path(),
                level: Some(LogLevel::Info),
                show_level: Some(true),
                show_log_origin: None,
            }),
            metrics: (!jailed).then(|| Metrics { metrics_path: vm.metrics_path.clone() }),
            serial: jailed.then(|| Serial { serial_out_path: jail_paths::SERIAL.into() }),
            machine: MachineConfig {
                vcpu_count: vm.vcpus,
                mem_size_mib: vm.memory_mib,
                smt: None,
                track_dirty_pages: None,
                huge_pages: None,
            },
            boot_source: BootSource {
                kernel_image_path: at(self.image.kernel_path.clone(), jail_paths::KERNEL),
                boot_args: Some(boot_args(&vm.name, tap.guest_ip, tap.host_ip, tap.prefix_len)),
                initrd_path: self.image.initrd.as_ref().map(|i| at(i.path.clone(), jail_paths::INITRD)),
            },
            drives,
            network_interfaces: vec![NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: tap.name.clone(),
                guest_mac: Some(tap.guest_mac.clone()),
            }],
            vsock: Some(Vsock {
                guest_cid: vm.vsock_cid,
                uds_path: at(vm.vsock_path.clone(), jail_paths::VSOCK),
            }),
        };
        let timings = self
            .daemon
            .vmm
            .configure(Api::of(vm, &self.handles), &config)
            .await
            .map_err(DaemonError::vmm_api)?;
        for (path, took) in timings {
            self.phases.record(format!("api calls: PUT {path}"), took);
        }
        Ok(())
    }

    /// Boot: `InstanceStart`, then the row says `running`. A store that cannot record it fails
    /// the step, so a VM never runs while its row says otherwise.
    async fn boot(&mut self) -> Result<(), DaemonError> {
        let at = Instant::now();
        self.daemon.vmm.boot(Api::of(self.vm, &self.handles)).await.map_err(DaemonError::vmm_api)?;
        self.phases.record("instance start", at.elapsed());
        if let Some(jail) = &self.handles.jail {
            // Firecracker opened the console pipe at boot: the relay can read it now. A VM whose
            // console cannot be relayed still runs; its log stays empty.
            let relayed = self
                .daemon
                .vmm
                .relay_serial(&jail.root, jail_paths::SERIAL, &self.vm.log_path, logs::SERIAL_LOG_CAP)
                .await;
            if let Err(e) = relayed {
                tracing::warn!(vm = %self.vm.name, error = %chain(&e), "the guest's console is not logged");
            }
        }
        let at = Instant::now();
        let recorded = self.daemon.record(self.vm, VmState::Running, None, None);
        self.phases.record("row running", at.elapsed());
        recorded
    }
}

/// The phase a step's time counts in; `None` for the steps that record their own parts
/// (personalize: `keys` and `personalization`; boot: `instance start` and `row running`).
fn phase_of(step: StartStep) -> Option<&'static str> {
    Some(match step {
        StartStep::Image => "image",
        StartStep::Network | StartStep::BaseLoop | StartStep::CowLoop | StartStep::Snapshot => "helper",
        StartStep::RootDisk => "root disk",
        StartStep::Spawn => "vmm spawn to api socket",
        StartStep::Configure => "api calls",
        StartStep::Personalize | StartStep::Boot => return None,
    })
}

/// `TYPE BASE64` of a public key line, as a pin holds it.
fn key_blob(public_key: &str) -> String {
    public_key.split_ascii_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// Whether a failed helper request certainly made nothing: the helper could not be reached (so
/// nothing was sent), or it answered with an error (a helper operation that fails undoes what
/// it did before answering). A broken connection or a timeout leaves it unknown.
fn left_nothing(e: &HelperClientError) -> bool {
    e.is_unreachable() || matches!(e, HelperClientError::Helper(_))
}
