//! bangerd, the per-user daemon: [`Daemon`] holds what every request needs and answers the
//! reads (list, show, status, logs, images); the VM lifecycle (create, start, stop, restart,
//! delete, and noticing VMMs that died) is in [`lifecycle`].
//!
//! The daemon reaches the system only through what it is given ([`Deps`]): the root helper
//! ([`helper_client::HelperApi`]), the process table ([`liveness::ProcessTable`]), the VMM
//! ([`vmm::Vmm`]) and the tools that prepare a VM's root disk ([`guest_prep::GuestPrep`]).
//! [`startup`] gives it the real ones; tests give it fakes.
//!
//! Its parts: [`startup`] (start-up and serving), [`api`] (HTTP routing), [`error`] (errors and
//! their HTTP statuses), [`store`] (durable intent), [`handles`] (momentary reality),
//! [`liveness`], [`reconcile`], [`helper_client`], [`firecracker`] (the VMM's API), [`vmm`], [`launch`],
//! [`beneath`] (files inside a jail), [`images`], [`file_identity`], [`storage`], [`work_disk`], [`personalize`], [`resolvers`], [`guest_prep`],
//! [`logs`].

pub mod api;
pub mod beneath;
pub mod error;
pub mod file_identity;
pub mod firecracker;
pub mod guest_prep;
pub mod handles;
pub mod helper_client;
pub mod images;
pub mod launch;
pub mod lifecycle;
pub mod liveness;
pub mod logs;
pub mod personalize;
pub mod reconcile;
pub mod resolvers;
pub mod startup;
pub mod storage;
pub mod store;
pub mod vmm;
pub mod work_disk;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_protocol::{InstallId, VmId};

pub use self::error::{DaemonError, chain};
use self::guest_prep::GuestPrep;
use self::handles::HandleCache;
use self::helper_client::HelperApi;
use self::lifecycle::{Retry, Timeouts};
use self::liveness::{ProcessTable, rediscover_handles, vm_alive};
use self::store::{ImageRecord, Store, StoreError};
use self::vmm::Vmm;
use crate::api_types::{ImageView, ImportImage, Status, VmView};
use crate::config::{Config, ConfigError};
use crate::ids::validate_name;
use crate::model::{VmHandles, VmRuntime, VmState};
use crate::paths::Paths;

/// What the daemon reaches the system through.
pub struct Deps {
    /// The root helper.
    pub helper: Arc<dyn HelperApi>,
    /// The process table.
    pub procs: Arc<dyn ProcessTable>,
    /// Starting and driving VMMs.
    pub vmm: Arc<dyn Vmm>,
    /// Preparing a VM's root disk.
    pub prep: Arc<dyn GuestPrep>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").finish_non_exhaustive()
    }
}

/// The daemon: everything a request handler needs.
pub struct Daemon {
    /// Where this install keeps its files.
    pub paths: Paths,
    /// The settings in effect (fixed for the daemon's life).
    pub config: Config,
    /// The VMM binary, resolved at start (an error when it could not be: starts then fail
    /// clearly).
    firecracker: Result<PathBuf, Arc<ConfigError>>,
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
    /// The VMM.
    vmm: Arc<dyn Vmm>,
    /// The root disk's tools.
    prep: Arc<dyn GuestPrep>,
    /// How long stops wait.
    timeouts: Timeouts,
    /// Guards the map of per-VM operation locks (by VM name); each inner lock serializes the
    /// operations on one VM.
    vm_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Guards the background refresh's record of failed teardown retries, per VM (its backoff).
    retries: Mutex<HashMap<VmId, Retry>>,
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
    pub fn new(paths: Paths, config: Config, store: Store, deps: Deps) -> Self {
        let firecracker = config.resolve_firecracker().map_err(Arc::new);
        let install_id = store.install_id().clone();
        Daemon {
            paths,
            config,
            firecracker,
            install_id,
            store: Mutex::new(store),
            cache: HandleCache::new(),
            helper: deps.helper,
            procs: deps.procs,
            vmm: deps.vmm,
            prep: deps.prep,
            timeouts: Timeouts::default(),
            vm_locks: Mutex::new(HashMap::new()),
            retries: Mutex::new(HashMap::new()),
            shutdown: tokio::sync::Notify::new(),
        }
    }

    /// The same daemon with other waits (tests shorten them).
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Reconciles every VM with the system (see [`reconcile`]).
    pub async fn reconcile(&self) -> Result<reconcile::ReconcileReport, reconcile::ReconcileError> {
        reconcile::reconcile(&self.store, &self.cache, self.helper.as_ref(), self.procs.as_ref()).await
    }

    /// The install id.
    pub fn install_id(&self) -> &InstallId {
        &self.install_id
    }

    /// Runs `f` on the store.
    pub fn with_store<T>(&self, f: impl FnOnce(&Store) -> Result<T, StoreError>) -> Result<T, DaemonError> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&store)?)
    }

    /// The lock serializing operations on the VM named `name`.
    fn vm_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_owned()).or_default().clone()
    }

    /// The VM named `name`.
    fn find(&self, name: &str) -> Result<VmRuntime, DaemonError> {
        validate_name(name)?;
        self.with_store(|s| s.get_vm_by_name(name))?.ok_or_else(|| DaemonError::NoSuchVm(name.to_owned()))
    }

    /// The image named `name`.
    fn image(&self, name: &str) -> Result<ImageRecord, DaemonError> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        Ok(images::get(&store, name)?)
    }

    /// The VM's handles: the cache, else what the OS and scratch file say.
    fn handles_of(&self, vm: &VmRuntime) -> VmHandles {
        self.cache.get(&vm.id).unwrap_or_else(|| rediscover_handles(vm, self.procs.as_ref()).handles)
    }

    fn view(&self, vm: &VmRuntime) -> VmView {
        let handles = self.cache.get(&vm.id).unwrap_or_default();
        let alive = vm_alive(vm, &handles, self.procs.as_ref());
        view_of(vm, &handles, alive)
    }

    /// `GET /v1/vms`: the rows (one query) and the handle cache, with one liveness check per VM
    /// meant to run and nothing else: no helper, no file of any VM. A VM recorded `running`
    /// whose VMM is gone is refreshed (torn down, recorded `stopped`) as `vm show` would.
    pub async fn list(&self) -> Result<Vec<VmView>, DaemonError> {
        let vms = self.with_store(|s| s.list_vms())?;
        let mut out = Vec::with_capacity(vms.len());
        for vm in vms {
            let handles = self.cache.get(&vm.id).unwrap_or_default();
            let alive = vm_alive(&vm, &handles, self.procs.as_ref());
            if vm.state == VmState::Running && !alive {
                let vm = self.refresh(vm).await;
                out.push(self.view(&vm));
            } else {
                out.push(view_of(&vm, &handles, alive));
            }
        }
        Ok(out)
    }

    /// `GET /v1/vms/{name}`.
    pub async fn show(&self, name: &str) -> Result<VmView, DaemonError> {
        let vm = self.find(name)?;
        let vm = self.refresh(vm).await;
        Ok(self.view(&vm))
    }

    /// `GET /v1/vms/{name}/logs`: the last `bytes` of the VM's console (or with `vmm`, of its
    /// VMM's log), of the current run only when `current_run`.
    pub async fn logs(
        &self,
        name: &str,
        bytes: u64,
        vmm: bool,
        current_run: bool,
    ) -> Result<String, DaemonError> {
        let vm = self.find(name)?;
        if vmm && vm.launch == Some(crate::model::LaunchMode::Jailer) {
            return Err(launch::LaunchError::NoVmmLog { vm: vm.name }.into());
        }
        let path = if vmm { vm.vmm_log_path() } else { vm.log_path.clone() };
        let text = if current_run { logs::run_tail(&path, bytes) } else { logs::tail(&path, bytes) };
        text.map_err(|source| DaemonError::Io { action: "read", path, source })
    }

    /// `GET /v1/status`: with `checks`, the helper pinged and the running VMs counted; without
    /// (the CLI's probe before each command), the daemon's settings alone, touching neither the
    /// helper nor any VM.
    pub async fn status(&self, checks: bool) -> Result<Status, DaemonError> {
        let (helper_reachable, helper_problem, running_vms) =
            if checks { self.checks().await? } else { (None, None, None) };
        Ok(Status {
            storage: self.config.storage.as_str().to_owned(),
            launch: self.config.launch.as_str().to_owned(),
            pid: std::process::id() as i32,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            install_id: self.install_id.to_string(),
            helper_socket: self.config.helper_socket.clone(),
            firecracker: self.firecracker.clone().unwrap_or_else(|_| self.config.firecracker.clone()),
            helper_reachable,
            helper_problem,
            running_vms,
        })
    }

    /// The status's checks: whether the helper answers (and why not), how many VMs run.
    async fn checks(&self) -> Result<(Option<bool>, Option<String>, Option<usize>), DaemonError> {
        // A helper that hangs must not hang `daemon status`.
        let helper_problem = match tokio::time::timeout(Duration::from_secs(2), self.helper.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                let (why, fix) = crate::doctor::checks::helper_problem(&e);
                Some(format!("{why}; fix: {fix}"))
            }
            Err(_) => Some("banger-helper did not answer a ping within 2s; see its log".to_owned()),
        };
        let helper_reachable = helper_problem.is_none();
        let vms = self.with_store(|s| s.list_vms())?;
        let running_vms = vms
            .iter()
            .filter(|vm| vm_alive(vm, &self.cache.get(&vm.id).unwrap_or_default(), self.procs.as_ref()))
            .count();
        Ok((Some(helper_reachable), helper_problem, Some(running_vms)))
    }

    /// `GET /v1/images`.
    pub async fn images(&self) -> Result<Vec<ImageView>, DaemonError> {
        Ok(self.with_store(|s| s.list_images())?.into_iter().map(image_view).collect())
    }

    /// `POST /v1/images`.
    pub async fn import_image(&self, req: ImportImage) -> Result<ImageView, DaemonError> {
        self.import_image_reporting(req, |_| {}).await
    }

    /// Refuses an import whose name is invalid or taken, before anything is copied.
    pub fn check_import(&self, req: &ImportImage) -> Result<(), DaemonError> {
        validate_name(&req.name).map_err(|_| images::ImageError::InvalidName(req.name.clone()))?;
        if self.with_store(|s| s.get_image(&req.name))?.is_some() {
            return Err(images::ImageError::Exists(req.name.clone()).into());
        }
        Ok(())
    }

    /// `POST /v1/images?progress=true`: an import that tells `progress` each step and the bytes
    /// done ([`images::stage`]).
    pub async fn import_image_reporting(
        &self,
        req: ImportImage,
        mut progress: impl FnMut(images::ImportProgress) + Send + 'static,
    ) -> Result<ImageView, DaemonError> {
        self.check_import(&req)?;
        // Copy and hash without holding the store; only the commit takes it.
        let paths = self.paths.clone();
        let staged = tokio::task::spawn_blocking(move || {
            let files = images::ImageFiles {
                kernel: &req.kernel,
                rootfs: &req.rootfs,
                initrd: req.initrd.as_deref(),
            };
            images::stage(&paths, &req.name, files, &mut progress)
        })
        .await
        .map_err(DaemonError::Task)??;
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        Ok(image_view(staged.commit(&store, &self.paths)?))
    }

    /// `DELETE /v1/images/{name}`.
    pub async fn remove_image(&self, name: &str) -> Result<(), DaemonError> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        Ok(images::remove(&store, &self.paths, name)?)
    }
}

/// What `vm list` and `vm show` say of `vm`, given its `handles` and whether its VMM is `alive`.
fn view_of(vm: &VmRuntime, handles: &VmHandles, alive: bool) -> VmView {
    VmView {
        name: vm.name.clone(),
        id: vm.id.to_string(),
        state: vm.state.to_string(),
        // The address a VM had is not its own while it does not run (the next start may
        // get another).
        guest_ip: if alive { vm.guest_ip } else { None },
        last_error: vm.last_error.clone(),
        cleanup_pending: vm.cleanup_pending.clone(),
        image: vm.image.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        pid: if alive { handles.pid } else { None },
        tap: handles.tap.clone(),
        storage: vm.storage.map(|s| s.as_str().to_owned()),
        launch: vm.launch.map(|l| l.as_str().to_owned()),
        jail_uid: handles.jail.as_ref().filter(|_| alive).map(|j| j.uid),
        work_disk: vm.work_disk_path.clone(),
        work_disk_bytes: vm.work_disk_bytes,
        vm_dir: vm.vm_dir.clone(),
        log_path: vm.log_path.clone(),
        vmm_log_path: vm.vmm_log_path(),
        api_socket: crate::daemon::liveness::api_socket(vm, handles).to_owned(),
        created_at: vm.created_at,
    }
}

fn image_view(i: ImageRecord) -> ImageView {
    ImageView {
        name: i.name,
        kernel_sha256: i.kernel_sha256,
        rootfs_sha256: i.rootfs_sha256,
        initrd_sha256: i.initrd.map(|i| i.sha256),
        size_bytes: i.size_bytes,
        created_at: i.created_at,
    }
}
