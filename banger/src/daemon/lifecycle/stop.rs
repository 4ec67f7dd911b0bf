//! `stop` and `restart`: the guest asked to shut down (Ctrl-Alt-Del), its VMM given a grace
//! period to exit (the request's, else [`Timeouts::stop_grace`](super::Timeouts)) or killed at
//! once ([`Shutdown::Kill`]; a jailed VMM by the helper's `JailKill`), then the teardown. A teardown that fails
//! leaves the VM `stopped` (its guest is down) with `cleanup_pending` saying why; the devices
//! are removed by a later attempt (see the module docs of [`super`]).

use super::{Op, Shutdown, delete_unfinished};
use crate::api_types::VmView;
use crate::daemon::liveness::{vm_alive, wait_gone};
use crate::daemon::vmm::Api;
use crate::daemon::{Daemon, DaemonError, chain};
use crate::model::{VmRuntime, VmState};

impl Daemon {
    /// `POST /v1/vms/{name}/stop`.
    pub async fn stop(&self, name: &str, how: Shutdown) -> Result<VmView, DaemonError> {
        let lock = self.vm_lock(name);
        let _guard = lock.lock().await;
        let mut vm = self.find(name)?;
        self.stop_locked(&mut vm, Op::Stop, how).await?;
        Ok(self.view(&vm))
    }

    /// `POST /v1/vms/{name}/restart`.
    pub async fn restart(&self, name: &str) -> Result<VmView, DaemonError> {
        {
            let lock = self.vm_lock(name);
            let _guard = lock.lock().await;
            let mut vm = self.find(name)?;
            self.stop_locked(&mut vm, Op::Restart, Shutdown::Guest).await?;
        }
        self.start(name).await
    }

    /// Stops `vm` for `op`; its lock is held by the caller. A teardown that fails is
    /// [`DaemonError::Incomplete`], with the VM recorded `stopped` and its cleanup pending.
    pub(super) async fn stop_locked(
        &self,
        vm: &mut VmRuntime,
        op: Op,
        how: Shutdown,
    ) -> Result<(), DaemonError> {
        let handles = self.handles_of(vm);
        if !vm.state.wants_running() && handles.is_empty() && vm.cleanup_pending.is_none() {
            return Ok(());
        }
        let was_alive = vm_alive(vm, &handles, self.procs.as_ref());
        let pending = vm.cleanup_pending.clone();
        self.record(vm, VmState::Stopping, None, pending)?;
        let grace = match how {
            Shutdown::Guest => Some(self.timeouts.stop_grace),
            Shutdown::GuestWithin(grace) => Some(grace),
            Shutdown::Kill => None,
        };
        // Without a grace period the teardown kills the VMM at once.
        if was_alive && let (Some(pid), Some(grace)) = (handles.pid, grace) {
            self.shut_down_guest(vm, Api::of(vm, &handles), pid, grace).await;
        }
        match self.teardown(vm, &handles).await {
            Ok(()) => {
                self.record(vm, VmState::Stopped, None, None)?;
                tracing::info!(vm = %vm.name, id = %vm.id, "stopped");
                Ok(())
            }
            Err(e) => {
                let why = chain(&e);
                tracing::warn!(vm = %vm.name, id = %vm.id, error = %why, "the guest is down but its devices could not be removed; retrying in the background");
                let last_error = (op == Op::Delete).then(|| delete_unfinished(&vm.name));
                // A store that refuses is logged by `record`, and a row left `stopping` is
                // settled by the background refresh.
                let _ = self.record(vm, VmState::Stopped, last_error, Some(why));
                Err(DaemonError::Incomplete { vm: vm.name.clone(), op, source: Box::new(e) })
            }
        }
    }

    /// Asks the guest to shut down and waits for its VMM to exit; a VMM still running after
    /// `grace` is left to the teardown, which kills it.
    async fn shut_down_guest(&self, vm: &VmRuntime, api: Api<'_>, pid: i32, grace: std::time::Duration) {
        match self.vmm.shutdown(api).await {
            Ok(()) => match wait_gone(self.procs.as_ref(), pid, grace).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(vm = %vm.name, "guest did not shut down in time; killing the vmm")
                }
                Err(e) => tracing::warn!(vm = %vm.name, error = %e, "cannot watch the vmm exit; killing it"),
            },
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %chain(&e), "ctrl-alt-del failed; killing the vmm")
            }
        }
    }
}
