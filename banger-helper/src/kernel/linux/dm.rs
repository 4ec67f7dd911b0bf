//! Device-mapper on Linux: the `devicemapper` crate's ioctls on `/dev/mapper/control`, and the
//! block device nodes of the targets in the helper's node directory.
//!
//! Both are opened once, at start, by [`LinuxDm::detect`], while the helper still has every
//! privilege: the control device (the dm ioctls themselves need `CAP_SYS_ADMIN`, which the helper
//! keeps only when this found device-mapper) and the node directory, made `root:root` 0711 on a
//! path whose every directory is root's and writable by no one else. Nodes are made, examined and
//! removed relative to that directory's descriptor (`mknodat`, `fchownat`, `fstatat`,
//! `unlinkat`): the helper never resolves a node's path again.
//!
//! No udev is needed, nor waited for: where there is none (some hosts, the kernel tier) no
//! `/dev/mapper/NAME` appears, and the helper makes its own node anyway. Every target is made
//! with udev's rules for it turned off (`DmOptions::private`), and the helper's seccomp filter
//! refuses the SysV semaphores the crate would wait on udev with, so a udev that does not answer
//! can never hold an operation up.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use devicemapper::{DM, DevId, DmError, DmName, DmOptions, DmUuid};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag};
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use crate::kernel::{DevNum, Dm, DmStatus, KResult, KernelError, NODE_MODE, NodeStatus, snapshot_params};

/// The mode of the node directory: everyone may reach a node by its path (and the node's own
/// mode decides), no one but root may list or change the directory.
pub const NODE_DIR_MODE: u32 = 0o711;

/// The transient target whose table makes the kernel load the snapshot target's module.
const PROBE_TARGET: &str = "banger-probe";

/// Why device-mapper cannot be used here. Only [`Unavailable::NodeDir`] stops the helper.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// No `/dev/mapper/control`, or it cannot be opened.
    #[error("cannot open /dev/mapper/control ({0})")]
    NoControl(String),
    /// device-mapper does not answer.
    #[error("device-mapper does not answer its version request ({0})")]
    NoAnswer(String),
    /// The snapshot target is missing and the kernel could not load it.
    #[error(
        "the kernel has no dm-snapshot target and could not load it (modprobe dm-snapshot, or a kernel built with it)"
    )]
    NoSnapshot,
    /// The node directory is unusable.
    #[error(transparent)]
    NodeDir(#[from] NodeDirError),
}

/// Why the node directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeDirError {
    /// Not an absolute path.
    #[error("the node directory {0} must be an absolute path; choose another --node-dir")]
    Relative(PathBuf),
    /// Something on the way is not a directory (links are refused too).
    #[error(
        "{0} is on the way to the helper's node directory but is not a directory; choose another --node-dir"
    )]
    NotADirectory(PathBuf),
    /// Something on the way is not root's.
    #[error(
        "{path} is owned by uid {uid}, not root: its owner could replace the device nodes the helper hands out; make it root's (chown root {path}) or choose another --node-dir"
    )]
    NotRoots {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// A directory on the way may be written by others than root.
    #[error(
        "{path} (mode {mode:04o}) is writable by others than root, who could replace the device nodes the helper hands out; remove their write permission (chmod go-w {path}) or choose another --node-dir"
    )]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A system call failed.
    #[error("cannot prepare the node directory {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The node directory, open.
#[derive(Debug)]
struct NodeDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl NodeDir {
    /// Node `name` (at `path`), unless there is none; a link is not followed.
    fn stat(&self, name: &str, path: &str) -> KResult<Option<nix::sys::stat::FileStat>> {
        match nix::sys::stat::fstatat(self.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(KernelError::errno("stat", path, e)),
        }
    }

    /// Sets node `name` (at `path`) to [`NODE_MODE`].
    fn chmod(&self, name: &str, path: &str) -> KResult<()> {
        let mode = Mode::from_bits_truncate(NODE_MODE);
        nix::sys::stat::fchmodat(self.fd.as_fd(), name, mode, FchmodatFlags::FollowSymlink)
            .map_err(|e| KernelError::errno("chmod", path, e))
    }

    /// Gives node `name` (at `path`) to `uid`, group root.
    fn chown(&self, name: &str, path: &str, uid: u32) -> KResult<()> {
        let (uid, gid) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(0)));
        nix::unistd::fchownat(self.fd.as_fd(), name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| KernelError::errno("chown", path, e))
    }
}

/// Device-mapper and the node directory, as found at start.
pub struct LinuxDm {
    /// `/dev/mapper/control`, when device-mapper with the snapshot target was found.
    ctl: Option<DM>,
    /// The node directory, when device-mapper was found.
    dir: Option<NodeDir>,
}

impl std::fmt::Debug for LinuxDm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxDm").field("found", &self.ctl.is_some()).field("dir", &self.dir).finish()
    }
}

fn kerr(op: &'static str, object: &str, e: DmError) -> KernelError {
    match &e {
        DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => {
            KernelError::errno(op, object, **errno)
        }
        _ => KernelError::other(op, object, e.to_string()),
    }
}

fn dm_name(name: &str) -> KResult<&DmName> {
    DmName::new(name).map_err(|e| KernelError::other("device-mapper name", name, e.to_string()))
}

/// Whether the kernel lists the snapshot target.
fn has_snapshot(dm: &DM) -> bool {
    dm.list_versions().is_ok_and(|targets| targets.iter().any(|(name, ..)| name == "snapshot"))
}

/// Has the kernel load the snapshot target's module (`dm-snapshot`) the way it does for any
/// table naming a target it lacks: a table of that type, with arguments the target refuses, is
/// loaded into a transient target that is removed at once (a leftover of a helper killed here
/// goes first).
fn load_snapshot_target(dm: &DM) {
    let Ok(name) = DmName::new(PROBE_TARGET) else { return };
    let id = DevId::Name(name);
    let _ = dm.device_remove(&id, DmOptions::private());
    if dm.device_create(name, None, DmOptions::private()).is_ok() {
        let _ = dm.table_load(&id, &[(0, 1, "snapshot".to_owned(), String::new())], DmOptions::private());
        if let Err(e) = dm.device_remove(&id, DmOptions::private()) {
            tracing::warn!("cannot remove the transient target {PROBE_TARGET}: {e}");
        }
    }
}

impl LinuxDm {
    /// No device-mapper.
    pub fn absent() -> Self {
        LinuxDm { ctl: None, dir: None }
    }

    /// Looks for device-mapper with the snapshot target, with every privilege (before they are
    /// dropped): opens `/dev/mapper/control`, asks for its version, has the kernel load the
    /// snapshot target if it is missing, and then makes or checks the node directory
    /// `node_dir` and opens it. Without device-mapper the directory is not touched.
    pub fn detect(node_dir: &Path) -> Result<Self, Unavailable> {
        let dm = DM::new().map_err(|e| Unavailable::NoControl(e.to_string()))?;
        let (major, minor, patch) = dm.version().map_err(|e| Unavailable::NoAnswer(e.to_string()))?;
        if !has_snapshot(&dm) {
            load_snapshot_target(&dm);
            if !has_snapshot(&dm) {
                return Err(Unavailable::NoSnapshot);
            }
        }
        let dir = NodeDir { path: node_dir.to_owned(), fd: prepare_node_dir(node_dir)? };
        tracing::info!(
            "device-mapper {major}.{minor}.{patch} with the snapshot target; nodes in {}",
            node_dir.display()
        );
        Ok(LinuxDm { ctl: Some(dm), dir: Some(dir) })
    }

    /// The node directory, when device-mapper was found.
    pub fn node_dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(|d| d.path.as_path())
    }

    fn ctl(&self, op: &'static str, object: &str) -> KResult<&DM> {
        self.ctl.as_ref().ok_or_else(|| KernelError::errno(op, object, Errno::ENODEV))
    }

    fn dir(&self, op: &'static str, object: &str) -> KResult<&NodeDir> {
        self.dir.as_ref().ok_or_else(|| KernelError::errno(op, object, Errno::ENODEV))
    }
}

/// Makes or checks the node directory and opens it: every existing directory on the way must be
/// a directory (not a link), root's, and writable by no one else unless sticky; missing ones are
/// made `root:root` 0755, the node directory itself `root:root` [`NODE_DIR_MODE`] (an existing
/// one of root's is set to it).
pub fn prepare_node_dir(dir: &Path) -> Result<OwnedFd, NodeDirError> {
    if !dir.is_absolute() {
        return Err(NodeDirError::Relative(dir.to_owned()));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| NodeDirError::Io { path, source }
    };
    let chain: Vec<&Path> = dir.ancestors().collect::<Vec<_>>().into_iter().rev().collect();
    for p in chain {
        let m = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Made root's alone, then opened up (the umask cut the mode), then checked.
                match std::fs::DirBuilder::new().mode(0o700).create(p) {
                    Ok(()) => {
                        std::os::unix::fs::lchown(p, Some(0), Some(0)).map_err(io(p))?;
                        let mode = if p == dir { NODE_DIR_MODE } else { 0o755 };
                        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io(p))?;
                    }
                    // Made by someone else meanwhile: it must pass the checks like any other.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io(p)(e)),
                }
                std::fs::symlink_metadata(p).map_err(io(p))?
            }
            Err(e) => return Err(io(p)(e)),
        };
        if !m.file_type().is_dir() {
            return Err(NodeDirError::NotADirectory(p.to_owned()));
        }
        if m.uid() != 0 {
            return Err(NodeDirError::NotRoots { path: p.to_owned(), uid: m.uid() });
        }
        let mode = m.mode() & 0o7777;
        if p == dir {
            if mode != NODE_DIR_MODE {
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    p,
                    Mode::from_bits_truncate(NODE_DIR_MODE),
                    FchmodatFlags::FollowSymlink,
                )
                .map_err(|e| io(p)(e.into()))?;
            }
        } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(NodeDirError::Writable { path: p.to_owned(), mode });
        }
    }
    let fd = nix::fcntl::open(
        dir,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(dir)(e.into()))?;
    Ok(fd)
}

fn status_of(st: &nix::sys::stat::FileStat) -> NodeStatus {
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    NodeStatus {
        block: kind == SFlag::S_IFBLK,
        rdev: DevNum { major: libc::major(st.st_rdev), minor: libc::minor(st.st_rdev) },
        uid: st.st_uid,
        mode: st.st_mode & 0o7777,
    }
}

impl Dm for LinuxDm {
    fn probe(&self) -> bool {
        let (Some(dm), Some(_)) = (&self.ctl, &self.dir) else { return false };
        let caps = [caps::Capability::CAP_MKNOD, caps::Capability::CAP_CHOWN];
        dm.version().is_ok()
            && has_snapshot(dm)
            && caps.iter().all(|c| caps::has_cap(None, caps::CapSet::Effective, *c).unwrap_or(false))
    }

    fn create_snapshot(
        &self,
        name: &str,
        uuid: &str,
        sectors: u64,
        origin: DevNum,
        cow: DevNum,
    ) -> KResult<DevNum> {
        let dm = self.ctl("DM_DEV_CREATE", name)?;
        let dm_uuid =
            DmUuid::new(uuid).map_err(|e| KernelError::other("device-mapper uuid", uuid, e.to_string()))?;
        let id = DevId::Name(dm_name(name)?);
        let info = dm
            .device_create(dm_name(name)?, Some(dm_uuid), DmOptions::private())
            .map_err(|e| kerr("DM_DEV_CREATE", name, e))?;
        let table = [(0, sectors, "snapshot".to_owned(), snapshot_params(origin, cow))];
        let made = dm
            .table_load(&id, &table, DmOptions::private())
            .map_err(|e| kerr("DM_TABLE_LOAD", name, e))
            .and_then(|_| {
                dm.device_suspend(&id, DmOptions::private()).map_err(|e| kerr("DM_DEV_SUSPEND", name, e))
            });
        if let Err(e) = made {
            if let Err(undo) = dm.device_remove(&id, DmOptions::private()) {
                tracing::error!("cannot remove {name} after a failed creation: {undo}");
            }
            return Err(e);
        }
        let dev = info.device();
        Ok(DevNum { major: dev.major, minor: dev.minor })
    }

    fn remove(&self, name: &str) -> KResult<()> {
        let dm = self.ctl("DM_DEV_REMOVE", name)?;
        dm.device_remove(&DevId::Name(dm_name(name)?), DmOptions::private())
            .map(|_| ())
            .map_err(|e| kerr("DM_DEV_REMOVE", name, e))
    }

    fn info(&self, name: &str) -> KResult<Option<DmStatus>> {
        // Without device-mapper there is no target.
        let Some(dm) = &self.ctl else { return Ok(None) };
        match dm.device_info(&DevId::Name(dm_name(name)?)) {
            Ok(info) => Ok(Some(DmStatus {
                dev: DevNum { major: info.device().major, minor: info.device().minor },
                uuid: info.uuid().map(|u| u.to_string()).unwrap_or_default(),
            })),
            Err(e) => match kerr("DM_DEV_STATUS", name, e) {
                e if e.errno_value() == Some(Errno::ENXIO) => Ok(None),
                e => Err(e),
            },
        }
    }

    fn list(&self) -> KResult<Vec<String>> {
        let Some(dm) = &self.ctl else { return Ok(Vec::new()) };
        let devices = dm.list_devices().map_err(|e| kerr("DM_LIST_DEVICES", "device-mapper", e))?;
        Ok(devices.into_iter().map(|(name, ..)| name.to_string()).collect())
    }

    fn node_path(&self, name: &str) -> String {
        match &self.dir {
            Some(d) => d.path.join(name).display().to_string(),
            None => name.to_owned(),
        }
    }

    fn make_node(&self, name: &str, dev: DevNum, owner: u32) -> KResult<()> {
        self.release_node(name)?;
        let dir = self.dir("mknod", name)?;
        let path = self.node_path(name);
        nix::sys::stat::mknodat(
            dir.fd.as_fd(),
            name,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(NODE_MODE),
            libc::makedev(dev.major, dev.minor),
        )
        .map_err(|e| KernelError::errno("mknod", path.clone(), e))?;
        // The mode is set while root owns the node (mknod's is cut by the umask), then the owner.
        dir.chmod(name, &path)?;
        dir.chown(name, &path, owner)
    }

    fn node(&self, name: &str) -> KResult<Option<NodeStatus>> {
        let dir = self.dir("stat", name)?;
        Ok(dir.stat(name, &self.node_path(name))?.map(|st| status_of(&st)))
    }

    fn release_node(&self, name: &str) -> KResult<()> {
        // Without device-mapper the helper made no node.
        let Some(dir) = &self.dir else { return Ok(()) };
        let path = self.node_path(name);
        let Some(st) = dir.stat(name, &path)? else { return Ok(()) };
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFLNK {
            // The inode, and so every hard link its owner may have made, goes back to root first.
            dir.chown(name, &path, 0)?;
            dir.chmod(name, &path)?;
        }
        match nix::unistd::unlinkat(dir.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(KernelError::errno("unlink", path, e)),
        }
    }

    fn nodes(&self) -> KResult<Vec<String>> {
        let Some(dir) = &self.dir else { return Ok(Vec::new()) };
        let object = dir.path.display().to_string();
        let mut d = nix::dir::Dir::openat(
            dir.fd.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| KernelError::errno("open", object.clone(), e))?;
        let mut names = Vec::new();
        for entry in d.iter() {
            let entry = entry.map_err(|e| KernelError::errno("readdir", object.clone(), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_directory_is_made_roots_and_only_on_a_safe_path() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: the node directory checks need root (owners)");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = base.path().join("a/nodes");
        prepare_node_dir(&dir).unwrap();
        let m = std::fs::metadata(&dir).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, NODE_DIR_MODE));
        assert_eq!(std::fs::metadata(base.path().join("a")).unwrap().mode() & 0o7777, 0o755);
        // An existing one of root's is set to the mode again.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_node_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, NODE_DIR_MODE);
        // Someone else's directory, one on the way others may write, a link: refused.
        std::os::unix::fs::chown(&dir, Some(1000), None).unwrap();
        assert!(matches!(prepare_node_dir(&dir), Err(NodeDirError::NotRoots { uid: 1000, .. })));
        std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
        std::fs::set_permissions(base.path().join("a"), std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = prepare_node_dir(&dir).unwrap_err();
        assert!(matches!(e, NodeDirError::Writable { mode: 0o775, .. }), "{e}");
        assert!(e.to_string().contains("chmod go-w"), "{e}");
        std::fs::set_permissions(base.path().join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&dir, base.path().join("link")).unwrap();
        assert!(matches!(prepare_node_dir(&base.path().join("link")), Err(NodeDirError::NotADirectory(_))));
        assert!(matches!(prepare_node_dir(Path::new("rel/dir")), Err(NodeDirError::Relative(_))));
    }

    #[test]
    fn without_device_mapper_there_is_nothing_to_see_and_nothing_is_made() {
        let dm = LinuxDm::absent();
        assert!(!dm.probe());
        assert_eq!(dm.info("banger-x").unwrap(), None);
        assert!(dm.list().unwrap().is_empty() && dm.nodes().unwrap().is_empty());
        dm.release_node("banger-x").unwrap();
        let e = dm.create_snapshot("banger-x", "BANGER-x", 8, DevNum::default(), DevNum::default());
        assert_eq!(e.unwrap_err().errno_value(), Some(Errno::ENODEV));
        assert!(dm.make_node("banger-x", DevNum::default(), 1000).is_err());
    }
}
