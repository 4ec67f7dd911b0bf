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

/// The undo list of one setup: the links it created, oldest first.
pub(crate) struct Rollback<K: Kernel> {
    kernel: Arc<K>,
    links: Vec<String>,
}

impl<K: Kernel> Rollback<K> {
    /// An empty undo list.
    pub(crate) fn new(kernel: Arc<K>) -> Self {
        Rollback { kernel, links: Vec::new() }
    }

    /// The setup created this link.
    pub(crate) fn link(&mut self, name: String) {
        self.links.push(name);
    }

    /// Keeps everything.
    pub(crate) fn commit(mut self) {
        self.links.clear();
    }

    /// Undoes every step, newest first. Failures are logged: the object is then left for the
    /// start-up reconcile to report.
    pub(crate) async fn undo(mut self) {
        delete(self.kernel.clone(), std::mem::take(&mut self.links)).await;
    }
}

/// Deletes `links`, newest first, logging what could not be deleted.
async fn delete<K: Kernel>(kernel: Arc<K>, mut links: Vec<String>) {
    links.reverse();
    for (name, r) in links.iter().zip(kernel.links().delete(&links).await) {
        if let Err(e) = r {
            tracing::error!("rollback: cannot delete link {name}: {e}");
        }
    }
}

impl<K: Kernel> Drop for Rollback<K> {
    fn drop(&mut self) {
        if self.links.is_empty() {
            return;
        }
        let links = std::mem::take(&mut self.links);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(delete(self.kernel.clone(), links));
            }
            Err(_) => {
                tracing::error!("rollback: no runtime to delete links {links:?}; reconcile will report them")
            }
        }
    }
}
