//! The helper's socket on disk, when the helper binds it itself (under systemd the socket unit
//! makes the same directory and socket), whatever the umask, in this order:
//!
//! 1. every directory on the way to the socket that exists must be root's and writable by no one
//!    else, unless sticky (like `/tmp`, where no one can remove or rename root's entries); a
//!    symbolic link on the way must be root's. Anything else is refused: whoever may write there
//!    could replace the socket, or a directory above it;
//! 2. the socket's directory and any missing parents are created `root:root 0755`;
//! 3. (checked before step 1 for it) an existing root-owned socket directory that holds nothing
//!    but the socket, as an earlier run leaves it (say with mode 0700 from a umask), is set to
//!    0755; any other existing directory is left as it is;
//! 4. the path with every link resolved is checked as in step 1, and a directory on it that the
//!    socket group cannot search is reported in the log (members could not reach the socket,
//!    unless an ACL lets them);
//! 5. a stale socket left by a helper that is gone is removed; one that answers is refused;
//! 6. the socket is bound with a umask of 0177 (reachable by root alone), then given to
//!    `root:<socket group>` and mode 0660.

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The mode of the socket's directory.
pub const DIR_MODE: u32 = 0o755;

/// The mode of the socket.
pub const SOCKET_MODE: u32 = 0o660;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A system call on a path failed.
    #[error("cannot listen on {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another helper answers on the socket.
    #[error("another banger-helper is already serving {0}; stop it or choose another --socket")]
    AlreadyServing(PathBuf),
    /// The socket path is taken by something else.
    #[error("{0} exists and is not a socket; remove it or choose another --socket")]
    NotASocket(PathBuf),
    /// Something on the way to the socket is neither a directory nor a link.
    #[error("{0} is on the way to the helper's socket but is not a directory; choose another --socket")]
    NotADirectory(PathBuf),
    /// A directory or link on the way is not root's.
    #[error(
        "{path} is owned by uid {uid}, not root: its owner could replace the helper's socket; make it root's (chown root {path}) or choose another --socket"
    )]
    NotRoots {
        /// The directory or link.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// A directory on the way may be written by others than root.
    #[error(
        "{path} (mode {mode:04o}) is writable by others than root, who could replace the helper's socket; remove their write permission (chmod go-w {path}) or choose another --socket"
    )]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// What the checks need to know about one entry on the way to the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    kind: Kind,
    uid: u32,
    gid: u32,
    mode: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Link,
    Other,
}

impl Entry {
    fn of(m: &std::fs::Metadata) -> Entry {
        let t = m.file_type();
        let kind = if t.is_dir() {
            Kind::Dir
        } else if t.is_symlink() {
            Kind::Link
        } else {
            Kind::Other
        };
        Entry { kind, uid: m.uid(), gid: m.gid(), mode: m.mode() & 0o7777 }
    }

    /// Step 1: root's, and (for a directory) writable by no one else unless sticky.
    fn check(&self, path: &Path) -> Result<(), SocketError> {
        if self.kind == Kind::Other {
            return Err(SocketError::NotADirectory(path.to_owned()));
        }
        if self.uid != 0 {
            return Err(SocketError::NotRoots { path: path.to_owned(), uid: self.uid });
        }
        let sticky = self.mode & 0o1000 != 0;
        if self.kind == Kind::Dir && self.mode & 0o022 != 0 && !sticky {
            return Err(SocketError::Writable { path: path.to_owned(), mode: self.mode });
        }
        Ok(())
    }

    /// Whether members of group `gid` may search this directory (by its mode bits).
    fn searchable_by(&self, gid: u32) -> bool {
        self.mode & 0o001 != 0 || (self.gid == gid && self.mode & 0o010 != 0)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SocketError + '_ {
    move |source| SocketError::Io { path: path.to_owned(), source }
}

fn entry(path: &Path) -> Result<Option<Entry>, SocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(Entry::of(&m))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Makes the socket's directory, ready for the socket (steps 1 to 4).
fn prepare_dir(dir: &Path, socket_name: &OsStr, gid: u32) -> Result<(), SocketError> {
    // Steps 1 and 3: from the root down, the entries that exist; then step 2 for the others.
    let chain: Vec<&Path> = dir.ancestors().collect::<Vec<_>>().into_iter().rev().collect();
    let mut missing = Vec::new();
    for p in chain {
        match entry(p)? {
            Some(e) if missing.is_empty() => {
                let e = if p == dir { set_mode_if_own(dir, e, socket_name)? } else { e };
                e.check(p)?;
            }
            Some(_) | None => missing.push(p),
        }
    }
    for p in missing {
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(p) {
            Ok(()) => {
                std::os::unix::fs::lchown(p, Some(0), Some(0)).map_err(io_err(p))?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(DIR_MODE)).map_err(io_err(p))?;
                tracing::info!("created {} (root:root {DIR_MODE:04o}) for the socket", p.display());
            }
            // Made by someone else meanwhile: it must pass step 1 like any other.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                entry(p)?.ok_or_else(|| io_err(p)(e))?.check(p)?;
            }
            Err(e) => return Err(io_err(p)(e)),
        }
    }
    // Step 4.
    let resolved = std::fs::canonicalize(dir).map_err(io_err(dir))?;
    for p in resolved.ancestors() {
        let e = entry(p)?.ok_or_else(|| io_err(p)(io::ErrorKind::NotFound.into()))?;
        e.check(p)?;
        if !e.searchable_by(gid) {
            tracing::warn!(
                "{} (mode {:04o}, group {}) does not let members of the socket group (gid {gid}) search it, so they cannot reach the socket unless an ACL lets them; chmod o+x {} or choose another --socket",
                p.display(),
                e.mode,
                e.gid,
                p.display()
            );
        }
    }
    Ok(())
}

/// Step 3: a root-owned directory holding nothing but the socket is the socket's own, and gets
/// [`DIR_MODE`]. Returns the entry as it now is.
fn set_mode_if_own(dir: &Path, e: Entry, socket_name: &OsStr) -> Result<Entry, SocketError> {
    if e.kind != Kind::Dir || e.uid != 0 || e.mode == DIR_MODE || !holds_only(dir, socket_name)? {
        return Ok(e);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)).map_err(io_err(dir))?;
    tracing::info!(
        "{}: mode {:04o} set to {DIR_MODE:04o}, as the socket's own directory (it holds nothing else)",
        dir.display(),
        e.mode
    );
    Ok(Entry { mode: DIR_MODE, ..e })
}

/// Whether `dir` holds nothing, or nothing but an entry named `name`.
fn holds_only(dir: &Path, name: &OsStr) -> Result<bool, SocketError> {
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        if e.map_err(io_err(dir))?.file_name() != name {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Binds the helper socket at `path`: `root:gid`, mode 0660, in a directory made or checked as
/// the module says, whatever the umask.
pub fn bind(path: &Path, gid: u32) -> Result<UnixListener, SocketError> {
    let path = &std::path::absolute(path).map_err(io_err(path))?;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(SocketError::NotASocket(path.to_owned()));
    };
    prepare_dir(dir, name, gid)?;
    // Step 5.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::AlreadyServing(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err(path))?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    // Step 6.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io_err(path))?;
    std::os::unix::fs::lchown(path, Some(0), Some(gid)).map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io_err(path))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(uid: u32, mode: u32) -> Entry {
        Entry { kind: Kind::Dir, uid, gid: 0, mode }
    }

    #[test]
    fn only_roots_directories_that_no_one_else_writes_are_on_the_way() {
        let p = Path::new("/x");
        assert!(dir(0, 0o755).check(p).is_ok());
        assert!(dir(0, 0o700).check(p).is_ok());
        assert!(dir(0, 0o1777).check(p).is_ok(), "sticky, like /tmp");
        assert!(matches!(dir(1000, 0o755).check(p), Err(SocketError::NotRoots { uid: 1000, .. })));
        assert!(matches!(dir(0, 0o775).check(p), Err(SocketError::Writable { mode: 0o775, .. })));
        assert!(matches!(dir(0, 0o757).check(p), Err(SocketError::Writable { .. })));
        let link = Entry { kind: Kind::Link, uid: 0, gid: 0, mode: 0o777 };
        assert!(link.check(p).is_ok());
        assert!(matches!(Entry { uid: 5, ..link }.check(p), Err(SocketError::NotRoots { uid: 5, .. })));
        let file = Entry { kind: Kind::Other, uid: 0, gid: 0, mode: 0o644 };
        assert!(matches!(file.check(p), Err(SocketError::NotADirectory(_))));
    }

    #[test]
    fn the_socket_group_needs_search_permission() {
        assert!(dir(0, 0o755).searchable_by(61000));
        assert!(dir(0, 0o711).searchable_by(61000));
        assert!(!dir(0, 0o700).searchable_by(61000));
        assert!(!dir(0, 0o750).searchable_by(61000));
        assert!(Entry { gid: 61000, ..dir(0, 0o750) }.searchable_by(61000));
    }

    #[test]
    fn refusals_say_what_to_do() {
        let e = SocketError::NotRoots { path: "/run/banger".into(), uid: 1000 }.to_string();
        assert!(
            e.contains("/run/banger is owned by uid 1000") && e.contains("chown root /run/banger"),
            "{e}"
        );
        let e = SocketError::Writable { path: "/run/banger".into(), mode: 0o775 }.to_string();
        assert!(e.contains("mode 0775") && e.contains("chmod go-w /run/banger"), "{e}");
    }
}
