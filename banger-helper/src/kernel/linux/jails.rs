//! Jailed VMMs on Linux. No launcher runs yet, so no jail can be made: [`Jails::available`] is
//! false, a launch is refused and there is never a jail to list or remove.

use std::os::fd::OwnedFd;

use nix::errno::Errno;

use crate::kernel::{JailOrder, JailState, Jails, KResult, KernelError};

/// Jails as this helper can make them.
#[derive(Debug)]
pub struct LinuxJails {
    _private: (),
}

impl LinuxJails {
    /// No jails: the policy has no `[jailer]`.
    pub fn unavailable() -> Self {
        LinuxJails { _private: () }
    }
}

impl Jails for LinuxJails {
    fn available(&self) -> bool {
        false
    }

    fn root(&self, id: &str) -> String {
        format!("<no chroot base>/firecracker/{id}/root")
    }

    async fn launch(&self, order: &JailOrder, _fds: Vec<OwnedFd>) -> KResult<i32> {
        Err(KernelError::errno("jail launch", order.id.clone(), Errno::ENOSYS))
    }

    async fn remove(&self, _id: &str, _uid: u32, _pid: Option<i32>) -> KResult<()> {
        Ok(())
    }

    fn list(&self) -> KResult<Vec<JailState>> {
        Ok(Vec::new())
    }
}
