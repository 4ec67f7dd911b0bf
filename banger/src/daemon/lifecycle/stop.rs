//! `stop` and `restart`: the guest asked to shut down (Ctrl-Alt-Del), its VMM given
//! [`Timeouts::stop_grace`](super::Timeouts) to exit, then the teardown.

use crate::api_types::VmView;
use crate::daemon::liveness::{vm_alive, wait_gone};
use crate::daemon::{Daemon, DaemonError, chain};
use crate::model::{VmRuntime, VmState};

impl Daemon {
    /// `POST /v1/vms/{name}/stop`.
    pub async fn stop(&self, name: &str) -> Result<VmView, DaemonError> {
        let lock = self.vm_lock(name);
        let _guard = lock.lock().await;
        let mut vm = self.find(name)?;
        self.stop_locked(&mut vm).await?;
        Ok(self.view(&vm))
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

    /// Stops `vm`; its lock is held by the caller.
    pub(super) async fn stop_locked(&self, vm: &mut VmRuntime) -> Result<(), DaemonError> {
        let handles = self.handles_of(vm);
        if !vm.state.wants_running() && handles.is_empty() {
            return Ok(());
        }
        let was_alive = vm_alive(vm, &handles, self.procs.as_ref());
        self.record(vm, VmState::Stopping, None)?;
        if was_alive && let Some(pid) = handles.pid {
            self.shut_down_guest(vm, pid).await;
        }
        self.teardown(vm, &handles).await?;
        self.record(vm, VmState::Stopped, None)?;
        tracing::info!(vm = %vm.name, id = %vm.id, "stopped");
        Ok(())
    }

    /// Asks the guest to shut down and waits for its VMM to exit; a VMM still running after the
    /// grace period is left to the teardown, which kills it.
    async fn shut_down_guest(&self, vm: &VmRuntime, pid: i32) {
        match self.vmm.shutdown(&vm.api_socket).await {
            Ok(()) => match wait_gone(self.procs.as_ref(), pid, self.timeouts.stop_grace).await {
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
