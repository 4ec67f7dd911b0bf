//! STUB, to be replaced by the real jail module: the interface the launcher calls, with no
//! jail behind it. `JailConfig::new` only records the policy's paths; `launch`, `remove` and
//! `list` fail with `ENOSYS`.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use banger_policy::Jailer;
use nix::errno::Errno;

use crate::kernel::{JailOrder, JailState, KResult, KernelError};

/// What the jail functions need from the policy's `[jailer]`.
#[derive(Debug, Clone)]
pub struct JailConfig {
    base: PathBuf,
    exec_name: String,
}

/// Why the jail configuration could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailSetupError {
    /// The Firecracker path has no file name.
    #[error("{0}: the policy's jailer.firecracker names no file")]
    ExecName(PathBuf),
}

impl JailConfig {
    /// Records the policy's paths.
    pub fn new(policy: &Jailer) -> Result<JailConfig, JailSetupError> {
        let exec_name = policy
            .firecracker
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| JailSetupError::ExecName(policy.firecracker.clone()))?
            .to_owned();
        Ok(JailConfig { base: policy.chroot_base.clone(), exec_name })
    }
}

/// `<base>/<exec name>/<id>/root`.
pub fn root(cfg: &JailConfig, id: &str) -> PathBuf {
    cfg.base.join(&cfg.exec_name).join(id).join("root")
}

/// Not built yet.
pub fn launch(_cfg: &JailConfig, order: &JailOrder, _fds: Vec<OwnedFd>) -> KResult<i32> {
    Err(KernelError::errno("jail launch", order.id.clone(), Errno::ENOSYS))
}

/// Not built yet.
pub fn remove(_cfg: &JailConfig, id: &str, _uid: u32, _pid: Option<i32>) -> KResult<()> {
    Err(KernelError::errno("jail remove", id, Errno::ENOSYS))
}

/// Not built yet.
pub fn list(cfg: &JailConfig) -> KResult<Vec<JailState>> {
    Err(KernelError::errno("jail list", cfg.base.display().to_string(), Errno::ENOSYS))
}
