//! Noticing VMMs that died under a running daemon (guest shutdown, crash, kill): such a VM is
//! torn down and demoted to `stopped` with the reason. Reads (`vm list`, `vm show`) refresh the
//! VMs they return; VMs with an operation in progress are left to it.

use crate::daemon::liveness::vm_alive;
use crate::daemon::{Daemon, chain};
use crate::model::{VmRuntime, VmState};

impl Daemon {
    /// Refreshes one VM (see the module docs) and returns it as it is now.
    pub(in crate::daemon) async fn refresh(&self, vm: VmRuntime) -> VmRuntime {
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
            Err(e) => format!("the vmm exited; cleanup is incomplete and will be retried: {}", chain(&e)),
        };
        if self.record(&mut vm, VmState::Stopped, Some(reason.clone())).is_err() {
            // Logged by `record`; what is shown is still what is true, and the next refresh
            // records it.
            vm.state = VmState::Stopped;
            vm.last_error = Some(reason);
        }
        vm
    }
}
