//! The VM lifecycle on top of the store (intent), the handle cache (reality), the helper (kernel
//! objects) and the VMM: [`create`](Daemon::create), [`start`](Daemon::start),
//! [`stop`](Daemon::stop), [`restart`](Daemon::restart), [`delete`](Daemon::delete), and the
//! refresh that notices VMMs that died and finishes what failed ([`refresh`]).
//!
//! Every operation on one VM holds that VM's lock (keyed by name, so a create and a delete of the
//! same name cannot interleave); different VMs proceed in parallel. Every state change is one
//! store transaction, made *before* the step it announces (`starting` before any kernel object,
//! `stopping` before any teardown), so a daemon that dies anywhere leaves a row reconcile can
//! finish or undo.
//!
//! A create makes the row, the VM's directory and, when asked, its work disk. A start is ten
//! named steps ([`StartStep`]), each undone by its own undo when a later one fails (see
//! [`start`]). A stop asks the guest to shut down (Ctrl-Alt-Del), waits for its VMM
//! to exit for a grace period (the request's, else [`Timeouts::stop_grace`]; none with
//! [`Shutdown::Kill`]), then tears down (below). A delete stops the VM if it runs, tears down what it may
//! still hold, then removes its host key pin, its directory and its row.
//!
//! Teardown (shared by all of them): kill the VMM if it still serves the VM's API socket and wait
//! for it (a jailed VMM: the helper's `JailKill`, which also removes its jail), remove the
//! sockets it leaves, ask the helper to remove the VM's NAT, TAP, dm-snapshot
//! and loop devices (`TeardownVms`), and only once that succeeded forget the VM's handles (cache
//! and `handles.json`), so a teardown that fails can be retried from what is recorded. The VM's
//! own files (its root or copy-on-write file, its work disk) stay until the VM is deleted.
//!
//! How each operation ends (`state`, `last_error`, `cleanup_pending`):
//!
//! | operation | success | failure |
//! | --- | --- | --- |
//! | start | `running` | `failed`, `last_error` = the step and its cause; the steps made are undone, and if that undo fails, `cleanup_pending` = why |
//! | stop, restart (its stop) | `stopped` | the guest is down either way: `stopped`, `cleanup_pending` = why its devices are not removed |
//! | delete | the row is gone | as a failed stop, `last_error` = [`delete_unfinished`]; the row stays so its devices can still be found |
//! | the VMM exits by itself | `stopped`, `last_error` = why | the same, `cleanup_pending` = why |
//!
//! A VM with `cleanup_pending` keeps its handles. The teardown is retried by the next command on
//! the VM (start, stop, restart, delete) and by the background refresh every few seconds
//! ([`refresh::REFRESH_EVERY`]; after refusals by the helper, with a growing pause). When it
//! succeeds, `cleanup_pending` is cleared and the state stays as it is.

mod create;
mod delete;
mod phases;
pub mod refresh;
pub mod start;
mod stop;
#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::path::Path;
use std::time::Duration;

pub use self::refresh::{REFRESH_EVERY, Retry};
pub use self::start::{Progress, StartStep, boot_args};
use super::{Daemon, DaemonError, chain};
use crate::daemon::liveness::kill_and_wait;
use crate::daemon::vmm;
use crate::model::{VmHandles, VmRuntime, VmState};

/// How long the lifecycle waits for processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How long a guest gets to shut down after Ctrl-Alt-Del before its VMM is killed.
    pub stop_grace: Duration,
    /// How long a killed VMM gets to exit before its devices are torn down anyway.
    pub kill_wait: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { stop_grace: Duration::from_secs(10), kill_wait: Duration::from_secs(5) }
    }
}

/// The longest grace period a stop may ask for.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(3600);

/// How a stop (or the stop of a delete) ends a running guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Shutdown {
    /// Ctrl-Alt-Del, then the VMM killed if it still runs after [`Timeouts::stop_grace`].
    #[default]
    Guest,
    /// Ctrl-Alt-Del, then the VMM killed if it still runs after this long.
    GuestWithin(Duration),
    /// The VMM killed at once, without asking the guest.
    Kill,
}

/// `last_error` of the VM `name` whose delete could not remove its devices.
pub fn delete_unfinished(name: &str) -> String {
    format!("a delete did not finish: run `banger vm delete {name}` again to remove the vm")
}

/// What a user asked for, when it could not be finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `vm stop`.
    Stop,
    /// `vm restart`.
    Restart,
    /// `vm delete`.
    Delete,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Stop => "stop",
            Op::Restart => "restart",
            Op::Delete => "delete",
        })
    }
}

impl Daemon {
    /// Records `state`, `last_error` and `cleanup_pending` for `vm` in the store (one
    /// statement), then in `vm`. A store that refuses is logged here and returned; `vm` is then
    /// left as it was.
    fn record(
        &self,
        vm: &mut VmRuntime,
        state: VmState,
        last_error: Option<String>,
        cleanup_pending: Option<String>,
    ) -> Result<(), DaemonError> {
        let stored = self
            .with_store(|s| s.set_state(&vm.id, state, last_error.as_deref(), cleanup_pending.as_deref()));
        if let Err(e) = stored {
            tracing::error!(vm = %vm.name, id = %vm.id, %state, error = %chain(&e), "cannot record the vm's state");
            return Err(e);
        }
        vm.state = state;
        vm.last_error = last_error;
        vm.cleanup_pending = cleanup_pending;
        Ok(())
    }

    /// Records only `vm`'s `cleanup_pending`, when it changes; a store that refuses is logged.
    fn record_cleanup(&self, vm: &mut VmRuntime, cleanup_pending: Option<String>) {
        if vm.cleanup_pending == cleanup_pending {
            return;
        }
        match self.with_store(|s| s.set_cleanup_pending(&vm.id, cleanup_pending.as_deref())) {
            Ok(()) => vm.cleanup_pending = cleanup_pending,
            Err(e) => {
                tracing::error!(vm = %vm.name, id = %vm.id, error = %chain(&e), "cannot record the vm's pending cleanup")
            }
        }
    }

    /// Tears down what a VM not meant to run may still hold (left by a crash, or a teardown that
    /// failed before) and records the outcome in `cleanup_pending`.
    async fn finish_teardown(&self, vm: &mut VmRuntime) -> Result<(), DaemonError> {
        let handles = self.handles_of(vm);
        match self.teardown(vm, &handles).await {
            Ok(()) => {
                if vm.cleanup_pending.is_some() {
                    tracing::info!(vm = %vm.name, id = %vm.id, "removed the devices an earlier failure left");
                }
                self.record_cleanup(vm, None);
                Ok(())
            }
            Err(e) => {
                self.record_cleanup(vm, Some(chain(&e)));
                Err(e)
            }
        }
    }

    /// Kills the VM's VMM if it still serves the VM's API socket, waits for it, and removes the
    /// sockets it leaves behind (Firecracker refuses to bind an existing path). A jailed VMM
    /// runs as another uid, which the user cannot signal: the helper kills it and removes its
    /// jail (`JailKill`). Failures are logged: what follows (the helper's teardown, which
    /// removes a jail too) goes on regardless.
    async fn kill_vmm(&self, vm: &VmRuntime, handles: &VmHandles) {
        if handles.jail.is_some() {
            match self.helper.jail_kill(&vm.id).await {
                Ok(report) => {
                    for f in report.failures {
                        tracing::warn!(vm = %vm.name, object = %f.object, error = %f.error, "cannot kill the jailed vmm; tearing its devices down anyway");
                    }
                }
                Err(e) => {
                    tracing::warn!(vm = %vm.name, error = %chain(&e), "cannot kill the jailed vmm; tearing its devices down anyway")
                }
            }
            return;
        }
        if let Some(pid) = handles.pid
            && let Err(e) =
                kill_and_wait(self.procs.as_ref(), pid, &vm.api_socket, self.timeouts.kill_wait).await
        {
            tracing::warn!(vm = %vm.name, pid, error = %e, "cannot kill the vmm; tearing its devices down anyway");
        }
        for sock in [&vm.api_socket, &vm.vsock_path] {
            if let Err(e) = vmm::remove_stale_socket(sock) {
                tracing::warn!(vm = %vm.name, error = %chain(&e), "cannot remove a socket the vmm left");
            }
        }
    }

    /// Asks the helper to remove the VM's NAT, TAP, dm-snapshot and loop devices, then forgets its
    /// handles.
    /// The handles stay recorded until the helper confirms, so a later attempt (or reconcile)
    /// still knows what to remove if this fails.
    async fn release(&self, vm: &VmRuntime) -> Result<(), DaemonError> {
        let report = self.helper.teardown_vms(std::slice::from_ref(&vm.id)).await?;
        if let Some(f) = report.failures.into_iter().next() {
            return Err(DaemonError::Teardown { vm: vm.name.clone(), object: f.object, source: f.error });
        }
        self.cache.forget(&vm.id, &vm.vm_dir)?;
        Ok(())
    }

    /// Removes everything a VM holds: its VMM ([`Daemon::kill_vmm`]), then its kernel objects
    /// and handles ([`Daemon::release`]). Idempotent.
    async fn teardown(&self, vm: &VmRuntime, handles: &VmHandles) -> Result<(), DaemonError> {
        self.kill_vmm(vm, handles).await;
        self.release(vm).await
    }
}

/// Creates `dir` (and its parents) mode 0700.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Creates `path` mode 0600 if it does not exist.
fn touch(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map(drop)
}
