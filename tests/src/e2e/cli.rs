//! Running `banger` as a test user, inside the test's host namespace, and reading its JSON.
//!
//! Each command goes through
//!
//! ```text
//! ip netns exec HOSTNS unshare --mount --propagation private sh -c '
//!     mount -t tmpfs … /dev/net && mknod -m 0666 /dev/net/tun c 10 200 &&
//!     exec setpriv --reuid=U --regid=G --init-groups env -i PATH=… BANGER_HOME=… banger ARGS'
//! ```
//!
//! so the user gets a `/dev/net/tun` it may open (mode 0666, as on most distributions) in a
//! private mount namespace while the machine's own node keeps its mode. The daemon the CLI starts,
//! the VMMs it spawns and their guests inherit that mount namespace and the host network
//! namespace.
//!
//! In a jailed world the commands run in the helper's mount (and network) namespace instead,
//! where the helper's start already put such a node (see [`UserLaunch::mount_ns_of`]):
//!
//! ```text
//! nsenter --target HELPER --mount --net sh -c 'exec setpriv … env -i … banger ARGS'
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::run::{Output, run_with_timeout};
use super::users::Account;

/// The script run as root in the private mount namespace before dropping to the user. `$1` and
/// `$2` are the uid and gid; the rest is `env -i`'s arguments.
const SCRIPT: &str = "mount -t tmpfs -o mode=0755,size=16k,nosuid,noexec banger-e2e-tun /dev/net \
     && mknod -m 0666 /dev/net/tun c 10 200 \
     && u=$1 g=$2 && shift 2 \
     && exec setpriv --reuid=\"$u\" --regid=\"$g\" --init-groups env -i \"$@\"";

/// [`SCRIPT`] without the node: for a mount namespace that has one already.
const SCRIPT_SHARED: &str =
    "u=$1 g=$2 && shift 2 && exec setpriv --reuid=\"$u\" --regid=\"$g\" --init-groups env -i \"$@\"";

/// The default deadline of one CLI command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Everything needed to run a program as one test user.
#[derive(Debug, Clone)]
pub struct UserLaunch {
    /// The network namespace to run in.
    pub netns: String,
    /// The staged binaries.
    pub bin_dir: PathBuf,
    /// The account.
    pub account: Account,
    /// Its `BANGER_HOME` (also `HOME`).
    pub home: PathBuf,
    /// The environment every command gets (after `PATH`, `HOME`, `USER`, `LOGNAME`).
    pub env: Vec<(String, String)>,
    /// Run in the mount and network namespaces of this process (the helper's, which has a
    /// `/dev/net/tun` of mode 0666) rather than in a private mount namespace of each command:
    /// banger-helper hard-links a jailed VM's drives into its jail by descriptor, which Linux
    /// allows only when the descriptor was opened through a mount of the linking process's own
    /// mount namespace (else `EXDEV`).
    pub mount_ns_of: Option<u32>,
}

/// One command being prepared: extra environment and a deadline.
#[derive(Debug, Clone)]
pub struct Cli {
    launch: UserLaunch,
    extra_env: Vec<(String, String)>,
    timeout: Duration,
}

impl Cli {
    /// A command as the user of `launch`.
    pub fn new(launch: UserLaunch) -> Cli {
        Cli { launch, extra_env: Vec::new(), timeout: DEFAULT_TIMEOUT }
    }

    /// Sets (or overrides) an environment variable.
    pub fn env(mut self, key: &str, value: impl AsRef<str>) -> Cli {
        self.extra_env.push((key.to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Sets the deadline.
    pub fn timeout(mut self, timeout: Duration) -> Cli {
        self.timeout = timeout;
        self
    }

    fn environment(&self) -> Vec<(String, String)> {
        let l = &self.launch;
        let path =
            format!("{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", l.bin_dir.display());
        let home = l.home.display().to_string();
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), path),
            ("HOME".into(), home),
            ("USER".into(), l.account.name.clone()),
            ("LOGNAME".into(), l.account.name.clone()),
        ];
        for (k, v) in l.env.iter().chain(&self.extra_env) {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }

    /// The full command line that runs `program args` as the user.
    pub fn command(&self, program: &Path, args: &[&str]) -> Command {
        let l = &self.launch;
        let mut cmd = match l.mount_ns_of {
            Some(pid) => {
                let mut cmd = Command::new("nsenter");
                cmd.args(["--target", &pid.to_string(), "--mount", "--net", "sh", "-c", SCRIPT_SHARED, "sh"]);
                cmd
            }
            None => {
                let mut cmd = Command::new("ip");
                cmd.args([
                    "netns",
                    "exec",
                    &l.netns,
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    SCRIPT,
                    "sh",
                ]);
                cmd
            }
        };
        cmd.arg(l.account.uid.to_string()).arg(l.account.gid.to_string());
        for (k, v) in self.environment() {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.arg(program).args(args).current_dir(&l.home);
        cmd
    }

    /// `banger args…` as the user without the launcher: in the world's network namespace (so
    /// guests are reachable) but the caller's other namespaces, with the user's uid, gid (no
    /// supplementary groups) and environment. Enough for commands that talk to a daemon already
    /// running (`vm list`, `vm start`) and reach guests (`vm ssh`, `vm run` of a created VM),
    /// timed without the launcher's own processes; a daemon it started would lack the launcher's
    /// mount namespace.
    pub fn banger_in_place(&self, args: &[&str]) -> Command {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let l = &self.launch;
        // A jailed world's commands run in the helper's namespaces.
        let ns_path = match l.mount_ns_of {
            Some(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            None => Path::new("/run/netns").join(&l.netns),
        };
        let netns = std::fs::File::open(&ns_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", ns_path.display()));
        let (uid, gid) = (l.account.uid, l.account.gid);
        let mut cmd = Command::new(l.bin_dir.join("banger"));
        cmd.args(args).env_clear().envs(self.environment()).current_dir(&l.home);
        // SAFETY: setns, setgroups, setgid and setuid are async-signal-safe; the namespace file
        // is moved into the closure, so it stays open until the child has entered it.
        unsafe {
            cmd.pre_exec(move || {
                let check =
                    |rc: libc::c_int| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
                check(libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET))?;
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))
            });
        }
        cmd
    }

    /// Runs `banger args…` and returns what it did.
    pub fn banger(&self, args: &[&str]) -> Output {
        let bin = self.launch.bin_dir.join("banger");
        self.program(&bin, args)
    }

    /// Runs any program as the user (in the same namespaces as `banger`).
    pub fn program(&self, program: &Path, args: &[&str]) -> Output {
        let mut cmd = self.command(program, args);
        run_with_timeout(&mut cmd, self.timeout).unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// A VM as `banger vm list --json` and `vm show --json` print it. Fields beyond the contract are
/// kept in `extra`.
#[derive(Debug, Clone, Deserialize)]
pub struct VmView {
    /// The name.
    pub name: String,
    /// The generated id.
    pub id: String,
    /// `created`, `starting`, `running`, `stopping`, `stopped` or `failed`.
    pub state: String,
    /// The guest's address.
    #[serde(default)]
    pub guest_ip: Option<String>,
    /// Why it last failed or stopped unexpectedly.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The VMM's pid, while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The TAP, while it runs.
    #[serde(default)]
    pub tap: Option<String>,
    /// The VM's directory.
    #[serde(default)]
    pub vm_dir: Option<PathBuf>,
    /// The VMM's API socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// The serial log.
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    /// Everything else.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl VmView {
    /// `vm_dir/handles.json`.
    pub fn handles_path(&self) -> Option<PathBuf> {
        self.vm_dir.as_ref().map(|d| d.join("handles.json"))
    }
}

/// Parses `vm list --json` output.
pub fn parse_list(out: &Output) -> Vec<VmView> {
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("`vm list --json` did not print a JSON array of VMs ({e}):\n{out}"))
}

/// Parses `vm show --json` (or `vm create --json`) output.
pub fn parse_vm(out: &Output) -> VmView {
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("the command did not print a JSON VM object ({e}):\n{out}"))
}

/// Parses any JSON object output (e.g. `daemon status --json`).
pub fn parse_object(out: &Output) -> serde_json::Map<String, Value> {
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("the command did not print a JSON object ({e}):\n{out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> UserLaunch {
        UserLaunch {
            netns: "bgeh-00000001".into(),
            bin_dir: "/tmp/bge/bin".into(),
            account: Account { name: "bgea00000001".into(), uid: 990, gid: 991, groups: vec![992] },
            home: "/tmp/bge/a".into(),
            env: vec![
                ("BANGER_HOME".into(), "/tmp/bge/a".into()),
                ("BANGER_FIRECRACKER".into(), "/fc".into()),
            ],
            mount_ns_of: None,
        }
    }

    #[test]
    fn the_command_enters_the_namespace_then_drops_to_the_user_with_a_clean_environment() {
        let cli = Cli::new(launch()).env("BANGER_FIRECRACKER", "/nonexistent");
        let cmd = cli.command(Path::new("/tmp/bge/bin/banger"), &["vm", "list"]);
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(cmd.get_program(), "ip");
        assert_eq!(&args[..3], ["netns", "exec", "bgeh-00000001"]);
        let script = args.iter().position(|a| a == SCRIPT).unwrap();
        assert_eq!(&args[script + 1..script + 4], ["sh", "990", "991"]);
        let rest = &args[script + 4..];
        assert!(rest.contains(
            &"PATH=/tmp/bge/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        ));
        assert!(rest.contains(&"BANGER_FIRECRACKER=/nonexistent".into()));
        assert!(!rest.contains(&"BANGER_FIRECRACKER=/fc".into()), "the override replaces the default");
        assert_eq!(&rest[rest.len() - 3..], ["/tmp/bge/bin/banger", "vm", "list"]);
        assert_eq!(cmd.get_current_dir(), Some(Path::new("/tmp/bge/a")));
    }

    #[test]
    fn in_the_helpers_namespaces_the_command_enters_them_then_drops_to_the_user() {
        let cli = Cli::new(UserLaunch { mount_ns_of: Some(4242), ..launch() });
        let cmd = cli.command(Path::new("/tmp/bge/bin/banger"), &["vm", "list"]);
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(cmd.get_program(), "nsenter");
        assert_eq!(&args[..8], ["--target", "4242", "--mount", "--net", "sh", "-c", SCRIPT_SHARED, "sh"]);
        assert_eq!(&args[8..10], ["990", "991"]);
        assert_eq!(&args[args.len() - 3..], ["/tmp/bge/bin/banger", "vm", "list"]);
        let script = SCRIPT_SHARED
            .replace("exec setpriv --reuid=\"$u\" --regid=\"$g\" --init-groups env -i", "echo \"$u/$g\"");
        let out = Command::new("sh").args(["-c", &script, "sh", "5", "6", "A=b c", "prog"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "5/6 A=b c prog\n");
    }

    #[test]
    fn the_script_passes_the_arguments_through() {
        // Replace the privileged steps by `true` and `exec env -i` by `echo`, keep the argument flow.
        let script = SCRIPT
            .replace("mount -t tmpfs -o mode=0755,size=16k,nosuid,noexec banger-e2e-tun /dev/net", "true")
            .replace("mknod -m 0666 /dev/net/tun c 10 200", "true")
            .replace("exec setpriv --reuid=\"$u\" --regid=\"$g\" --init-groups env -i", "echo \"$u/$g\"");
        let out = Command::new("sh").args(["-c", &script, "sh", "5", "6", "A=b c", "prog"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "5/6 A=b c prog\n");
    }

    #[test]
    fn vm_json_keeps_unknown_fields_and_tolerates_missing_optional_ones() {
        let v: VmView = serde_json::from_str(
            r#"{"name":"e2e","id":"0123abcd","state":"running","guest_ip":"172.30.0.2","pid":42,"tap":"bg1","vm_dir":"/x/vms/0123abcd","vcpus":1}"#,
        )
        .unwrap();
        assert_eq!(v.pid, Some(42));
        assert_eq!(v.last_error, None);
        assert_eq!(v.handles_path(), Some(PathBuf::from("/x/vms/0123abcd/handles.json")));
        assert_eq!(v.extra["vcpus"], 1);
    }
}
