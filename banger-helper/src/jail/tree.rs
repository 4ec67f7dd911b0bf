//! Directories inside a jail, opened and removed only through descriptors: every step is an
//! `*at` call relative to a directory descriptor opened with `O_NOFOLLOW`, and every entry is
//! examined with `AT_SYMLINK_NOFOLLOW`, so a symlink the jail's uid planted is removed as a link
//! and never followed. Regular files lose the jail uid's ACL entry before they are unlinked
//! (a drive is a hard link of the caller's file: the inode outlives the jail).

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::acl;

/// Opens directory `name` in `dir` without following a symlink.
pub fn open_dir(dir: impl AsFd, name: &str) -> Result<OwnedFd, Errno> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// The names in a directory (without `.` and `..`).
fn names(dir: &OwnedFd) -> Result<Vec<Vec<u8>>, Errno> {
    let copy = open_dir(dir, ".")?;
    let mut d = nix::dir::Dir::from_fd(copy)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

/// Drops `uid`'s ACL entry from regular file `name` in `dir`, if it still is one.
fn revoke_at(dir: &OwnedFd, name: &OsStr, uid: u32) -> Result<(), Errno> {
    if uid == 0 {
        // The jail's uid is not known: there is no named entry to drop.
        return Ok(());
    }
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        // Gone, or swapped for a symlink or something not to be opened: nothing to revoke.
        Err(Errno::ENOENT | Errno::ELOOP | Errno::ENXIO | Errno::EACCES) => return Ok(()),
        Err(e) => return Err(e),
    };
    if SFlag::from_bits_truncate(fstat(&fd)?.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Ok(());
    }
    match acl::revoke(&fd, uid) {
        Ok(_) | Err(Errno::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes `name` in `dir` and everything below it, symlinks as links, after dropping `uid`'s
/// ACL entries from regular files. A name that is not there counts as removed.
pub fn remove_at(dir: &OwnedFd, name: &str, uid: u32) -> Result<(), Errno> {
    remove_entry(dir, OsStr::new(name), uid)
}

fn remove_entry(dir: &OwnedFd, name: &OsStr, uid: u32) -> Result<(), Errno> {
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFDIR {
        let sub = match openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Some(fd),
            Err(Errno::ENOENT) => return Ok(()),
            // Swapped for something else since the stat: unlink that instead.
            Err(Errno::ELOOP | Errno::ENOTDIR) => None,
            Err(e) => return Err(e),
        };
        if let Some(sub) = sub {
            for n in names(&sub)? {
                remove_entry(&sub, OsStr::from_bytes(&n), uid)?;
            }
            return match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(e),
            };
        }
    } else if kind == SFlag::S_IFREG {
        revoke_at(dir, name, uid)?;
    }
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EISDIR) => remove_entry(dir, name, uid),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn removes_a_tree_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "x").unwrap();
        let jail = dir.path().join("jail");
        fs::create_dir_all(jail.join("root/run/deep")).unwrap();
        fs::write(jail.join("root/run/deep/f"), "y").unwrap();
        symlink(&outside, jail.join("root/run/link-to-dir")).unwrap();
        symlink(outside.join("keep"), jail.join("root/link-to-file")).unwrap();
        let base = open_dir(fs::File::open(dir.path()).unwrap(), ".").unwrap();
        remove_at(&base, "jail", 4_000_000).unwrap();
        assert!(!jail.exists());
        assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "x", "the symlinks' targets stay");
        remove_at(&base, "jail", 4_000_000).unwrap();
    }

    #[test]
    fn open_dir_refuses_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        symlink("/", dir.path().join("l")).unwrap();
        let base = fs::File::open(dir.path()).unwrap();
        let e = open_dir(&base, "l").unwrap_err();
        assert!(matches!(e, Errno::ELOOP | Errno::ENOTDIR), "{e}");
    }
}
