//! The daemon's core: the VM lifecycle on top of the store (intent), the handle cache (reality),
//! the helper (kernel objects) and the VMM (Firecracker's API).
//!
//! Every operation on one VM holds that VM's lock (keyed by name, so a create and a delete of the
//! same name cannot interleave); different VMs proceed in parallel. Every state change is one
//! store transaction, made *before* the step it announces (`starting` before any kernel object,
//! `stopping` before any teardown), so a daemon that dies anywhere leaves a row reconcile can
//! finish or undo.
//!
//! `start`, step by step: state `starting`; TAP (helper) and record it in the handles; NAT
//! (helper); the VM's writable root (made once, from the image) and its personalization
//! (hostname, keys); the VMM spawned and configured through its API; `InstanceStart`; handles
//! recorded with the PID; state `running`. A failure at any step undoes what was done (VMM killed,
//! NAT and TAP removed through the helper, handles forgotten) and records `failed` with the
//! reason.

pub mod api;
pub mod firecracker;
pub mod handles;
pub mod helper_client;
pub mod images;
pub mod liveness;
pub mod logs;
pub mod personalize;
pub mod reconcile;
pub mod startup;
pub mod storage;
pub mod store;
pub mod vmm;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_protocol::InstallId;

use crate::api_types::{CreateVm, ImageView, ImportImage, Status, VmView};
use crate::config::Config;
use crate::daemon::firecracker::FirecrackerClient;
use crate::daemon::handles::HandleCache;
use crate::daemon::helper_client::HelperApi;
use crate::daemon::liveness::{ProcessTable, kill_and_wait, rediscover_handles, vm_alive, wait_gone};
use crate::daemon::store::{Store, StoreError, unix_now};
use crate::ids::{new_vm_id, validate_name};
use crate::model::{VmHandles, VmRuntime, VmState};
use crate::paths::Paths;
use crate::ssh;

/// How long a guest gets to shut down after Ctrl-Alt-Del before its VMM is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long a killed VMM gets to exit before its devices are torn down anyway.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Why a daemon operation failed; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The request is malformed or names something invalid (400).
    #[error("{0}")]
    Invalid(String),
    /// No such VM or image (404).
    #[error("{0}")]
    NotFound(String),
    /// It conflicts with what exists (409).
    #[error("{0}")]
    Conflict(String),
    /// The helper is needed and cannot be reached (503).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (500).
    #[error("{0}")]
    Failed(String),
}

impl DaemonError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            DaemonError::Invalid(_) => 400,
            DaemonError::NotFound(_) => 404,
            DaemonError::Conflict(_) => 409,
            DaemonError::Unavailable(_) => 503,
            DaemonError::Failed(_) => 500,
        }
    }
}

fn failed(e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Failed(e.to_string())
}

fn store_err(e: StoreError) -> DaemonError {
    match e {
        StoreError::DuplicateName { .. } => DaemonError::Conflict(e.to_string()),
        StoreError::ImageInUse { .. } => DaemonError::Conflict(e.to_string()),
        other => failed(with_sources(&other)),
    }
}

/// Formats an error and its `source()` chain on one line.
pub fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// The daemon: everything a request handler needs.
pub struct Daemon {
    /// Where this install keeps its files.
    pub paths: Paths,
    /// The settings in effect (fixed for the daemon's life).
    pub config: Config,
    /// The VMM binary, resolved at start (`None` when it could not be: starts then fail clearly).
    firecracker: Result<PathBuf, String>,
    /// This daemon's own executable (it doubles as the serial log relay).
    relay_exe: PathBuf,
    /// This install's id, sent to the helper.
    install_id: InstallId,
    /// Guards the SQLite connection; held only for single short queries or transactions.
    store: Mutex<Store>,
    /// What is live now, per VM.
    pub cache: HandleCache,
    /// The root helper.
    helper: Arc<dyn HelperApi>,
    /// The process table.
    procs: Arc<dyn ProcessTable>,
    /// Guards the map of per-VM operation locks (by VM name); each inner lock serializes the
    /// operations on one VM.
    vm_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Notified when `POST /v1/daemon/stop` asks the daemon to exit.
    pub shutdown: tokio::sync::Notify,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").field("paths", &self.paths).field("install_id", &self.install_id).finish()
    }
}

impl Daemon {
    /// Builds a daemon over an opened store.
    pub fn new(
        paths: Paths,
        config: Config,
        store: Store,
        helper: Arc<dyn HelperApi>,
        procs: Arc<dyn ProcessTable>,
        relay_exe: PathBuf,
    ) -> Self {
        let firecracker = config.resolve_firecracker().map_err(|e| with_sources(&e));
        let install_id = store.install_id().clone();
        Daemon {
            paths,
            config,
            firecracker,
            relay_exe,
            install_id,
            store: Mutex::new(store),
            cache: HandleCache::new(),
            helper,
            procs,
            vm_locks: Mutex::new(HashMap::new()),
            shutdown: tokio::sync::Notify::new(),
        }
    }

    /// Reconciles every VM with the system (see [`crate::daemon::reconcile`]).
    pub async fn reconcile(
        &self,
    ) -> Result<crate::daemon::reconcile::ReconcileReport, crate::daemon::reconcile::ReconcileError> {
        crate::daemon::reconcile::reconcile(
            &self.store,
            &self.cache,
            self.helper.as_ref(),
            self.procs.as_ref(),
        )
        .await
    }

    /// The install id.
    pub fn install_id(&self) -> &InstallId {
        &self.install_id
    }

    /// Runs `f` on the store.
    pub fn with_store<T>(&self, f: impl FnOnce(&Store) -> Result<T, StoreError>) -> Result<T, DaemonError> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        f(&store).map_err(store_err)
    }

    fn vm_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_owned()).or_default().clone()
    }

    fn find(&self, name: &str) -> Result<VmRuntime, DaemonError> {
        validate_name(name).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        self.with_store(|s| s.get_vm_by_name(name))?.ok_or_else(|| {
            DaemonError::NotFound(format!("no vm named {name:?}: see `banger vm list` for your vms"))
        })
    }

    fn set_state(
        &self,
        vm: &mut VmRuntime,
        state: VmState,
        last_error: Option<String>,
    ) -> Result<(), DaemonError> {
        self.with_store(|s| s.set_state(&vm.id, state, last_error.as_deref()))?;
        vm.state = state;
        vm.last_error = last_error;
        Ok(())
    }

    /// The VM's handles: the cache, else what the OS and scratch file say.
    fn handles_of(&self, vm: &VmRuntime) -> VmHandles {
        self.cache.get(&vm.id).unwrap_or_else(|| rediscover_handles(vm, self.procs.as_ref()).handles)
    }

    fn view(&self, vm: &VmRuntime) -> VmView {
        let handles = self.cache.get(&vm.id).unwrap_or_default();
        let alive = vm_alive(vm, &handles, self.procs.as_ref());
        VmView {
            name: vm.name.clone(),
            id: vm.id.to_string(),
            state: vm.state.to_string(),
            guest_ip: vm.guest_ip,
            last_error: vm.last_error.clone(),
            image: vm.image.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            pid: if alive { handles.pid } else { None },
            tap: handles.tap.clone(),
            storage: vm.storage.map(|s| s.as_str().to_owned()),
            vm_dir: vm.vm_dir.clone(),
            log_path: vm.log_path.clone(),
            api_socket: vm.api_socket.clone(),
            created_at: vm.created_at,
        }
    }

    /// Notices VMs whose VMM died while the daemon ran (guest reboot, crash, kill) and demotes
    /// them, tearing down their kernel objects. VMs with an operation in progress are skipped.
    async fn refresh(&self, vm: VmRuntime) -> VmRuntime {
        if vm.state != VmState::Running {
            return vm;
        }
        let lock = self.vm_lock(&vm.name);
        let Ok(_guard) = lock.try_lock() else { return vm };
        // Re-read under the lock: another operation may just have finished.
        let Ok(Some(mut vm)) = self.with_store(|s| s.get_vm(&vm.id)) else { return vm };
        let handles = self.handles_of(&vm);
        if vm.state != VmState::Running || vm_alive(&vm, &handles, self.procs.as_ref()) {
            return vm;
        }
        tracing::warn!(vm = %vm.name, id = %vm.id, "vmm is gone; tearing the vm down");
        let reason = match self.teardown(&vm, &handles).await {
            Ok(()) => "the vmm exited (guest shutdown or crash)".to_owned(),
            Err(e) => format!("the vmm exited; cleanup is incomplete and will be retried: {e}"),
        };
        let _ = self.set_state(&mut vm, VmState::Stopped, Some(reason));
        vm
    }

    /// `GET /v1/vms`.
    pub async fn list(&self) -> Result<Vec<VmView>, DaemonError> {
        let vms = self.with_store(|s| s.list_vms())?;
        let mut out = Vec::with_capacity(vms.len());
        for vm in vms {
            let vm = self.refresh(vm).await;
            out.push(self.view(&vm));
        }
        Ok(out)
    }

    /// `GET /v1/vms/{name}`.
    pub async fn show(&self, name: &str) -> Result<VmView, DaemonError> {
        let vm = self.find(name)?;
        let vm = self.refresh(vm).await;
        Ok(self.view(&vm))
    }

    /// `POST /v1/vms`.
    pub async fn create(&self, req: CreateVm) -> Result<VmView, DaemonError> {
        validate_name(&req.name).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        let lock = self.vm_lock(&req.name);
        let _guard = lock.lock().await;
        if self.with_store(|s| s.get_vm_by_name(&req.name))?.is_some() {
            return Err(DaemonError::Conflict(format!(
                "a vm named {:?} already exists: pick another name or `banger vm delete {}` first",
                req.name, req.name
            )));
        }
        let image = {
            let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            images::select(&store, req.image.as_deref(), self.config.default_image.as_deref())
                .map_err(image_err)?
        }
        .name;
        let vcpus = req.vcpus.unwrap_or(self.config.default_vcpus);
        if !(1..=32).contains(&vcpus) {
            return Err(DaemonError::Invalid(format!("--vcpus {vcpus} is out of range: use 1 to 32")));
        }
        let memory_mib = req.memory_mib.unwrap_or(self.config.default_memory_mib);
        if memory_mib < 128 {
            return Err(DaemonError::Invalid(format!(
                "--memory {memory_mib} MiB is too small: use at least 128"
            )));
        }
        let id = new_vm_id();
        let vm = VmRuntime::new_created(&self.paths, id, &req.name, &image, vcpus, memory_mib, unix_now());
        crate::paths::check_socket_path_len(&vm.api_socket, 0)
            .map_err(|e| DaemonError::Invalid(e.to_string()))?;
        crate::paths::check_socket_path_len(&vm.vsock_path, 6)
            .map_err(|e| DaemonError::Invalid(e.to_string()))?;
        create_private_dir(&vm.vm_dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", vm.vm_dir.display())))?;
        if let Err(e) = self.with_store(|s| s.insert_vm(&vm)) {
            let _ = std::fs::remove_dir_all(&vm.vm_dir);
            return Err(e);
        }
        tracing::info!(vm = %vm.name, id = %vm.id, "created");
        Ok(self.view(&vm))
    }

    fn image(&self, name: &str) -> Result<crate::daemon::store::ImageRecord, DaemonError> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        images::get(&store, name).map_err(image_err)
    }

    /// `POST /v1/vms/{name}/start`.
    pub async fn start(&self, name: &str) -> Result<VmView, DaemonError> {
        let lock = self.vm_lock(name);
        let _guard = lock.lock().await;
        let mut vm = self.find(name)?;
        let handles = self.handles_of(&vm);
        if vm_alive(&vm, &handles, self.procs.as_ref()) {
            return Ok(self.view(&vm));
        }
        let vmm_bin = self.firecracker.clone().map_err(DaemonError::Invalid)?;
        let image = self.image(&vm.image)?;
        // Whatever a previous run left (a crash between reconciles) goes first.
        if !handles.is_empty() || vm.state.wants_running() {
            self.teardown(&vm, &handles).await?;
        }
        self.set_state(&mut vm, VmState::Starting, None)?;
        match self.boot(&mut vm, &image, &vmm_bin).await {
            Ok(()) => {
                self.set_state(&mut vm, VmState::Running, None)?;
                tracing::info!(vm = %vm.name, id = %vm.id, "running");
                Ok(self.view(&vm))
            }
            Err(e) => {
                tracing::warn!(vm = %vm.name, id = %vm.id, error = %e, "start failed; undoing");
                let handles = self.handles_of(&vm);
                let undo = self.teardown(&vm, &handles).await;
                let mut msg = e.to_string();
                if let Err(u) = undo {
                    msg.push_str(&format!(" (cleanup incomplete: {u})"));
                }
                let _ = self.set_state(&mut vm, VmState::Failed, Some(msg.clone()));
                Err(match e {
                    DaemonError::Unavailable(_) => DaemonError::Unavailable(msg),
                    DaemonError::Invalid(_) => DaemonError::Invalid(msg),
                    _ => DaemonError::Failed(msg),
                })
            }
        }
    }

    async fn boot(
        &self,
        vm: &mut VmRuntime,
        image: &crate::daemon::store::ImageRecord,
        vmm_bin: &Path,
    ) -> Result<(), DaemonError> {
        let helper_err = |e: crate::daemon::helper_client::HelperClientError| helper_error(&e);
        let tap = self.helper.tap_create(&vm.id).await.map_err(helper_err)?;
        let mut handles = VmHandles { tap: Some(tap.name.clone()), ..VmHandles::default() };
        self.cache.record(&vm.id, &vm.vm_dir, handles.clone()).map_err(|e| failed(with_sources(&e)))?;
        self.helper.nat_up(&vm.id).await.map_err(helper_err)?;
        vm.guest_ip = Some(tap.guest_ip);
        vm.gateway_ip = Some(tap.host_ip);

        // The writable root: made once from the image, then personalized at every start.
        if !vm.overlay_path.exists() {
            let kind = storage::prepare_root(
                storage::StorageStrategy::default(),
                &image.rootfs_path,
                &vm.overlay_path,
            )
            .map_err(|e| failed(with_sources(&e)))?;
            vm.storage = Some(kind);
        }
        let user_key = ssh::ensure_user_key(&self.paths.ssh_key()).map_err(|e| failed(with_sources(&e)))?;
        let host_key = personalize::personalize(
            &vm.overlay_path,
            &personalize::Personalization {
                hostname: &vm.name,
                authorized_keys: std::slice::from_ref(&user_key.public_key),
            },
        )
        .map_err(|e| failed(with_sources(&e)))?;
        ssh::pin_host_key(&self.paths.known_hosts(), &vm.id, &host_key)
            .map_err(|e| failed(with_sources(&e)))?;
        vm.updated_at = unix_now();
        self.with_store(|s| s.update_vm(vm))?;

        // The vsock socket is bound at PUT /vsock; one left by a killed VMM would make it fail.
        vmm::remove_stale_socket(&vm.vsock_path).map_err(|e| failed(with_sources(&e)))?;
        let spawned = vmm::spawn_direct(&vmm::SpawnSpec {
            vmm: vmm_bin,
            relay: &self.relay_exe,
            id: vm.id.as_str(),
            api_socket: &vm.api_socket,
            serial_log: &vm.log_path,
            serial_cap: logs::SERIAL_LOG_CAP,
        })
        .await
        .map_err(|e| failed(with_sources(&e)))?;
        handles.pid = Some(spawned.pid);
        self.cache.record(&vm.id, &vm.vm_dir, handles).map_err(|e| failed(with_sources(&e)))?;

        let fc = FirecrackerClient::new(&vm.api_socket);
        let api = |e: firecracker::FirecrackerError| {
            let text = with_sources(&e);
            let hint = vmm::device_hint(&text);
            failed(format!("{text}{hint}"))
        };
        // Firecracker appends to the metrics file; it must exist.
        touch(&vm.metrics_path)
            .map_err(|e| failed(format!("cannot create {}: {e}", vm.metrics_path.display())))?;
        fc.put_metrics(&firecracker::Metrics { metrics_path: vm.metrics_path.clone() }).await.map_err(api)?;
        fc.put_machine_config(&firecracker::MachineConfig {
            vcpu_count: vm.vcpus,
            mem_size_mib: vm.memory_mib,
            smt: None,
            track_dirty_pages: None,
            huge_pages: None,
        })
        .await
        .map_err(api)?;
        fc.put_boot_source(&firecracker::BootSource {
            kernel_image_path: image.kernel_path.clone(),
            boot_args: Some(boot_args(vm, tap.guest_ip, tap.host_ip, tap.prefix_len)),
            initrd_path: None,
        })
        .await
        .map_err(api)?;
        fc.put_drive(&firecracker::Drive {
            drive_id: "rootfs".into(),
            is_root_device: true,
            path_on_host: vm.overlay_path.clone(),
            is_read_only: false,
            cache_type: None,
            io_engine: None,
            partuuid: None,
        })
        .await
        .map_err(api)?;
        fc.put_network_interface(&firecracker::NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: tap.name.clone(),
            guest_mac: Some(tap.guest_mac.clone()),
        })
        .await
        .map_err(api)?;
        fc.put_vsock(&firecracker::Vsock { guest_cid: vm.vsock_cid, uds_path: vm.vsock_path.clone() })
            .await
            .map_err(api)?;
        fc.instance_start().await.map_err(api)?;
        Ok(())
    }

    /// Removes everything a VM holds: kills its VMM if it still serves the VM's socket, then
    /// NAT, TAP and loops through the helper, then its handles and sockets. Idempotent.
    async fn teardown(&self, vm: &VmRuntime, handles: &VmHandles) -> Result<(), DaemonError> {
        if let Some(pid) = handles.pid
            && let Err(e) = kill_and_wait(self.procs.as_ref(), pid, &vm.api_socket, KILL_WAIT).await
        {
            tracing::warn!(vm = %vm.name, pid, error = %e, "cannot kill the vmm; tearing its devices down anyway");
        }
        for sock in [&vm.api_socket, &vm.vsock_path] {
            let _ = vmm::remove_stale_socket(sock);
        }
        // The handles stay recorded until the helper confirms, so a later reconcile still knows
        // what to remove if this fails.
        let report =
            self.helper.teardown_vms(std::slice::from_ref(&vm.id)).await.map_err(|e| helper_error(&e))?;
        if let Some(f) = report.failures.first() {
            return Err(failed(format!(
                "helper could not remove {} of vm {}: {}",
                f.object, vm.name, f.error
            )));
        }
        self.cache.forget(&vm.id, &vm.vm_dir).map_err(|e| failed(with_sources(&e)))?;
        Ok(())
    }

    /// `POST /v1/vms/{name}/stop`.
    pub async fn stop(&self, name: &str) -> Result<VmView, DaemonError> {
        let lock = self.vm_lock(name);
        let _guard = lock.lock().await;
        let mut vm = self.find(name)?;
        self.stop_locked(&mut vm).await?;
        Ok(self.view(&vm))
    }

    async fn stop_locked(&self, vm: &mut VmRuntime) -> Result<(), DaemonError> {
        let handles = self.handles_of(vm);
        if !vm.state.wants_running() && handles.is_empty() {
            return Ok(());
        }
        let was_alive = vm_alive(vm, &handles, self.procs.as_ref());
        self.set_state(vm, VmState::Stopping, None)?;
        if was_alive && let Some(pid) = handles.pid {
            let fc = FirecrackerClient::new(&vm.api_socket);
            match fc.send_ctrl_alt_del().await {
                Ok(()) => match wait_gone(self.procs.as_ref(), pid, STOP_GRACE).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(vm = %vm.name, "guest did not shut down in time; killing the vmm")
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm.name, error = %e, "cannot watch the vmm exit; killing it")
                    }
                },
                Err(e) => tracing::warn!(vm = %vm.name, error = %e, "ctrl-alt-del failed; killing the vmm"),
            }
        }
        self.teardown(vm, &handles).await?;
        self.set_state(vm, VmState::Stopped, None)?;
        tracing::info!(vm = %vm.name, id = %vm.id, "stopped");
        Ok(())
    }

    /// `POST /v1/vms/{name}/restart`.
    pub async fn restart(&self, name: &str) -> Result<VmView, DaemonError> {
        {
            let lock = self.vm_lock(name);
            let _guard = lock.lock().await;
            let mut vm = self.find(name)?;
            self.stop_locked(&mut vm).await?;
        }
        self.start(name).await
    }

    /// `DELETE /v1/vms/{name}`. Returns a warning when the VM is gone but kernel objects it may
    /// have left could not be checked (the helper was unreachable): no row claims them any more,
    /// so the next reconcile with the helper reachable removes them.
    pub async fn delete(&self, name: &str) -> Result<Option<String>, DaemonError> {
        let lock = self.vm_lock(name);
        let _guard = lock.lock().await;
        let mut vm = self.find(name)?;
        let handles = self.handles_of(&vm);
        let mut warning = None;
        if vm_alive(&vm, &handles, self.procs.as_ref()) {
            self.stop_locked(&mut vm).await?;
        } else {
            // Kernel objects of a VM that is not running (never started, or left by a crash).
            match self.teardown(&vm, &handles).await {
                Ok(()) => {}
                Err(DaemonError::Unavailable(why)) => {
                    self.cache.remove(&vm.id);
                    warning = Some(format!(
                        "could not check vm {name} for leftover network devices ({why}); any are removed at the next daemon start with banger-helper reachable"
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        ssh::unpin_host_key(&self.paths.known_hosts(), &vm.id).map_err(|e| failed(with_sources(&e)))?;
        match std::fs::remove_dir_all(&vm.vm_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(format!("cannot remove {}: {e}", vm.vm_dir.display()))),
        }
        self.with_store(|s| s.delete_vm(&vm.id))?;
        self.vm_locks.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        tracing::info!(vm = %vm.name, id = %vm.id, warning = warning.as_deref().unwrap_or(""), "deleted");
        Ok(warning)
    }

    /// `GET /v1/vms/{name}/logs`.
    pub async fn logs(&self, name: &str, bytes: u64) -> Result<String, DaemonError> {
        let vm = self.find(name)?;
        logs::tail(&vm.log_path, bytes)
            .map_err(|e| failed(format!("cannot read {}: {e}", vm.log_path.display())))
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status, DaemonError> {
        // Every CLI command asks for the status; a helper that hangs must not hang them.
        let helper_reachable =
            matches!(tokio::time::timeout(Duration::from_secs(2), self.helper.ping()).await, Ok(Ok(())));
        let vms = self.with_store(|s| s.list_vms())?;
        let running_vms = vms
            .iter()
            .filter(|vm| vm_alive(vm, &self.cache.get(&vm.id).unwrap_or_default(), self.procs.as_ref()))
            .count();
        Ok(Status {
            pid: std::process::id() as i32,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            install_id: self.install_id.to_string(),
            helper_socket: self.config.helper_socket.clone(),
            firecracker: self.firecracker.clone().unwrap_or_else(|_| self.config.firecracker.clone()),
            helper_reachable,
            running_vms,
        })
    }

    /// `GET /v1/images`.
    pub async fn images(&self) -> Result<Vec<ImageView>, DaemonError> {
        Ok(self.with_store(|s| s.list_images())?.into_iter().map(image_view).collect())
    }

    /// `POST /v1/images`.
    pub async fn import_image(&self, req: ImportImage) -> Result<ImageView, DaemonError> {
        crate::ids::validate_name(&req.name)
            .map_err(|_| image_err(images::ImageError::InvalidName(req.name.clone())))?;
        if self.with_store(|s| s.get_image(&req.name))?.is_some() {
            return Err(image_err(images::ImageError::Exists(req.name.clone())));
        }
        // Copy and hash without holding the store; only the commit takes it.
        let paths = self.paths.clone();
        let staged =
            tokio::task::spawn_blocking(move || images::stage(&paths, &req.name, &req.kernel, &req.rootfs))
                .await
                .map_err(failed)?
                .map_err(image_err)?;
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        Ok(image_view(staged.commit(&store, &self.paths).map_err(image_err)?))
    }

    /// `DELETE /v1/images/{name}`.
    pub async fn remove_image(&self, name: &str) -> Result<(), DaemonError> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        images::remove(&store, &self.paths, name).map_err(image_err)
    }
}

fn image_view(i: crate::daemon::store::ImageRecord) -> ImageView {
    ImageView {
        name: i.name,
        kernel_sha256: i.kernel_sha256,
        rootfs_sha256: i.rootfs_sha256,
        size_bytes: i.size_bytes,
        created_at: i.created_at,
    }
}

fn image_err(e: images::ImageError) -> DaemonError {
    let text = with_sources(&e);
    match e.kind() {
        images::ImageErrorKind::NotFound => DaemonError::NotFound(text),
        images::ImageErrorKind::Conflict => DaemonError::Conflict(text),
        images::ImageErrorKind::Invalid => DaemonError::Invalid(text),
        images::ImageErrorKind::Failed => DaemonError::Failed(text),
    }
}

fn helper_error(e: &crate::daemon::helper_client::HelperClientError) -> DaemonError {
    let text = with_sources(e);
    if e.is_unreachable() { DaemonError::Unavailable(text) } else { DaemonError::Failed(text) }
}

/// The kernel command line: console, reboot on Ctrl-Alt-Del, and the guest's address.
pub fn boot_args(vm: &VmRuntime, guest: Ipv4Addr, gateway: Ipv4Addr, prefix_len: u8) -> String {
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0));
    format!("console=ttyS0 reboot=k panic=1 pci=off ip={guest}::{gateway}:{mask}:{}:eth0:off", vm.name)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

fn touch(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map(drop)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use banger_protocol::Request;

    use super::*;
    use crate::daemon::helper_client::fake::FakeHelper;
    use crate::daemon::liveness::fake::FakeProcesses;
    use crate::daemon::store::ImageRecord;

    struct Env {
        _dir: tempfile::TempDir,
        daemon: Daemon,
        helper: Arc<FakeHelper>,
        procs: Arc<FakeProcesses>,
    }

    /// A daemon over a temp install with one image, a fake helper and a fake process table.
    /// `vmm` is the VMM's shell script body.
    fn env(vmm: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("h");
        let paths = Paths::under(&home, nix::unistd::getuid().as_raw()).unwrap();
        paths.ensure_dirs().unwrap();
        let fc = dir.path().join("vmm");
        std::fs::write(&fc, format!("#!/bin/sh\n{vmm}\n")).unwrap();
        std::fs::set_permissions(&fc, std::fs::Permissions::from_mode(0o755)).unwrap();
        let rootfs = dir.path().join("rootfs.ext4");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&rootfs)
            .arg("8M")
            .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
            .status()
            .unwrap();
        assert!(ok.success());
        let relay = dir.path().join("relay");
        std::fs::write(&relay, "#!/bin/sh\n[ \"$1\" = serial-relay ] && exec cat >> \"$2\"\n").unwrap();
        std::fs::set_permissions(&relay, std::fs::Permissions::from_mode(0o755)).unwrap();
        let store = Store::open_in_memory().unwrap();
        store
            .insert_image(&ImageRecord {
                name: "base".into(),
                kernel_path: fc.clone(),
                rootfs_path: rootfs,
                kernel_sha256: "0".repeat(64),
                rootfs_sha256: "0".repeat(64),
                size_bytes: 1,
                created_at: 0,
            })
            .unwrap();
        let helper = Arc::new(FakeHelper::new(store.install_id().clone()));
        let procs = Arc::new(FakeProcesses::new());
        let config = Config { firecracker: fc, ..Config::default() };
        let daemon = Daemon::new(paths, config, store, helper.clone(), procs.clone(), relay);
        Env { _dir: dir, daemon, helper, procs }
    }

    fn create(name: &str) -> CreateVm {
        CreateVm { name: name.into(), image: Some("base".into()), vcpus: None, memory_mib: None }
    }

    #[tokio::test]
    async fn create_validates_and_refuses_duplicates_without_side_effects() {
        let e = env("exit 1");
        let vm = e.daemon.create(create("dev")).await.unwrap();
        assert_eq!((vm.name.as_str(), vm.state.as_str()), ("dev", "created"));
        assert!(vm.vm_dir.is_dir());

        let dup = e.daemon.create(create("dev")).await.unwrap_err();
        assert_eq!(dup.status(), 409, "{dup}");
        assert!(dup.to_string().contains("already exists"), "{dup}");

        let bad = e.daemon.create(create("Bad_Name")).await.unwrap_err();
        assert_eq!(bad.status(), 400);
        assert!(bad.to_string().contains("invalid vm name"), "{bad}");

        let unknown =
            e.daemon.create(CreateVm { image: Some("nope".into()), ..create("other") }).await.unwrap_err();
        assert_eq!(unknown.status(), 404, "{unknown}");
        assert!(unknown.to_string().contains("nope") && unknown.to_string().contains("base"), "{unknown}");

        let vcpus = e.daemon.create(CreateVm { vcpus: Some(64), ..create("other") }).await.unwrap_err();
        assert_eq!(vcpus.status(), 400, "{vcpus}");

        // Only the first create left anything.
        let list = e.daemon.list().await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(std::fs::read_dir(e.daemon.paths.vms_dir()).unwrap().count(), 1);
        assert!(e.helper.calls().is_empty(), "create never needs the helper");
    }

    #[tokio::test]
    async fn a_failed_start_undoes_everything_and_records_why() {
        let e = env("echo 'Error creating KVM object: Permission denied (os error 13)'; exit 1");
        e.daemon.create(create("dev")).await.unwrap();
        let err = e.daemon.start("dev").await.unwrap_err().to_string();
        assert!(err.contains("/dev/kvm") && err.contains("kvm group"), "{err}");

        let vm = e.daemon.show("dev").await.unwrap();
        assert_eq!(vm.state, "failed");
        assert!(vm.last_error.as_deref().unwrap_or("").contains("KVM object"), "{vm:?}");
        assert!(vm.pid.is_none() && vm.tap.is_none());
        // The TAP and NAT made for it were removed through the helper, and nothing is owned now.
        let calls = e.helper.calls();
        assert!(matches!(calls[0], Request::TapCreate { .. }), "{calls:?}");
        assert!(calls.iter().any(|c| matches!(c, Request::NatUp { .. })), "{calls:?}");
        assert!(matches!(calls.last(), Some(Request::TeardownVms { .. })), "{calls:?}");
        let owned = e.helper.owned();
        assert!(owned.taps.is_empty() && owned.nat.is_empty(), "{owned:?}");
        assert!(!crate::daemon::handles::scratch_path(&vm.vm_dir).exists());
        // The root was made once and keeps the hostname written into it.
        assert_eq!(vm.storage.as_deref().map(|s| s == "reflink" || s == "sparse-copy"), Some(true));
    }

    #[tokio::test]
    async fn start_without_a_helper_says_how_to_start_it() {
        let e = env("exit 1");
        e.daemon.create(create("dev")).await.unwrap();
        e.helper.set_unreachable(true);
        let err = e.daemon.start("dev").await.unwrap_err();
        assert_eq!(err.status(), 503, "{err}");
        assert!(err.to_string().contains("banger-helper"), "{err}");
        // List and show still work without the helper.
        assert_eq!(e.daemon.list().await.unwrap()[0].state, "failed");
    }

    #[tokio::test]
    async fn stopping_a_stopped_vm_changes_nothing_and_delete_removes_everything() {
        let e = env("exit 1");
        let created = e.daemon.create(create("dev")).await.unwrap();
        let stopped = e.daemon.stop("dev").await.unwrap();
        assert_eq!(stopped.state, "created");
        assert!(e.helper.calls().is_empty());
        e.daemon.delete("dev").await.unwrap();
        assert!(!created.vm_dir.exists());
        assert_eq!(e.daemon.show("dev").await.unwrap_err().status(), 404);
        assert!(e.daemon.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_vmm_that_died_under_a_running_daemon_is_demoted_with_its_objects_removed() {
        let e = env("exit 1");
        let view = e.daemon.create(create("dev")).await.unwrap();
        // Pretend a start succeeded: a TAP at the helper, handles recorded, state running.
        let id: banger_protocol::VmId = view.id.parse().unwrap();
        e.helper.tap_create(&id).await.unwrap();
        e.daemon.with_store(|s| s.set_state(&id, VmState::Running, None)).unwrap();
        e.procs.add_vmm(4242, &view.api_socket);
        let handles = VmHandles { pid: Some(4242), tap: Some("bgtest".into()), ..VmHandles::default() };
        e.daemon.cache.record(&id, &view.vm_dir, handles).unwrap();
        assert_eq!(e.daemon.show("dev").await.unwrap().pid, Some(4242));

        // The VMM exits; the next read notices, tears down and demotes.
        e.procs.make_zombie(4242);
        let vm = e.daemon.show("dev").await.unwrap();
        assert_eq!(vm.state, "stopped");
        assert!(vm.last_error.unwrap().contains("vmm exited"));
        assert!(e.helper.owned().taps.is_empty());
        assert!(e.daemon.cache.get(&id).is_none());
    }

    #[tokio::test]
    async fn a_stopped_vm_can_be_deleted_while_the_helper_is_down_with_a_warning() {
        let e = env("exit 1");
        let created = e.daemon.create(create("dev")).await.unwrap();
        e.helper.set_unreachable(true);
        let warning = e.daemon.delete("dev").await.unwrap().expect("a warning");
        assert!(warning.contains("banger-helper") && warning.contains("next daemon start"), "{warning}");
        assert!(!created.vm_dir.exists());
        assert_eq!(e.daemon.show("dev").await.unwrap_err().status(), 404);
        // With the helper up, deleting asks it and warns about nothing.
        e.helper.set_unreachable(false);
        e.daemon.create(create("dev")).await.unwrap();
        assert_eq!(e.daemon.delete("dev").await.unwrap(), None);
    }

    #[test]
    fn boot_args_carry_the_guest_address() {
        let vm_name = "dev";
        let mut vm = sample_vm();
        vm.name = vm_name.into();
        let args = boot_args(&vm, Ipv4Addr::new(172, 30, 0, 2), Ipv4Addr::new(172, 30, 0, 1), 30);
        assert!(args.contains("ip=172.30.0.2::172.30.0.1:255.255.255.252:dev:eth0:off"), "{args}");
        assert!(args.starts_with("console=ttyS0 reboot=k panic=1"), "{args}");
    }

    fn sample_vm() -> VmRuntime {
        let paths = Paths::under(Path::new("/home/u/.b"), 1000).unwrap();
        VmRuntime::new_created(&paths, crate::ids::new_vm_id(), "x", "base", 1, 128, 0)
    }
}
