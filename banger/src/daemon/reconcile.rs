//! Startup reconcile: make durable intent (the store) and momentary reality (processes, kernel
//! objects held by the helper) agree again after the daemon was down.
//!
//! It runs when bangerd starts, before it serves requests, with no other daemon of the same
//! install running. It is idempotent, so the daemon may run it again later (for example once the
//! helper becomes reachable). Step by step:
//!
//! 1. Read every VM from the store. A store failure is the only error that stops reconcile.
//! 2. Ask the helper once for everything this user owns (`ListOwned`). If it cannot be
//!    reached, remember why and go on: liveness does not need it.
//! 3. For each VM whose intent is to run (`starting`, `running`, `stopping`), rediscover its
//!    handles ([`crate::daemon::liveness::rediscover_handles`]: the OS first, then `handles.json`;
//!    over one pass of the process table, which reads each network namespace's socket table once)
//!    and decide:
//!    - the process table cannot be read → *undetermined*: the VM is left exactly as it is and
//!      its kernel objects are protected from step 5 (acting on an unknown answer could cut a
//!      running VM off its network);
//!    - `running` and alive → *kept*: the cache is seeded with its handles. TAP, loop and dm
//!      names that `handles.json` lacks (all of them when it is missing or corrupt) come from the
//!      helper's list, and the file is rewritten when it differs from what was found;
//!    - `starting` or `stopping` and alive → the interrupted transition is settled: a start is
//!      undone and a stop finished, both by killing the VMM (SIGKILL through a pidfd, only if it
//!      still serves the VM's API socket) and waiting for it to exit (a jailed VMM, which runs
//!      as another uid: the helper's `JailKill`); then as dead below. A VMM that does not exit
//!      in time is left alone and reported;
//!    - a jailed VM (its handles, or the helper's list, name a jail): the jail the helper lists
//!      is the truth (its PID and uid replace what `handles.json` says) and liveness is asked
//!      again with it;
//!    - not alive → *dead*: the VM's kernel objects are torn down through the helper
//!      (`TeardownVms` with its id: NAT, TAP, dm-snapshot, loops), its `handles.json` is removed once the
//!      teardown succeeded, its cache entry dropped, and its state set in one transaction:
//!      `running` → `stopped` with the reason in `last_error`; `starting` → `failed`;
//!      `stopping` → `stopped`. What the VM held is reported from `handles.json`, or from the
//!      helper's list when the file is missing or corrupt.
//! 4. Helper unreachable or teardown failed: the VM is *still* demoted (its VMM is gone), with
//!    `cleanup_pending` saying why its network and disk devices are not removed yet, and its
//!    `handles.json` kept. Nothing is lost: the daemon's background refresh retries the teardown
//!    once the helper answers, and since a VM that does not want to run claims no kernel objects,
//!    the next reconcile with a reachable helper removes them in step 5 anyway.
//! 5. Orphans: every VM id that the helper lists for *this* install (TAPs, NAT, loops, dm-snapshots, jails) and that
//!    no VM claims (no row, or a row not wanting to run, and not handled in step 3) is torn down
//!    in one `TeardownVms` and logged; a VM whose row said its teardown was pending has that
//!    cleared and its `handles.json` removed. Objects tagged with another install id are never
//!    touched.
//!
//! Everything that happened is returned in a [`ReconcileReport`]; the `reconcile finished` log line
//! counts it and says how long reconcile took (`took_us`), step 3 (`examine_us`: every VM's
//! liveness) and steps 4 and 5 (`teardown_us`: the helper's teardown and the demotions).

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use banger_protocol::{OwnedObjects, TeardownFailure, VmId};

use crate::daemon::handles::{self, HandleCache};
use crate::daemon::helper_client::{HelperApi, HelperClientError};
use crate::daemon::liveness::{ProcessTable, kill_and_wait, rediscover_handles, vm_liveness};
use crate::daemon::store::{Store, StoreError};
use crate::model::JailHandles;
use crate::model::{VmHandles, VmRuntime, VmState};

/// How long reconcile waits for a killed VMM to exit by default.
pub const DEFAULT_KILL_WAIT: Duration = Duration::from_secs(5);

/// `last_error` of a VM whose VMM died while the daemon was down.
pub const REASON_EXITED: &str = "the vmm exited while bangerd was not running";

/// `last_error` of a VM whose start was interrupted by the daemon exiting.
pub const REASON_START_INTERRUPTED: &str =
    "the start was interrupted because bangerd exited; start the vm again";

/// Why reconcile could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The VMs could not be read from the store.
    #[error("cannot reconcile: the vms could not be read from the store")]
    Store(#[source] StoreError),
}

/// What happened to the kernel objects of a demoted VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Teardown {
    /// The helper removed everything.
    Done,
    /// The helper could not be reached; the next reconcile removes them.
    Pending,
    /// The helper tried and reported failures (each described).
    Failed(Vec<String>),
}

/// A VM that reconcile moved out of a running intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demoted {
    /// The VM.
    pub vm: VmId,
    /// Its name.
    pub name: String,
    /// Its state before.
    pub from: VmState,
    /// Its state now.
    pub to: VmState,
    /// The `last_error` written (`None` for a stop that was simply finished).
    pub last_error: Option<String>,
    /// The `cleanup_pending` written: why its kernel objects are not removed yet.
    pub cleanup_pending: Option<String>,
    /// Whether reconcile killed its VMM (an interrupted start or stop).
    pub killed: Option<i32>,
    /// What it held, e.g. `pid 42`, `tap bg0123`, `cow loop /dev/loop3`.
    pub held: Vec<String>,
    /// What became of those kernel objects.
    pub teardown: Teardown,
}

/// What reconcile did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// VMs found alive and kept; their handles are in the cache.
    pub kept: Vec<VmId>,
    /// VMs demoted to `stopped` or `failed`.
    pub demoted: Vec<Demoted>,
    /// VMs left as they were because their liveness could not be decided, with the reason.
    pub undetermined: Vec<(VmId, String)>,
    /// VM ids of this install whose unclaimed kernel objects were removed.
    pub orphans_removed: Vec<VmId>,
    /// Objects the helper could not remove (of demoted VMs and of orphans).
    pub teardown_failures: Vec<TeardownFailure>,
    /// Why the helper could not be used, when it could not.
    pub helper_unreachable: Option<String>,
    /// Problems that did not stop reconcile (a scratch file or state that could not be written).
    pub warnings: Vec<String>,
}

/// Runs reconcile with the default options.
pub async fn reconcile(
    store: &Mutex<Store>,
    cache: &HandleCache,
    helper: &dyn HelperApi,
    procs: &dyn ProcessTable,
) -> Result<ReconcileReport, ReconcileError> {
    Reconciler::new(store, cache, helper, procs).run().await
}

/// Reconcile's inputs and options.
#[derive(Clone, Copy)]
pub struct Reconciler<'a> {
    store: &'a Mutex<Store>,
    cache: &'a HandleCache,
    helper: &'a dyn HelperApi,
    procs: &'a dyn ProcessTable,
    kill_wait: Duration,
}

impl std::fmt::Debug for Reconciler<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler").field("kill_wait", &self.kill_wait).finish_non_exhaustive()
    }
}

/// A VM found dead in step 3, waiting for teardown.
struct Dead {
    vm: VmRuntime,
    to: VmState,
    reason: Option<&'static str>,
    killed: Option<i32>,
    held: Vec<String>,
}

impl<'a> Reconciler<'a> {
    /// Reconcile over these parts, waiting [`DEFAULT_KILL_WAIT`] for killed VMMs.
    pub fn new(
        store: &'a Mutex<Store>,
        cache: &'a HandleCache,
        helper: &'a dyn HelperApi,
        procs: &'a dyn ProcessTable,
    ) -> Self {
        Self { store, cache, helper, procs, kill_wait: DEFAULT_KILL_WAIT }
    }

    /// Sets how long to wait for a killed VMM to exit.
    pub fn kill_wait(mut self, wait: Duration) -> Self {
        self.kill_wait = wait;
        self
    }

    fn store(&self) -> std::sync::MutexGuard<'a, Store> {
        // Every store call is one statement or transaction; a panic elsewhere cannot leave the
        // connection mid-transaction, so a poisoned lock is still usable.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the steps in the module docs, over one pass of the process table
    /// ([`ProcessTable::one_pass`]) when it has one.
    pub async fn run(&self) -> Result<ReconcileReport, ReconcileError> {
        let pass = self.procs.one_pass();
        let this = Reconciler {
            store: self.store,
            cache: self.cache,
            helper: self.helper,
            procs: pass.as_deref().unwrap_or(self.procs),
            kill_wait: self.kill_wait,
        };
        this.steps().await
    }

    async fn steps(&self) -> Result<ReconcileReport, ReconcileError> {
        let started = Instant::now();
        let mut report = ReconcileReport::default();
        // Step 1.
        let vms = self.store().list_vms().map_err(ReconcileError::Store)?;
        let install = self.store().install_id().clone();

        // Step 2.
        let owned = match self.helper.list_owned().await {
            Ok(o) => Some(mine(o, &install)),
            Err(e) => {
                self.note_helper_error(&mut report, &e);
                None
            }
        };

        // Step 3.
        let mut claimed: HashSet<VmId> = HashSet::new();
        let mut dead = Vec::new();
        for vm in vms.into_iter().filter(|v| v.state.wants_running()) {
            if let Some(d) = self.examine(vm, owned.as_ref(), &mut claimed, &mut report).await {
                dead.push(d);
            }
        }

        let examined = started.elapsed();

        // Step 4.
        let handled: HashSet<VmId> = dead.iter().map(|d| d.vm.id.clone()).collect();
        self.demote(dead, owned.is_some(), &mut report).await;

        // Step 5.
        if let Some(owned) = &owned {
            let orphans: Vec<VmId> = vm_ids(owned)
                .into_iter()
                .filter(|id| !claimed.contains(id) && !handled.contains(id))
                .collect();
            if !orphans.is_empty() {
                self.remove_orphans(orphans, owned, &mut report).await;
            }
        }
        tracing::info!(
            kept = report.kept.len(),
            demoted = report.demoted.len(),
            undetermined = report.undetermined.len(),
            orphans = report.orphans_removed.len(),
            helper_unreachable = report.helper_unreachable.is_some(),
            took_us = started.elapsed().as_micros() as u64,
            examine_us = examined.as_micros() as u64,
            teardown_us = (started.elapsed() - examined).as_micros() as u64,
            "reconcile finished"
        );
        Ok(report)
    }

    fn note_helper_error(&self, report: &mut ReconcileReport, e: &HelperClientError) {
        tracing::warn!(error = %e, "banger-helper is not usable; kernel objects will be cleaned up at the next reconcile");
        report.helper_unreachable.get_or_insert_with(|| e.to_string());
    }

    /// Step 3 for one VM: keeps it (returning `None`) or returns it as dead.
    async fn examine(
        &self,
        vm: VmRuntime,
        owned: Option<&OwnedObjects>,
        claimed: &mut HashSet<VmId>,
        report: &mut ReconcileReport,
    ) -> Option<Dead> {
        let r = rediscover_handles(&vm, self.procs);
        if let Some(e) = &r.scratch_error {
            tracing::warn!(vm = %vm.id, error = %e, "handles.json unusable; using what the os and the helper know");
        }
        let scratch_ok = r.scratch_error.is_none() && r.source != crate::daemon::liveness::HandleSource::None;
        // The helper's list fills what the scratch file lacks (all of it when the file is
        // missing or corrupt); fields the file has are kept.
        let mut handles = r.handles;
        let mut alive = r.alive;
        if let Some(owned) = owned {
            fill_from_helper(&mut handles, owned, &vm.id);
        }
        if handles.jail.is_some() && r.os_error.is_none() {
            // A jail the helper named may have changed the PID or the jail: ask again.
            alive = match vm_liveness(&vm, &handles, self.procs) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(vm = %vm.id, error = %e, "cannot tell whether the jailed vmm is alive; leaving the vm as it is");
                    self.cache.set(vm.id.clone(), handles);
                    claimed.insert(vm.id.clone());
                    report.undetermined.push((vm.id, e.to_string()));
                    return None;
                }
            };
        }

        if let Some(e) = r.os_error {
            tracing::warn!(vm = %vm.id, error = %e, "cannot tell whether the vmm is alive; leaving the vm as it is");
            if !handles.is_empty() {
                self.cache.set(vm.id.clone(), handles);
            }
            claimed.insert(vm.id.clone());
            report.undetermined.push((vm.id, e.to_string()));
            return None;
        }

        if alive && vm.state == VmState::Running {
            tracing::info!(vm = %vm.id, name = %vm.name, pid = ?handles.pid, "vmm is alive; keeping the vm");
            let on_disk = if scratch_ok { handles::read_scratch(&vm.vm_dir).ok().flatten() } else { None };
            if on_disk.as_ref() == Some(&handles) {
                self.cache.set(vm.id.clone(), handles);
            } else if let Err(e) = self.cache.record(&vm.id, &vm.vm_dir, handles.clone()) {
                report.warnings.push(format!("vm {}: {e}", vm.id));
                self.cache.set(vm.id.clone(), handles);
            }
            claimed.insert(vm.id.clone());
            report.kept.push(vm.id);
            return None;
        }

        let mut killed = None;
        if alive && handles.jail.is_some() {
            // The same for a jailed VMM, which only the helper can kill.
            let pid = handles.pid.expect("alive implies a pid");
            let why = match self.helper.jail_kill(&vm.id).await {
                Ok(report) if report.torn_down.contains(&vm.id) => None,
                Ok(report) => Some(
                    report
                        .failures
                        .iter()
                        .map(|f| format!("{}: {}", f.object, f.error))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = why {
                tracing::warn!(vm = %vm.id, pid, %why, "cannot settle the interrupted {}", vm.state);
                self.cache.set(vm.id.clone(), handles);
                claimed.insert(vm.id.clone());
                report.undetermined.push((vm.id, why));
                return None;
            }
            tracing::info!(vm = %vm.id, pid, "killed the jailed vmm of an interrupted {}", vm.state);
            killed = Some(pid);
        } else if alive {
            // An interrupted start or stop whose VMM still runs: settle it by killing the VMM.
            let pid = handles.pid.expect("alive implies a pid");
            match kill_and_wait(self.procs, pid, &vm.api_socket, self.kill_wait).await {
                Ok(signalled) => {
                    if signalled {
                        tracing::info!(vm = %vm.id, pid, "killed the vmm of an interrupted {}", vm.state);
                        killed = Some(pid);
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    tracing::warn!(vm = %vm.id, pid, %why, "cannot settle the interrupted {}", vm.state);
                    self.cache.set(vm.id.clone(), handles);
                    claimed.insert(vm.id.clone());
                    report.undetermined.push((vm.id, why));
                    return None;
                }
            }
        }

        let (to, reason) = match vm.state {
            VmState::Starting => (VmState::Failed, Some(REASON_START_INTERRUPTED)),
            VmState::Stopping => (VmState::Stopped, None),
            _ => (VmState::Stopped, Some(REASON_EXITED)),
        };
        Some(Dead { held: describe(&handles), vm, to, reason, killed })
    }

    /// Step 4: tears down the dead VMs' objects and demotes them.
    async fn demote(&self, dead: Vec<Dead>, helper_up: bool, report: &mut ReconcileReport) {
        if dead.is_empty() {
            return;
        }
        let ids: Vec<VmId> = dead.iter().map(|d| d.vm.id.clone()).collect();
        let mut outcome: Vec<Teardown> = vec![Teardown::Pending; dead.len()];
        if helper_up {
            match self.helper.teardown_vms(&ids).await {
                Ok(r) => {
                    for (i, id) in ids.iter().enumerate() {
                        let fails: Vec<String> = r
                            .failures
                            .iter()
                            .filter(|f| &f.vm == id)
                            .map(|f| format!("{}: {}", f.object, f.error))
                            .collect();
                        outcome[i] = if !fails.is_empty() {
                            Teardown::Failed(fails)
                        } else if r.torn_down.contains(id) {
                            Teardown::Done
                        } else {
                            Teardown::Failed(vec!["banger-helper did not report it torn down".into()])
                        };
                    }
                    report.teardown_failures.extend(r.failures);
                }
                Err(e) if e.is_unreachable() => self.note_helper_error(report, &e),
                Err(e) => {
                    tracing::warn!(error = %e, "teardown of dead vms failed");
                    outcome.fill(Teardown::Failed(vec![e.to_string()]));
                }
            }
        }

        for (d, teardown) in dead.into_iter().zip(outcome) {
            let last_error = d.reason.map(str::to_owned);
            // What is left is retried by the daemon's background refresh (and at the next start).
            let cleanup_pending = match &teardown {
                Teardown::Done => None,
                Teardown::Pending => Some(format!(
                    "banger-helper could not be reached: {}",
                    report.helper_unreachable.as_deref().unwrap_or("no answer")
                )),
                Teardown::Failed(fails) => Some(fails.join("; ")),
            };
            if teardown == Teardown::Done
                && let Err(e) = handles::remove_scratch(&d.vm.vm_dir)
            {
                report.warnings.push(format!("vm {}: {e}", d.vm.id));
            }
            self.cache.remove(&d.vm.id);
            // Its VMM is gone: the sockets it left would make the next start fail (Firecracker
            // refuses to bind an existing path).
            for sock in [&d.vm.api_socket, &d.vm.vsock_path] {
                if let Err(e) = crate::daemon::vmm::remove_stale_socket(sock) {
                    report.warnings.push(format!("vm {}: {e}", d.vm.id));
                }
            }
            if let Err(e) =
                self.store().set_state(&d.vm.id, d.to, last_error.as_deref(), cleanup_pending.as_deref())
            {
                report.warnings.push(format!("vm {}: cannot record state {}: {e}", d.vm.id, d.to));
            }
            tracing::info!(vm = %d.vm.id, name = %d.vm.name, from = %d.vm.state, to = %d.to, held = ?d.held, ?teardown, "demoted a vm whose vmm is gone");
            report.demoted.push(Demoted {
                vm: d.vm.id,
                name: d.vm.name,
                from: d.vm.state,
                to: d.to,
                last_error,
                cleanup_pending,
                killed: d.killed,
                held: d.held,
                teardown,
            });
        }
    }

    /// Step 5: removes the kernel objects nobody claims.
    async fn remove_orphans(&self, orphans: Vec<VmId>, owned: &OwnedObjects, report: &mut ReconcileReport) {
        for id in &orphans {
            let mut held = VmHandles::default();
            fill_from_helper(&mut held, owned, id);
            tracing::info!(vm = %id, held = ?describe(&held), "removing kernel objects no vm claims");
        }
        match self.helper.teardown_vms(&orphans).await {
            Ok(r) => {
                for f in &r.failures {
                    tracing::warn!(vm = %f.vm, object = %f.object, error = %f.error, "cannot remove an orphaned object");
                }
                self.finish_pending(&r.torn_down, report);
                report.orphans_removed.extend(r.torn_down);
                report.teardown_failures.extend(r.failures);
            }
            Err(e) if e.is_unreachable() => self.note_helper_error(report, &e),
            Err(e) => report.warnings.push(format!("removing orphaned kernel objects failed: {e}")),
        }
    }
}

impl Reconciler<'_> {
    /// For the VMs among `torn_down` whose row said their teardown was pending: it is done now,
    /// so their `handles.json` goes and the row says nothing is pending.
    fn finish_pending(&self, torn_down: &[VmId], report: &mut ReconcileReport) {
        for id in torn_down {
            let vm = match self.store().get_vm(id) {
                Ok(Some(vm)) if vm.cleanup_pending.is_some() => vm,
                Ok(_) => continue,
                Err(e) => {
                    report.warnings.push(format!("vm {id}: {e}"));
                    continue;
                }
            };
            if let Err(e) = handles::remove_scratch(&vm.vm_dir) {
                report.warnings.push(format!("vm {id}: {e}"));
                continue;
            }
            if let Err(e) = self.store().set_cleanup_pending(id, None) {
                report.warnings.push(format!("vm {id}: cannot record its finished cleanup: {e}"));
            }
        }
    }
}

/// The objects of `install` only.
fn mine(mut owned: OwnedObjects, install: &banger_protocol::InstallId) -> OwnedObjects {
    owned.taps.retain(|t| &t.install == install);
    owned.nat.retain(|n| &n.install == install);
    owned.loops.retain(|l| &l.install == install);
    owned.dms.retain(|d| &d.install == install);
    owned.jails.retain(|j| &j.install == install);
    owned
}

/// Every VM id that has an object in `owned`, sorted.
fn vm_ids(owned: &OwnedObjects) -> Vec<VmId> {
    let ids: BTreeSet<VmId> = owned
        .taps
        .iter()
        .map(|t| t.vm.clone())
        .chain(owned.nat.iter().map(|n| n.vm.clone()))
        .chain(owned.loops.iter().map(|l| l.vm.clone()))
        .chain(owned.dms.iter().map(|d| d.vm.clone()))
        .chain(owned.jails.iter().map(|j| j.vm.clone()))
        .collect();
    ids.into_iter().collect()
}

/// Fills the handles the helper knows (TAP, base and COW loops, dm-snapshot) where `handles` has
/// none. A jail the helper lists is taken as the helper says (its PID and uid are the helper's
/// to know: `handles.json` may be missing, or older than a launch that the daemon's exit
/// interrupted).
fn fill_from_helper(handles: &mut VmHandles, owned: &OwnedObjects, vm: &VmId) {
    if let Some(jail) = owned.jails.iter().find(|j| &j.vm == vm) {
        let listed = JailHandles::from(jail);
        if handles.jail.as_ref().is_some_and(|h| h != &listed)
            || handles.pid.is_some_and(|p| Some(p) != jail.pid)
        {
            tracing::info!(vm = %vm, scratch_pid = ?handles.pid, helper_pid = ?jail.pid, "the jail differs from handles.json; using the helper's");
        }
        handles.jail = Some(listed);
        handles.pid = jail.pid;
    }
    use banger_protocol::LoopRole;
    if handles.tap.is_none() {
        handles.tap = owned.taps.iter().find(|t| &t.vm == vm).map(|t| t.name.clone());
    }
    let device = |role| owned.loops.iter().find(|l| &l.vm == vm && l.role == role).map(|l| l.device.clone());
    if handles.base_loop.is_none() {
        handles.base_loop = device(LoopRole::Base);
    }
    if handles.cow_loop.is_none() {
        handles.cow_loop = device(LoopRole::Cow);
    }
    if let Some(dm) = owned.dms.iter().find(|d| &d.vm == vm) {
        handles.dm_name.get_or_insert_with(|| dm.name.clone());
        handles.dm_dev.get_or_insert_with(|| dm.device.clone());
    }
}

/// Human descriptions of what `handles` name.
fn describe(h: &VmHandles) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = h.pid {
        out.push(format!("pid {p}"));
    }
    if let Some(t) = &h.tap {
        out.push(format!("tap {t}"));
    }
    if let Some(l) = &h.base_loop {
        out.push(format!("base loop {l}"));
    }
    if let Some(l) = &h.cow_loop {
        out.push(format!("cow loop {l}"));
    }
    if let Some(d) = &h.dm_name {
        out.push(format!("dm {d}"));
    }
    if let Some(d) = &h.dm_dev {
        out.push(format!("dm device {d}"));
    }
    if let Some(j) = &h.jail {
        out.push(format!("jail {} (uid {})", j.id, j.uid));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use banger_protocol::{DmInfo, HelperError, InstallId, LoopInfo, LoopRole, NatInfo, Request};

    use super::*;
    use crate::daemon::helper_client::fake::FakeHelper;
    use crate::daemon::liveness::PidState;
    use crate::daemon::liveness::fake::{FakeProcess, FakeProcesses};
    use crate::daemon::store::ImageRecord;

    struct World {
        dir: tempfile::TempDir,
        store: Mutex<Store>,
        cache: HandleCache,
        helper: FakeHelper,
        procs: FakeProcesses,
    }

    impl World {
        fn new() -> World {
            let store = Store::open_in_memory().unwrap();
            store
                .insert_image(&ImageRecord {
                    name: "base".into(),
                    kernel_path: "/k".into(),
                    rootfs_path: "/r".into(),
                    kernel_sha256: "0".repeat(64),
                    rootfs_sha256: "0".repeat(64),
                    size_bytes: 1,
                    created_at: 0,
                    kernel_identity: None,
                    rootfs_identity: None,
                    initrd: None,
                })
                .unwrap();
            let helper = FakeHelper::new(store.install_id().clone());
            helper.set_device_mapper(true);
            World {
                dir: tempfile::tempdir().unwrap(),
                helper,
                store: Mutex::new(store),
                cache: HandleCache::new(),
                procs: FakeProcesses::new(),
            }
        }

        fn add_vm(&self, id: &str, state: VmState) -> VmRuntime {
            let vm_dir = self.dir.path().join(id);
            std::fs::create_dir(&vm_dir).unwrap();
            let vm = VmRuntime {
                id: VmId::new(id).unwrap(),
                name: format!("n-{id}"),
                state,
                vcpus: 1,
                memory_mib: 128,
                image: "base".into(),
                guest_ip: None,
                gateway_ip: None,
                api_socket: self.dir.path().join(format!("fc-{id}.sock")),
                vsock_path: vm_dir.join("vsock"),
                vsock_cid: 3,
                log_path: vm_dir.join("serial.log"),
                metrics_path: vm_dir.join("metrics"),
                dns_name: format!("n-{id}.banger.internal"),
                overlay_path: vm_dir.join("root.ext4"),
                vm_dir,
                work_disk_path: None,
                work_disk_bytes: None,
                storage: None,
                launch: None,
                last_error: None,
                created_at: 0,
                updated_at: 0,
                cleanup_pending: None,
            };
            self.store.lock().unwrap().insert_vm(&vm).unwrap();
            vm
        }

        /// Gives `vm` a TAP, NAT and a dm-snapshot root (base and COW loops, dm target) in the
        /// helper, as a start would have.
        async fn give_objects(&self, vm: &VmRuntime) -> VmHandles {
            let tap = self.helper.tap_create(&vm.id).await.unwrap();
            self.helper.nat_up(&vm.id).await.unwrap();
            let open = |name: &str, write: bool| {
                let path = vm.vm_dir.join(name);
                std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap();
                std::fs::OpenOptions::new().read(true).write(write).open(path).unwrap()
            };
            let base = self
                .helper
                .loop_attach(&vm.id, LoopRole::Base, true, open("base", false).into())
                .await
                .unwrap();
            let cow = self
                .helper
                .loop_attach(&vm.id, LoopRole::Cow, false, open("cow", true).into())
                .await
                .unwrap();
            let dm = self.helper.dm_create(&vm.id).await.unwrap();
            self.helper.clear_calls();
            VmHandles {
                tap: Some(tap.name),
                base_loop: Some(base.device),
                cow_loop: Some(cow.device),
                dm_name: Some(dm.name),
                dm_dev: Some(dm.device),
                ..Default::default()
            }
        }

        fn state(&self, vm: &VmRuntime) -> (VmState, Option<String>) {
            let v = self.store.lock().unwrap().get_vm(&vm.id).unwrap().unwrap();
            (v.state, v.last_error)
        }

        fn cleanup_pending(&self, vm: &VmRuntime) -> Option<String> {
            self.store.lock().unwrap().get_vm(&vm.id).unwrap().unwrap().cleanup_pending
        }

        fn objects_of(&self, vm: &VmId) -> usize {
            let o = self.helper.owned();
            o.taps.iter().filter(|t| &t.vm == vm).count()
                + o.nat.iter().filter(|n| &n.vm == vm).count()
                + o.loops.iter().filter(|l| &l.vm == vm).count()
                + o.dms.iter().filter(|d| &d.vm == vm).count()
        }

        async fn run(&self) -> ReconcileReport {
            Reconciler::new(&self.store, &self.cache, &self.helper, &self.procs)
                .kill_wait(Duration::from_millis(200))
                .run()
                .await
                .unwrap()
        }

        fn teardown_calls(&self) -> Vec<Vec<VmId>> {
            self.helper
                .calls()
                .into_iter()
                .filter_map(|r| match r {
                    Request::TeardownVms { vms } => Some(vms),
                    _ => None,
                })
                .collect()
        }
    }

    fn scratch(dir: &Path) -> Option<VmHandles> {
        handles::read_scratch(dir).unwrap()
    }

    #[tokio::test]
    async fn an_alive_vm_is_kept_and_the_cache_seeded() {
        let w = World::new();
        let vm = w.add_vm("alive", VmState::Running);
        let held = VmHandles { pid: Some(100), ..w.give_objects(&vm).await };
        handles::write_scratch(&vm.vm_dir, &held).unwrap();
        w.procs.add_vmm(100, &vm.api_socket);

        let r = w.run().await;
        assert_eq!(r.kept, std::slice::from_ref(&vm.id));
        assert!(r.demoted.is_empty() && r.orphans_removed.is_empty() && r.undetermined.is_empty());
        let cached = w.cache.get(&vm.id).unwrap();
        assert_eq!((cached.pid, &cached.tap, &cached.cow_loop), (Some(100), &held.tap, &held.cow_loop));
        assert_eq!((&cached.dm_name, &cached.dm_dev), (&held.dm_name, &held.dm_dev));
        assert_eq!(w.state(&vm), (VmState::Running, None));
        assert!(w.teardown_calls().is_empty(), "nothing of a live vm is torn down");
        assert_eq!(w.objects_of(&vm.id), 5);
        assert!(w.procs.kills().is_empty());
    }

    #[tokio::test]
    async fn a_dead_vm_is_torn_down_and_demoted() {
        let w = World::new();
        let vm = w.add_vm("dead", VmState::Running);
        let held = VmHandles { pid: Some(200), ..w.give_objects(&vm).await };
        handles::write_scratch(&vm.vm_dir, &held).unwrap();
        w.cache.set(vm.id.clone(), held.clone());
        // The killed VMM left its sockets behind.
        let _api = std::os::unix::net::UnixListener::bind(&vm.api_socket).unwrap();
        let _vsock = std::os::unix::net::UnixListener::bind(&vm.vsock_path).unwrap();

        let r = w.run().await;
        assert!(!vm.api_socket.exists() && !vm.vsock_path.exists(), "stale sockets are removed");
        assert_eq!(r.demoted.len(), 1);
        let d = &r.demoted[0];
        assert_eq!(
            (d.from, d.to, &d.teardown, d.killed),
            (VmState::Running, VmState::Stopped, &Teardown::Done, None)
        );
        assert!(
            d.held.contains(&"pid 200".to_owned()) && d.held.iter().any(|h| h.starts_with("tap faketap"))
        );
        assert_eq!(w.teardown_calls(), [vec![vm.id.clone()]]);
        assert_eq!(w.objects_of(&vm.id), 0);
        assert_eq!(w.state(&vm), (VmState::Stopped, Some(REASON_EXITED.to_owned())));
        assert_eq!(scratch(&vm.vm_dir), None, "handles.json goes once the teardown is done");
        assert_eq!(w.cache.get(&vm.id), None);
    }

    #[tokio::test]
    async fn a_recycled_pid_or_a_zombie_is_dead_and_not_killed() {
        let w = World::new();
        let recycled = w.add_vm("recycled", VmState::Running);
        handles::write_scratch(&recycled.vm_dir, &VmHandles { pid: Some(300), ..Default::default() })
            .unwrap();
        w.procs.add(
            300,
            FakeProcess {
                state: PidState::Live('S'),
                cmdline: vec!["vim".into()],
                listening: vec![],
                uid: 1000,
            },
        );
        let zombie = w.add_vm("zombie", VmState::Running);
        handles::write_scratch(&zombie.vm_dir, &VmHandles { pid: Some(301), ..Default::default() }).unwrap();
        w.procs.add_vmm(301, &zombie.api_socket);
        w.procs.make_zombie(301);

        let r = w.run().await;
        let mut demoted: Vec<&str> = r.demoted.iter().map(|d| d.vm.as_str()).collect();
        demoted.sort();
        assert_eq!(demoted, ["recycled", "zombie"]);
        assert!(w.procs.kills().is_empty());
        assert_eq!(w.state(&recycled).0, VmState::Stopped);
        assert_eq!(w.state(&zombie).0, VmState::Stopped);
    }

    #[tokio::test]
    async fn a_corrupt_or_missing_scratch_of_a_dead_vm_falls_back_to_the_helper_list() {
        let w = World::new();
        let corrupt = w.add_vm("corrupt", VmState::Running);
        let held_corrupt = w.give_objects(&corrupt).await;
        std::fs::write(handles::scratch_path(&corrupt.vm_dir), b"{\"pid\": 4").unwrap();
        let missing = w.add_vm("missing", VmState::Running);
        let held_missing = w.give_objects(&missing).await;

        let r = w.run().await;
        assert_eq!(r.demoted.len(), 2);
        for (vm, held) in [(&corrupt, held_corrupt), (&missing, held_missing)] {
            let d = r.demoted.iter().find(|d| d.vm == vm.id).unwrap();
            assert_eq!(d.teardown, Teardown::Done);
            assert!(d.held.contains(&format!("tap {}", held.tap.unwrap())), "{:?}", d.held);
            assert!(d.held.contains(&format!("cow loop {}", held.cow_loop.unwrap())), "{:?}", d.held);
            assert!(d.held.contains(&format!("base loop {}", held.base_loop.unwrap())), "{:?}", d.held);
            assert!(d.held.contains(&format!("dm device {}", held.dm_dev.unwrap())), "{:?}", d.held);
            assert_eq!(w.objects_of(&vm.id), 0);
            assert_eq!(w.state(vm).0, VmState::Stopped);
        }
    }

    #[tokio::test]
    async fn a_corrupt_scratch_of_an_alive_vm_is_rebuilt_from_the_os_and_the_helper() {
        let w = World::new();
        let vm = w.add_vm("rebuilt", VmState::Running);
        let held = w.give_objects(&vm).await;
        std::fs::write(handles::scratch_path(&vm.vm_dir), b"not json").unwrap();
        w.procs.add_vmm(400, &vm.api_socket);

        let r = w.run().await;
        assert_eq!(r.kept, std::slice::from_ref(&vm.id));
        let want = VmHandles { version: crate::model::HANDLES_VERSION, pid: Some(400), ..held };
        assert_eq!(w.cache.get(&vm.id), Some(want.clone()));
        assert_eq!(scratch(&vm.vm_dir), Some(want), "handles.json is repaired");
    }

    #[tokio::test]
    async fn a_partial_scratch_of_an_alive_vm_is_completed_from_the_helper() {
        let w = World::new();
        let vm = w.add_vm("partial", VmState::Running);
        let held = w.give_objects(&vm).await;
        // Written while the helper was down: only the pid is known.
        handles::write_scratch(&vm.vm_dir, &VmHandles { pid: Some(450), ..Default::default() }).unwrap();
        w.procs.add_vmm(450, &vm.api_socket);

        w.run().await;
        let want = VmHandles { version: crate::model::HANDLES_VERSION, pid: Some(450), ..held };
        assert_eq!(w.cache.get(&vm.id), Some(want.clone()));
        assert_eq!(scratch(&vm.vm_dir), Some(want));
    }

    #[tokio::test]
    async fn orphans_of_this_install_are_removed_and_other_installs_untouched() {
        let w = World::new();
        let stopped = w.add_vm("stopped", VmState::Stopped);
        w.give_objects(&stopped).await;
        let ghost = VmId::new("ghost").unwrap();
        w.helper.tap_create(&ghost).await.unwrap();
        let other = InstallId::new("0000000000000000").unwrap();
        let foreign = VmId::new("foreign").unwrap();
        w.helper.insert_tap(FakeHelper::tap_for(&other, &foreign, 7));
        w.helper.insert_nat(NatInfo {
            install: other.clone(),
            vm: foreign.clone(),
            guest_ip: "172.30.0.30".parse().unwrap(),
            uplink: "eth0".into(),
        });
        // The other install even uses the same vm id as one of ours.
        w.helper.insert_loop(LoopInfo {
            install: other.clone(),
            vm: stopped.id.clone(),
            role: LoopRole::Base,
            device: "/dev/loop30".into(),
            read_only: true,
        });
        w.helper.insert_dm(DmInfo {
            install: other.clone(),
            vm: stopped.id.clone(),
            name: "otherdm".into(),
            device: "/dev/otherdm".into(),
            sectors: 8,
        });
        w.helper.clear_calls();

        let r = w.run().await;
        assert_eq!(r.orphans_removed, [ghost.clone(), stopped.id.clone()]);
        assert_eq!(w.teardown_calls(), [vec![ghost.clone(), stopped.id.clone()]]);
        let left = w.helper.owned();
        assert!(left.taps.iter().all(|t| t.install == other));
        assert!(left.nat.iter().all(|n| n.install == other) && left.loops.iter().all(|l| l.install == other));
        assert!(left.dms.iter().all(|d| d.install == other));
        assert_eq!((left.taps.len(), left.nat.len(), left.loops.len(), left.dms.len()), (1, 1, 1, 1));
        assert_eq!(w.state(&stopped), (VmState::Stopped, None), "a stopped vm's row is not changed");
        assert!(w.procs.kills().is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_helper_still_demotes_and_the_next_run_cleans_up() {
        let w = World::new();
        let alive = w.add_vm("alive", VmState::Running);
        handles::write_scratch(&alive.vm_dir, &VmHandles { pid: Some(500), ..w.give_objects(&alive).await })
            .unwrap();
        w.procs.add_vmm(500, &alive.api_socket);
        let dead = w.add_vm("dead", VmState::Running);
        handles::write_scratch(&dead.vm_dir, &VmHandles { pid: Some(501), ..w.give_objects(&dead).await })
            .unwrap();
        w.helper.set_unreachable(true);

        let r = w.run().await;
        assert!(r.helper_unreachable.as_deref().is_some_and(|m| m.contains("banger-helper")), "{r:?}");
        assert_eq!(r.kept, std::slice::from_ref(&alive.id));
        assert_eq!(r.demoted[0].teardown, Teardown::Pending);
        assert_eq!(w.state(&dead), (VmState::Stopped, Some(REASON_EXITED.to_owned())));
        let pending = w.cleanup_pending(&dead).expect("the teardown is pending");
        assert!(pending.contains("banger-helper could not be reached"), "{pending}");
        assert_eq!(r.demoted[0].cleanup_pending.as_ref(), Some(&pending));
        assert!(scratch(&dead.vm_dir).is_some(), "handles.json stays until the teardown happened");
        assert_eq!(w.cache.get(&dead.id), None);
        assert_eq!(w.objects_of(&dead.id), 5);
        assert!(w.helper.calls().is_empty());

        w.helper.set_unreachable(false);
        let r = w.run().await;
        assert_eq!(r.orphans_removed, std::slice::from_ref(&dead.id));
        assert_eq!(r.kept, std::slice::from_ref(&alive.id));
        assert_eq!(w.objects_of(&dead.id), 0);
        assert_eq!(w.objects_of(&alive.id), 5);
    }

    #[tokio::test]
    async fn an_unreadable_process_table_changes_nothing() {
        let w = World::new();
        let vm = w.add_vm("unknown", VmState::Running);
        let held = VmHandles { pid: Some(600), ..w.give_objects(&vm).await };
        handles::write_scratch(&vm.vm_dir, &held).unwrap();
        w.procs.set_broken(true);

        let r = w.run().await;
        assert_eq!(r.undetermined.len(), 1);
        assert!(r.demoted.is_empty() && r.orphans_removed.is_empty());
        assert!(w.teardown_calls().is_empty(), "an undetermined vm's objects are protected");
        assert_eq!(w.state(&vm), (VmState::Running, None));
        assert_eq!(w.cache.get(&vm.id).unwrap().pid, Some(600));
        assert_eq!(w.objects_of(&vm.id), 5);
    }

    #[tokio::test]
    async fn interrupted_starts_are_undone_and_stops_finished() {
        let w = World::new();
        let starting = w.add_vm("starting", VmState::Starting);
        handles::write_scratch(
            &starting.vm_dir,
            &VmHandles { pid: Some(700), ..w.give_objects(&starting).await },
        )
        .unwrap();
        w.procs.add_vmm(700, &starting.api_socket);
        let stopping = w.add_vm("stopping", VmState::Stopping);
        handles::write_scratch(
            &stopping.vm_dir,
            &VmHandles { pid: Some(701), ..w.give_objects(&stopping).await },
        )
        .unwrap();
        w.procs.add_vmm(701, &stopping.api_socket);
        let starting_dead = w.add_vm("startdead", VmState::Starting);

        let r = w.run().await;
        let mut kills = w.procs.kills();
        kills.sort();
        assert_eq!(kills, [700, 701]);
        assert_eq!(w.state(&starting), (VmState::Failed, Some(REASON_START_INTERRUPTED.to_owned())));
        assert_eq!(w.state(&stopping), (VmState::Stopped, None));
        assert_eq!(w.state(&starting_dead).0, VmState::Failed);
        assert_eq!(w.objects_of(&starting.id) + w.objects_of(&stopping.id), 0);
        let killed: Vec<Option<i32>> = r.demoted.iter().map(|d| d.killed).collect();
        assert_eq!(killed.iter().filter(|k| k.is_some()).count(), 2);
    }

    #[tokio::test]
    async fn a_vmm_that_survives_sigkill_is_left_alone() {
        let w = World::new();
        let vm = w.add_vm("stuck", VmState::Stopping);
        handles::write_scratch(&vm.vm_dir, &VmHandles { pid: Some(800), ..w.give_objects(&vm).await })
            .unwrap();
        w.procs.add_vmm(800, &vm.api_socket);
        w.procs.survive_kills(true);

        let r = w.run().await;
        assert_eq!(w.procs.kills(), [800]);
        assert_eq!(r.undetermined.len(), 1);
        assert!(r.undetermined[0].1.contains("did not exit"), "{:?}", r.undetermined);
        assert_eq!(w.state(&vm), (VmState::Stopping, None));
        assert!(w.teardown_calls().is_empty(), "its objects are still in use");
        assert_eq!(w.objects_of(&vm.id), 5);
    }

    #[tokio::test]
    async fn a_failed_teardown_is_recorded_and_retried_as_an_orphan() {
        let w = World::new();
        let vm = w.add_vm("busy", VmState::Running);
        handles::write_scratch(&vm.vm_dir, &VmHandles { pid: Some(900), ..w.give_objects(&vm).await })
            .unwrap();
        w.helper.fail_teardown_of(&vm.id, HelperError::kernel("TUNSETPERSIST", nix::errno::Errno::EBUSY));

        let r = w.run().await;
        assert!(matches!(&r.demoted[0].teardown, Teardown::Failed(f) if f[0].contains("TUNSETPERSIST")));
        assert_eq!(r.teardown_failures.len(), 1);
        assert_eq!(w.state(&vm), (VmState::Stopped, Some(REASON_EXITED.to_owned())));
        assert!(
            w.cleanup_pending(&vm).is_some_and(|p| p.contains("TUNSETPERSIST")),
            "{:?}",
            w.cleanup_pending(&vm)
        );
        assert!(scratch(&vm.vm_dir).is_some());
        assert!(r.orphans_removed.is_empty(), "not retried within the same run");

        // Once the helper can remove them, the next run does, as orphans of a stopped vm, and the
        // row no longer says a cleanup is pending.
        w.helper.clear_failures();
        let r = w.run().await;
        assert_eq!(r.orphans_removed, std::slice::from_ref(&vm.id));
        assert!(r.teardown_failures.is_empty());
        assert_eq!(w.objects_of(&vm.id), 0);
        assert_eq!(w.cleanup_pending(&vm), None);
        assert!(scratch(&vm.vm_dir).is_none());
        assert_eq!(w.state(&vm), (VmState::Stopped, Some(REASON_EXITED.to_owned())));
    }

    #[tokio::test]
    async fn vms_not_meant_to_run_are_left_alone() {
        let w = World::new();
        let mut vms = Vec::new();
        for (id, state) in [("c", VmState::Created), ("s", VmState::Stopped), ("f", VmState::Failed)] {
            let vm = w.add_vm(id, state);
            handles::write_scratch(&vm.vm_dir, &VmHandles { pid: Some(1), ..Default::default() }).unwrap();
            vms.push(vm);
        }
        let r = w.run().await;
        assert!(r.kept.is_empty() && r.demoted.is_empty() && r.undetermined.is_empty());
        for vm in &vms {
            assert_eq!(w.state(vm), (vm.state, None));
        }
        assert_eq!(w.helper.calls(), [Request::ListOwned]);
    }

    #[test]
    fn the_reconcile_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let w = World::new();
        let fut = reconcile(&w.store, &w.cache, &w.helper, &w.procs);
        assert_send(&fut);
    }
}
