//! A VM's work disk: a sparse ext4 file of the size the user asked for, made as the user when
//! the VM is created (`vm create --disk SIZE`), attached as the VM's second drive at every start
//! and mounted by the guest at [`WORK_DISK_MOUNT`](crate::daemon::personalize::WORK_DISK_MOUNT)
//! (personalization writes its fstab line). It lives in the VM's directory, so it survives
//! stops and goes with the VM.
//!
//! [`make`]: the file is created new (never replacing anything), mode 0600, and given its length
//! without writing (sparse); then `mkfs.ext4` formats it in place: no root, no mount, no loop
//! device. Its root directory belongs to the guest's root (`root_owner=0:0`), its label is
//! `banger-work`, nothing is reserved for root, and inode tables are initialised lazily by the
//! guest, so only the filesystem's metadata is written. Any failure removes the file.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::daemon::personalize::find_tool;
use crate::size::format_size;

/// The smallest work disk.
pub const MIN_WORK_DISK_BYTES: u64 = 16 << 20;
/// The largest work disk (ext4's limit with 4 KiB blocks and no 64-bit feature, a sane bound).
pub const MAX_WORK_DISK_BYTES: u64 = 16 << 40;

/// Why a work disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WorkDiskError {
    /// The size is out of range.
    #[error(
        "a work disk of {} is out of range: use {} to {}, e.g. --disk 10G",
        format_size(*.0),
        format_size(MIN_WORK_DISK_BYTES),
        format_size(MAX_WORK_DISK_BYTES)
    )]
    Size(u64),
    /// The file could not be created or sized.
    #[error("cannot create the work disk {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// mkfs.ext4 is not installed.
    #[error("mkfs.ext4 not found on PATH, in /usr/sbin or in /sbin: install e2fsprogs")]
    ToolMissing,
    /// mkfs.ext4 could not be started.
    #[error("cannot run mkfs.ext4")]
    Spawn(#[source] io::Error),
    /// mkfs.ext4 failed.
    #[error("mkfs.ext4 failed on {path} ({status}): {stderr}")]
    Mkfs {
        /// The file.
        path: PathBuf,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed.
        stderr: String,
    },
}

impl WorkDiskError {
    /// Whether the request was wrong (as opposed to something failing on the host).
    pub fn is_invalid(&self) -> bool {
        matches!(self, WorkDiskError::Size(_))
    }
}

/// Checks that a work disk of `bytes` may be made.
pub fn check_size(bytes: u64) -> Result<(), WorkDiskError> {
    if (MIN_WORK_DISK_BYTES..=MAX_WORK_DISK_BYTES).contains(&bytes) {
        Ok(())
    } else {
        Err(WorkDiskError::Size(bytes))
    }
}

/// Makes the work disk `path` of `bytes` (see the module docs).
pub fn make(path: &Path, bytes: u64) -> Result<(), WorkDiskError> {
    check_size(bytes)?;
    let mkfs = find_tool("mkfs.ext4").map_err(|_| WorkDiskError::ToolMissing)?;
    let create = |source| WorkDiskError::Create { path: path.to_owned(), source };
    let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(create)?;
    let made = file.set_len(bytes).map_err(create).and_then(|()| {
        drop(file);
        let out = Command::new(mkfs)
            .args(["-q", "-F", "-L", "banger-work", "-m", "0"])
            .args(["-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
            .arg(path)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(WorkDiskError::Spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(WorkDiskError::Mkfs {
                path: path.to_owned(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    });
    if made.is_err() {
        let _ = fs::remove_file(path);
    }
    made
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn a_work_disk_is_a_sparse_private_ext4_file_owned_inside_by_root() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("work.ext4");
        make(&path, 1 << 30).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.len(), meta.mode() & 0o777), (1 << 30, 0o600));
        assert!(meta.blocks() * 512 < 64 << 20, "only metadata is written: {} bytes", meta.blocks() * 512);
        assert!(crate::daemon::personalize::is_ext_filesystem(&path).unwrap());
        let out =
            Command::new(find_tool("debugfs").unwrap()).args(["-R", "stat /"]).arg(&path).output().unwrap();
        let stat = String::from_utf8_lossy(&out.stdout);
        assert!(stat.contains("User:     0   Group:     0"), "{stat}");

        // Never replaces a file, and leaves none behind when it fails.
        let err = make(&path, 1 << 30).unwrap_err();
        assert!(matches!(err, WorkDiskError::Create { .. }), "{err:?}");
        assert_eq!(fs::metadata(&path).unwrap().len(), 1 << 30);
    }

    #[test]
    fn sizes_out_of_range_are_refused_before_anything_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("work.ext4");
        for bytes in [0, MIN_WORK_DISK_BYTES - 1, MAX_WORK_DISK_BYTES + 1] {
            let err = make(&path, bytes).unwrap_err();
            assert!(err.is_invalid() && err.to_string().contains("16 MiB to 16 TiB"), "{err}");
        }
        assert!(!path.exists());
        check_size(MIN_WORK_DISK_BYTES).unwrap();
    }
}
