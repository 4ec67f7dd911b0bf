//! The real `banger-helper`, run as root inside the test's host namespace with a test policy, and
//! a direct client that speaks the helper protocol as any test user.
//!
//! The direct client forks: the child drops to the user's uid, gid and groups, connects, sends
//! `Hello` and the requests, and writes the answers (JSON) to a pipe; the parent reads them. The
//! child only makes system calls and allocations (glibc keeps `malloc` usable after `fork`), never
//! touches locks of the test harness, and leaves with `_exit`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use banger_protocol::frame::{recv_blocking, send_blocking};
use banger_protocol::{InstallId, PROTOCOL_VERSION, Request, Response};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork, pipe, setgid, setgroups, setuid};

use super::run::wait_for;
use super::users::Account;

/// What the test policy says, beyond the defaults.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    /// The group allowed to connect (and owning the socket).
    pub group: String,
    /// Where audit records go.
    pub audit_log: PathBuf,
    /// The `[jailer]` section, when the world launches VMMs through the jailer.
    pub jailer: Option<JailerSpec>,
}

/// The test policy's `[jailer]` (cgroup version `auto`, mode `allow`) and the quotas of jailed
/// VMMs.
#[derive(Debug, Clone)]
pub struct JailerSpec {
    /// The jailer binary (root's, 0755).
    pub jailer: PathBuf,
    /// The statically linked Firecracker (double), root's, 0755.
    pub firecracker: PathBuf,
    /// The chroot base (root's, 0755).
    pub chroot_base: PathBuf,
    /// The jail uids, first and last.
    pub uids: (u32, u32),
    /// The cgroup every user's parent cgroup is made under.
    pub cgroup_parent: String,
    /// `quotas.max_vcpus`.
    pub max_vcpus: u32,
    /// `quotas.max_memory_mib`.
    pub max_memory_mib: u32,
}

impl JailerSpec {
    fn render(&self) -> String {
        format!(
            r#"
[jailer]
jailer = "{jailer}"
firecracker = "{firecracker}"
chroot_base = "{base}"
uid_range = "{first}-{last}"
cgroup = "auto"
cgroup_parent = "{parent}"
mode = "allow"
"#,
            jailer = self.jailer.display(),
            firecracker = self.firecracker.display(),
            base = self.chroot_base.display(),
            first = self.uids.0,
            last = self.uids.1,
            parent = self.cgroup_parent,
        )
    }
}

impl PolicySpec {
    /// The policy file's text.
    pub fn render(&self) -> String {
        let (quotas, jailer) = match &self.jailer {
            Some(j) => {
                (format!("max_vcpus = {}\nmax_memory_mib = {}\n", j.max_vcpus, j.max_memory_mib), j.render())
            }
            None => (String::new(), String::new()),
        };
        format!(
            r#"# Test policy of one end-to-end world.
[access]
groups = ["{group}"]
socket_group = "{group}"

[quotas]
max_vms = 128
max_taps = 128
max_loops = 256
{quotas}
[network]
pool = "172.30.0.0/16"
lease_prefix = 23
vm_prefix = 30
uplink = "auto"

[audit]
log = "{audit}"
{jailer}"#,
            group = self.group,
            audit = self.audit_log.display()
        )
    }
}

/// A running helper; killed on drop.
#[derive(Debug)]
pub struct Helper {
    /// Its socket.
    pub socket: PathBuf,
    /// Its policy file.
    pub policy: PathBuf,
    /// Its state directory (the ledger).
    pub state_dir: PathBuf,
    /// Its standard output and error.
    pub log: PathBuf,
    /// The audit log.
    pub audit_log: PathBuf,
    child: Option<Child>,
}

impl Helper {
    /// Writes the policy and starts `bin` as root in network namespace `netns`, with everything
    /// under `dir` (which must be traversable by the users), then waits until `probe` (a user the
    /// policy allows) gets a `Pong`.
    pub fn start(
        bin: &Path,
        netns: &str,
        dir: &Path,
        spec: &PolicySpec,
        probe: &Account,
    ) -> anyhow::Result<Helper> {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        let policy = dir.join("policy.toml");
        fs::write(&policy, spec.render())?;
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir)?;
        fs::set_permissions(&state_dir, fs::Permissions::from_mode(0o700))?;
        let socket = dir.join("helper.sock");
        let log = dir.join("helper.log");
        let out = File::create(&log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]);
        if spec.jailer.is_some() {
            // `ip netns exec` mounts a sysfs of the namespace over /sys, which hides the cgroup
            // hierarchies the jails need: mount them again in its mount namespace. The users'
            // commands run in that namespace too (see `cli`), with a `/dev/net/tun` they may open.
            cmd.args(["sh", "-c", &helper_namespace_script()?, "sh"]);
        }
        cmd.arg(bin)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--policy")
            .arg(&policy)
            .arg("--state-dir")
            .arg(&state_dir)
            .env("RUST_LOG", std::env::var("BANGER_E2E_HELPER_LOG").unwrap_or_else(|_| "info".to_owned()))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
        let mut helper =
            Helper { socket, policy, state_dir, log, audit_log: spec.audit_log.clone(), child: Some(child) };
        let ready = wait_for(Duration::from_secs(15), Duration::from_millis(20), || {
            if helper.exited() {
                return Some(false);
            }
            if !helper.socket.exists() {
                return None;
            }
            match session_as(probe, &helper.socket, "e2e-probe", &[Request::Ping]) {
                Ok(s) if matches!(s.answers.first(), Some(Ok(Response::Pong))) => Some(true),
                _ => None,
            }
        });
        match ready {
            Some(true) => Ok(helper),
            Some(false) => bail!("banger-helper exited at start; its log:\n{}", helper.log_tail(4000)),
            None => {
                bail!("banger-helper did not answer a ping within 15 s; its log:\n{}", helper.log_tail(4000))
            }
        }
    }

    /// The helper's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the helper process has exited.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The last `bytes` of the helper's log.
    pub fn log_tail(&self, bytes: usize) -> String {
        tail(&self.log, bytes)
    }

    /// Stops the helper: SIGTERM, then SIGKILL after two seconds.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            let done = wait_for(Duration::from_secs(2), Duration::from_millis(10), || {
                matches!(child.try_wait(), Ok(Some(_))).then_some(())
            });
            if done.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A shell script that mounts the host's cgroup hierarchies again (the tmpfs of
/// `/sys/fs/cgroup`, unnamed v1 ones, the unified one) where the host has them, puts a
/// `/dev/net/tun` node of mode 0666 on a tmpfs of its own (as the users' commands get one), then
/// execs its arguments.
fn helper_namespace_script() -> anyhow::Result<String> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let mut script = String::from("set -e\n");
    for line in info.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        let (point, fstype, opts) =
            (fields[4], fields[dash + 1], fields.get(dash + 3).copied().unwrap_or(""));
        match fstype {
            "tmpfs" if point == "/sys/fs/cgroup" => {
                script += "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup\n"
            }
            "cgroup" if !opts.contains("name=") => {
                script += &format!("mkdir -p {point}\nmount -t cgroup -o {opts} cgroup {point}\n");
            }
            "cgroup2" => script += &format!("mkdir -p {point}\nmount -t cgroup2 cgroup2 {point}\n"),
            _ => {}
        }
    }
    script += "mount -t tmpfs -o mode=0755,size=16k,nosuid,noexec banger-e2e-tun /dev/net\n";
    script += "mknod -m 0666 /dev/net/tun c 10 200\n";
    Ok(script + "exec \"$@\"\n")
}

/// The last `bytes` of a file, lossily decoded (or a note that it cannot be read).
pub fn tail(path: &Path, bytes: usize) -> String {
    match fs::read(path) {
        Ok(data) => {
            let start = data.len().saturating_sub(bytes);
            let mut s = String::from_utf8_lossy(&data[start..]).into_owned();
            if start > 0 {
                s.insert_str(0, "[…]");
            }
            s
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The outcome of one direct connection.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Session {
    /// The answer to `Hello` (or why there was none).
    pub hello: Result<Response, String>,
    /// One entry per request sent, in order; after a failed read or write the rest are not sent.
    pub answers: Vec<Result<Response, String>>,
}

/// Connects to the helper at `socket` as `who` (uid, gid and groups of the account), says `Hello`
/// with `install`, sends `requests` one by one and returns every answer.
pub fn session_as(
    who: &Account,
    socket: &Path,
    install: &str,
    requests: &[Request],
) -> anyhow::Result<Session> {
    let install = InstallId::new(install)?;
    let (rd, wr) = pipe()?;
    // SAFETY: the child runs only `child_session` (system calls, allocation and socket I/O, no
    // locks shared with other threads of this process) and leaves with `_exit`, never returning
    // into the test harness.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(rd);
            let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                child_session(who, socket, &install, requests, wr)
            })) {
                Ok(Ok(())) => 0,
                _ => 1,
            };
            // SAFETY: `_exit` ends the forked child without running the parent's atexit handlers
            // or destructors.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let mut data = Vec::new();
            let read = File::from(rd).read_to_end(&mut data);
            let status = waitpid(child, None)?;
            read.context("reading the session's answers")?;
            if data.is_empty() {
                bail!("the direct helper session as {} produced nothing ({status:?})", who.name);
            }
            let text = String::from_utf8_lossy(&data);
            let result: Result<Session, String> = serde_json::from_str(&text)
                .with_context(|| format!("undecodable session report {text:?}"))?;
            result.map_err(|e| anyhow::anyhow!("direct helper session as {}: {e}", who.name))
        }
    }
}

fn child_session(
    who: &Account,
    socket: &Path,
    install: &InstallId,
    requests: &[Request],
    out: OwnedFd,
) -> anyhow::Result<()> {
    let result = (|| -> Result<Session, String> {
        let mut groups: Vec<Gid> = who.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        groups.push(Gid::from_raw(who.gid));
        setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
        setgid(Gid::from_raw(who.gid)).map_err(|e| format!("setgid: {e}"))?;
        setuid(Uid::from_raw(who.uid)).map_err(|e| format!("setuid: {e}"))?;
        let sock = UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
        sock.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
        sock.set_write_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
        let exchange = |req: &Request| -> Result<Response, String> {
            send_blocking(sock.as_fd(), req, &[]).map_err(|e| format!("send {}: {e}", req.op_name()))?;
            recv_blocking::<Response>(sock.as_fd()).map(|(r, _fds)| r).map_err(|e| format!("receive: {e}"))
        };
        let hello = exchange(&Request::Hello { version: PROTOCOL_VERSION, install_id: install.clone() });
        let mut answers = Vec::new();
        if hello.is_ok() {
            for req in requests {
                let a = exchange(req);
                let stop = a.is_err();
                answers.push(a);
                if stop {
                    break;
                }
            }
        }
        Ok(Session { hello, answers })
    })();
    let mut f = File::from(out);
    f.write_all(&serde_json::to_vec(&result)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_parses_allows_the_group_and_lifts_quotas_for_fifty_vms() {
        let spec =
            PolicySpec { group: "bge00000001".into(), audit_log: "/tmp/x/audit.log".into(), jailer: None };
        let p = banger_policy::Policy::from_toml("policy.toml", &spec.render()).unwrap();
        assert_eq!(p.access.groups, ["bge00000001"]);
        assert!(p.access.users.is_empty());
        assert_eq!(p.access.socket_group, "bge00000001");
        assert!(p.quotas.max_vms >= 50 && p.quotas.max_taps >= 50);
        assert_eq!(p.network.uplink, banger_policy::Uplink::Auto);
        assert!(!p.network.guest_to_host.allow_all && p.network.guest_to_host.allow.is_empty());
        assert_eq!(p.audit.target, banger_policy::AuditTarget::File("/tmp/x/audit.log".into()));
        assert_eq!(p.jailer, None);
    }

    #[test]
    fn the_jailer_section_and_its_quotas_parse() {
        let jailer = JailerSpec {
            jailer: "/tmp/x/jail-bin/jailer".into(),
            firecracker: "/tmp/x/jail-bin/firecracker".into(),
            chroot_base: "/tmp/x/jails".into(),
            uids: (1_073_741_824, 1_073_741_825),
            cgroup_parent: "banger-e2e-00000001".into(),
            max_vcpus: 3,
            max_memory_mib: 768,
        };
        let spec = PolicySpec {
            group: "bge00000001".into(),
            audit_log: "/tmp/x/audit.log".into(),
            jailer: Some(jailer),
        };
        let p = banger_policy::Policy::from_toml("policy.toml", &spec.render()).unwrap();
        let j = p.jailer.expect("a [jailer] section");
        assert_eq!(j.jailer, std::path::Path::new("/tmp/x/jail-bin/jailer"));
        assert_eq!(j.firecracker, std::path::Path::new("/tmp/x/jail-bin/firecracker"));
        assert_eq!(j.chroot_base, std::path::Path::new("/tmp/x/jails"));
        assert_eq!(j.uids, (1_073_741_824, 1_073_741_825));
        assert_eq!(j.cgroup, banger_policy::CgroupVersion::Auto);
        assert_eq!(j.mode, banger_policy::JailerMode::Allow);
        assert_eq!(j.user_cgroup(1000), "banger-e2e-00000001/u1000");
        assert_eq!((p.quotas.max_vcpus, p.quotas.max_memory_mib), (3, 768));
        assert_eq!(p.quotas.max_vms, 128);
    }

    #[test]
    fn tail_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        fs::write(&p, "0123456789").unwrap();
        assert_eq!(tail(&p, 4), "[…]6789");
        assert_eq!(tail(&p, 40), "0123456789");
        assert!(tail(&dir.path().join("none"), 4).starts_with("(cannot read"));
    }
}
