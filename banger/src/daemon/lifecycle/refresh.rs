//! Keeping the rows true while the daemon runs, and finishing what failed.
//!
//! [`Daemon::refresh`] runs for the VM `vm show` returns, and for each VM `vm list` finds recorded
//! `running` without a live VMM (`vm list` otherwise answers from the rows and the handle cache,
//! with one liveness check per VM meant to run): a VM meant to run whose VMM died (guest
//! shutdown, crash, kill) is torn down and demoted to `stopped` with the reason.
//!
//! [`Daemon::refresh_all`] is the background pass, every [`REFRESH_EVERY`]
//! ([`Daemon::refresh_in_background`]). It reads the rows once (one query: nothing else happens
//! when no VM runs or waits for anything) and for each VM:
//! 1. `running`: as [`Daemon::refresh`];
//! 2. `starting` or `stopping` with no operation holding its lock: an operation ended without
//!    recording its outcome (the store refused a write); it is settled as reconcile settles one
//!    interrupted by a crash (VMM killed, devices torn down; `failed` / `stopped`);
//! 3. `cleanup_pending`: the teardown is tried again. After the helper answered with an error the
//!    pause before the next try doubles each time (one pass skipped, then two, four, ..., at most
//!    [`MAX_SKIPPED`], about five minutes); while the helper cannot be reached at all it is tried
//!    at every pass, which costs one failed `connect`, so the devices go as soon as the helper is
//!    back.
//!
//! VMs with an operation in progress are left to it; so are VMs whose lock is taken.

use std::sync::Arc;
use std::time::Duration;

use crate::daemon::liveness::vm_alive;
use crate::daemon::{Daemon, DaemonError, chain};
use crate::model::{VmRuntime, VmState};

/// How often the background refresh runs.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// The most passes skipped between two tries of one VM's pending teardown (5 minutes).
pub const MAX_SKIPPED: u32 = 60;

/// `last_error` of a VM whose start ended without recording its outcome.
pub const REASON_START_UNRECORDED: &str =
    "the start did not finish: bangerd could not record its outcome (see its log); start the vm again";

/// The backoff of one VM's pending teardown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retry {
    /// Tries that failed in a row.
    failures: u32,
    /// Passes still to skip before the next try.
    skip: u32,
}

impl Daemon {
    /// Runs [`Daemon::refresh_all`] every [`REFRESH_EVERY`], for as long as the daemon runs.
    pub async fn refresh_in_background(self: Arc<Self>) {
        let mut every = tokio::time::interval(REFRESH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            self.refresh_all().await;
        }
    }

    /// One background pass (see the module docs).
    pub async fn refresh_all(&self) {
        let vms = match self.with_store(|s| s.list_vms()) {
            Ok(vms) => vms,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "background refresh cannot read the vms");
                return;
            }
        };
        for vm in vms {
            match vm.state {
                VmState::Running => {
                    self.refresh(vm).await;
                }
                VmState::Starting | VmState::Stopping => self.settle(vm).await,
                _ if vm.cleanup_pending.is_some() => self.retry_teardown(vm).await,
                _ => {}
            }
        }
    }

    /// Refreshes one VM meant to run (see the module docs) and returns it as it is now.
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
        let pending = self.teardown(&vm, &handles).await.err().map(|e| chain(&e));
        let reason = "the vmm exited (guest shutdown or crash)".to_owned();
        if self.record(&mut vm, VmState::Stopped, Some(reason.clone()), pending.clone()).is_err() {
            // Logged by `record`; what is shown is still what is true, and the next refresh
            // records it.
            vm.state = VmState::Stopped;
            vm.last_error = Some(reason);
            vm.cleanup_pending = pending;
        }
        vm
    }

    /// Settles a row an operation left `starting` or `stopping` without recording its end.
    async fn settle(&self, vm: VmRuntime) {
        let lock = self.vm_lock(&vm.name);
        let Ok(_guard) = lock.try_lock() else { return };
        let Ok(Some(mut vm)) = self.with_store(|s| s.get_vm(&vm.id)) else { return };
        let (to, reason) = match vm.state {
            VmState::Starting => (VmState::Failed, Some(REASON_START_UNRECORDED.to_owned())),
            VmState::Stopping => (VmState::Stopped, None),
            _ => return,
        };
        tracing::warn!(vm = %vm.name, id = %vm.id, state = %vm.state, "no operation is running on this vm; settling it");
        let handles = self.handles_of(&vm);
        let pending = self.teardown(&vm, &handles).await.err().map(|e| chain(&e));
        // Logged by `record` when refused; the next pass tries again.
        let _ = self.record(&mut vm, to, reason, pending);
    }

    /// Tries a pending teardown again, unless its backoff says to wait.
    async fn retry_teardown(&self, vm: VmRuntime) {
        if !self.retry_due(&vm) {
            return;
        }
        let lock = self.vm_lock(&vm.name);
        let Ok(_guard) = lock.try_lock() else { return };
        let Ok(Some(mut vm)) = self.with_store(|s| s.get_vm(&vm.id)) else { return };
        if vm.state.wants_running() || vm.cleanup_pending.is_none() {
            return;
        }
        let before = vm.cleanup_pending.clone();
        match self.finish_teardown(&mut vm).await {
            Ok(()) => {
                self.retries().remove(&vm.id);
            }
            Err(e) => {
                let unreachable = matches!(&e, DaemonError::Helper(h) if h.is_unreachable());
                let mut retries = self.retries();
                let r = retries.entry(vm.id.clone()).or_default();
                r.failures = r.failures.saturating_add(1);
                r.skip = if unreachable { 0 } else { backoff(r.failures) };
                if vm.cleanup_pending != before {
                    tracing::warn!(vm = %vm.name, id = %vm.id, error = %chain(&e), "cannot remove the devices an earlier failure left; retrying later");
                } else {
                    tracing::debug!(vm = %vm.name, id = %vm.id, error = %chain(&e), "pending teardown failed again");
                }
            }
        }
    }

    /// Whether `vm`'s pending teardown is to be tried in this pass (and counts the pass).
    fn retry_due(&self, vm: &VmRuntime) -> bool {
        let mut retries = self.retries();
        match retries.get_mut(&vm.id) {
            Some(r) if r.skip > 0 => {
                r.skip -= 1;
                false
            }
            _ => true,
        }
    }

    fn retries(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<banger_protocol::VmId, Retry>> {
        self.retries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Passes to skip after the `failures`-th refusal in a row: 1, 2, 4, ... at most
/// [`MAX_SKIPPED`].
fn backoff(failures: u32) -> u32 {
    1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX).min(MAX_SKIPPED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let skips: Vec<u32> = (1..=9).map(backoff).collect();
        assert_eq!(skips, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(40), MAX_SKIPPED);
    }
}
