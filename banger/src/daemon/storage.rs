//! A VM's root disk, made from its image's read-only rootfs: which kind a host gives it
//! ([`choose`]), and the files behind each kind.
//!
//! Three kinds ([`StorageKind`]), chosen per host by the `storage` setting
//! ([`StorageMode`]) when the VM's root is first made, recorded in its row and kept:
//!
//! - **dm-snapshot** (where banger-helper offers it: its `Hello` capability `device_mapper`): the
//!   VM owns only a sparse copy-on-write file ([`create_cow`], sized with
//!   [`banger_protocol::min_cow_bytes`] of the image so the snapshot can never fill up and turn
//!   invalid under the guest). At each start the helper attaches a read-only loop device over
//!   the image, a read-write one over the COW file, and a snapshot target over both, whose
//!   device node (owned by the user) is the VM's root drive; at each stop it removes them. The
//!   COW file keeps the guest's writes across stops; the image is shared by every VM on it.
//! - **reflink**: a clone of the image (`FICLONE`) that shares its blocks until the guest writes,
//!   on btrfs, XFS and other filesystems that support it.
//! - **sparse copy**: a full copy of the image's data, holes left out.
//!
//! The last two are a file handed to the VMM directly (no loop device, no root), made by
//! [`prepare_root`] as follows:
//!
//! 1. the image's rootfs is opened read-only; an existing destination is refused (a VM's root
//!    holds the guest's writes and is never silently replaced);
//! 2. a temporary file `.<name>.partial-<random>` is created next to the destination, mode 0600;
//! 3. with [`StorageStrategy::CloneOrCopy`] a reflink clone is tried first, and any refusal
//!    (`EOPNOTSUPP` on ext4 and tmpfs, `EXDEV` across filesystems, ...) falls back to a sparse
//!    copy; [`StorageStrategy::Reflink`] fails instead ([`StorageError::NoReflink`]);
//!    [`StorageStrategy::SparseCopy`] copies at once;
//! 4. the sparse copy reads only the source's data extents (`SEEK_DATA`/`SEEK_HOLE`) and does not
//!    write blocks that read as zeros, so it allocates no more than the data the image really
//!    holds; the length is set at the end so trailing holes survive;
//! 5. the temporary file is synced and renamed into place without replacing anything
//!    (`RENAME_NOREPLACE`), then the directory is synced. A crash leaves at most a `.partial`
//!    file, never a half-written root under the real name. Any failure removes the temporary.
//!
//! Which method ran is returned as a [`StorageKind`] to be recorded and shown.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

use crate::config::{Origin, StorageMode};
use crate::model::StorageKind;

/// The block size zero detection works in (the usual filesystem block).
const BLOCK: usize = 4096;
/// How much is read at a time.
const CHUNK: usize = 256 * BLOCK;

/// How to make a file that is a VM's whole root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StorageStrategy {
    /// A reflink clone where the filesystem supports it, a sparse copy otherwise.
    #[default]
    CloneOrCopy,
    /// A reflink clone, or nothing.
    Reflink,
    /// Always a sparse copy.
    SparseCopy,
}

/// How a VM's root is to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootPlan {
    /// A copy-on-write file under a dm-snapshot the helper makes at each start.
    DmSnapshot,
    /// A file of its own, made with this strategy.
    File(StorageStrategy),
}

/// The plan for a new VM's root on this host: the `storage` setting (`mode`, from `origin`)
/// and whether the helper can make dm-snapshot roots here. A setting the host cannot follow
/// is refused, saying what to set instead (a forced reflink is found out only by trying it).
pub fn choose(mode: StorageMode, origin: &Origin, device_mapper: bool) -> Result<RootPlan, StorageError> {
    Ok(match mode {
        StorageMode::Auto if device_mapper => RootPlan::DmSnapshot,
        StorageMode::Auto => RootPlan::File(StorageStrategy::CloneOrCopy),
        StorageMode::DmSnapshot if device_mapper => RootPlan::DmSnapshot,
        StorageMode::DmSnapshot => return Err(StorageError::NoDeviceMapper { origin: origin.clone() }),
        StorageMode::Reflink => RootPlan::File(StorageStrategy::Reflink),
        StorageMode::Copy => RootPlan::File(StorageStrategy::SparseCopy),
    })
}

/// The plan that makes a root of `kind` again (a VM keeps the kind it got).
pub fn plan_for(kind: StorageKind) -> RootPlan {
    match kind {
        StorageKind::DmSnapshot => RootPlan::DmSnapshot,
        StorageKind::Reflink => RootPlan::File(StorageStrategy::Reflink),
        StorageKind::SparseCopy => RootPlan::File(StorageStrategy::SparseCopy),
    }
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
    /// `storage = "reflink"` on a filesystem that cannot clone.
    #[error(
        "cannot clone the image into {dest}: storage = \"reflink\" needs a filesystem with reflinks (btrfs, XFS, ...); set storage = \"auto\" or \"copy\" (config.toml or BANGER_STORAGE)"
    )]
    NoReflink {
        /// The destination.
        dest: PathBuf,
        /// The kernel's refusal.
        #[source]
        source: io::Error,
    },
    /// `storage = "dm-snapshot"` where the helper cannot make dm-snapshots.
    #[error(
        "storage = \"dm-snapshot\" (from {origin}) cannot be used here: this host's banger-helper cannot make dm-snapshot roots (no device-mapper with the snapshot target); set storage = \"auto\", \"reflink\" or \"copy\""
    )]
    NoDeviceMapper {
        /// Where the setting came from.
        origin: Origin,
    },
    /// A VM whose root is a dm-snapshot, where the helper cannot make dm-snapshots (any more).
    #[error(
        "the root of this vm is a dm-snapshot, and this host's banger-helper cannot make dm-snapshot roots (no device-mapper with the snapshot target): start it on a host whose helper can, or delete it"
    )]
    DmRootUnavailable,
    /// The helper attached the copy-on-write file read-only.
    #[error(
        "banger-helper attached the copy-on-write file {path} read-only ({device}): the vm's writes would fail; check that the file is the user's and writable"
    )]
    CowReadOnly {
        /// The COW file.
        path: PathBuf,
        /// The loop device.
        device: String,
    },
    /// A copy-on-write file could not be made or sized.
    #[error("cannot make the copy-on-write file {path}")]
    Cow {
        /// The COW file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl StorageError {
    /// Whether the host cannot do what the settings (or the VM's kind) ask, as opposed to
    /// something failing.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StorageError::NoReflink { .. }
                | StorageError::NoDeviceMapper { .. }
                | StorageError::DmRootUnavailable
        )
    }
}

/// Makes `path`, a VM's copy-on-write file: new (never replacing anything), mode 0600, sparse,
/// `bytes` long; synced with its directory.
pub fn create_cow(path: &Path, bytes: u64) -> Result<(), StorageError> {
    let err = |source| StorageError::Cow { path: path.to_owned(), source };
    let file =
        OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
    let made = file.set_len(bytes).and_then(|()| file.sync_all());
    if let Err(e) = made {
        let _ = fs::remove_file(path);
        return Err(err(e));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// Whether the copy-on-write file at `path` holds a persistent snapshot's header (the kernel
/// writes it when the snapshot is first made over the file: a file without it holds nothing of
/// the guest's yet).
pub fn cow_has_header(path: &Path) -> std::io::Result<bool> {
    use std::io::Read as _;
    const SNAP_MAGIC: u32 = 0x7041_6e53;
    let mut magic = [0u8; 4];
    match std::fs::File::open(path)?.read_exact(&mut magic) {
        Ok(()) => Ok(u32::from_le_bytes(magic) == SNAP_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Grows the copy-on-write file at `path` to at least `bytes` (a snapshot's exception store may
/// grow; it never shrinks). Returns its length.
pub fn ensure_cow_len(path: &Path, bytes: u64) -> Result<u64, StorageError> {
    let err = |source| StorageError::Cow { path: path.to_owned(), source };
    let file = OpenOptions::new().write(true).open(path).map_err(err)?;
    let len = file.metadata().map_err(err)?.len();
    if len >= bytes {
        return Ok(len);
    }
    file.set_len(bytes).and_then(|()| file.sync_all()).map_err(err)?;
    Ok(bytes)
}

/// Makes `dest`, the VM's writable root, from the image's rootfs (mode 0600).
pub fn prepare_root(
    strategy: StorageStrategy,
    image_rootfs: &Path,
    dest: &Path,
) -> Result<StorageKind, StorageError> {
    copy_file(strategy, image_rootfs, dest, 0o600, &mut |_| {})
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

/// Copies `src` to a new file `dest` with `mode`, as described in the module docs, telling
/// `progress` how far through `src` the copy is (a clone at once, a copy chunk by chunk). Returns
/// which method ran.
pub fn copy_file(
    strategy: StorageStrategy,
    src: &Path,
    dest: &Path,
    mode: u32,
    progress: &mut dyn FnMut(u64),
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
        StorageStrategy::Reflink => {
            reflink(&input, &output)
                .map_err(|source| StorageError::NoReflink { dest: dest.to_owned(), source })?;
            StorageKind::Reflink
        }
        StorageStrategy::CloneOrCopy => match reflink(&input, &output) {
            Ok(()) => StorageKind::Reflink,
            Err(e) => {
                tracing::debug!(src = %src.display(), error = %e, "reflink refused, making a sparse copy");
                output.set_len(0).map_err(copy_err)?;
                sparse_copy(&input, &output, progress).map_err(copy_err)?;
                StorageKind::SparseCopy
            }
        },
        StorageStrategy::SparseCopy => {
            sparse_copy(&input, &output, progress).map_err(copy_err)?;
            StorageKind::SparseCopy
        }
    };
    progress(meta.len());
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

/// Copies `src` into the empty file `dest`, skipping holes and zero blocks, telling `progress`
/// the offset reached after each chunk of data. Returns the bytes written.
pub fn sparse_copy(src: &File, dest: &File, progress: &mut dyn FnMut(u64)) -> io::Result<u64> {
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    let mut pos = 0u64;
    while pos < len {
        let (data, hole) = match next_data(src, pos, len)? {
            Some(extent) => extent,
            None => break,
        };
        written += copy_extent(src, dest, data, hole, &mut buf, progress)?;
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
fn copy_extent(
    src: &File,
    dest: &File,
    start: u64,
    end: u64,
    buf: &mut [u8],
    progress: &mut dyn FnMut(u64),
) -> io::Result<u64> {
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
        progress(pos);
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
    fn a_cow_has_a_header_only_once_a_snapshot_wrote_one() {
        let tmp = tempfile::tempdir().unwrap();
        let cow = tmp.path().join("cow");
        create_cow(&cow, MIB).unwrap();
        assert!(!cow_has_header(&cow).unwrap(), "a new COW file is all holes");
        // The persistent snapshot's header: magic, valid, version, chunk size (little-endian).
        let header: Vec<u8> = [0x7041_6e53u32, 1, 1, 16].iter().flat_map(|w| w.to_le_bytes()).collect();
        File::options().write(true).open(&cow).unwrap().write_all_at(&header, 0).unwrap();
        assert!(cow_has_header(&cow).unwrap());
        fs::write(&cow, b"ab").unwrap();
        assert!(!cow_has_header(&cow).unwrap(), "too short");
        assert!(cow_has_header(&tmp.path().join("none")).is_err());
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
    fn the_setting_and_the_helper_choose_the_plan() {
        use StorageStrategy::*;
        let env = Origin::Env("BANGER_STORAGE");
        let plan = |mode, dm| choose(mode, &env, dm);
        assert_eq!(plan(StorageMode::Auto, true).unwrap(), RootPlan::DmSnapshot);
        assert_eq!(plan(StorageMode::Auto, false).unwrap(), RootPlan::File(CloneOrCopy));
        assert_eq!(plan(StorageMode::DmSnapshot, true).unwrap(), RootPlan::DmSnapshot);
        let err = plan(StorageMode::DmSnapshot, false).unwrap_err();
        assert!(err.is_unavailable());
        let msg = err.to_string();
        assert!(msg.contains("$BANGER_STORAGE") && msg.contains("storage = \"auto\""), "{msg}");
        for dm in [true, false] {
            assert_eq!(plan(StorageMode::Reflink, dm).unwrap(), RootPlan::File(Reflink));
            assert_eq!(plan(StorageMode::Copy, dm).unwrap(), RootPlan::File(SparseCopy));
        }
        // A VM keeps its kind.
        assert_eq!(plan_for(StorageKind::DmSnapshot), RootPlan::DmSnapshot);
        assert_eq!(plan_for(StorageKind::Reflink), RootPlan::File(Reflink));
        assert_eq!(plan_for(StorageKind::SparseCopy), RootPlan::File(SparseCopy));
    }

    #[test]
    fn a_forced_reflink_fails_where_the_filesystem_cannot_clone() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src.img");
        make_sparse_source(&src);
        let supported =
            reflink(&File::open(&src).unwrap(), &File::create(tmp.path().join("probe")).unwrap()).is_ok();
        let dest = tmp.path().join("root.ext4");
        match prepare_root(StorageStrategy::Reflink, &src, &dest) {
            Ok(kind) => assert!(supported && kind == StorageKind::Reflink, "{kind:?}"),
            Err(e) => {
                assert!(!supported, "{e}");
                assert!(matches!(e, StorageError::NoReflink { .. }) && e.is_unavailable(), "{e:?}");
                assert!(e.to_string().contains("set storage = \"auto\" or \"copy\""), "{e}");
                assert!(!dest.exists());
                let left = fs::read_dir(tmp.path()).unwrap().count();
                assert_eq!(left, 2, "no temporary file is left");
            }
        }
    }

    #[test]
    fn a_cow_file_is_new_private_sparse_and_only_grows() {
        let tmp = tempfile::tempdir().unwrap();
        let cow = tmp.path().join("root.cow");
        create_cow(&cow, 64 * MIB).unwrap();
        let meta = fs::metadata(&cow).unwrap();
        assert_eq!((meta.len(), meta.mode() & 0o777), (64 * MIB, 0o600));
        assert!(allocated(&cow) <= 4096, "allocates {}", allocated(&cow));
        fs::write(tmp.path().join("other"), "x").unwrap();
        let err = create_cow(&tmp.path().join("other"), MIB).unwrap_err();
        assert!(matches!(err, StorageError::Cow { .. }), "{err:?}");
        assert_eq!(fs::read(tmp.path().join("other")).unwrap(), b"x", "never replaced");

        assert_eq!(ensure_cow_len(&cow, 32 * MIB).unwrap(), 64 * MIB);
        assert_eq!(ensure_cow_len(&cow, 65 * MIB).unwrap(), 65 * MIB);
        assert_eq!(fs::metadata(&cow).unwrap().len(), 65 * MIB);
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
