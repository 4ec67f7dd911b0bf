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
//! | network | the TAP (helper), recorded in the VM's handles; NAT (helper); the guest's address | the helper removes the VM's NAT, TAP and loops (`TeardownVms`), then the handles are forgotten; skipped when the helper certainly made nothing |
//! | root disk | the VM's writable root, made from its image the first time | none: the root is the VM's own disk, made once and kept across starts |
//! | personalize | the user's key; hostname, keys and a new host key written into the root; the host key pinned; the row saved | the pin is removed |
//! | spawn | the VMM started, its API socket answering; its PID recorded in the handles | the VMM killed (if it still serves the VM's socket) and its sockets removed |
//! | configure | the metrics file; machine, kernel and boot arguments, root drive, network interface, vsock sent through the VMM's API | none of its own: the configuration dies with the VMM |
//! | boot | `InstanceStart`; the row says `running` | none of its own: as above |
//!
//! The root disk and personalize steps run host tools (copies, `debugfs`, `ssh-keygen`) through
//! [`GuestPrep`](crate::daemon::guest_prep::GuestPrep), on a blocking thread.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use banger_protocol::TapInfo;

use super::touch;
use crate::api_types::VmView;
use crate::daemon::firecracker::{
    BootSource, Drive, MachineConfig, Metrics, NetworkInterface, VmConfig, Vsock,
};
use crate::daemon::guest_prep::GuestPrep;
use crate::daemon::helper_client::HelperClientError;
use crate::daemon::liveness::vm_alive;
use crate::daemon::personalize::Personalization;
use crate::daemon::store::{ImageRecord, unix_now};
use crate::daemon::vmm::{self, SpawnSpec};
use crate::daemon::{Daemon, DaemonError, chain, logs};
use crate::model::{VmHandles, VmRuntime, VmState};
use crate::ssh;

/// The steps of a start, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StartStep {
    /// TAP and NAT through the helper.
    Network,
    /// The VM's writable root.
    RootDisk,
    /// Hostname, keys and host key in the root.
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
    pub const ALL: [StartStep; 6] = [
        StartStep::Network,
        StartStep::RootDisk,
        StartStep::Personalize,
        StartStep::Spawn,
        StartStep::Configure,
        StartStep::Boot,
    ];
}

impl fmt::Display for StartStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StartStep::Network => "setting up the network",
            StartStep::RootDisk => "preparing the root disk",
            StartStep::Personalize => "personalizing the root disk",
            StartStep::Spawn => "spawning the vmm",
            StartStep::Configure => "configuring the vmm",
            StartStep::Boot => "booting the guest",
        })
    }
}

/// The kernel command line: console, reboot on Ctrl-Alt-Del, and the guest's address.
pub fn boot_args(vm: &VmRuntime, guest: Ipv4Addr, gateway: Ipv4Addr, prefix_len: u8) -> String {
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0));
    format!("console=ttyS0 reboot=k panic=1 pci=off ip={guest}::{gateway}:{mask}:{}:eth0:off", vm.name)
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static, E: Into<DaemonError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(f).await.map_err(DaemonError::Task)?.map_err(Into::into)
}

impl Daemon {
    /// `POST /v1/vms/{name}/start`.
    pub async fn start(&self, name: &str) -> Result<VmView, DaemonError> {
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

        let mut run = Start::new(self, &mut vm, &image, &vmm_bin);
        let failed = match run.run_all().await {
            Ok(()) => None,
            Err((step, cause)) => {
                tracing::warn!(vm = %name, %step, error = %chain(&cause), "start failed; undoing");
                let undo = run.rollback(step).await.err().map(|e| chain(&e));
                Some((step, cause, undo))
            }
        };
        drop(run);

        let Some((step, cause, undo)) = failed else {
            tracing::info!(vm = %vm.name, id = %vm.id, "running");
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
    image: &'a ImageRecord,
    vmm_bin: &'a Path,
    /// The VM's handles as recorded so far (cache and `handles.json`).
    handles: VmHandles,
    /// The TAP, once made.
    tap: Option<TapInfo>,
    /// Whether the helper may have made kernel objects for this VM.
    network_made: bool,
    /// Whether this start pinned a host key.
    pinned: bool,
}

impl<'a> Start<'a> {
    fn new(daemon: &'a Daemon, vm: &'a mut VmRuntime, image: &'a ImageRecord, vmm_bin: &'a Path) -> Self {
        Start {
            daemon,
            vm,
            image,
            vmm_bin,
            handles: VmHandles::default(),
            tap: None,
            network_made: false,
            pinned: false,
        }
    }

    /// Runs every step in order; the first failure is returned with its step.
    async fn run_all(&mut self) -> Result<(), (StartStep, DaemonError)> {
        for step in StartStep::ALL {
            let done = match step {
                StartStep::Network => self.network().await,
                StartStep::RootDisk => self.root_disk().await,
                StartStep::Personalize => self.personalize().await,
                StartStep::Spawn => self.spawn().await,
                StartStep::Configure => self.configure().await,
                StartStep::Boot => self.boot().await,
            };
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
                StartStep::Network => self.undo_network().await,
                StartStep::RootDisk | StartStep::Configure | StartStep::Boot => Ok(()),
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

    /// Network: TAP, recorded; NAT; the guest's address.
    async fn network(&mut self) -> Result<(), DaemonError> {
        let d = self.daemon;
        let tap = d.helper.tap_create(&self.vm.id).await.inspect_err(|e| {
            self.network_made = !left_nothing(e);
        })?;
        self.network_made = true;
        self.handles.tap = Some(tap.name.clone());
        d.cache.record(&self.vm.id, &self.vm.vm_dir, self.handles.clone())?;
        d.helper.nat_up(&self.vm.id).await?;
        self.vm.guest_ip = Some(tap.guest_ip);
        self.vm.gateway_ip = Some(tap.host_ip);
        self.tap = Some(tap);
        Ok(())
    }

    async fn undo_network(&mut self) -> Result<(), DaemonError> {
        if self.network_made { self.daemon.release(self.vm).await } else { Ok(()) }
    }

    /// Root disk: made once, from the image.
    async fn root_disk(&mut self) -> Result<(), DaemonError> {
        if self.vm.overlay_path.exists() {
            return Ok(());
        }
        let prep: Arc<dyn GuestPrep> = self.daemon.prep.clone();
        let (rootfs, dest) = (self.image.rootfs_path.clone(), self.vm.overlay_path.clone());
        let kind = blocking(move || prep.prepare_root(&rootfs, &dest)).await?;
        self.vm.storage = Some(kind);
        Ok(())
    }

    /// Personalize: the user's key and the VM's identity in its root; the host key pinned.
    async fn personalize(&mut self) -> Result<(), DaemonError> {
        let d = self.daemon;
        let prep = d.prep.clone();
        let key_path = d.paths.ssh_key();
        let user_key = blocking(move || prep.user_key(&key_path)).await?;
        let prep = d.prep.clone();
        let (root, hostname) = (self.vm.overlay_path.clone(), self.vm.name.clone());
        let host_key = blocking(move || {
            let keys = [user_key.public_key];
            prep.personalize(&root, &Personalization { hostname: &hostname, authorized_keys: &keys })
        })
        .await?;
        ssh::pin_host_key(&d.paths.known_hosts(), &self.vm.id, &host_key)?;
        self.pinned = true;
        self.vm.updated_at = unix_now();
        d.with_store(|s| s.update_vm(self.vm))?;
        Ok(())
    }

    fn undo_personalize(&mut self) -> Result<(), DaemonError> {
        if self.pinned {
            ssh::unpin_host_key(&self.daemon.paths.known_hosts(), &self.vm.id)?;
            self.pinned = false;
        }
        Ok(())
    }

    /// Spawn: the VMM, its PID recorded.
    async fn spawn(&mut self) -> Result<(), DaemonError> {
        let d = self.daemon;
        // The vsock socket is bound at PUT /vsock; one left by a killed VMM would make it fail.
        vmm::remove_stale_socket(&self.vm.vsock_path)?;
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
        d.cache.record(&self.vm.id, &self.vm.vm_dir, self.handles.clone())?;
        Ok(())
    }

    async fn undo_spawn(&mut self) {
        self.daemon.kill_vmm(self.vm, &self.handles).await;
    }

    /// Configure: everything the VMM needs before it boots.
    async fn configure(&mut self) -> Result<(), DaemonError> {
        let vm = &*self.vm;
        let tap = self.tap.as_ref().expect("the network step ran");
        // Firecracker appends to the metrics file; it must exist.
        touch(&vm.metrics_path).map_err(|source| DaemonError::Io {
            action: "create",
            path: vm.metrics_path.clone(),
            source,
        })?;
        let config = VmConfig {
            metrics: Metrics { metrics_path: vm.metrics_path.clone() },
            machine: MachineConfig {
                vcpu_count: vm.vcpus,
                mem_size_mib: vm.memory_mib,
                smt: None,
                track_dirty_pages: None,
                huge_pages: None,
            },
            boot_source: BootSource {
                kernel_image_path: self.image.kernel_path.clone(),
                boot_args: Some(boot_args(vm, tap.guest_ip, tap.host_ip, tap.prefix_len)),
                initrd_path: None,
            },
            drives: vec![Drive {
                drive_id: "rootfs".into(),
                is_root_device: true,
                path_on_host: vm.overlay_path.clone(),
                is_read_only: false,
                cache_type: None,
                io_engine: None,
                partuuid: None,
            }],
            network_interfaces: vec![NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: tap.name.clone(),
                guest_mac: Some(tap.guest_mac.clone()),
            }],
            vsock: Some(Vsock { guest_cid: vm.vsock_cid, uds_path: vm.vsock_path.clone() }),
        };
        self.daemon.vmm.configure(&vm.api_socket, &config).await.map_err(DaemonError::vmm_api)
    }

    /// Boot: `InstanceStart`, then the row says `running`. A store that cannot record it fails
    /// the step, so a VM never runs while its row says otherwise.
    async fn boot(&mut self) -> Result<(), DaemonError> {
        self.daemon.vmm.boot(&self.vm.api_socket).await.map_err(DaemonError::vmm_api)?;
        self.daemon.record(self.vm, VmState::Running, None, None)
    }
}

/// Whether a failed helper request certainly made nothing: the helper could not be reached (so
/// nothing was sent), or it answered with an error (a helper operation that fails undoes what
/// it did before answering). A broken connection or a timeout leaves it unknown.
fn left_nothing(e: &HelperClientError) -> bool {
    e.is_unreachable() || matches!(e, HelperClientError::Helper(_))
}
