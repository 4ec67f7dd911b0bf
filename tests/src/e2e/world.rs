//! [`World`]: one test's complete banger installation (see the [module docs](super)).
//!
//! Layout of the world's temporary directory `T` (mode 0755, under `/tmp`):
//!
//! ```text
//! T/bin/      banger, bangerd, banger-helper, firecracker-double (0755)
//! T/img/      vmlinux (test kernel), rootfs.ext4 (0644)
//! T/helper/   policy.toml, helper.sock, helper.log, audit.log, state/ (0700)
//! T/a T/b T/c each user's BANGER_HOME (0700, owned by the user), with config.toml
//! ```
//!
//! [`World::jailed`] adds the policy's `[jailer]`: its binaries and chroot base under `T` (see
//! [`jails`](super::jails)), and `launch = "jailer"` in A's and B's configuration.
//!
//! [`World::with_homes_in`] puts the users' homes (where images and VM disks live) in a directory
//! of their own under another base instead, e.g. a tmpfs.
//!
//! When a test fails, the world prints its diagnostics before tearing down; with
//! `BANGER_E2E_KEEP=1` it also keeps `T` (logs, databases, VM directories) for a post-mortem.
//! `BANGER_E2E_RUST_LOG` sets `RUST_LOG` for the daemons, `BANGER_E2E_HELPER_LOG` for the helper.

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::Context;
use banger_protocol::{Request, Response};

use super::cli::{Cli, UserLaunch, VmView, parse_list, parse_object, parse_vm};
use super::fixtures;
use super::helper::{Helper, PolicySpec, Session, session_as, tail};
use super::jails::{self, Jailing};
use super::leaks::{self, Scope};
use super::names::{self, Names};
use super::netns::{Netns, Network};
use super::proc;
use super::run::{Output, root_unchecked, wait_for};
use super::users::{Account, Accounts, Who, remove_group, remove_user};

/// The image every world imports for its users (also their configured default image).
pub const IMAGE: &str = "e2e";

/// Tools the harness and the product need on the machine.
const TOOLS: [&str; 11] = [
    "ip",
    "iptables-save",
    "losetup",
    "mkfs.ext4",
    "debugfs",
    "dropbear",
    "setpriv",
    "unshare",
    "ssh",
    "useradd",
    "curl",
];

/// Fails the test unless it runs as root with every tool it needs. Never skips silently: the
/// e2e tests are `#[ignore]`d and only run when asked for (`--include-ignored`), and then they must
/// be able to run.
pub fn require_privileges() {
    if !nix::unistd::geteuid().is_root() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        panic!(
            "this end-to-end test needs root (it creates users, namespaces and TAPs){}; run tests/run as root",
            if ci { " and CI=true requires it to run" } else { "" }
        );
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let have =
        |t: &str| path.split(':').chain(["/usr/sbin", "/sbin"]).any(|d| Path::new(d).join(t).is_file());
    let missing: Vec<&str> = TOOLS.iter().copied().filter(|t| !have(t)).collect();
    assert!(missing.is_empty(), "missing tools {missing:?}: install them (see .ci/run for the packages)");
}

/// One test's users, network, helper and files. See the module docs.
#[derive(Debug)]
pub struct World {
    /// The names of everything in this world.
    pub names: Names,
    /// The temporary directory `T`.
    pub temp: PathBuf,
    /// `T/bin`.
    pub bin: PathBuf,
    /// The test kernel.
    pub kernel: PathBuf,
    /// The root filesystem image.
    pub rootfs: PathBuf,
    /// The directory holding the users' homes (`T` unless built with [`World::with_homes_in`]).
    pub homes: PathBuf,
    /// The jailer's binaries, chroot base, uids and cgroups, in a [`World::jailed`] one.
    pub jailing: Option<Jailing>,
    started: Instant,
    helper: Option<Helper>,
    network: Option<Network>,
    accounts: Option<Accounts>,
    tempdir: Option<tempfile::TempDir>,
    homes_tempdir: Option<tempfile::TempDir>,
}

static SWEEP: Once = Once::new();

impl World {
    /// Builds a world and imports the test image for user A (which starts A's daemon). Panics
    /// (after tearing down what was made) when any step fails.
    pub fn new() -> World {
        World::built(None, false)
    }

    /// Like [`World::new`], with a policy that has a `[jailer]` (the jailer double, the static
    /// Firecracker double) and `launch = "jailer"` in the configuration of A and B.
    pub fn jailed() -> World {
        World::built(None, true)
    }

    /// Like [`World::new`], with the users' homes (their images and VM disks) under `base`:
    /// files the helper attaches loop devices to must be on a filesystem its policy allows (in
    /// the kernel tier `/tmp` is an overlay, `/run` a tmpfs).
    pub fn with_homes_in(base: &Path) -> World {
        World::built(Some(base), false)
    }

    fn built(homes: Option<&Path>, jailed: bool) -> World {
        let world = World::build_with(&fixtures::BINARIES, homes, jailed);
        world.import_image(Who::A);
        eprintln!(
            "e2e world {}: image imported for A after {:.1}s",
            world.names.suffix,
            world.started.elapsed().as_secs_f64()
        );
        world
    }

    /// Builds a world without touching banger itself: users, network, binaries, image files and
    /// the helper.
    pub fn bare() -> World {
        World::build_with(&["banger-helper"], None, false)
    }

    fn build_with(required: &[&str], homes: Option<&Path>, jailed: bool) -> World {
        require_privileges();
        SWEEP.call_once(sweep_stale);
        let names = Names::fresh();
        let mut world = World {
            names: names.clone(),
            temp: PathBuf::new(),
            bin: PathBuf::new(),
            kernel: PathBuf::new(),
            rootfs: PathBuf::new(),
            homes: PathBuf::new(),
            jailing: None,
            started: Instant::now(),
            helper: None,
            network: None,
            accounts: None,
            tempdir: None,
            homes_tempdir: None,
        };
        if let Err(e) = world.build(required, homes, jailed) {
            panic!("cannot build the end-to-end world {}: {e:#}", names.suffix);
        }
        eprintln!(
            "e2e world {} ready in {:.1}s at {}",
            names.suffix,
            world.started.elapsed().as_secs_f64(),
            world.temp.display()
        );
        world
    }

    fn build(&mut self, required: &[&str], homes: Option<&Path>, jailed: bool) -> anyhow::Result<()> {
        let dir = tempfile::Builder::new().prefix(&self.names.temp_prefix()).tempdir_in("/tmp")?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        self.temp = dir.path().to_path_buf();
        self.homes = self.temp.clone();
        self.tempdir = Some(dir);
        if let Some(base) = homes {
            let dir = tempfile::Builder::new().prefix(&self.names.temp_prefix()).tempdir_in(base)?;
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
            self.homes = dir.path().to_path_buf();
            self.homes_tempdir = Some(dir);
        }
        self.bin = self.temp.join("bin");
        fixtures::stage_binaries(&self.bin, required)?;
        let img = self.temp.join("img");
        fs::create_dir(&img)?;
        fs::set_permissions(&img, fs::Permissions::from_mode(0o755))?;
        self.kernel = img.join("vmlinux");
        self.rootfs = img.join("rootfs.ext4");
        fixtures::write_kernel(&self.kernel)?;
        fixtures::write_rootfs(&self.rootfs, &self.temp)?;
        if jailed {
            self.jailing = Some(Jailing::stage(&self.temp, &fixtures::build_dir()?, &self.names)?);
        }

        let n = &self.names;
        let accounts = Accounts::create(&n.group(), [n.user(0), n.user(1), n.user(2)])?;
        self.accounts = Some(accounts);
        for who in Who::ALL {
            let home = self.home(who);
            fs::create_dir(&home)?;
            fs::set_permissions(&home, fs::Permissions::from_mode(0o700))?;
            let acct = self.account(who).clone();
            let config = home.join("config.toml");
            let launch = if jailed && who != Who::C { "launch = \"jailer\"\n" } else { "" };
            fs::write(
                &config,
                format!("default_image = \"{IMAGE}\"\ndefault_vcpus = 1\ndefault_memory_mib = 128\n{launch}"),
            )?;
            fs::set_permissions(&config, fs::Permissions::from_mode(0o600))?;
            for p in [&home, &config] {
                chown(p, Some(acct.uid), Some(acct.gid)).with_context(|| format!("chown {}", p.display()))?;
            }
        }

        self.network = Some(Network::create(
            &n.host_ns(),
            &n.outside_ns(),
            &n.veth_host(),
            &n.veth_outside(),
            &n.suffix,
        )?);
        let spec = PolicySpec {
            group: n.group(),
            audit_log: self.temp.join("helper/audit.log"),
            jailer: self.jailing.as_ref().map(|j| j.spec.clone()),
        };
        let helper = Helper::start(
            &self.bin.join("banger-helper"),
            &n.host_ns(),
            &self.temp.join("helper"),
            &spec,
            self.account(Who::A),
        )?;
        self.helper = Some(helper);
        Ok(())
    }

    /// The account of `who`.
    pub fn account(&self, who: Who) -> &Account {
        self.accounts.as_ref().expect("accounts exist").get(who)
    }

    /// The `BANGER_HOME` of `who`.
    pub fn home(&self, who: Who) -> PathBuf {
        self.homes.join(who.letter())
    }

    /// The daemon log of `who`.
    pub fn daemon_log(&self, who: Who) -> PathBuf {
        self.home(who).join("state/bangerd.log")
    }

    /// The helper.
    pub fn helper(&self) -> &Helper {
        self.helper.as_ref().expect("the helper runs")
    }

    /// Mutable access to the helper (to stop it).
    pub fn helper_mut(&mut self) -> &mut Helper {
        self.helper.as_mut().expect("the helper runs")
    }

    /// The host network namespace.
    pub fn host_ns(&self) -> &Netns {
        &self.network.as_ref().expect("the network exists").host
    }

    /// The network (namespaces and servers).
    pub fn network(&self) -> &Network {
        self.network.as_ref().expect("the network exists")
    }

    /// A `banger` command as `who`, with the world's environment.
    pub fn cli(&self, who: Who) -> Cli {
        let home = self.home(who);
        let launch = UserLaunch {
            netns: self.names.host_ns(),
            bin_dir: self.bin.clone(),
            account: self.account(who).clone(),
            home: home.clone(),
            env: vec![
                ("BANGER_HOME".into(), home.display().to_string()),
                ("BANGER_HELPER_SOCKET".into(), self.helper().socket.display().to_string()),
                ("BANGER_FIRECRACKER".into(), self.bin.join("firecracker-double").display().to_string()),
                ("RUST_BACKTRACE".into(), "1".into()),
            ]
            .into_iter()
            .chain(std::env::var("BANGER_E2E_RUST_LOG").ok().map(|v| ("RUST_LOG".to_owned(), v)))
            .collect(),
            mount_ns_of: self.jailing.as_ref().and_then(|_| self.helper().pid()),
        };
        Cli::new(launch)
    }

    /// Runs `banger args…` as `who` with the default deadline.
    pub fn banger(&self, who: Who, args: &[&str]) -> Output {
        self.cli(who).banger(args)
    }

    /// Runs `banger args…` as `who` and panics (with diagnostics) unless it succeeds.
    #[track_caller]
    pub fn banger_ok(&self, who: Who, args: &[&str]) -> Output {
        let out = self.banger(who, args);
        if !out.success() {
            panic!("command failed:\n{out}");
        }
        out
    }

    /// Adds `line` to the `config.toml` of `who` (stop its daemon first: a running one keeps
    /// the settings it started with).
    pub fn add_config(&self, who: Who, line: &str) {
        let path = self.home(who).join("config.toml");
        let mut text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.push_str(line);
        text.push('\n');
        fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// Imports the test image for `who` under [`IMAGE`].
    #[track_caller]
    pub fn import_image(&self, who: Who) {
        let (k, r) = (self.kernel.display().to_string(), self.rootfs.display().to_string());
        self.banger_ok(who, &["image", "import", IMAGE, "--kernel", &k, "--rootfs", &r]);
    }

    /// Imports for `who`, as image `name`, the test kernel and a root filesystem like the test
    /// image's, with `extra` adding to its tree.
    #[track_caller]
    pub fn import_image_with(&self, who: Who, name: &str, extra: &dyn Fn(&Path) -> std::io::Result<()>) {
        let rootfs = self.temp.join("img").join(format!("{name}.ext4"));
        fixtures::write_rootfs_with(&rootfs, &self.temp, extra)
            .unwrap_or_else(|e| panic!("cannot write {}: {e:#}", rootfs.display()));
        let (k, r) = (self.kernel.display().to_string(), rootfs.display().to_string());
        self.banger_ok(who, &["image", "import", name, "--kernel", &k, "--rootfs", &r]);
    }

    /// `vm list --json` of `who`.
    #[track_caller]
    pub fn list(&self, who: Who) -> Vec<VmView> {
        parse_list(&self.banger_ok(who, &["vm", "list", "--json"]))
    }

    /// `vm show NAME --json` of `who`.
    #[track_caller]
    pub fn show(&self, who: Who, name: &str) -> VmView {
        parse_vm(&self.banger_ok(who, &["vm", "show", name, "--json"]))
    }

    /// `daemon status --json` of `who`.
    #[track_caller]
    pub fn daemon_status(&self, who: Who) -> serde_json::Map<String, serde_json::Value> {
        parse_object(&self.banger_ok(who, &["daemon", "status", "--json"]))
    }

    /// The bangerd daemons of `who`, from the process table: `bangerd` processes without a
    /// subcommand (`bangerd serial-relay …` belongs to a VM, not to the daemon).
    pub fn daemon_pids(&self, who: Who) -> Vec<u32> {
        let uid = self.account(who).uid;
        proc::find(|p| {
            let sub = p.cmdline.split_whitespace().nth(1);
            p.uid == uid && p.comm == "bangerd" && p.state != 'Z' && sub.is_none_or(|a| a.starts_with('-'))
        })
        .iter()
        .map(|p| p.pid)
        .collect()
    }

    /// Polls `vm show` until the VM is in `state`; panics with the last view on timeout.
    #[track_caller]
    pub fn wait_state(&self, who: Who, name: &str, state: &str, timeout: Duration) -> VmView {
        let mut last = None;
        let found = wait_for(timeout, Duration::from_millis(200), || {
            let v = self.show(who, name);
            let done = v.state == state;
            last = Some(v.clone());
            done.then_some(v)
        });
        found.unwrap_or_else(|| {
            panic!("VM {name} of {who:?} did not reach {state} within {timeout:?}; last seen: {last:#?}")
        })
    }

    /// Stops the daemon of `who` (`banger daemon stop`) and waits until its process is gone.
    #[track_caller]
    pub fn stop_daemon(&self, who: Who) {
        let pids = self.daemon_pids(who);
        self.banger_ok(who, &["daemon", "stop"]);
        let gone = wait_for(Duration::from_secs(15), Duration::from_millis(50), || {
            pids.iter().all(|p| !proc::alive(*p)).then_some(())
        });
        assert!(gone.is_some(), "bangerd {pids:?} of {who:?} still runs 15 s after `banger daemon stop`");
    }

    /// `banger vm run --name NAME -- CMD…` as `who`.
    pub fn vm_run(&self, who: Who, name: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["vm", "run", "--name", name, "--"];
        args.extend_from_slice(cmd);
        self.banger(who, &args)
    }

    /// `banger vm ssh NAME -- CMD…` as `who`.
    pub fn ssh(&self, who: Who, name: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["vm", "ssh", name, "--"];
        args.extend_from_slice(cmd);
        self.banger(who, &args)
    }

    /// Whether network interface `name` exists in the host namespace.
    pub fn link_exists(&self, name: &str) -> bool {
        root_unchecked("ip", &["-n", &self.names.host_ns(), "link", "show", "dev", name])
            .is_ok_and(|o| o.success())
    }

    /// The IPv4 address of interface `name` in the host namespace.
    pub fn link_ipv4(&self, name: &str) -> Option<String> {
        let out =
            root_unchecked("ip", &["-n", &self.names.host_ns(), "-j", "-4", "addr", "show", "dev", name])
                .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        v.pointer("/0/addr_info/0/local").and_then(|a| a.as_str()).map(str::to_owned)
    }

    /// The owner uid of TAP `name` in the host namespace (sysfs `owner`).
    pub fn tap_owner(&self, name: &str) -> Option<u32> {
        let out = root_unchecked(
            "ip",
            &["netns", "exec", &self.names.host_ns(), "cat", &format!("/sys/class/net/{name}/owner")],
        )
        .ok()?;
        out.stdout.trim().parse().ok()
    }

    /// Firewall lines of the host namespace that mention banger and `needle` (e.g. a VM id).
    pub fn firewall_lines_with(&self, needle: &str) -> Vec<String> {
        leaks::firewall_lines(&self.names.host_ns()).into_iter().filter(|l| l.contains(needle)).collect()
    }

    /// Firewall lines of the host namespace that mention banger.
    pub fn firewall_lines(&self) -> Vec<String> {
        leaks::firewall_lines(&self.names.host_ns())
    }

    /// TAP devices in the host namespace.
    pub fn taps(&self) -> Vec<String> {
        leaks::taps(&self.names.host_ns())
    }

    /// Loop devices backed by files of this world.
    pub fn loops(&self) -> Vec<(String, String)> {
        self.file_dirs().iter().flat_map(|d| leaks::loops_under(d)).collect()
    }

    /// The directories holding this world's files: `T`, and the homes' directory when apart.
    fn file_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.temp.clone()];
        if !self.homes.starts_with(&self.temp) {
            dirs.push(self.homes.clone());
        }
        dirs.retain(|d| !d.as_os_str().is_empty());
        dirs
    }

    /// Speaks the helper protocol directly as `who` (see [`session_as`]).
    pub fn helper_session(&self, who: Who, install: &str, requests: &[Request]) -> Session {
        session_as(self.account(who), &self.helper().socket, install, requests)
            .unwrap_or_else(|e| panic!("direct helper session as {who:?}: {e:#}"))
    }

    fn scope(&self) -> Scope {
        let mut uids: Vec<u32> =
            self.accounts.as_ref().map(|a| a.users.iter().map(|u| u.uid).collect()).unwrap_or_default();
        if let Some(j) = &self.jailing {
            uids.extend(j.spec.uids.0..=j.spec.uids.1);
        }
        // The helper, and the processes it forks of itself (its jail launcher).
        let mut allowed_pids: Vec<u32> = self.helper.as_ref().and_then(Helper::pid).into_iter().collect();
        if let Some(&helper) = allowed_pids.first() {
            allowed_pids.extend(proc::find(|p| p.ppid == helper && p.uid == 0).iter().map(|p| p.pid));
        }
        Scope {
            netns: self.names.host_ns(),
            temp: self.temp.clone(),
            uids,
            homes: Who::ALL.iter().map(|w| self.home(*w)).collect(),
            allowed_pids,
        }
    }

    /// What the helper's ledger still lists for the allowed users (TAPs, NAT, loops,
    /// dm-snapshots, jails).
    fn ledger_leaks(&self) -> Vec<String> {
        let mut leaks = Vec::new();
        for who in [Who::A, Who::B] {
            let s = session_as(self.account(who), &self.helper().socket, "e2e-probe", &[Request::ListOwned]);
            match s.as_ref().map(|s| s.answers.first()) {
                Ok(Some(Ok(Response::Owned(o)))) => {
                    leaks.extend(
                        o.taps.iter().map(|t| {
                            format!("helper ledger of {who:?}: tap {} (vm {})", t.name, t.vm.as_str())
                        }),
                    );
                    leaks.extend(o.nat.iter().map(|n| {
                        format!("helper ledger of {who:?}: nat for {} (vm {})", n.guest_ip, n.vm.as_str())
                    }));
                    leaks.extend(o.loops.iter().map(|l| {
                        format!("helper ledger of {who:?}: loop {} (vm {})", l.device, l.vm.as_str())
                    }));
                    leaks.extend(o.dms.iter().map(|d| {
                        format!("helper ledger of {who:?}: dm-snapshot {} (vm {})", d.name, d.vm.as_str())
                    }));
                    leaks.extend(o.jails.iter().map(|j| {
                        format!(
                            "helper ledger of {who:?}: jail {} uid {} (vm {})",
                            j.id,
                            j.uid,
                            j.vm.as_str()
                        )
                    }));
                }
                _ => leaks.push(format!("helper ledger of {who:?} cannot be listed: {s:?}")),
            }
        }
        leaks
    }

    /// Stops every daemon still running (`banger daemon stop`), then checks (for up to ten
    /// seconds, as processes and devices go away asynchronously) that nothing of the world is
    /// left: see [`leaks`]. Panics with the list and diagnostics otherwise.
    #[track_caller]
    pub fn assert_no_leaks(&self) {
        for who in Who::ALL {
            if !self.daemon_pids(who).is_empty() {
                let out = self.banger(who, &["daemon", "stop"]);
                if !out.success() {
                    eprintln!("leak check: `banger daemon stop` of {who:?} failed:\n{out}");
                }
            }
        }
        let scope = self.scope();
        let mut last = Vec::new();
        let clean = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            let mut l = leaks::check(&scope);
            l.extend(self.jailing.iter().flat_map(Jailing::leaks));
            if l.is_empty() {
                l = self.ledger_leaks();
            }
            last = l;
            last.is_empty().then_some(())
        });
        if clean.is_none() {
            panic!("leaks after the test:\n  {}\n{}", last.join("\n  "), self.diagnostics());
        }
    }

    /// Everything useful to debug a failure: the helper's and daemons' logs, serial logs, links,
    /// firewall and processes.
    pub fn diagnostics(&self) -> String {
        let mut out =
            format!("==== diagnostics of e2e world {} ({})\n", self.names.suffix, self.temp.display());
        if let Some(h) = &self.helper {
            out += &format!("---- helper log {}\n{}\n", h.log.display(), h.log_tail(6000));
            out +=
                &format!("---- helper audit log {}\n{}\n", h.audit_log.display(), tail(&h.audit_log, 3000));
        }
        for who in Who::ALL {
            let home = self.home(who);
            if !home.exists() {
                continue;
            }
            for f in files_named(&home, |p| p.extension().is_some_and(|e| e == "log")) {
                let bytes = if f.ends_with("bangerd.log") { 8000 } else { 3000 };
                out += &format!("---- {who:?}: {}\n{}\n", f.display(), tail(&f, bytes));
            }
            for f in files_named(&home, |p| p.file_name().is_some_and(|n| n == "handles.json")) {
                out += &format!("---- {who:?}: {}\n{}\n", f.display(), tail(&f, 1000));
            }
        }
        if self.network.is_some() {
            let ns = self.names.host_ns();
            let links =
                root_unchecked("ip", &["-n", &ns, "-br", "addr"]).map(|o| o.stdout).unwrap_or_default();
            out += &format!(
                "---- links in {ns}\n{links}\n---- iptables-save and nft list table ip banger in {ns}\n{}\n",
                leaks::firewall_dump(&ns)
            );
        }
        if let Some(j) = &self.jailing {
            out += "---- jails and cgroups of the world\n";
            for d in j.jail_dirs() {
                out += &format!("{}\n", d.display());
            }
            for c in j.cgroups() {
                out += &format!("{}\n", c.display());
            }
        }
        out += "---- processes of the world\n";
        for p in leaks::processes(&self.scope()) {
            out += &format!("{}\n", p.describe());
        }
        out
    }

    fn teardown(&mut self) {
        let scope = self.scope();
        // Processes: the users' (daemons, VMMs, guests) and anything working under T.
        for _ in 0..20 {
            let left = leaks::processes(&scope);
            if left.is_empty() {
                break;
            }
            for p in left {
                proc::kill9(p.pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(mut h) = self.helper.take() {
            h.stop();
        }
        if let Some(j) = &self.jailing {
            for f in j.remove_cgroups() {
                eprintln!("e2e teardown: {f}");
            }
        }
        for (dev, _) in self.loops() {
            let _ = root_unchecked("losetup", &["-d", &dev]);
        }
        self.network = None;
        if let Some(mut a) = self.accounts.take() {
            for f in a.remove() {
                eprintln!("e2e teardown: {f}");
            }
        }
        let keep = std::thread::panicking() && std::env::var_os("BANGER_E2E_KEEP").is_some();
        for dir in [self.tempdir.take(), self.homes_tempdir.take()].into_iter().flatten() {
            if keep {
                eprintln!(
                    "e2e world {}: BANGER_E2E_KEEP is set, keeping {}",
                    self.names.suffix,
                    dir.keep().display()
                );
            }
        }
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        self.teardown();
        eprintln!("e2e world {} done after {:.1}s", self.names.suffix, self.started.elapsed().as_secs_f64());
    }
}

/// Files under `dir` (recursively) for which `pred` holds, sorted.
fn files_named(dir: &Path, pred: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() && pred(&p) => found.push(p),
                _ => {}
            }
        }
    }
    found.sort();
    found
}

/// Removes what killed runs of the harness left behind: namespaces, users, groups, loop devices
/// and temporary directories whose names carry the pid of a process that no longer exists.
fn sweep_stale() {
    let dead =
        |suffix: &str| Names::pid_of(suffix).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
    if let Ok(out) = root_unchecked("ip", &["netns", "list"]) {
        for name in out.stdout.lines().filter_map(|l| l.split_whitespace().next()) {
            let stale = [names::HOST_NS_PREFIX, names::OUTSIDE_NS_PREFIX]
                .iter()
                .any(|p| Names::parse(p, name).is_some_and(dead));
            if stale {
                eprintln!("e2e: removing network namespace {name} left by a killed run");
                let ns = Netns { name: name.to_owned() };
                for pid in ns.pids() {
                    proc::kill9(pid);
                }
            }
        }
    }
    if let Ok(passwd) = fs::read_to_string("/etc/passwd") {
        for name in passwd.lines().filter_map(|l| l.split(':').next()) {
            if names::USER_PREFIXES.iter().any(|p| Names::parse(p, name).is_some_and(dead)) {
                eprintln!("e2e: removing user {name} left by a killed run");
                if let Err(e) = remove_user(name) {
                    eprintln!("e2e: {e:#}");
                }
            }
        }
    }
    if let Ok(group) = fs::read_to_string("/etc/group") {
        for name in group.lines().filter_map(|l| l.split(':').next()) {
            if Names::parse(names::GROUP_PREFIX, name).is_some_and(dead) {
                eprintln!("e2e: removing group {name} left by a killed run");
                if let Err(e) = remove_group(name) {
                    eprintln!("e2e: {e:#}");
                }
            }
        }
    }
    // Jailed VMMs of killed runs (by their uid), before their cgroups can go.
    let dead_pid = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists();
    for p in proc::find(|p| Names::pid_of_jail_uid(p.uid).is_some_and(dead_pid)) {
        eprintln!("e2e: killing jailed process {} left by a killed run", p.describe());
        proc::kill9(p.pid);
    }
    for mount in jails::cgroup_mounts() {
        for e in fs::read_dir(&mount).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if Names::parse(names::CGROUP_PREFIX, &name).is_some_and(dead) {
                eprintln!("e2e: removing cgroup {} left by a killed run", e.path().display());
                for f in jails::remove_cgroup_trees(&[e.path()]) {
                    eprintln!("e2e: {f}");
                }
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/tmp") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(names::TEMP_PREFIX) else { continue };
            let Some((suffix, _)) = rest.split_once('-') else { continue };
            if dead(suffix) {
                eprintln!("e2e: removing {} left by a killed run", e.path().display());
                for (dev, _) in leaks::loops_under(&e.path()) {
                    let _ = root_unchecked("losetup", &["-d", &dev]);
                }
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}
