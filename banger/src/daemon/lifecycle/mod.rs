//! The VM lifecycle on top of the store (intent), the handle cache (reality), the helper (kernel
//! objects) and the VMM: [`create`](Daemon::create), [`start`](Daemon::start),
//! [`stop`](Daemon::stop), [`restart`](Daemon::restart), [`delete`](Daemon::delete), and noticing
//! VMMs that died under a running daemon (`refresh`).
//!
//! Every operation on one VM holds that VM's lock (keyed by name, so a create and a delete of the
//! same name cannot interleave); different VMs proceed in parallel. Every state change is one
//! store transaction, made *before* the step it announces (`starting` before any kernel object,
//! `stopping` before any teardown), so a daemon that dies anywhere leaves a row reconcile can
//! finish or undo.
//!
//! A start is six named steps ([`StartStep`]), each undone by its own undo when a later one
//! fails (see [`start`]). A stop asks the guest to shut down (Ctrl-Alt-Del), waits for its VMM
//! to exit, then tears down (below). A delete stops the VM if it runs, tears down what it may
//! still hold, then removes its host key pin, its directory and its row.
//!
//! Teardown (shared by all of them): kill the VMM if it still serves the VM's API socket and wait
//! for it, remove the sockets it leaves, ask the helper to remove the VM's NAT, TAP and loop
//! devices (`TeardownVms`), and only once that succeeded forget the VM's handles (cache and
//! `handles.json`), so a teardown that fails can be retried from what is recorded.

mod create;
mod delete;
mod refresh;
pub mod start;
mod stop;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::time::Duration;

pub use self::start::{StartStep, boot_args};
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

impl Daemon {
    /// Records `state` and `last_error` for `vm` in the store, then in `vm`. A store that refuses
    /// is logged here and returned; `vm` is then left as it was.
    fn record(
        &self,
        vm: &mut VmRuntime,
        state: VmState,
        last_error: Option<String>,
    ) -> Result<(), DaemonError> {
        if let Err(e) = self.with_store(|s| s.set_state(&vm.id, state, last_error.as_deref())) {
            tracing::error!(vm = %vm.name, id = %vm.id, %state, error = %chain(&e), "cannot record the vm's state");
            return Err(e);
        }
        vm.state = state;
        vm.last_error = last_error;
        Ok(())
    }

    /// Kills the VM's VMM if it still serves the VM's API socket, waits for it, and removes the
    /// sockets it leaves behind (Firecracker refuses to bind an existing path). Failures are
    /// logged: what follows (the helper's teardown) goes on regardless.
    async fn kill_vmm(&self, vm: &VmRuntime, handles: &VmHandles) {
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

    /// Asks the helper to remove the VM's NAT, TAP and loop devices, then forgets its handles.
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
