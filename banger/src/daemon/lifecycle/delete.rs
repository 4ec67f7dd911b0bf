//! `delete`: the VM stopped if it runs (as a stop does, [`Shutdown`] saying how), what it may still hold torn down, then its host key pin,
//! its directory and its row removed. When its devices cannot be removed the row stays (its
//! `handles.json` is what says what to remove), `stopped` with `cleanup_pending`.

use super::{Op, Shutdown, delete_unfinished};
use crate::daemon::liveness::vm_alive;
use crate::daemon::{Daemon, DaemonError, chain};
use crate::model::VmState;
use crate::ssh;

impl Daemon {
    /// `DELETE /v1/vms/{name}`. Returns a warning when the VM is gone but kernel objects it may
    /// have left could not be checked (it held none that banger knows of, and the helper was
    /// unreachable): no row claims them any more, so the next reconcile with the helper
    /// reachable removes them.
    pub async fn delete(&self, name: &str, how: Shutdown) -> Result<Option<String>, DaemonError> {
        let lock = self.vm_lock(name);
        let _guard = lock.lock().await;
        let mut vm = self.find(name)?;
        let handles = self.handles_of(&vm);
        let mut warning = None;
        if vm_alive(&vm, &handles, self.procs.as_ref()) {
            self.stop_locked(&mut vm, Op::Delete, how).await?;
        } else {
            // Kernel objects of a VM that is not running (never started, or left by a crash or
            // a teardown that failed).
            let knows_of_some = !handles.is_empty() || vm.cleanup_pending.is_some();
            match self.teardown(&vm, &handles).await {
                Ok(()) => {}
                Err(DaemonError::Helper(e)) if e.is_unreachable() && !knows_of_some => {
                    self.cache.remove(&vm.id);
                    warning = Some(format!(
                        "could not check vm {name} for leftover network devices ({}); any are removed at the next daemon start with banger-helper reachable",
                        chain(&e)
                    ));
                }
                Err(e) => {
                    let why = chain(&e);
                    tracing::warn!(vm = %vm.name, id = %vm.id, error = %why, "cannot remove the devices of a vm being deleted; keeping it");
                    let state = if vm.state.wants_running() { VmState::Stopped } else { vm.state };
                    // A store that refuses is logged by `record`.
                    let _ = self.record(&mut vm, state, Some(delete_unfinished(name)), Some(why));
                    return Err(DaemonError::Incomplete { vm: vm.name, op: Op::Delete, source: Box::new(e) });
                }
            }
        }
        ssh::unpin_host_key(&self.paths.known_hosts(), &vm.id)?;
        match std::fs::remove_dir_all(&vm.vm_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DaemonError::Io { action: "remove", path: vm.vm_dir.clone(), source }),
        }
        self.with_store(|s| s.delete_vm(&vm.id))?;
        self.vm_locks.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        self.retries.lock().unwrap_or_else(|p| p.into_inner()).remove(&vm.id);
        tracing::info!(vm = %vm.name, id = %vm.id, warning = warning.as_deref().unwrap_or(""), "deleted");
        Ok(warning)
    }
}
