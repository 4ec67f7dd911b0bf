//! A VM's writable root disk, made from its image's read-only rootfs.
//!
//! Where the kernel has no device-mapper, each VM gets its own full copy of the rootfs, handed
//! to the VMM directly as a file (no loop device, no root). [`prepare_root`] makes it:
//!
//! 1. the image's rootfs is opened read-only; an existing destination is refused (a VM's root
//!    holds the guest's writes and is never silently replaced);
//! 2. a temporary file `.<name>.partial-<random>` is created next to the destination, mode 0600;
//! 3. with [`StorageStrategy::CloneOrCopy`] a reflink clone (`FICLONE`) is tried first: instant
//!    and sharing blocks until the guest writes, on btrfs, XFS and other filesystems that
//!    support it. Any refusal (`EOPNOTSUPP` on ext4 and tmpfs, `EXDEV` across filesystems, ...)
//!    falls back to:
//! 4. a sparse copy: only the source's data extents are read (`SEEK_DATA`/`SEEK_HOLE`), and
//!    blocks that read as zeros are not written, so the copy allocates no more than the data
//!    the image really holds; the length is set at the end so trailing holes survive;
//! 5. the temporary file is synced and renamed into place without replacing anything
//!    (`RENAME_NOREPLACE`), then the directory is synced. A crash leaves at most a `.partial`
//!    file, never a half-written root under the real name. Any failure removes the temporary.
//!
//! Which method ran is returned as a [`StorageKind`] to be recorded and shown.
//!
//! The dm-snapshot strategy (a read-only loop over the image, a loop over a per-VM
//! copy-on-write file, a snapshot target joining them, all made through the helper) belongs
//! in [`StorageStrategy`] as another variant once the helper offers it; it will return
//! [`StorageKind::DmSnapshot`] and its teardown goes through the helper instead of
//! [`remove_root`].

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

use crate::model::StorageKind;

/// The block size zero detection works in (the usual filesystem block).
const BLOCK: usize = 4096;
/// How much is read at a time.
const CHUNK: usize = 256 * BLOCK;

/// How to make a VM's writable root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StorageStrategy {
    /// A reflink clone where the filesystem supports it, a sparse copy otherwise.
    #[default]
    CloneOrCopy,
    /// Always a sparse copy (for filesystems whose reflinks are unwanted, and for tests).
    SparseCopy,
}

/// Why a root (or an image file) could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The destination already exists.
    #[error("{path} already exists: delete it first if it is no longer needed")]
    Exists {
        /// The destination.
        path: PathBuf,
    },
    /// The source cannot be opened or is not a regular file.
    #[error("cannot read {path}")]
    Source {
        /// The source file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The copy failed (nothing is left at the destination).
    #[error("cannot copy {src} to {dest}")]
    Copy {
        /// The source file.
        src: PathBuf,
        /// The destination.
        dest: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The root could not be removed.
    #[error("cannot remove {path}")]
    Remove {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Makes `dest`, the VM's writable root, from the image's rootfs (mode 0600).
pub fn prepare_root(
    strategy: StorageStrategy,
    image_rootfs: &Path,
    dest: &Path,
) -> Result<StorageKind, StorageError> {
    copy_file(strategy, image_rootfs, dest, 0o600)
}

/// Removes a VM's root; a missing file counts as removed.
pub fn remove_root(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(StorageError::Remove { path: path.to_owned(), source: e })
        }
        _ => Ok(()),
    }
}

/// Removes the temporary file unless disarmed.
struct PartialFile {
    path: Option<PathBuf>,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// Copies `src` to a new file `dest` with `mode`, as described in the module docs. Returns
/// which method ran.
pub fn copy_file(
    strategy: StorageStrategy,
    src: &Path,
    dest: &Path,
    mode: u32,
) -> Result<StorageKind, StorageError> {
    let source_err = |source| StorageError::Source { path: src.to_owned(), source };
    let copy_err = |source| StorageError::Copy { src: src.to_owned(), dest: dest.to_owned(), source };

    let input = File::open(src).map_err(source_err)?;
    let meta = input.metadata().map_err(source_err)?;
    if !meta.is_file() {
        return Err(source_err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
    }
    if fs::symlink_metadata(dest).is_ok() {
        return Err(StorageError::Exists { path: dest.to_owned() });
    }
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dest.file_name().ok_or_else(|| copy_err(io::ErrorKind::InvalidInput.into()))?;

    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(|e| copy_err(io::Error::other(e.to_string())))?;
    let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let tmp_path = dir.join(format!(".{}.partial-{hex}", name.to_string_lossy()));
    let output =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp_path).map_err(copy_err)?;
    let mut partial = PartialFile { path: Some(tmp_path.clone()) };

    let kind = match strategy {
        StorageStrategy::CloneOrCopy => match reflink(&input, &output) {
            Ok(()) => StorageKind::Reflink,
            Err(e) => {
                tracing::debug!(src = %src.display(), error = %e, "reflink refused, making a sparse copy");
                output.set_len(0).map_err(copy_err)?;
                sparse_copy(&input, &output).map_err(copy_err)?;
                StorageKind::SparseCopy
            }
        },
        StorageStrategy::SparseCopy => {
            sparse_copy(&input, &output).map_err(copy_err)?;
            StorageKind::SparseCopy
        }
    };
    output.set_permissions(fs::Permissions::from_mode(mode)).map_err(copy_err)?;
    output.sync_all().map_err(copy_err)?;
    drop(output);

    rename_no_replace(&tmp_path, dest).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            StorageError::Exists { path: dest.to_owned() }
        } else {
            copy_err(e)
        }
    })?;
    partial.path = None;
    File::open(dir).and_then(|d| d.sync_all()).map_err(copy_err)?;
    Ok(kind)
}

/// Renames `from` to `to`, failing with `AlreadyExists` rather than replacing `to`.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        // Filesystems without RENAME_NOREPLACE: a hard link is just as exclusive.
        Err(Errno::EINVAL) => {
            fs::hard_link(from, to)?;
            fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Makes `dest` share `src`'s blocks (`FICLONE`). Fails with the kernel's error where the
/// filesystem cannot (`EOPNOTSUPP`, `EXDEV`, `EINVAL`, ...).
pub fn reflink(src: &File, dest: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both descriptors are
    // open for the duration of the call and no memory is passed to the kernel.
    let rc = unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Copies `src` into the empty file `dest`, skipping holes and zero blocks. Returns the bytes
/// written.
pub fn sparse_copy(src: &File, dest: &File) -> io::Result<u64> {
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    let mut pos = 0u64;
    while pos < len {
        let (data, hole) = match next_data(src, pos, len)? {
            Some(extent) => extent,
            None => break,
        };
        written += copy_extent(src, dest, data, hole, &mut buf)?;
        pos = hole;
    }
    dest.set_len(len)?;
    Ok(written)
}

/// The next data extent `[start, end)` at or after `pos`, or `None` when only a hole remains.
/// Filesystems without `SEEK_DATA` report everything as data.
fn next_data(file: &File, pos: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let offset = |v: u64| i64::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let start = match lseek(file, offset(pos)?, Whence::SeekData) {
        Ok(off) => off as u64,
        Err(Errno::ENXIO) => return Ok(None),
        Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(Some((pos, len))),
        Err(e) => return Err(e.into()),
    };
    if start >= len {
        return Ok(None);
    }
    let end = match lseek(file, offset(start)?, Whence::SeekHole) {
        Ok(off) => (off as u64).min(len),
        Err(Errno::EINVAL | Errno::EOPNOTSUPP) => len,
        Err(e) => return Err(e.into()),
    };
    Ok(Some((start, end)))
}

/// Copies `[start, end)` from `src` to the same offsets in `dest`, writing only the runs of
/// blocks that are not all zeros. Returns the bytes written.
fn copy_extent(src: &File, dest: &File, start: u64, end: u64, buf: &mut [u8]) -> io::Result<u64> {
    let mut written = 0;
    let mut pos = start;
    while pos < end {
        let want = usize::try_from(end - pos).unwrap_or(usize::MAX).min(buf.len());
        let n = src.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            // The source shrank while being copied; what remains reads as a hole.
            break;
        }
        let chunk = &buf[..n];
        let mut run_start: Option<usize> = None;
        for (i, block) in chunk.chunks(BLOCK).enumerate() {
            let offset = i * BLOCK;
            let zero = block.iter().all(|&b| b == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(offset),
                (true, Some(s)) => {
                    dest.write_all_at(&chunk[s..offset], pos + s as u64)?;
                    written += (offset - s) as u64;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            dest.write_all_at(&chunk[s..], pos + s as u64)?;
            written += (n - s) as u64;
        }
        pos += n as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// A 16 MiB file: data at 0 and at 8 MiB, 64 KiB of explicitly written zeros at 4 MiB (so
    /// allocated), holes elsewhere, ending in a hole.
    fn make_sparse_source(path: &Path) -> Vec<(u64, Vec<u8>)> {
        let f = File::create(path).unwrap();
        f.set_len(16 * MIB).unwrap();
        let head: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        let middle = vec![0xabu8; 5000];
        f.write_all_at(&head, 0).unwrap();
        f.write_all_at(&vec![0u8; 64 * 1024], 4 * MIB).unwrap();
        f.write_all_at(&middle, 8 * MIB).unwrap();
        f.sync_all().unwrap();
        vec![(0, head), (8 * MIB, middle)]
    }

    fn allocated(path: &Path) -> u64 {
        fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src.img");
        let dest = tmp.path().join("dest.img");
        make_sparse_source(&src);

        let kind = prepare_root(StorageStrategy::SparseCopy, &src, &dest).unwrap();
        assert_eq!(kind, StorageKind::SparseCopy);
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dest).unwrap());
        let meta = fs::metadata(&dest).unwrap();
        assert_eq!(meta.len(), 16 * MIB);
        assert_eq!(meta.mode() & 0o777, 0o600);
        // 10 000 + 5 000 bytes of data take at most 4 + 2 blocks (plus a little metadata); the
        // zero run the source allocated is not copied.
        let dest_alloc = allocated(&dest);
        assert!(dest_alloc <= 8 * 4096, "dest allocates {dest_alloc} bytes");
        assert!(dest_alloc < allocated(&src), "{dest_alloc} vs {}", allocated(&src));
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn sparse_copy_of_data_without_holes_and_of_empty_files() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("dense");
        let content: Vec<u8> = (0..(3 * CHUNK + 123)).map(|i| (i % 7) as u8).collect();
        fs::write(&src, &content).unwrap();
        let dest = tmp.path().join("copy");
        prepare_root(StorageStrategy::SparseCopy, &src, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), content);

        let empty = tmp.path().join("empty");
        fs::write(&empty, "").unwrap();
        let dest = tmp.path().join("empty-copy");
        prepare_root(StorageStrategy::SparseCopy, &empty, &dest).unwrap();
        assert_eq!(fs::metadata(&dest).unwrap().len(), 0);
    }

    #[test]
    fn clone_or_copy_uses_reflink_exactly_when_the_filesystem_supports_it() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src.img");
        let expected = make_sparse_source(&src);

        // Ask the filesystem directly whether it clones.
        let probe_dest = tmp.path().join("probe");
        let supported = reflink(&File::open(&src).unwrap(), &File::create(&probe_dest).unwrap()).is_ok();

        let dest = tmp.path().join("root.ext4");
        let kind = prepare_root(StorageStrategy::CloneOrCopy, &src, &dest).unwrap();
        eprintln!("filesystem of {}: reflink supported = {supported}, ran {kind:?}", tmp.path().display());
        let want = if supported { StorageKind::Reflink } else { StorageKind::SparseCopy };
        assert_eq!(kind, want);
        let copy = fs::read(&dest).unwrap();
        assert_eq!(copy.len() as u64, 16 * MIB);
        for (offset, bytes) in expected {
            assert_eq!(&copy[offset as usize..offset as usize + bytes.len()], &bytes[..]);
        }
    }

    /// A loop-mounted btrfs, visible only in the calling thread's mount namespace, unmounted on
    /// drop (mount(8) sets autoclear, so the loop device goes with it).
    struct BtrfsMount {
        dir: tempfile::TempDir,
    }

    impl BtrfsMount {
        fn mnt(&self) -> PathBuf {
            self.dir.path().join("mnt")
        }
    }

    impl Drop for BtrfsMount {
        fn drop(&mut self) {
            nix::mount::umount(&self.mnt()).expect("unmount the test btrfs");
        }
    }

    #[test]
    #[ignore = "needs root: mounts a loop-backed btrfs in a private mount namespace to run the reflink path"]
    fn clone_or_copy_reflinks_on_btrfs() {
        use nix::mount::{MsFlags, mount};
        use std::process::Command;

        // unshare affects only this thread (and what it spawns), never the test harness.
        std::thread::spawn(|| {
            assert!(nix::unistd::geteuid().is_root(), "this test needs root");
            assert!(
                Command::new("mkfs.btrfs").arg("--version").output().is_ok(),
                "mkfs.btrfs is missing: install btrfs-progs"
            );
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
                .unwrap();

            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("btrfs.img");
            File::create(&image).unwrap().set_len(256 * MIB).unwrap();
            fs::create_dir(dir.path().join("mnt")).unwrap();
            let out = Command::new("mkfs.btrfs").arg("-q").arg(&image).output().unwrap();
            assert!(out.status.success(), "mkfs.btrfs failed: {}", String::from_utf8_lossy(&out.stderr));
            let st =
                Command::new("mount").arg("-o").arg("loop").arg(&image).arg(dir.path().join("mnt")).status();
            assert!(st.unwrap().success(), "mount -o loop failed");
            let fs_mount = BtrfsMount { dir };

            let src = fs_mount.mnt().join("src.img");
            let expected = make_sparse_source(&src);
            let dest = fs_mount.mnt().join("root.ext4");
            let kind = prepare_root(StorageStrategy::CloneOrCopy, &src, &dest).unwrap();
            assert_eq!(kind, StorageKind::Reflink);
            let copy = fs::read(&dest).unwrap();
            assert_eq!(copy.len() as u64, 16 * MIB);
            for (offset, bytes) in expected {
                assert_eq!(&copy[offset as usize..offset as usize + bytes.len()], &bytes[..]);
            }
            assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o777, 0o600);
            // The forced sparse copy still copies on the same filesystem.
            let dest2 = fs_mount.mnt().join("root2.ext4");
            assert_eq!(
                prepare_root(StorageStrategy::SparseCopy, &src, &dest2).unwrap(),
                StorageKind::SparseCopy
            );
            assert_eq!(fs::read(&dest2).unwrap(), copy);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn existing_destination_and_bad_sources_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::write(&src, "image").unwrap();
        let dest = tmp.path().join("dest");
        fs::write(&dest, "guest data").unwrap();
        let err = prepare_root(StorageStrategy::CloneOrCopy, &src, &dest).unwrap_err();
        assert!(matches!(err, StorageError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&dest).unwrap(), b"guest data");

        let err =
            prepare_root(StorageStrategy::CloneOrCopy, &tmp.path().join("missing"), &tmp.path().join("x"))
                .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        let err = prepare_root(StorageStrategy::CloneOrCopy, tmp.path(), &tmp.path().join("x")).unwrap_err();
        assert!(matches!(err, StorageError::Source { .. }), "{err}");
        assert!(!tmp.path().join("x").exists());
    }

    #[test]
    fn rename_never_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::write(&a, "new").unwrap();
        fs::write(&b, "old").unwrap();
        let err = rename_no_replace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&b).unwrap(), b"old");
        fs::remove_file(&b).unwrap();
        rename_no_replace(&a, &b).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"new");
        assert!(!a.exists());
    }

    #[test]
    fn remove_root_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root.ext4");
        fs::write(&root, "x").unwrap();
        remove_root(&root).unwrap();
        assert!(!root.exists());
        remove_root(&root).unwrap();
    }
}
