//! Jails: building a VM's jail, starting Firecracker's jailer in it, killing its VMM, removing the
//! jail, listing jails. These are blocking functions run with root's privileges by the helper's
//! launcher process; [`JailConfig::new`] runs in the helper before it locks itself down.
//!
//! A launch ([`launch`]), step by step (SECURITY.md holds each step to why it is safe):
//!
//! 1. Make `<base>/<exec name>/<id>` (root, 0755; refused when it exists) and in it `root/` and
//!    `root/run/` (root, 0700): nothing of the jail is reachable by anyone but root yet.
//! 2. Place the files from the descriptors, in [`JailFiles`] order ([`files`]): kernel and initrd
//!    hard-linked by descriptor when other-readable, else copied (jail uid, 0400); a regular-file
//!    drive hard-linked, and again in `drives/` beside `root/` (root's, 0700: the link removal
//!    drops the ACL entry through), the jail uid given `rw` by an ACL entry set through the descriptor; a
//!    block-device drive as a node with the same rdev (jail uid, 0600).
//! 3. Make the serial console's FIFO `run/serial` (jail uid, 0600, ACL `u:<caller>:r`).
//! 4. Hand the TAP to the jail uid (`TUNSETOWNER`).
//! 5. Make the caller's parent cgroup with their totals ([`cgroup`]).
//! 6. Run the jailer ([`command`]): it copies Firecracker in, makes the device nodes, chowns
//!    `root/`, `dev/`, `run/` to the jail uid (0700), makes the VM's cgroup, pivots into the jail,
//!    daemonizes in a new PID namespace and execs Firecracker as the jail uid.
//! 7. Read its PID file and hold the VMM by a pidfd, checked to run as the jail uid.
//! 8. Wait (bounded) for the API socket.
//! 9. Give the caller `--x` on `root/` and `run/`, `rw` on the API socket, and a default ACL on
//!    `run/` so sockets the VMM makes there later are theirs too.
//!
//! Any failure undoes everything made ([`remove`], and the TAP back to root).

pub mod acl;
pub mod cgroup;
pub mod command;
pub mod files;
pub mod process;
pub mod tree;

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use banger_protocol::jail_paths;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, fstatat, mkdirat};

use crate::kernel::{JailOrder, JailState, KResult, KernelError};
pub use cgroup::{CgroupSetupError, Hierarchies};

/// How long the jailer itself may run (it exits as soon as it has daemonized).
pub const JAILER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a started VMM has to write its PID file and make its API socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed VMM has to end.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Serialises making and removing users' parent cgroups, so that a parent removed as empty is
/// never one a launch has just made (the jailer would make it again without the user's limits).
static CGROUPS: Mutex<()> = Mutex::new(());

/// Everything the jail functions need, from the policy's `[jailer]` and what was found at start.
#[derive(Debug)]
pub struct JailConfig {
    jailer: PathBuf,
    firecracker: PathBuf,
    exec_name: String,
    base: PathBuf,
    base_fd: OwnedFd,
    uids: (u32, u32),
    cgroups: Hierarchies,
    cgroup_parent: String,
    initial_netns: bool,
}

/// Why jails cannot be made here.
#[derive(Debug, thiserror::Error)]
pub enum JailSetupError {
    /// The chroot base cannot be opened.
    #[error("cannot open the jailer's chroot base {}", .0.display())]
    Base(PathBuf, #[source] std::io::Error),
    /// The chroot base may be changed by someone other than root.
    #[error(
        "the jailer's chroot base {} must be a directory owned by root and writable by nobody else",
        .0.display()
    )]
    BaseUnsafe(PathBuf),
    /// A binary is missing.
    #[error("cannot use {}: it must be an existing regular file", .0.display())]
    Binary(PathBuf, #[source] std::io::Error),
    /// `/proc` cannot be read.
    #[error("cannot read {0}")]
    Proc(&'static str, #[source] std::io::Error),
    /// No cgroup hierarchy fits the policy.
    #[error(transparent)]
    Cgroup(#[from] CgroupSetupError),
}

fn regular_file(path: &Path) -> Result<PathBuf, JailSetupError> {
    let canonical = fs::canonicalize(path).map_err(|e| JailSetupError::Binary(path.to_owned(), e))?;
    let meta = fs::metadata(&canonical).map_err(|e| JailSetupError::Binary(path.to_owned(), e))?;
    if !meta.is_file() {
        let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
        return Err(JailSetupError::Binary(path.to_owned(), e));
    }
    Ok(canonical)
}

/// The inode number Linux (6.x) gives the initial network namespace (`PROC_NET_INIT_INO`).
const NET_INIT_INO: u64 = 0xEFFF_FFF9;

/// Whether the calling thread is in the initial network namespace: PID 1's, or where PID 1's
/// cannot be read (a sandbox), the one with the kernel's fixed inode number. Where neither
/// answers right (an older kernel with PID 1 hidden) the answer is "not initial", and the jailer
/// is told to join the namespace it is in already: harmless.
fn in_initial_netns() -> Result<bool, JailSetupError> {
    let ns = |p: &'static str| fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let mine =
        ns("/proc/thread-self/ns/net").map_err(|e| JailSetupError::Proc("/proc/thread-self/ns/net", e))?;
    Ok(match ns("/proc/1/ns/net") {
        Ok(init) => mine == init,
        Err(_) => mine.1 == NET_INIT_INO,
    })
}

impl JailConfig {
    /// Checks the policy's `[jailer]` against this machine: the binaries exist, the chroot base
    /// is a root-owned directory nobody else may write (opened now and used by descriptor), the
    /// cgroup hierarchy for the policy's version, whether the calling thread runs in a network
    /// namespace other than the initial one (then the jailer is given `--netns`).
    pub fn new(policy: &banger_policy::Jailer) -> Result<JailConfig, JailSetupError> {
        let jailer = regular_file(&policy.jailer)?;
        let firecracker = regular_file(&policy.firecracker)?;
        let exec_name =
            firecracker.file_name().and_then(|n| n.to_str()).map(str::to_owned).ok_or_else(|| {
                JailSetupError::Binary(firecracker.clone(), std::io::ErrorKind::InvalidInput.into())
            })?;
        let base = fs::canonicalize(&policy.chroot_base)
            .map_err(|e| JailSetupError::Base(policy.chroot_base.clone(), e))?;
        let base_fd = nix::fcntl::open(
            &base,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| JailSetupError::Base(base.clone(), e.into()))?;
        let st = fstat(&base_fd).map_err(|e| JailSetupError::Base(base.clone(), e.into()))?;
        if st.st_uid != 0 || st.st_mode & 0o022 != 0 {
            return Err(JailSetupError::BaseUnsafe(base));
        }
        let mounts =
            fs::read_to_string("/proc/mounts").map_err(|e| JailSetupError::Proc("/proc/mounts", e))?;
        let cgroups = cgroup::detect(policy.cgroup, &mounts, |unified| {
            fs::read_to_string(unified.join("cgroup.controllers")).unwrap_or_default()
        })?;
        Ok(JailConfig {
            jailer,
            firecracker,
            exec_name,
            base,
            base_fd,
            uids: policy.uids,
            cgroups,
            cgroup_parent: policy.cgroup_parent.clone(),
            initial_netns: in_initial_netns()?,
        })
    }

    /// The cgroup hierarchies jails use.
    pub fn cgroups(&self) -> &Hierarchies {
        &self.cgroups
    }

    /// The chroot base (canonical).
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// `<base>/<exec name>/<id>`.
    fn jail_dir(&self, id: &str) -> PathBuf {
        self.base.join(&self.exec_name).join(id)
    }

    /// The exec file name's directory under the base, made (root, 0755 whatever the umask:
    /// callers traverse it to their jails' sockets) when missing.
    fn exec_dir(&self, create: bool) -> Result<OwnedFd, Errno> {
        let made = create
            && match mkdirat(&self.base_fd, self.exec_name.as_str(), Mode::from_bits_truncate(0o755)) {
                Ok(()) => true,
                Err(Errno::EEXIST) => false,
                Err(e) => return Err(e),
            };
        let fd = tree::open_dir(&self.base_fd, &self.exec_name)?;
        if made {
            fchmod(&fd, Mode::from_bits_truncate(0o755))?;
        }
        let st = fstat(&fd)?;
        if st.st_uid != 0 || st.st_mode & 0o022 != 0 {
            return Err(Errno::EPERM);
        }
        Ok(fd)
    }

    fn is_jail_uid(&self, uid: u32) -> bool {
        uid != 0 && (self.uids.0..=self.uids.1).contains(&uid)
    }
}

/// The longest jail id (the jailer's own limit).
pub const MAX_ID_LEN: usize = 64;

/// Whether `id` is a jail id (the jailer's rule, narrowed to lowercase as the helper derives
/// them): 1–[`MAX_ID_LEN`] of `[a-z0-9-]`.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The host path of jail `id`'s root: `<base>/<exec name>/<id>/root`.
pub fn root(cfg: &JailConfig, id: &str) -> PathBuf {
    cfg.jail_dir(id).join("root")
}

fn inside(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// The API socket's name in `run/`.
fn socket_name() -> &'static str {
    Path::new(jail_paths::API_SOCKET).file_name().and_then(|n| n.to_str()).unwrap_or("firecracker.socket")
}

/// The serial FIFO's name in `run/`.
fn serial_name() -> &'static str {
    Path::new(jail_paths::SERIAL).file_name().and_then(|n| n.to_str()).unwrap_or("serial")
}

/// The jail's directories as descriptors: the jail directory, `root/` and `root/run/`.
struct Dirs {
    jail: OwnedFd,
    root: OwnedFd,
    run: OwnedFd,
}

fn make_dir(parent: &OwnedFd, name: &str, mode: u32) -> Result<OwnedFd, Errno> {
    mkdirat(parent, name, Mode::from_bits_truncate(mode))?;
    let fd = tree::open_dir(parent, name)?;
    fchmod(&fd, Mode::from_bits_truncate(mode))?;
    Ok(fd)
}

/// Builds the jail of `order`, starts the jailer in it and returns the VMM's host PID (see the
/// module documentation for the steps). On failure nothing of the jail is left.
pub fn launch(cfg: &JailConfig, order: &JailOrder, fds: Vec<OwnedFd>) -> KResult<i32> {
    let id = order.id.as_str();
    if !valid_id(id) || !cfg.is_jail_uid(order.uid) || fds.len() != order.files.count() {
        return Err(KernelError::errno("jail launch", id, Errno::EINVAL));
    }
    // Step 1.
    let exec_dir = cfg
        .exec_dir(true)
        .map_err(|e| KernelError::errno("open jail base", cfg.base.display().to_string(), e))?;
    let jail = make_dir(&exec_dir, id, 0o755)
        .map_err(|e| KernelError::errno("make jail", cfg.jail_dir(id).display().to_string(), e))?;
    let mut tap_handed = false;
    let result = (|| {
        let root_fd =
            make_dir(&jail, "root", 0o700).map_err(|e| KernelError::errno("make jail root", id, e))?;
        let run = make_dir(&root_fd, inside(jail_paths::RUN_DIR), 0o700)
            .map_err(|e| KernelError::errno("make jail run dir", id, e))?;
        let dirs = Dirs { jail, root: root_fd, run };
        build_and_start(cfg, order, fds, &dirs, &mut tap_handed)
    })();
    match result {
        Ok(pid) => Ok(pid),
        Err(e) => {
            if let Some(tap) = order.tap.as_deref().filter(|_| tap_handed)
                && let Err(undo) = crate::kernel::linux::links::set_tap_owner(tap, 0)
            {
                tracing::warn!(tap, error = %undo, "cannot take the TAP back from a failed jail");
            }
            if let Err(undo) = remove(cfg, id, order.uid, None) {
                tracing::warn!(jail = id, error = %undo, "cannot remove a failed jail");
            }
            // The user's parent may have been made before the jailer made the VM's group in it.
            if let Ok(rel) = cgroup::checked_relative(&order.user_cgroup) {
                let _cgroups = CGROUPS.lock().unwrap_or_else(|p| p.into_inner());
                for root in cfg.cgroups.roots() {
                    if let Err(undo) = cgroup::remove_user_if_empty(&root.join(rel)) {
                        tracing::warn!(jail = id, error = %undo, "cannot remove a failed jail's user cgroup");
                    }
                }
            }
            Err(e)
        }
    }
}

fn build_and_start(
    cfg: &JailConfig,
    order: &JailOrder,
    fds: Vec<OwnedFd>,
    dirs: &Dirs,
    tap_handed: &mut bool,
) -> KResult<i32> {
    let (uid, id) = (order.uid, order.id.as_str());
    // Step 2.
    files::place(&dirs.jail, &dirs.root, &cfg.base, order, fds)?;
    // Step 3.
    files::serial_fifo(&dirs.run, serial_name(), uid, order.caller)?;
    // Step 4.
    if let Some(tap) = &order.tap {
        *tap_handed = true;
        crate::kernel::linux::links::set_tap_owner(tap, uid)?;
    }
    // Steps 5 and 6, the user's parent kept while the jailer makes the VM's group in it.
    {
        let _cgroups = CGROUPS.lock().unwrap_or_else(|p| p.into_inner());
        cfg.cgroups
            .ensure_user(&order.user_cgroup, order.user_limits)
            .map_err(|e| KernelError::io("make user cgroup", order.user_cgroup.clone(), e))?;
        let netns = (!cfg.initial_netns).then(command::thread_netns);
        let args = command::jailer_args(&command::JailerLine {
            id,
            exec_file: &cfg.firecracker,
            uid,
            chroot_base: &cfg.base,
            netns: netns.as_deref(),
            cgroup_version: cfg.cgroups.version(),
            parent_cgroup: &order.user_cgroup,
            cgroups: cfg.cgroups.vm_settings(order.shape),
        });
        run_jailer(&cfg.jailer, &args, id)?;
        // The jailer made the VM's groups with the umask it runs under (group-writable):
        // only root writes there.
        for root in cfg.cgroups.roots() {
            let group = root.join(&order.user_cgroup).join(id);
            fs::set_permissions(&group, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(|e| KernelError::io("chmod VM cgroup", group.display().to_string(), e))?;
        }
    }
    // Step 7.
    let deadline = Instant::now() + READY_TIMEOUT;
    let pid_name = format!("{}.pid", cfg.exec_name);
    let vmm = loop {
        if let Some(pid) = files::read_pid(&dirs.root, &pid_name) {
            match process::find(pid, uid).map_err(|e| KernelError::errno("pidfd_open", pid.to_string(), e))? {
                process::Found::Jailed(p) => break p,
                process::Found::Gone => {
                    return Err(KernelError::other(
                        "jail launch",
                        id,
                        format!("the VMM (PID {pid}) ended at once"),
                    ));
                }
                // Cloned but not yet exec'd as the jail uid: still the jailer's root.
                process::Found::Foreign if Instant::now() < deadline => {}
                process::Found::Foreign => {
                    return Err(KernelError::other(
                        "jail launch",
                        id,
                        format!("PID {pid} does not run as uid {uid}"),
                    ));
                }
            }
        }
        if Instant::now() > deadline {
            return Err(KernelError::errno("read jailer pid file", id, Errno::ETIMEDOUT));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Step 8.
    let socket = loop {
        match openat(
            &dirs.run,
            socket_name(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => {
                let st = fstat(&fd).map_err(|e| KernelError::errno("stat API socket", id, e))?;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
                    return Err(KernelError::errno("stat API socket", id, Errno::ENOTSOCK));
                }
                break (fd, st.st_mode);
            }
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(KernelError::errno("open API socket", id, e)),
        }
        if vmm.ended() {
            return Err(KernelError::other("jail launch", id, "the VMM ended before making its API socket"));
        }
        if Instant::now() > deadline {
            return Err(KernelError::errno("wait for API socket", id, Errno::ETIMEDOUT));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Step 9.
    grant_caller(dirs, socket, order.caller).map_err(|e| KernelError::errno("set jail ACLs", id, e))?;
    Ok(vmm.pid())
}

/// Step 9: the caller (and nobody else but root and the jail uid) may reach the sockets.
fn grant_caller(dirs: &Dirs, (socket, mode): (OwnedFd, u32), caller: u32) -> Result<(), Errno> {
    acl::grant(&dirs.root, caller, acl::X)?;
    acl::grant(&dirs.run, caller, acl::X)?;
    acl::fset(dirs.run.as_fd(), acl::DEFAULT, &acl::default_for(&[(caller, acl::R | acl::W)]).encode())?;
    let mut socket_acl = acl::Acl::from_mode(mode);
    socket_acl.set_user(caller, acl::R | acl::W);
    acl::set_via_proc(socket.as_fd(), acl::ACCESS, &socket_acl.encode())
}

/// The umask the jailer (and so the VMM) runs with. Group-writable on purpose: a unix socket's
/// mode is `0777 & ~umask` even under a default ACL, and the ACL's mask is cut to the mode's group
/// bits, so the caller's `rw` entry in `run/`'s default ACL only takes effect on sockets the VMM
/// makes later if the group bits keep `w`. The group of what the VMM makes is the jail's own gid
/// (no member); what the jailer makes as root is inside the 0700 jail root, or the VM's cgroup
/// directories, set to 0755 after it ran.
const JAILER_UMASK: libc::mode_t = 0o002;

/// Runs the jailer with an empty environment and [`JAILER_UMASK`], waits at most [`JAILER_TIMEOUT`];
/// a non-zero exit is an error carrying its first line on stderr.
fn run_jailer(jailer: &Path, args: &[String], id: &str) -> KResult<()> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(jailer);
    cmd.args(args).env_clear().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: umask is async-signal-safe and only changes the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(JAILER_UMASK);
            Ok(())
        });
    }
    let mut child =
        cmd.spawn().map_err(|e| KernelError::io("run jailer", jailer.display().to_string(), e))?;
    let deadline = Instant::now() + JAILER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(KernelError::errno("run jailer", id, Errno::ETIMEDOUT));
            }
            Err(e) => return Err(KernelError::io("wait for jailer", id, e)),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let first = stderr.lines().next().unwrap_or("no message");
    Err(KernelError::other("run jailer", id, format!("{status}: {first}")))
}

/// Kills jail `id`'s VMM (the process `pid` names, then the PID file's, any process left in the
/// VM's cgroups; the PID file only when `pid` is given), each only when it runs as `uid` and
/// through a pidfd; waits for them; then removes
/// the jail's tree (dropping `uid`'s ACL entries from linked files, never following a symlink),
/// the VM's cgroups, and the user's parent cgroup when it is left empty. A jail or part of one
/// that is not there counts as removed. Every step is tried; the first failure is returned.
pub fn remove(cfg: &JailConfig, id: &str, uid: u32, pid: Option<i32>) -> KResult<()> {
    // uid 0: the jail's uid is not known (a directory no ledger entry holds, whose jailer never
    // gave it one). Nothing is killed then, and no process may be in its cgroups.
    let unknown = uid == 0;
    if !valid_id(id) || !(unknown || cfg.is_jail_uid(uid)) || (unknown && pid.is_some()) {
        return Err(KernelError::errno("jail remove", id, Errno::EINVAL));
    }
    let mut errors: Vec<KernelError> = Vec::new();
    let exec_dir = match cfg.exec_dir(false) {
        Ok(fd) => Some(fd),
        Err(Errno::ENOENT) => None,
        Err(e) => {
            errors.push(KernelError::errno("open jail base", cfg.base.display().to_string(), e));
            None
        }
    };
    let pid_name = format!("{}.pid", cfg.exec_name);
    let pid_file = exec_dir
        .as_ref()
        .and_then(|d| tree::open_dir(d, id).ok())
        .and_then(|j| tree::open_dir(&j, "root").ok())
        .and_then(|r| files::read_pid(&r, &pid_name));
    let groups = cfg.cgroups.vm_groups(&cfg.cgroup_parent, id);
    let in_groups: Vec<i32> = groups.iter().flat_map(|(g, _)| cgroup::procs(g)).collect();
    if unknown && !in_groups.is_empty() {
        return Err(KernelError::other(
            "jail remove",
            id,
            format!("its cgroups hold processes {in_groups:?} and its uid is not known: nothing removed"),
        ));
    }
    // The PID file counts only beside the ledger's PID: without one (a leftover directory no
    // entry holds) its uid may since have been given to another VM, whose VMM the PID file of
    // this directory's jail uid could name.
    let pid_file = pid_file.filter(|_| pid.is_some());
    let mut candidates: Vec<i32> = pid.into_iter().chain(pid_file).chain(in_groups.iter().copied()).collect();
    candidates.sort_unstable();
    candidates.dedup();
    let mut found = Vec::new();
    for p in candidates {
        match process::find(p, uid) {
            Ok(process::Found::Jailed(proc)) => found.push(proc),
            // A PID (from the ledger or the PID file) since given to another process.
            Ok(process::Found::Foreign) if !in_groups.contains(&p) => {}
            // A process of another uid in the VM's own cgroup: `uid` is not this jail's.
            Ok(process::Found::Foreign) => {
                return Err(KernelError::other(
                    "jail remove",
                    id,
                    format!("process {p} in the jail's cgroup does not run as uid {uid}: nothing removed"),
                ));
            }
            Ok(process::Found::Gone) => {}
            Err(e) => errors.push(KernelError::errno("pidfd_open", p.to_string(), e)),
        }
    }
    let mut killed = Vec::new();
    for proc in found {
        match proc.kill() {
            Ok(()) => killed.push(proc),
            Err(e) => errors.push(KernelError::errno("pidfd_send_signal", proc.pid().to_string(), e)),
        }
    }
    for proc in &killed {
        match proc.wait(KILL_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => {
                errors.push(KernelError::errno("wait for VMM", proc.pid().to_string(), Errno::ETIMEDOUT))
            }
            Err(e) => errors.push(KernelError::errno("wait for VMM", proc.pid().to_string(), e)),
        }
    }
    if let Some(e) = errors.into_iter().next() {
        // A VMM that may still run keeps its jail: removing the tree under it would race it.
        return Err(e);
    }
    let mut errors: Vec<KernelError> = Vec::new();
    // The drives' ACL entries first, through the links the jail uid cannot reach: the VMM may
    // have unlinked its own.
    if let Some(jail) = exec_dir.as_ref().and_then(|d| tree::open_dir(d, id).ok())
        && let Err(e) = files::release_drives(&jail, uid)
    {
        errors.push(KernelError::errno("release jail drives", id, e));
    }
    if let Some(dir) = &exec_dir
        && let Err(e) = tree::remove_at(dir, id, uid)
    {
        errors.push(KernelError::errno("remove jail", cfg.jail_dir(id).display().to_string(), e));
    }
    {
        let _cgroups = CGROUPS.lock().unwrap_or_else(|p| p.into_inner());
        for (group, user) in &groups {
            if let Err(e) = cgroup::remove_group(group) {
                errors.push(KernelError::io("remove cgroup", group.display().to_string(), e));
            } else if let Err(e) = cgroup::remove_user_if_empty(user) {
                errors.push(KernelError::io("remove user cgroup", user.display().to_string(), e));
            }
        }
    }
    errors.into_iter().next().map_or(Ok(()), Err)
}

/// Every jail under the chroot base: its id, the PID its PID file names, and whether that
/// process still runs as the jail's uid (the owner the jailer gave its root directory).
pub fn list(cfg: &JailConfig) -> KResult<Vec<JailState>> {
    let exec_dir = match cfg.exec_dir(false) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(KernelError::errno("open jail base", cfg.base.display().to_string(), e)),
    };
    let pid_name = format!("{}.pid", cfg.exec_name);
    let entries = fs::read_dir(cfg.base.join(&cfg.exec_name))
        .map_err(|e| KernelError::io("list jails", cfg.base.display().to_string(), e))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if !valid_id(&id) {
            continue;
        }
        let Ok(jail) = tree::open_dir(&exec_dir, &id) else { continue };
        let root_dir = tree::open_dir(&jail, "root").ok();
        let owner = root_dir.as_ref().and_then(|r| fstatat(r, ".", AtFlags::empty()).ok()).map(|s| s.st_uid);
        let pid = root_dir.as_ref().and_then(|r| files::read_pid(r, &pid_name));
        let alive = match (pid, owner) {
            (Some(pid), Some(owner)) if cfg.is_jail_uid(owner) => {
                matches!(process::find(pid, owner), Ok(process::Found::Jailed(_)))
            }
            _ => false,
        };
        out.push(JailState { id, pid, alive, uid: owner.filter(|&u| cfg.is_jail_uid(u)) });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_jailers_rule_in_lowercase() {
        assert!(valid_id("bg-0123abcd"));
        assert!(valid_id(&"a".repeat(64)));
        for bad in ["", &"a".repeat(65), "bg_1", "BG-1", "a/b", "..", "a b"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    /// The jails' directory under the chroot base is made 0755 under the helper's umask (077),
    /// so that callers can reach their jails' sockets below it.
    #[test]
    fn the_exec_dir_is_traversable_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "needs root (a root-owned chroot base), and CI=true"
            );
            eprintln!("SKIPPED: needs root (a root-owned chroot base)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let base_fd =
            nix::fcntl::open(dir.path(), OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        let cfg = JailConfig {
            jailer: "/jailer".into(),
            firecracker: "/firecracker".into(),
            exec_name: "firecracker".into(),
            base: dir.path().to_path_buf(),
            base_fd,
            uids: (900_000, 900_009),
            cgroups: Hierarchies::V1 { cpu: "/cpu".into(), memory: "/memory".into() },
            cgroup_parent: "banger".into(),
            initial_netns: true,
        };
        // In a child: the umask is the whole process's.
        // SAFETY: the child makes system calls only and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
                let code = i32::from(cfg.exec_dir(true).is_err());
                // SAFETY: leaving the child without running the harness's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        let mode = fs::metadata(dir.path().join("firecracker")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        // An existing one is used as it is.
        assert!(cfg.exec_dir(true).is_ok());
        assert!(cfg.exec_dir(false).is_ok());
    }

    #[test]
    fn in_jail_names() {
        assert_eq!(socket_name(), "firecracker.socket");
        assert_eq!(serial_name(), "serial");
        assert_eq!(inside(jail_paths::RUN_DIR), "run");
        assert_eq!(inside(jail_paths::ROOT_DRIVE), "rootfs");
    }
}
