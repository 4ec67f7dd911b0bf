//! The VM's files placed in a jail from the caller's descriptors (never through a caller's path),
//! the serial console's FIFO, and reading the jailer's PID file.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use banger_protocol::jail_paths;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, fchmod, fchmodat, fstat, mknodat};
use nix::unistd::{Gid, Uid, fchown, fchownat, linkat, mkfifoat};

use super::acl;
use crate::kernel::{JailOrder, KResult, KernelError};

/// What one descriptor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The kernel or the initrd: read only.
    Boot,
    /// A drive: read-write.
    Drive,
}

/// The in-jail names and roles of the descriptors of `files`, in their order.
pub fn layout(files: banger_protocol::JailFiles) -> Vec<(&'static str, Role)> {
    let mut out = vec![(jail_paths::KERNEL, Role::Boot)];
    if files.initrd {
        out.push((jail_paths::INITRD, Role::Boot));
    }
    out.push((jail_paths::ROOT_DRIVE, Role::Drive));
    if files.work {
        out.push((jail_paths::WORK_DRIVE, Role::Drive));
    }
    out
}

/// The directory beside `root/` in the jail directory (root's, 0700: the jail uid cannot reach
/// it) that holds a second hard link of each regular-file drive, so that the jail uid's ACL
/// entry can be dropped at removal even when the VMM unlinked or replaced its own link.
pub const DRIVES_DIR: &str = "drives";

/// Places every descriptor of `order` in the jail's root (`root` still root's, 0700), and a
/// second link of each regular-file drive in [`DRIVES_DIR`] of the jail directory `jail`.
pub fn place(
    jail: &OwnedFd,
    root: &OwnedFd,
    base: &Path,
    order: &JailOrder,
    fds: Vec<OwnedFd>,
) -> KResult<()> {
    let names = layout(order.files);
    if names.len() != fds.len() {
        return Err(KernelError::errno("place jail files", order.id.clone(), Errno::EINVAL));
    }
    let drives =
        make_drives_dir(jail).map_err(|e| KernelError::errno("make jail drives dir", order.id.clone(), e))?;
    for ((path, role), fd) in names.into_iter().zip(fds) {
        let name = path.trim_start_matches('/');
        place_one(root, &drives, base, name, role, &fd, order.uid)?;
    }
    Ok(())
}

fn make_drives_dir(jail: &OwnedFd) -> Result<OwnedFd, Errno> {
    nix::sys::stat::mkdirat(jail, DRIVES_DIR, Mode::from_bits_truncate(0o700))?;
    let fd = super::tree::open_dir(jail, DRIVES_DIR)?;
    fchmod(&fd, Mode::from_bits_truncate(0o700))?;
    Ok(fd)
}

/// Drops `uid`'s ACL entry from every drive linked in [`DRIVES_DIR`] of the jail directory
/// `jail` and unlinks it; a missing directory or link counts as done.
pub fn release_drives(jail: &OwnedFd, uid: u32) -> Result<(), Errno> {
    let drives = match super::tree::open_dir(jail, DRIVES_DIR) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    for (path, role) in layout(banger_protocol::JailFiles { initrd: false, work: true }) {
        if role != Role::Drive {
            continue;
        }
        let name = path.trim_start_matches('/');
        super::tree::revoke_at(&drives, std::ffi::OsStr::new(name), uid)?;
        match nix::unistd::unlinkat(&drives, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn link(fd: &OwnedFd, root: &OwnedFd, name: &str) -> Result<(), Errno> {
    linkat(fd, "", root, name, AtFlags::AT_EMPTY_PATH)
}

fn place_one(
    root: &OwnedFd,
    drives: &OwnedFd,
    base: &Path,
    name: &str,
    role: Role,
    fd: &OwnedFd,
    uid: u32,
) -> KResult<()> {
    let err = |op: &'static str, e: Errno| KernelError::errno(op, format!("jail file {name}"), e);
    let st = fstat(fd).map_err(|e| err("fstat", e))?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    match (role, kind) {
        (Role::Boot, SFlag::S_IFREG) => {
            if st.st_mode & 0o004 != 0 {
                match link(fd, root, name) {
                    Ok(()) => return Ok(()),
                    // Another filesystem: a read-only file may be copied.
                    Err(Errno::EXDEV) => {}
                    Err(e) => return Err(err("linkat", e)),
                }
            }
            copy(fd, root, name, uid).map_err(|e| err("copy into jail", e))
        }
        (Role::Drive, SFlag::S_IFREG) => {
            match link(fd, root, name) {
                Ok(()) => {}
                Err(Errno::EXDEV) => {
                    return Err(KernelError::other(
                        "link into jail",
                        name,
                        format!(
                            "the drive is on another filesystem than the jailer's chroot base {} (a drive \
                             is never copied: the guest's writes would be lost); keep banger's data on the \
                             chroot base's filesystem",
                            base.display()
                        ),
                    ));
                }
                Err(e) => return Err(err("linkat", e)),
            }
            // The link the ACL entry is dropped through at removal, before the entry exists.
            link(fd, drives, name).map_err(|e| err("linkat", e))?;
            acl::grant(fd, uid, acl::R | acl::W).map_err(|e| err("set drive ACL", e))
        }
        (Role::Drive, SFlag::S_IFBLK) => {
            mknodat(root, name, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), st.st_rdev)
                .map_err(|e| err("mknod", e))?;
            // `root` is still root's alone: nobody can have swapped the node.
            fchownat(
                root,
                name,
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(uid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| err("chown", e))?;
            fchmodat(root, name, Mode::from_bits_truncate(0o600), FchmodatFlags::NoFollowSymlink)
                .or_else(|e| if e == Errno::EOPNOTSUPP { Ok(()) } else { Err(e) })
                .map_err(|e| err("chmod", e))
        }
        _ => Err(err("place jail file", Errno::EINVAL)),
    }
}

/// Copies the file `fd` is open on (from offset 0, the caller's offset untouched) to a new
/// `name` in `root`, owned by `uid`, mode 0400.
fn copy(fd: &OwnedFd, root: &OwnedFd, name: &str, uid: u32) -> Result<(), Errno> {
    let dst = openat(
        root,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o400),
    )?;
    fchmod(&dst, Mode::from_bits_truncate(0o400))?;
    fchown(&dst, Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)))?;
    let src = File::from(fd.as_fd().try_clone_to_owned().map_err(io_errno)?);
    let mut dst = File::from(dst);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = src.read_at(&mut buf, at).map_err(io_errno)?;
        if n == 0 {
            return Ok(());
        }
        dst.write_all(&buf[..n]).map_err(io_errno)?;
        at += n as u64;
    }
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Makes the serial console's FIFO `name` in `run` (still root's): the jail uid's, 0600, and
/// readable by `caller` through an ACL entry. Firecracker opens it (`PUT /serial`) read-write
/// and non-blocking, so it never waits for a reader.
pub fn serial_fifo(run: &OwnedFd, name: &str, uid: u32, caller: u32) -> KResult<()> {
    let err = |op: &'static str, e: Errno| KernelError::errno(op, format!("jail {}", jail_paths::SERIAL), e);
    mkfifoat(run, name, Mode::from_bits_truncate(0o600)).map_err(|e| err("mkfifo", e))?;
    let fifo = openat(
        run,
        name,
        OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err("open", e))?;
    fchmod(&fifo, Mode::from_bits_truncate(0o600)).map_err(|e| err("chmod", e))?;
    fchown(&fifo, Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid))).map_err(|e| err("chown", e))?;
    acl::grant(&fifo, caller, acl::R).map_err(|e| err("set serial ACL", e))
}

/// The PID in the jailer's PID file `name` in `root` (opened without following a symlink); none
/// while it is missing or not a number.
pub fn read_pid(root: &OwnedFd, name: &str) -> Option<i32> {
    let fd = openat(
        root,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut text = String::new();
    File::from(fd).take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok().filter(|p| *p > 1)
}

#[cfg(test)]
mod tests {
    use banger_protocol::JailFiles;

    use super::*;

    #[test]
    fn descriptors_map_to_in_jail_names_in_order() {
        assert_eq!(
            layout(JailFiles { initrd: true, work: true }),
            [
                ("/vmlinux", Role::Boot),
                ("/initrd", Role::Boot),
                ("/rootfs", Role::Drive),
                ("/work", Role::Drive)
            ]
        );
        assert_eq!(
            layout(JailFiles { initrd: false, work: false }),
            [("/vmlinux", Role::Boot), ("/rootfs", Role::Drive)]
        );
        for initrd in [false, true] {
            for work in [false, true] {
                let f = JailFiles { initrd, work };
                assert_eq!(layout(f).len(), f.count());
            }
        }
    }
}
