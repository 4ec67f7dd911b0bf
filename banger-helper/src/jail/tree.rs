//! Directories inside a jail, opened and removed only through descriptors: every step is an
//! `*at` call relative to a directory descriptor opened with `O_NOFOLLOW`, and every entry is
//! examined with `AT_SYMLINK_NOFOLLOW`, so a symlink the jail's uid planted is removed as a link
//! and never followed. Regular files lose the jail uid's ACL entry before they are unlinked
//! (a drive is a hard link of the caller's file: the inode outlives the jail).

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags, openat, renameat2};
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
pub(crate) fn revoke_at(dir: &OwnedFd, name: &OsStr, uid: u32) -> Result<(), Errno> {
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

/// How deep [`remove_at`] descends (one open directory descriptor and one stack frame per
/// level): a directory deeper than this is first moved up into the top directory, so a tree of
/// any depth the jail's uid built is removed with a bounded number of descriptors.
pub const MAX_DEPTH: usize = 32;

/// Removes `name` in `dir` and everything below it, symlinks as links, after dropping `uid`'s
/// ACL entries from regular files. A name that is not there counts as removed. At most
/// [`MAX_DEPTH`] directories are held open at once: a subdirectory deeper than that is renamed
/// (`RENAME_NOREPLACE`) into `name` itself, which is listed again until it is empty.
pub fn remove_at(dir: &OwnedFd, name: &str, uid: u32) -> Result<(), Errno> {
    let mut walk = Walk { uid, top: None, moved: 0 };
    walk.entry(dir, OsStr::new(name), 0)
}

/// One removal: the jail's uid, the top directory (once open) deep subtrees are moved into, and
/// how many were moved (their names).
struct Walk {
    uid: u32,
    top: Option<OwnedFd>,
    moved: u64,
}

impl Walk {
    fn entry(&mut self, dir: &OwnedFd, name: &OsStr, depth: usize) -> Result<(), Errno> {
        let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR {
            if depth > MAX_DEPTH && self.top.is_some() {
                return self.move_up(dir, name);
            }
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
                if depth == 0 {
                    // The top: listed again until empty, as deep subtrees are moved into it.
                    self.top = Some(open_dir(&sub, ".")?);
                    let mut before = Vec::new();
                    let listed = loop {
                        let now = match names(&sub) {
                            Ok(now) => now,
                            Err(e) => break Err(e),
                        };
                        if now.is_empty() || now == before {
                            break Ok(());
                        }
                        if let Err(e) = now.iter().try_for_each(|n| self.entry(&sub, OsStr::from_bytes(n), 1))
                        {
                            break Err(e);
                        }
                        before = now;
                    };
                    self.top = None;
                    listed?;
                } else {
                    for n in names(&sub)? {
                        self.entry(&sub, OsStr::from_bytes(&n), depth + 1)?;
                    }
                }
                return match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => Ok(()),
                    Err(e) => Err(e),
                };
            }
        } else if kind == SFlag::S_IFREG {
            revoke_at(dir, name, self.uid)?;
        }
        match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::EISDIR) => self.entry(dir, name, depth),
            Err(e) => Err(e),
        }
    }

    /// Moves directory `name` in `dir` into the top directory under a name of its own, where
    /// the top's next listing finds it.
    fn move_up(&mut self, dir: &OwnedFd, name: &OsStr) -> Result<(), Errno> {
        let Some(top) = &self.top else { return Err(Errno::EINVAL) };
        loop {
            self.moved += 1;
            let to = format!(".banger-deep-{}", self.moved);
            match renameat2(dir, name, top, to.as_str(), RenameFlags::RENAME_NOREPLACE) {
                Ok(()) | Err(Errno::ENOENT) => return Ok(()),
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
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

    /// Builds `depth` nested directories `d` in `dir`, a file in each, a symlink to `outside`
    /// at the bottom.
    fn deep_tree(dir: &OwnedFd, depth: usize, outside: &std::path::Path) {
        let mut at = open_dir(dir, ".").unwrap();
        for _ in 0..depth {
            nix::sys::stat::mkdirat(&at, "d", Mode::from_bits_truncate(0o755)).unwrap();
            let f = openat(&at, "f", OFlag::O_CREAT | OFlag::O_WRONLY, Mode::from_bits_truncate(0o600));
            drop(f.unwrap());
            at = open_dir(&at, "d").unwrap();
        }
        nix::unistd::symlinkat(outside, &at, "out").unwrap();
    }

    #[test]
    fn removes_a_tree_deeper_than_its_descriptors_allow() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "x").unwrap();
        let base = open_dir(fs::File::open(dir.path()).unwrap(), ".").unwrap();
        nix::sys::stat::mkdirat(&base, "jail", Mode::from_bits_truncate(0o755)).unwrap();
        let depth = 10 * MAX_DEPTH;
        deep_tree(&open_dir(&base, "jail").unwrap(), depth, &outside);
        // In a child whose descriptor limit is far below the tree's depth (a walk holding one
        // per level fails with EMFILE).
        // SAFETY: the child makes syscalls and allocations only and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let open = fs::read_dir("/proc/self/fd").map_or(1024, |d| d.count()) as u64;
                let limit = open + MAX_DEPTH as u64 + 16;
                let code = match nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    limit,
                    limit,
                ) {
                    Err(_) => 2,
                    Ok(()) => match remove_at(&base, "jail", 4_000_000) {
                        Ok(()) => 0,
                        Err(Errno::EMFILE) => 3,
                        Err(_) => 4,
                    },
                };
                // SAFETY: leaving the child without running the harness's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0), "removal of {depth} levels");
            }
        }
        assert!(!dir.path().join("jail").exists());
        assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "x", "the symlink's target stays");
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
