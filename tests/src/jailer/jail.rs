//! The jail's files: its root directory, the copy of the exec file, the directories and device
//! nodes made inside it (after `pivot_root`, so with jail-relative paths), and the PID file.
//!
//! Modes come from the calling process's umask where the jailer leaves them to it: with umask
//! 022 the directories above `root` are 0755 root, the copy keeps the exec file's mode, and the
//! PID file is 0644 root. `/`, `/dev`, `/dev/net` and `/run` are set to 0700 and the device nodes
//! are made 0600 (then owned by uid:gid) whatever the umask.

use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt, chown, fchown};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};

use super::unquoted;

/// Directories inside the jail made 0700 and given to uid:gid, in this order.
pub const JAIL_FOLDERS: [&str; 4] = ["/", "/dev", "/dev/net", "/run"];

/// A device node the jailer makes inside the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path inside the jail.
    pub path: &'static str,
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
}

/// `/dev/net/tun`, 10:200 (a failure is fatal).
pub const TUN: DeviceNode = DeviceNode { path: "/dev/net/tun", major: 10, minor: 200 };
/// `/dev/kvm`, 10:232 (a failure is fatal).
pub const KVM: DeviceNode = DeviceNode { path: "/dev/kvm", major: 10, minor: 232 };
/// `/dev/urandom`, 1:9 (a failure is only a warning on stdout).
pub const URANDOM: DeviceNode = DeviceNode { path: "/dev/urandom", major: 1, minor: 9 };
/// `/dev/userfaultfd`, major 10, minor from `/proc/misc` (made only when the host has it).
pub const USERFAULTFD_PATH: &str = "/dev/userfaultfd";

/// Errors making the jail's files, worded and named as the jailer's.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A directory could not be created.
    #[error("Failed to create directory {}: {}", unquoted(.0), .1)]
    CreateDir(PathBuf, io::Error),
    /// A file could not be opened.
    #[error("Failed to open {0}: {1}")]
    Open(PathBuf, io::Error),
    /// A file's metadata could not be read.
    #[error("Cannot get metadata for a file: {0}: {1}")]
    Metadata(PathBuf, io::Error),
    /// The copy's destination has other links.
    #[error("Detected hard link at: {0}")]
    HardLink(PathBuf),
    /// chown failed.
    #[error("Failed to change owner for {0}: {1}")]
    ChangeFileOwner(PathBuf, io::Error),
    /// The exec file could not be copied.
    #[error("Failed to copy {} to {}: {}", unquoted(.0), unquoted(.1), .2)]
    Copy(PathBuf, PathBuf, io::Error),
    /// chmod failed.
    #[error("Failed to change permissions on {0}: {1}")]
    Chmod(PathBuf, io::Error),
    /// mknod failed.
    #[error("Failed to create {1} via mknod inside the jail: {0}")]
    MknodDev(io::Error, String),
    /// The PID file could not be created (it exists, for one).
    #[error("Failed to open file {}: {}", unquoted(.0), .1)]
    FileOpen(PathBuf, io::Error),
    /// The PID file could not be written.
    #[error("Failed to write to {}: {}", unquoted(.0), .1)]
    Write(PathBuf, io::Error),
    /// The exec file's path has no file name.
    #[error("Failed to extract filename from path {}", unquoted(.0))]
    ExtractFileName(PathBuf),
}

fn os_error(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Creates `<base>/<exec file name>/<id>/root` and its parents (nothing happens to those that
/// exist).
pub fn create_chroot_dir(dir: &Path) -> Result<(), JailError> {
    fs::create_dir_all(dir).map_err(|e| JailError::CreateDir(dir.to_path_buf(), e))
}

/// Copies `exec_file` into `chroot_dir` under its own name, with its mode, owned by uid:gid;
/// returns the name. The destination is opened for writing without truncation and without
/// following a symlink; a destination with other hard links is refused. An existing copy that
/// a process is running fails with "Text file busy".
pub fn copy_exec_file(exec_file: &Path, chroot_dir: &Path, uid: u32, gid: u32) -> Result<String, JailError> {
    let name = exec_file.file_name().ok_or_else(|| JailError::ExtractFileName(exec_file.to_path_buf()))?;
    let dst = chroot_dir.join(name);
    let mut src = fs::File::open(exec_file).map_err(|e| JailError::Open(exec_file.to_path_buf(), e))?;
    let mode = src.metadata().map_err(|e| JailError::Metadata(exec_file.to_path_buf(), e))?.mode();
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&dst)
        .map_err(|e| JailError::Open(dst.clone(), e))?;
    let links = out.metadata().map_err(|e| JailError::Metadata(dst.clone(), e))?.nlink();
    if links > 1 {
        return Err(JailError::HardLink(dst));
    }
    fchown(&out, Some(uid), Some(gid)).map_err(|e| JailError::ChangeFileOwner(dst.clone(), e))?;
    io::copy(&mut src, &mut out).map_err(|e| JailError::Copy(exec_file.to_path_buf(), dst.clone(), e))?;
    Ok(name.to_string_lossy().into_owned())
}

/// Makes [`JAIL_FOLDERS`] (inside the jail) exist, 0700, owned by uid:gid.
pub fn setup_folders(uid: u32, gid: u32) -> Result<(), JailError> {
    for folder in JAIL_FOLDERS {
        let path = Path::new(folder);
        fs::create_dir_all(path).map_err(|e| JailError::CreateDir(path.to_path_buf(), e))?;
        fs::set_permissions(path, Permissions::from_mode(0o700))
            .map_err(|e| JailError::Chmod(path.to_path_buf(), e))?;
        chown(path, Some(uid), Some(gid)).map_err(|e| JailError::ChangeFileOwner(path.to_path_buf(), e))?;
    }
    Ok(())
}

/// Makes one character device node, 0600, owned by uid:gid.
fn make_node(path: &str, major: u64, minor: u64, uid: u32, gid: u32) -> Result<(), JailError> {
    mknod(path, SFlag::S_IFCHR, Mode::S_IRUSR | Mode::S_IWUSR, makedev(major, minor))
        .map_err(|e| JailError::MknodDev(os_error(e), path.to_string()))?;
    chown(path, Some(uid), Some(gid)).map_err(|e| JailError::ChangeFileOwner(PathBuf::from(path), e))
}

/// Makes the jail's device nodes (inside the jail), in the jailer's order.
pub fn make_device_nodes(uid: u32, gid: u32, userfaultfd_minor: Option<u32>) -> Result<(), JailError> {
    for node in [TUN, KVM] {
        make_node(node.path, node.major, node.minor, uid, gid)?;
    }
    if let Err(e) = make_node(URANDOM.path, URANDOM.major, URANDOM.minor, uid, gid) {
        println!("Warning! Could not create /dev/urandom device inside jailer: {e}.");
        println!("MMDS version 2 will not be available to use.");
    }
    if let Some(minor) = userfaultfd_minor {
        make_node(USERFAULTFD_PATH, 10, u64::from(minor), uid, gid)?;
    }
    Ok(())
}

/// The PID file for the jailed exec file (`/firecracker` → `/firecracker.pid`).
pub fn pid_file_path(jailed_exec: &Path) -> PathBuf {
    PathBuf::from(format!("{}.pid", jailed_exec.display()))
}

/// Writes `pid` (no newline) to a new file at `path`; an existing file is an error.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<(), JailError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| JailError::FileOpen(path.to_path_buf(), e))?;
    write!(f, "{pid}").map_err(|e| JailError::Write(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_keeps_the_mode_refuses_hard_links_and_does_not_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("firecracker");
        fs::write(&src, b"new").unwrap();
        fs::set_permissions(&src, Permissions::from_mode(0o750)).unwrap();
        let root = dir.path().join("root");
        create_chroot_dir(&root).unwrap();
        let me = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        assert_eq!(copy_exec_file(&src, &root, me.0, me.1).unwrap(), "firecracker");
        let copy = root.join("firecracker");
        assert_eq!(fs::read(&copy).unwrap(), b"new");
        assert_eq!(fs::metadata(&copy).unwrap().mode() & 0o777, 0o750 & !current_umask());
        // A longer old copy keeps its tail, as the jailer opens without O_TRUNC.
        fs::write(&copy, b"older copy").unwrap();
        copy_exec_file(&src, &root, me.0, me.1).unwrap();
        assert_eq!(fs::read(&copy).unwrap(), b"newer copy");
        fs::hard_link(&copy, dir.path().join("other")).unwrap();
        let e = copy_exec_file(&src, &root, me.0, me.1).unwrap_err();
        assert_eq!(e.to_string(), format!("Detected hard link at: {}", copy.display()));
        assert_eq!(format!("{e:?}"), format!("HardLink({copy:?})"));
    }

    /// The umask, read without changing it (tests run in parallel threads).
    fn current_umask() -> u32 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:")).unwrap();
        u32::from_str_radix(line.trim(), 8).unwrap()
    }

    #[test]
    fn the_pid_file_has_no_newline_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let exec = dir.path().join("firecracker");
        let pid_file = pid_file_path(&exec);
        assert_eq!(pid_file, dir.path().join("firecracker.pid"));
        write_pid_file(&pid_file, 1234).unwrap();
        assert_eq!(fs::read_to_string(&pid_file).unwrap(), "1234");
        let e = write_pid_file(&pid_file, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Failed to open file {}: File exists (os error 17)", pid_file.display())
        );
    }

    #[test]
    fn error_texts() {
        let e = JailError::Open(
            "/srv/jailer/firecracker/a/root/firecracker".into(),
            io::Error::from_raw_os_error(26),
        );
        assert_eq!(
            e.to_string(),
            "Failed to open /srv/jailer/firecracker/a/root/firecracker: Text file busy (os error 26)"
        );
        assert_eq!(
            format!("{e:?}"),
            "Open(\"/srv/jailer/firecracker/a/root/firecracker\", Os { code: 26, kind: ExecutableFileBusy, message: \"Text file busy\" })"
        );
        let e = JailError::MknodDev(io::Error::from_raw_os_error(17), "/dev/net/tun".into());
        assert_eq!(
            e.to_string(),
            "Failed to create /dev/net/tun via mknod inside the jail: File exists (os error 17)"
        );
    }
}
