//! Entering the jail as the jailer does: a new mount namespace, every mount made a slave, the
//! jail directory bind-mounted on itself, `pivot_root` into it with the old root put under
//! `old_root` (made 0600), the old root lazily unmounted and `old_root` removed. The process's
//! root is then the jail, which is also the root of its mount namespace (so it is not
//! "chrooted" in the kernel's sense), and nothing outside it is reachable by path.

use std::io;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, mkdir, pivot_root};

/// Errors entering the jail, worded and named as the jailer's.
#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    /// unshare(CLONE_NEWNS) failed.
    #[error("Failed to unshare into new mount namespace: {0}")]
    UnshareNewNs(io::Error),
    /// Making the mounts slaves failed.
    #[error("Failed to change the propagation type to slave: {0}")]
    MountPropagationSlave(io::Error),
    /// The bind mount of the jail failed.
    #[error("Failed to bind mount the jail root directory: {0}")]
    MountBind(io::Error),
    /// chdir into the jail failed.
    #[error("Failed to change current directory: {0}")]
    SetCurrentDir(io::Error),
    /// `old_root` could not be made.
    #[error("Failed to create the jail root directory before pivoting root: {0}")]
    MkdirOldRoot(io::Error),
    /// pivot_root failed.
    #[error("Failed to pivot root: {0}")]
    PivotRoot(io::Error),
    /// chdir to `/` failed.
    #[error("Failed to chdir into chroot directory: {0}")]
    ChdirNewRoot(io::Error),
    /// The old root could not be unmounted.
    #[error("Failed to unmount the old jail root: {0}")]
    UmountOldRoot(io::Error),
    /// `old_root` could not be removed.
    #[error("Failed to remove old jail root directory: {0}")]
    RmOldRootDir(io::Error),
}

fn os(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Makes `jail` the process's root (see the module documentation).
pub fn enter(jail: &Path) -> Result<(), ChrootError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| ChrootError::UnshareNewNs(os(e)))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_SLAVE | MsFlags::MS_REC, None::<&str>)
        .map_err(|e| ChrootError::MountPropagationSlave(os(e)))?;
    mount(Some(jail), jail, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(|e| ChrootError::MountBind(os(e)))?;
    std::env::set_current_dir(jail).map_err(ChrootError::SetCurrentDir)?;
    mkdir("old_root", Mode::S_IRUSR | Mode::S_IWUSR).map_err(|e| ChrootError::MkdirOldRoot(os(e)))?;
    pivot_root(".", "old_root").map_err(|e| ChrootError::PivotRoot(os(e)))?;
    chdir("/").map_err(|e| ChrootError::ChdirNewRoot(os(e)))?;
    umount2("old_root", MntFlags::MNT_DETACH).map_err(|e| ChrootError::UmountOldRoot(os(e)))?;
    std::fs::remove_dir("old_root").map_err(ChrootError::RmOldRootDir)
}
