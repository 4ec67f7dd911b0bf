//! Helpers for tests that run the jailer double: the statically linked Firecracker double to put
//! in a jail, a jail's paths, starting the jailer, reading the jailed VMM's process state, and
//! removing what a jail leaves behind (the jailer never does).
//!
//! The static double is built by one command, also run by `tests/run` before the suite:
//!
//! ```text
//! RUSTFLAGS='-C target-feature=+crt-static' \
//!   cargo build -p banger-tests --bin firecracker-double --target x86_64-unknown-linux-gnu
//! ```
//!
//! An explicit `--target` keeps the flag off build scripts and the normal build: the binary lands
//! in `<target dir>/x86_64-unknown-linux-gnu/debug/`. [`static_firecracker_double`] runs that
//! command (a no-op when it is up to date) and returns the binary's path as cargo reports it.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The target the static double is built for.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The flags that make it static (glibc's static libraries; no musl target is needed).
pub const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static";

/// Why the static double could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StaticDoubleError {
    /// cargo could not be run.
    #[error("cannot run cargo to build the static firecracker-double")]
    Spawn(#[source] io::Error),
    /// cargo failed.
    #[error("building the static firecracker-double failed ({0}); cargo's messages are above")]
    Build(String),
    /// cargo reported no executable.
    #[error("cargo built no firecracker-double executable for {STATIC_TARGET}")]
    NoExecutable,
    /// The executable asks for a dynamic loader.
    #[error("{0} is dynamically linked; a jail has no loader (build it with RUSTFLAGS='{STATIC_RUSTFLAGS}')")]
    NotStatic(PathBuf),
    /// The executable could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
}

/// Builds (when needed) and returns the statically linked `firecracker-double` (see the module
/// documentation). Built once per test process.
pub fn static_firecracker_double() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(|| build_static_double().map_err(|e| format!("{e}"))).clone()
}

fn build_static_double() -> Result<PathBuf, StaticDoubleError> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustflags = match std::env::var("RUSTFLAGS") {
        Ok(f) if !f.trim().is_empty() => format!("{f} {STATIC_RUSTFLAGS}"),
        _ => STATIC_RUSTFLAGS.to_string(),
    };
    let out = Command::new(cargo)
        .current_dir(workspace)
        .env("RUSTFLAGS", rustflags)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(["build", "-p", "banger-tests", "--bin", "firecracker-double", "--target", STATIC_TARGET])
        .args(["--message-format", "json-render-diagnostics"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(StaticDoubleError::Spawn)?;
    if !out.status.success() {
        return Err(StaticDoubleError::Build(out.status.to_string()));
    }
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "firecracker-double")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or(StaticDoubleError::NoExecutable)?;
    if !is_static(&exe).map_err(|e| StaticDoubleError::Read(exe.clone(), e))? {
        return Err(StaticDoubleError::NotStatic(exe));
    }
    Ok(exe)
}

/// Whether an ELF executable needs no dynamic loader (no `PT_INTERP` program header).
pub fn is_static(path: &Path) -> io::Result<bool> {
    let mut head = Vec::new();
    fs::File::open(path)?.take(64 * 1024).read_to_end(&mut head)?;
    let bad =
        || io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a 64-bit ELF", path.display()));
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(head[32..40].try_into().map_err(|_| bad())?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(entry) = head.get(at..at + 4) else { return Err(bad()) };
        if u32::from_le_bytes(entry.try_into().map_err(|_| bad())?) == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Puts a copy of `bin` at `dir/firecracker` (a hard link when on the same filesystem), so the
/// jail is named as a real Firecracker's would be; returns the path.
pub fn exec_file_named_firecracker(bin: &Path, dir: &Path) -> io::Result<PathBuf> {
    let path = dir.join("firecracker");
    if fs::hard_link(bin, &path).is_err() {
        fs::copy(bin, &path)?;
    }
    Ok(path)
}

/// A jail's paths: `<base>/<exec file name>/<id>/root` and what the jailer puts there.
#[derive(Debug, Clone)]
pub struct Jail {
    /// The chroot base (canonical).
    pub base: PathBuf,
    /// The exec file's name.
    pub exec_name: String,
    /// The instance id.
    pub id: String,
}

impl Jail {
    /// The jail of `id` for an exec file named `exec_name` under `base`.
    pub fn new(base: &Path, exec_name: &str, id: &str) -> Jail {
        let base = fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        Jail { base, exec_name: exec_name.to_string(), id: id.to_string() }
    }

    /// `<base>/<exec file name>/<id>`.
    pub fn dir(&self) -> PathBuf {
        self.base.join(&self.exec_name).join(&self.id)
    }

    /// The jail's root.
    pub fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    /// A path inside the jail, as the host sees it (`inside` is absolute in the jail).
    pub fn host_path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    /// The default API socket.
    pub fn socket(&self) -> PathBuf {
        self.host_path("/run/firecracker.socket")
    }

    /// The PID file.
    pub fn pid_file(&self) -> PathBuf {
        self.root().join(format!("{}.pid", self.exec_name))
    }

    /// Waits for the PID file and the API socket (a daemonized jailer exits before its VMM is
    /// ready); returns the PID.
    pub fn wait_ready(&self, timeout: Duration) -> Option<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let pid = fs::read_to_string(self.pid_file()).ok().and_then(|p| p.parse().ok());
            if let Some(pid) = pid
                && self.socket().exists()
            {
                return Some(pid);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A jailer command: `bin args…` run with umask 022 (the umask the recorded behaviour of the real
/// jailer was observed with).
pub fn jailer_command(bin: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    // SAFETY: umask is async-signal-safe and touches only the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    cmd
}

/// Makes the child of `cmd` inherit `fd` at number `target` (without close-on-exec), to check
/// that the jailer closes it. `fd` must stay open until the command is spawned.
pub fn inherit_fd(cmd: &mut Command, fd: &OwnedFd, target: RawFd) {
    let source = fd.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; `source` is open in the parent until spawn returns, and
    // the child only duplicates it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(source, target) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What `/proc` shows of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcView {
    /// Real, effective, saved and filesystem uids.
    pub uids: Vec<u32>,
    /// The same gids.
    pub gids: Vec<u32>,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// PIDs from the outermost namespace in.
    pub ns_pids: Vec<u32>,
    /// Parent, process group, session.
    pub ppid: u32,
    /// Process group.
    pub pgrp: u32,
    /// Session.
    pub session: u32,
    /// State letter.
    pub state: char,
    /// The environment (raw, NUL-separated).
    pub environ: Vec<u8>,
    /// Open descriptors and what they point at.
    pub fds: Vec<(RawFd, String)>,
    /// `Max open files` (soft, hard).
    pub max_open_files: (String, String),
    /// `Max file size` (soft, hard).
    pub max_file_size: (String, String),
    /// `/proc/PID/cgroup` lines.
    pub cgroups: Vec<String>,
    /// The network namespace (`net:[inode]`).
    pub netns: String,
}

fn numbers(s: &str) -> Vec<u32> {
    s.split_whitespace().filter_map(|n| n.parse().ok()).collect()
}

impl ProcView {
    /// Reads process `pid`.
    pub fn read(pid: u32) -> io::Result<ProcView> {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let status = fs::read_to_string(dir.join("status"))?;
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).unwrap_or("").to_string();
        let stat = fs::read_to_string(dir.join("stat"))?;
        let after_comm: Vec<&str> =
            stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
        let stat_field = |i: usize| after_comm.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut fds = Vec::new();
        for entry in fs::read_dir(dir.join("fd"))? {
            let entry = entry?;
            let Ok(n) = entry.file_name().to_string_lossy().parse::<RawFd>() else { continue };
            let target = fs::read_link(entry.path()).map(|p| p.display().to_string()).unwrap_or_default();
            fds.push((n, target));
        }
        fds.sort();
        let limits = fs::read_to_string(dir.join("limits"))?;
        let limit = |name: &str| {
            limits
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|rest| {
                    let w: Vec<&str> = rest.split_whitespace().collect();
                    (w.first().unwrap_or(&"").to_string(), w.get(1).unwrap_or(&"").to_string())
                })
                .unwrap_or_default()
        };
        Ok(ProcView {
            uids: numbers(&field("Uid:")),
            gids: numbers(&field("Gid:")),
            groups: numbers(&field("Groups:")),
            ns_pids: numbers(&field("NSpid:")),
            ppid: stat_field(1),
            pgrp: stat_field(2),
            session: stat_field(3),
            state: after_comm.first().and_then(|s| s.chars().next()).unwrap_or('?'),
            environ: fs::read(dir.join("environ"))?,
            fds,
            max_open_files: limit("Max open files"),
            max_file_size: limit("Max file size"),
            cgroups: fs::read_to_string(dir.join("cgroup"))?.lines().map(str::to_string).collect(),
            netns: fs::read_link(dir.join("ns/net"))?.display().to_string(),
        })
    }
}

/// The session of `pid`, from `/proc/PID/stat`.
fn session_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(3)?.parse().ok()
}

/// The processes (zombies included) of session `sid`.
fn session_members(sid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| session_of(*p) == Some(sid))
        .collect()
}

/// A jailed VMM, killed with SIGKILL on [`JailedVmm::kill`] or drop, then waited for until it
/// has been reaped (unless the caller is its parent and will reap it), so a test leaves no
/// process behind, zombies included. A daemonized jailer also leaves two exited forks in the
/// VMM's session, reparented to PID 1 like the VMM, which reaps them when it gets to it: the wait
/// lasts until that whole session is gone.
#[derive(Debug)]
pub struct JailedVmm {
    pid: u32,
    session: Option<u32>,
}

impl JailedVmm {
    /// The VMM with PID `pid` (as the PID file gives it).
    pub fn new(pid: u32) -> JailedVmm {
        let own = session_of(std::process::id());
        JailedVmm { pid, session: session_of(pid).filter(|s| Some(*s) != own) }
    }

    /// The VMM's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the VMM and waits (up to 15 s) as described above; returns whether it all ended.
    pub fn kill(mut self) -> bool {
        if self.pid != 0 {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        self.wait(Duration::from_secs(15))
    }

    /// Waits up to `timeout` for the VMM to end by itself (and be reaped, as described above);
    /// returns whether it did. If not, it is still killed on drop.
    pub fn ended(mut self, timeout: Duration) -> bool {
        self.wait(timeout)
    }

    /// Waits until the VMM is reaped; disarms the guard when it is.
    fn wait(&mut self, timeout: Duration) -> bool {
        if self.pid == 0 {
            return true;
        }
        let (pid, session) = (self.pid, self.session);
        let me = std::process::id();
        // Gone from /proc, or a zombie the caller itself will reap.
        let reaped = || match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => {
                let fields: Vec<&str> =
                    stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
                fields.first() == Some(&"Z") && fields.get(1) == Some(&me.to_string().as_str())
            }
        };
        let done = || reaped() && session.is_none_or(|sid| session_members(sid).is_empty());
        let deadline = Instant::now() + timeout;
        while !done() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let ended = done();
        if ended {
            self.pid = 0;
        }
        ended
    }
}

impl Drop for JailedVmm {
    fn drop(&mut self) {
        if self.pid != 0 {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            self.wait(Duration::from_secs(15));
        }
    }
}
/// The v1 mount point of `controller` from `/proc/mounts`.
pub fn v1_mount(controller: &str) -> Option<PathBuf> {
    let mounts = fs::File::open(super::PROC_MOUNTS).ok()?;
    BufReader::new(mounts).lines().map_while(Result::ok).find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() == 6 && f[2] == "cgroup" && f[3].split(',').any(|o| o == controller))
            .then(|| PathBuf::from(f[1]))
    })
}

/// The first cgroup2 mount point and the controllers it offers.
pub fn v2_mount() -> Option<(PathBuf, Vec<String>)> {
    let mounts = fs::File::open(super::PROC_MOUNTS).ok()?;
    let dir = BufReader::new(mounts).lines().map_while(Result::ok).find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() == 6 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })?;
    let controllers = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    Some((dir.clone(), controllers.split_whitespace().map(str::to_string).collect()))
}

/// Cgroup directories a test makes the jailer create, removed on drop: the groups themselves
/// (retrying while the kernel still counts a dying process in them), then the parents the test
/// caused to be made, deepest first, unless another user has put groups of its own in them
/// meanwhile. Directories that existed before the test are left alone.
#[derive(Debug, Default)]
pub struct CgroupDirs {
    groups: Vec<PathBuf>,
    parents: Vec<PathBuf>,
}

/// Removes an (empty) cgroup directory, retrying on EBUSY for up to 10 s.
fn remove_cgroup_dir(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

fn has_subdirectories(dir: &Path) -> bool {
    fs::read_dir(dir).map(|entries| entries.flatten().any(|e| e.path().is_dir())).unwrap_or(false)
}

impl CgroupDirs {
    /// Records the group `group` and its ancestors up to (not including) `root` that do not
    /// exist yet.
    pub fn expect(&mut self, root: &Path, group: &Path) {
        if !group.exists() {
            self.groups.push(group.to_path_buf());
        }
        let mut dir = group.to_path_buf();
        while dir.pop() && dir.starts_with(root) && dir != root {
            if !dir.exists() {
                self.parents.push(dir.clone());
            }
        }
    }

    /// Removes the recorded directories; returns those that could not be removed.
    pub fn remove(&mut self) -> Vec<(PathBuf, io::Error)> {
        let mut failed = Vec::new();
        for dir in self.groups.drain(..) {
            if let Err(e) = remove_cgroup_dir(&dir) {
                failed.push((dir, e));
            }
        }
        self.parents.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in self.parents.drain(..) {
            if has_subdirectories(&dir) {
                continue;
            }
            if let Err(e) = remove_cgroup_dir(&dir) {
                failed.push((dir, e));
            }
        }
        failed
    }
}

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        for (dir, e) in self.remove() {
            eprintln!("cannot remove cgroup {}: {e}", dir.display());
        }
    }
}

/// The mode bits, owner and group of a path (not following a final symlink).
pub fn mode_owner(path: &Path) -> io::Result<(u32, u32, u32)> {
    let m = fs::symlink_metadata(path)?;
    Ok((m.mode() & 0o7777, m.uid(), m.gid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        // The test binary itself is dynamically linked (the workspace's normal build).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static(&me).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        crate::double::write_test_kernel(&kernel).unwrap();
        assert!(is_static(&kernel).unwrap(), "an ELF without PT_INTERP");
        fs::write(dir.path().join("text"), "not an elf at all, long enough to be read as a header......")
            .unwrap();
        assert!(is_static(&dir.path().join("text")).is_err());
    }

    #[test]
    fn cgroup_dirs_remove_only_what_did_not_exist() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("existing")).unwrap();
        let mut dirs = CgroupDirs::default();
        dirs.expect(root, &root.join("existing/vm"));
        dirs.expect(root, &root.join("new/vm"));
        dirs.expect(root, &root.join("shared/vm"));
        fs::create_dir_all(root.join("existing/vm")).unwrap();
        fs::create_dir_all(root.join("new/vm")).unwrap();
        fs::create_dir_all(root.join("shared/vm")).unwrap();
        fs::create_dir_all(root.join("shared/someone-elses")).unwrap();
        assert!(dirs.remove().is_empty());
        assert!(root.join("existing").exists());
        assert!(!root.join("existing/vm").exists() && !root.join("new").exists());
        assert!(!root.join("shared/vm").exists() && root.join("shared/someone-elses").exists());
    }
}
