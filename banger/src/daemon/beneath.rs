//! Opening a file inside a jail from the daemon: a jailed VMM's directories belong to its uid,
//! which could replace any of them with a symbolic link pointing the daemon (running as the
//! user) at a file of the user's. [`open_beneath`] reaches a path only below the jail root,
//! following no link there; the jail root itself lies in the helper's directory, which the VMM
//! cannot change, and must not be a link.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
use nix::sys::stat::Mode;

/// Opens `in_jail` (absolute inside the jail, or relative to its root) below `root` with
/// `flags` (`O_CLOEXEC` is added), following no symbolic link and leaving `root` never.
pub fn open_beneath(root: &Path, in_jail: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let dir =
        open(root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?;
    let rel = in_jail.strip_prefix("/").unwrap_or(in_jail);
    let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(
        ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    );
    Ok(openat2(&dir, rel, how)?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn only_what_is_below_the_root_without_links_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::write(root.join("run/file"), "in").unwrap();
        std::fs::write(dir.path().join("secret"), "out").unwrap();
        symlink(dir.path(), root.join("up")).unwrap();
        symlink("../secret", root.join("rel")).unwrap();
        symlink(&root, dir.path().join("root-link")).unwrap();
        assert!(open_beneath(&root, Path::new("/run/file"), OFlag::O_RDONLY).is_ok());
        assert!(open_beneath(&root, Path::new("run/file"), OFlag::O_RDONLY).is_ok());
        for (r, p, errno) in [
            (&root, "/up/secret", libc::ELOOP),
            (&root, "/rel", libc::ELOOP),
            (&root, "/../secret", libc::EXDEV),
            (&dir.path().join("root-link"), "/run/file", libc::ENOTDIR),
        ] {
            let e = open_beneath(r, Path::new(p), OFlag::O_RDONLY).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(errno), "{p}: {e}");
        }
    }
}
