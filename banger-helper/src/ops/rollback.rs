//! Undoing a setup that failed half-way.
//!
//! Each kernel step of a setup registers its undo here as soon as it succeeded. The operation
//! then either [`commits`](Rollback::commit) (the object is recorded in the ledger) or awaits
//! [`Rollback::undo`] on its error path, which undoes the steps in reverse. If the guard is
//! dropped without either (a panic), [`Drop`] still undoes, on the runtime.
//!
//! Loop devices and dm targets need no guard: their entry is written to the ledger before the
//! device exists, and a failed setup releases them through it (`loopdev::give_back`,
//! `dm::undo`), keeping the entry, counted, while the kernel holds on to the device.

use std::sync::Arc;

use crate::kernel::{Kernel, Links as _};

/// One step to undo.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Delete a link the setup created.
    Link(String),
}

/// The undo list of one setup.
pub(crate) struct Rollback<K: Kernel> {
    kernel: Arc<K>,
    steps: Vec<Step>,
}

impl<K: Kernel> Rollback<K> {
    /// An empty undo list.
    pub(crate) fn new(kernel: Arc<K>) -> Self {
        Rollback { kernel, steps: Vec::new() }
    }

    /// The setup created this link.
    pub(crate) fn link(&mut self, name: String) {
        self.steps.push(Step::Link(name));
    }

    /// Keeps everything.
    pub(crate) fn commit(mut self) {
        self.steps.clear();
    }

    /// Undoes every step, newest first. Failures are logged: the object is then left for the
    /// start-up reconcile to report.
    pub(crate) async fn undo(mut self) {
        while let Some(step) = self.steps.pop() {
            match step {
                Step::Link(name) => {
                    if let Some(Err(e)) = self.kernel.links().delete(std::slice::from_ref(&name)).await.pop()
                    {
                        tracing::error!("rollback: cannot delete link {name}: {e}");
                    }
                }
            }
        }
    }
}

impl<K: Kernel> Drop for Rollback<K> {
    fn drop(&mut self) {
        if self.steps.is_empty() {
            return;
        }
        let links: Vec<String> = self.steps.drain(..).rev().map(|Step::Link(name)| name).collect();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let kernel = self.kernel.clone();
                rt.spawn(async move {
                    for r in kernel.links().delete(&links).await {
                        if let Err(e) = r {
                            tracing::error!("rollback: {e}");
                        }
                    }
                });
            }
            Err(_) => {
                tracing::error!("rollback: no runtime to delete links {links:?}; reconcile will report them")
            }
        }
    }
}
