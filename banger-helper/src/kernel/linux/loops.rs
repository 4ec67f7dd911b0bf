//! Loop devices on Linux: `/dev/loop-control` to create a device for each attach and to remove it
//! after release (refused while anyone holds it open), `LOOP_CONFIGURE` to attach in one step
//! (falling back to `LOOP_SET_FD` + `LOOP_SET_STATUS64` on kernels before 5.8), never with
//! autoclear, `LOOP_GET_STATUS64` to see what a device holds, and the device nodes' owner and mode.
//!
//! The ioctls are made here rather than through the `loopdev-3` crate: it attaches in two ioctls
//! (`LOOP_SET_FD`, then `LOOP_SET_STATUS64`), so a crash between them leaves a device bound
//! without its flags, and it has neither `LOOP_CONFIGURE` nor `LOOP_CTL_REMOVE` of a given number.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use linux_raw_sys::loop_device::{self as ld, loop_config, loop_info64};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, FcntlArg, OFlag, fcntl, open};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, fchmodat, lstat};
use nix::unistd::{Gid, Uid, fchownat};

use banger_policy::FileId;

use crate::kernel::{BackingFile, DevNum, FdAccess, KResult, KernelError, LoopStatus, Loops};

nix::ioctl_write_int_bad!(loop_ctl_add, ld::LOOP_CTL_ADD);
nix::ioctl_write_int_bad!(loop_ctl_remove, ld::LOOP_CTL_REMOVE);
nix::ioctl_write_ptr_bad!(loop_configure, ld::LOOP_CONFIGURE, loop_config);
nix::ioctl_write_int_bad!(loop_set_fd, ld::LOOP_SET_FD);
nix::ioctl_write_ptr_bad!(loop_set_status64, ld::LOOP_SET_STATUS64, loop_info64);
nix::ioctl_read_bad!(loop_get_status64, ld::LOOP_GET_STATUS64, loop_info64);
nix::ioctl_none_bad!(loop_clr_fd, ld::LOOP_CLR_FD);

const LO_FLAGS_READ_ONLY: u32 = ld::LO_FLAGS_READ_ONLY as u32;

/// Loop devices under a device directory (normally `/dev`).
#[derive(Debug)]
pub struct LinuxLoops {
    dev: PathBuf,
    /// `/proc/self/mountinfo`: which filesystem a backing file is on.
    mountinfo: PathBuf,
    /// Cleared the first time the kernel refuses `LOOP_CONFIGURE` as unknown.
    configure: AtomicBool,
}

/// `statx` of a descriptor from the attributes the kernel has cached (`AT_STATX_DONT_SYNC`), so
/// a FUSE or network filesystem is not asked (it could take forever to answer).
fn statx_cached(fd: BorrowedFd<'_>) -> KResult<libc::statx> {
    // SAFETY: statx is plain old data; all-zero is valid.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let mask = libc::STATX_TYPE
        | libc::STATX_MODE
        | libc::STATX_UID
        | libc::STATX_INO
        | libc::STATX_SIZE
        | libc::STATX_MNT_ID;
    // SAFETY: the path is an empty C string, `fd` is open, `st` is writable and outlives the call.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            mask,
            &mut st,
        )
    };
    if rc != 0 {
        return Err(KernelError::errno("statx", "backing file", Errno::last()));
    }
    Ok(st)
}

/// The filesystem type of a mount in a `/proc/self/mountinfo` text: the mount with ID `mnt_id`,
/// or else the first mount of the filesystem whose device is `dev` (what `st_dev` says).
pub fn mount_fs_type(mountinfo: &str, mnt_id: Option<u64>, dev: (u32, u32)) -> Option<String> {
    let parsed = mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut l = left.split(' ');
        let id: u64 = l.next()?.parse().ok()?;
        let _parent = l.next()?;
        let (major, minor) = l.next()?.split_once(':')?;
        let dev = (major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?);
        let fs_type = right.split(' ').next()?.to_owned();
        Some((id, dev, fs_type))
    });
    let mounts: Vec<(u64, (u32, u32), String)> = parsed.collect();
    mnt_id
        .and_then(|m| mounts.iter().find(|(id, _, _)| *id == m))
        .or_else(|| mounts.iter().find(|(_, d, _)| *d == dev))
        .map(|(_, _, t)| t.clone())
}

/// Whether `uname -r` is at least 5.8, where `LOOP_CONFIGURE` appeared.
fn kernel_has_configure() -> bool {
    let Ok(u) = nix::sys::utsname::uname() else { return true };
    let release = u.release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (5, 8)
}

impl LinuxLoops {
    /// Loop devices with nodes under `dev`.
    pub fn new(dev: impl Into<PathBuf>) -> Self {
        LinuxLoops {
            dev: dev.into(),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            configure: AtomicBool::new(kernel_has_configure()),
        }
    }

    /// Runs one `/dev/loop-control` request.
    fn control(
        &self,
        op: &'static str,
        object: String,
        f: impl FnOnce(i32) -> nix::Result<i32>,
    ) -> KResult<i32> {
        let path = self.dev.join("loop-control");
        let ctl = open(&path, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| KernelError::errno("open", path.display().to_string(), e))?;
        f(ctl.as_raw_fd()).map_err(|e| KernelError::errno(op, object, e))
    }

    fn node_path(&self, n: u32) -> PathBuf {
        self.dev.join(format!("loop{n}"))
    }

    fn open_device(&self, n: u32, op: &'static str) -> KResult<OwnedFd> {
        let path = self.node_path(n);
        open(&path, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| KernelError::errno(op, path.display().to_string(), e))
    }

    /// The older two-step attach. Read-only from a writable descriptor needs a read-only one,
    /// reopened through `/proc/self/fd`.
    fn attach_two_step(
        &self,
        dev: &OwnedFd,
        object: &str,
        fd: BorrowedFd<'_>,
        read_only: bool,
    ) -> KResult<()> {
        let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| KernelError::errno("F_GETFL", object, e))?;
        let writable = OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE == OFlag::O_RDWR;
        let reopened;
        let fd = if read_only && writable {
            let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            reopened = open(proc_path.as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|e| KernelError::errno("reopen read-only", object, e))?;
            reopened.as_raw_fd()
        } else {
            fd.as_raw_fd()
        };
        // SAFETY: `dev` is an open loop device and `fd` an open descriptor, passed by value.
        unsafe { loop_set_fd(dev.as_raw_fd(), fd) }
            .map_err(|e| KernelError::errno("LOOP_SET_FD", object, e))?;
        // SAFETY: loop_info64 is plain old data; all-zero is valid (no flags, no offset).
        let info: loop_info64 = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid loop_info64 that outlives the call.
        if let Err(e) = unsafe { loop_set_status64(dev.as_raw_fd(), &info) } {
            // SAFETY: detaching the device just attached; no argument.
            let _ = unsafe { loop_clr_fd(dev.as_raw_fd()) };
            return Err(KernelError::errno("LOOP_SET_STATUS64", object, e));
        }
        Ok(())
    }
}

impl Loops for LinuxLoops {
    fn inspect(&self, fd: BorrowedFd<'_>) -> KResult<BackingFile> {
        let st = statx_cached(fd)?;
        let flags =
            fcntl(fd, FcntlArg::F_GETFL).map_err(|e| KernelError::errno("F_GETFL", "backing file", e))?;
        let flags = OFlag::from_bits_retain(flags);
        let access = if flags.contains(OFlag::O_PATH) {
            FdAccess::Path
        } else {
            match flags & OFlag::O_ACCMODE {
                f if f == OFlag::O_RDWR => FdAccess::ReadWrite,
                f if f == OFlag::O_WRONLY => FdAccess::WriteOnly,
                _ => FdAccess::ReadOnly,
            }
        };
        let mountinfo = std::fs::read_to_string(&self.mountinfo)
            .map_err(|e| KernelError::io("read", self.mountinfo.display().to_string(), e))?;
        let mnt_id = (st.stx_mask & libc::STATX_MNT_ID != 0).then_some(st.stx_mnt_id);
        let fs_type = mount_fs_type(&mountinfo, mnt_id, (st.stx_dev_major, st.stx_dev_minor))
            .unwrap_or_else(|| "unknown".to_owned());
        Ok(BackingFile {
            regular: u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFREG,
            uid: st.stx_uid,
            fs_type,
            access,
            id: FileId { dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor), ino: st.stx_ino },
            size: st.stx_size,
            rdev: (u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFBLK)
                .then_some(DevNum { major: st.stx_rdev_major, minor: st.stx_rdev_minor }),
        })
    }

    fn remove(&self, n: u32) -> KResult<()> {
        let arg = n as i32;
        // SAFETY: LOOP_CTL_REMOVE takes the device number by value.
        self.control("LOOP_CTL_REMOVE", self.node_path(n).display().to_string(), |ctl| unsafe {
            loop_ctl_remove(ctl, arg)
        })
        .map(|_| ())
    }

    fn add(&self) -> KResult<u32> {
        let object = "a new loop device";
        // SAFETY: LOOP_CTL_ADD takes the device number (-1: the lowest free) by value and returns
        // the number.
        let got = self.control("LOOP_CTL_ADD", object.to_owned(), |ctl| unsafe { loop_ctl_add(ctl, -1) })?;
        u32::try_from(got).map_err(|_| KernelError::errno("LOOP_CTL_ADD", object, Errno::ERANGE))
    }

    fn make_root_only(&self, n: u32) -> KResult<()> {
        let path = self.node_path(n);
        let object = path.display().to_string();
        // It must be a block device node.
        self.device_number(n)?;
        let (root_uid, root_gid) = (Some(Uid::from_raw(0)), Some(Gid::from_raw(0)));
        fchownat(nix::fcntl::AT_FDCWD, &path, root_uid, root_gid, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| KernelError::errno("chown", object.clone(), e))?;
        fchmodat(nix::fcntl::AT_FDCWD, &path, Mode::from_bits_truncate(0o600), FchmodatFlags::FollowSymlink)
            .map_err(|e| KernelError::errno("chmod", object, e))
    }

    fn attach(&self, n: u32, fd: BorrowedFd<'_>, read_only: bool) -> KResult<()> {
        let dev = self.open_device(n, "open loop device")?;
        let object = self.node_path(n).display().to_string();
        if self.configure.load(Ordering::Relaxed) {
            // SAFETY: loop_config is plain old data; all-zero is valid.
            let mut cfg: loop_config = unsafe { std::mem::zeroed() };
            cfg.fd = fd.as_raw_fd() as u32;
            cfg.info.lo_flags = if read_only { LO_FLAGS_READ_ONLY } else { 0 };
            // SAFETY: `cfg` is a valid loop_config that outlives the call; its fd is open.
            match unsafe { loop_configure(dev.as_raw_fd(), &cfg) } {
                Ok(_) => return Ok(()),
                Err(Errno::EINVAL | Errno::ENOTTY) => {
                    tracing::info!("LOOP_CONFIGURE refused by this kernel; attaching in two steps");
                    self.configure.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(KernelError::errno("LOOP_CONFIGURE", object, e)),
            }
        }
        self.attach_two_step(&dev, &object, fd, read_only)
    }

    fn status(&self, n: u32) -> KResult<Option<LoopStatus>> {
        let path = self.node_path(n);
        let dev = match open(&path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(d) => d,
            Err(Errno::ENOENT | Errno::ENXIO) => return Ok(None),
            Err(e) => return Err(KernelError::errno("open loop device", path.display().to_string(), e)),
        };
        // SAFETY: loop_info64 is plain old data; all-zero is valid.
        let mut info: loop_info64 = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable loop_info64 that outlives the call.
        match unsafe { loop_get_status64(dev.as_raw_fd(), &mut info) } {
            Ok(_) => Ok(Some(LoopStatus { backing_dev: info.lo_device, backing_ino: info.lo_inode })),
            Err(Errno::ENXIO) => Ok(None),
            Err(e) => Err(KernelError::errno("LOOP_GET_STATUS64", path.display().to_string(), e)),
        }
    }

    fn detach(&self, n: u32) -> KResult<()> {
        let dev = match self.open_device(n, "open loop device") {
            Ok(d) => d,
            Err(e) if matches!(e.errno_value(), Some(Errno::ENOENT | Errno::ENXIO)) => return Ok(()),
            Err(e) => return Err(e),
        };
        // SAFETY: LOOP_CLR_FD takes no argument.
        match unsafe { loop_clr_fd(dev.as_raw_fd()) } {
            Ok(_) | Err(Errno::ENXIO) => Ok(()),
            Err(e) => Err(KernelError::errno("LOOP_CLR_FD", self.node_path(n).display().to_string(), e)),
        }
    }

    fn device_number(&self, n: u32) -> KResult<DevNum> {
        let path = self.node_path(n);
        let st = lstat(&path).map_err(|e| KernelError::errno("stat", path.display().to_string(), e))?;
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFBLK {
            return Err(KernelError::other("stat", path.display().to_string(), "not a block device node"));
        }
        Ok(DevNum { major: libc::major(st.st_rdev), minor: libc::minor(st.st_rdev) })
    }

    fn has_configure(&self) -> bool {
        self.configure.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:27 / /tmp rw,nosuid shared:9 - tmpfs tmpfs rw
41 22 0:45 / /home/u/remote rw,nosuid,nodev shared:20 - fuse.sshfs u@h:/ rw,user_id=1000
42 22 0:46 / /srv/nfs rw shared:21 master:3 - nfs4 h:/export rw
";

    #[test]
    fn finds_the_filesystem_by_mount_id_then_by_device() {
        assert_eq!(mount_fs_type(MOUNTINFO, Some(41), (0, 0)).as_deref(), Some("fuse.sshfs"));
        assert_eq!(mount_fs_type(MOUNTINFO, Some(42), (254, 0)).as_deref(), Some("nfs4"));
        // A mount of another namespace: by the filesystem's device.
        assert_eq!(mount_fs_type(MOUNTINFO, Some(999), (0, 27)).as_deref(), Some("tmpfs"));
        assert_eq!(mount_fs_type(MOUNTINFO, None, (254, 0)).as_deref(), Some("ext4"));
        assert_eq!(mount_fs_type(MOUNTINFO, Some(999), (0, 99)), None);
        assert_eq!(mount_fs_type("garbage\n\n", Some(1), (0, 0)), None);
    }

    #[test]
    fn inspects_a_file_without_calling_into_its_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let loops = LinuxLoops::new("/dev");
        let b = loops.inspect(f.as_fd()).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&path).unwrap();
        assert!(b.regular);
        assert_eq!((b.uid, b.id.dev, b.id.ino, b.access), (m.uid(), m.dev(), m.ino(), FdAccess::ReadWrite));
        assert_eq!((b.size, b.rdev), (1, None));
        let fs = String::from_utf8(
            std::process::Command::new("findmnt")
                .args(["-no", "FSTYPE", "-T"])
                .arg(&path)
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert_eq!(b.fs_type, fs.trim());
        let d = std::fs::File::open(dir.path()).unwrap();
        assert!(!loops.inspect(d.as_fd()).unwrap().regular);
        let null = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(loops.inspect(null.as_fd()).unwrap().rdev, None, "a character device is no drive");
    }

    #[test]
    #[ignore = "needs root: makes a block device node"]
    fn inspects_a_block_device_node_by_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let dev = libc::makedev(7, 200);
        nix::sys::stat::mknod(&path, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), dev).unwrap();
        // O_PATH: the node is looked at, the device never opened.
        let fd = open(&path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
        let b = LinuxLoops::new("/dev").inspect(fd.as_fd()).unwrap();
        assert!(!b.regular);
        assert_eq!((b.rdev, b.access), (Some(DevNum { major: 7, minor: 200 }), FdAccess::Path));
    }
}
