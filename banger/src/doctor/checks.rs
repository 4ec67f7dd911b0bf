//! Each check of `banger doctor`: what it looks at, what counts as broken, and the fix it prints.

use std::io;
use std::path::{Path, PathBuf};

use banger_protocol::HelperError;

use super::host::{HelperFacts, Host, Limits};
use super::{Check, Setup, TESTED_FIRECRACKER_VERSION};
use crate::daemon::helper_client::HelperClientError;

/// How the helper is started where systemd does not run (the defaults of `banger-helper serve`).
fn helper_by_hand(socket: &Path) -> String {
    format!(
        "sudo banger-helper serve --policy /etc/banger/policy.toml --socket {} --state-dir /var/lib/banger-helper",
        socket.display()
    )
}

/// Whether `/etc/group` lists `user` in `group` (so a fresh login would have it).
fn listed_in_group(host: &impl Host, setup: &Setup, group: &str, user: &str) -> bool {
    host.read(&setup.root.join("etc/group")).is_ok_and(|text| {
        text.lines().any(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            fields.len() == 4 && fields[0] == group && fields[3].split(',').any(|m| m == user)
        })
    })
}

/// The fix for a device this user may not open, by the group that owns it.
fn device_access_fix(host: &impl Host, setup: &Setup, device: &Path, wanted_group: &str) -> String {
    let user = host.user();
    match host.group_of(device) {
        Some(group) if group != "root" => {
            if listed_in_group(host, setup, &group, &user) {
                format!(
                    "{user} is in group {group} since this login began: log in again, or run banger through \
                     `sg {group} -c 'banger ...'`"
                )
            } else {
                format!("sudo usermod -aG {group} {user}, then log in again")
            }
        }
        _ => format!(
            "sudo ./install.sh (it gives {} to group {wanted_group} and adds {user} to it)",
            device.display()
        ),
    }
}

/// `/dev/kvm` opens read-write for this user.
pub fn kvm(host: &impl Host, setup: &Setup) -> Check {
    const NAME: &str = "kvm";
    let dev = &setup.kvm;
    match host.open_rw(dev) {
        Ok(()) => Check::ok(NAME, true, format!("{} is usable by {}", dev.display(), host.user())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Check::bad(
            NAME,
            true,
            format!("there is no {}", dev.display()),
            "enable virtualization (VT-x or AMD-V) in the firmware, then `sudo modprobe kvm_intel` (or kvm_amd); \
             inside a VM, enable nested virtualization",
        ),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Check::bad(
            NAME,
            true,
            format!("{} is not usable by {}: {e}", dev.display(), host.user()),
            device_access_fix(host, setup, dev, "kvm"),
        ),
        Err(e) => Check::bad(
            NAME,
            true,
            format!("cannot open {}: {e}", dev.display()),
            "check that the kvm module loaded (`dmesg | grep -i kvm`)",
        ),
    }
}

/// `/dev/net/tun` opens read-write for this user (Firecracker opens it to attach to its TAP).
pub fn tun_device(host: &impl Host, setup: &Setup) -> Check {
    const NAME: &str = "tun";
    let dev = &setup.tun;
    match host.open_rw(dev) {
        Ok(()) => Check::ok(NAME, true, format!("{} is usable by {}", dev.display(), host.user())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Check::bad(
            NAME,
            true,
            format!("there is no {}", dev.display()),
            "sudo modprobe tun (the kernel needs CONFIG_TUN)",
        ),
        Err(e) => Check::bad(
            NAME,
            true,
            format!("{} is not usable by {}: {e}", dev.display(), host.user()),
            format!(
                "sudo chmod 0666 {} (sudo ./install.sh does it and keeps it so with a udev rule)",
                dev.display()
            ),
        ),
    }
}

/// Why the helper is not available to this user, and what to do: not running, no permission on
/// its socket, refused by its policy, or another release.
pub fn helper_problem(e: &HelperClientError) -> (String, String) {
    match e {
        HelperClientError::Unreachable { socket, source } => (
            format!("banger-helper is not running: nothing answers at {} ({source})", socket.display()),
            format!(
                "sudo systemctl start banger-helper.socket, or where systemd does not run: {}",
                helper_by_hand(socket)
            ),
        ),
        HelperClientError::NoAccess { socket, problem, .. } => {
            (format!("no permission to open banger-helper's socket {}", socket.display()), problem.to_string())
        }
        HelperClientError::Helper(denied @ HelperError::Denied { .. }) => (
            format!("banger-helper refuses this user: {denied}"),
            "ask an admin to admit you in /etc/banger/policy.toml (e.g. groups = [\"banger\"] under [access]); \
             `banger-helper policy explain /etc/banger/policy.toml --user NAME` says why not"
                .to_owned(),
        ),
        HelperClientError::Helper(mismatch @ HelperError::VersionMismatch { .. }) => (
            format!("banger-helper speaks another protocol: {mismatch}"),
            "install matching banger and banger-helper releases (sudo ./install.sh)".to_owned(),
        ),
        other => (
            format!("banger-helper did not answer: {other}"),
            "see the helper's log (`journalctl -u banger-helper`, or its standard error when started by hand)"
                .to_owned(),
        ),
    }
}

fn left(limit: u32, used: usize, what: &str) -> String {
    let used = u32::try_from(used).unwrap_or(u32::MAX);
    format!("{} of {limit} {what}", limit.saturating_sub(used))
}

/// What this user has left of its quotas, or that the policy could not be read.
fn quota_left(facts: &HelperFacts, limits: Option<Limits>) -> String {
    let Some(l) = limits else {
        return "quota left unknown (the policy file is not readable)".to_owned();
    };
    let o = &facts.owned;
    let vms: std::collections::BTreeSet<_> = o
        .taps
        .iter()
        .map(|t| (&t.install, &t.vm))
        .chain(o.loops.iter().map(|l| (&l.install, &l.vm)))
        .chain(o.dms.iter().map(|d| (&d.install, &d.vm)))
        .chain(o.nat.iter().map(|n| (&n.install, &n.vm)))
        .collect();
    format!(
        "quota left: {}, {}, {}",
        left(l.max_vms, vms.len(), "VMs"),
        left(l.max_taps, o.taps.len(), "TAPs"),
        left(l.max_loops, o.loops.len(), "loop devices")
    )
}

/// The helper answers `Hello` (so it runs, this user may open its socket, speaks this protocol
/// and its policy admits this user) and says what the user holds.
pub async fn helper(host: &impl Host, setup: &Setup) -> Check {
    const NAME: &str = "helper";
    match host.helper(&setup.helper_socket).await {
        Ok(facts) => Check::ok(
            NAME,
            true,
            format!(
                "banger-helper at {} admits {} (protocol {}; firewall {}; dm-snapshot roots {}); {}",
                setup.helper_socket.display(),
                host.user(),
                facts.protocol,
                facts.capabilities.firewall,
                if facts.capabilities.device_mapper { "available" } else { "not available here" },
                quota_left(&facts, host.limits())
            ),
        ),
        Err(e) => {
            let (detail, fix) = helper_problem(&e);
            Check::bad(NAME, true, detail, fix)
        }
    }
}

/// The version in `Firecracker v1.16.1` (the first line of `firecracker --version`).
fn parse_version(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.trim().strip_prefix("Firecracker v")).map(str::trim)
}

/// The VMM binary is found, runs, and is the release banger is tested against.
pub fn firecracker(host: &impl Host, setup: &Setup) -> Check {
    const NAME: &str = "firecracker";
    let install = format!(
        "sudo ./install.sh installs Firecracker v{TESTED_FIRECRACKER_VERSION} (or one you give with --firecracker PATH)"
    );
    let path = match &setup.firecracker {
        Ok(p) => p,
        Err(why) => return Check::bad(NAME, true, why.clone(), install),
    };
    let text = match host.version_of(path) {
        Ok(t) => t,
        Err(e) => {
            return Check::bad(NAME, true, format!("cannot run {} --version: {e}", path.display()), install);
        }
    };
    match parse_version(&text) {
        Some(v) if v == TESTED_FIRECRACKER_VERSION => {
            Check::ok(NAME, true, format!("{} is Firecracker v{v}", path.display()))
        }
        Some(v) => Check::bad(
            NAME,
            false,
            format!(
                "{} is Firecracker v{v}; banger is tested against v{TESTED_FIRECRACKER_VERSION}",
                path.display()
            ),
            install,
        ),
        None => Check::bad(
            NAME,
            true,
            format!("{} --version does not say \"Firecracker v...\": is it Firecracker?", path.display()),
            install,
        ),
    }
}

/// At least one image to boot.
pub fn images(host: &impl Host, setup: &Setup) -> Check {
    const NAME: &str = "images";
    match host.images(&setup.images_dir) {
        Ok(names) if !names.is_empty() => {
            Check::ok(NAME, false, format!("{} image(s): {}", names.len(), names.join(", ")))
        }
        Ok(_) => Check::bad(
            NAME,
            false,
            "no images yet",
            "banger image build (the first `banger vm run` without --image builds it too), or \
             banger image import NAME --kernel vmlinux --rootfs rootfs.ext4",
        ),
        Err(e) => Check::bad(
            NAME,
            false,
            format!("cannot list {}: {e}", setup.images_dir.display()),
            format!("check the permissions of {}", setup.images_dir.display()),
        ),
    }
}

/// Where the kernel keeps a feature, as far as `/proc`, `/sys` and `/lib/modules` tell.
#[derive(Debug, PartialEq, Eq)]
enum Presence {
    /// Built in or loaded now.
    Here,
    /// A module the kernel loads on demand.
    Module,
    /// Nowhere to be found.
    Missing,
}

/// Looks for a feature: a `/proc/misc` device name, paths that exist only when it is there, and
/// its module names (`dm-snapshot`; `/sys/module` spells them with `_`).
fn presence(host: &impl Host, root: &Path, misc: Option<&str>, paths: &[&str], modules: &[&str]) -> Presence {
    let misc_has = |name: &str| {
        host.read(&root.join("proc/misc"))
            .is_ok_and(|t| t.lines().any(|l| l.split_whitespace().nth(1) == Some(name)))
    };
    if misc.is_some_and(misc_has) || paths.iter().any(|p| host.exists(&root.join(p))) {
        return Presence::Here;
    }
    if modules.iter().any(|m| host.exists(&root.join("sys/module").join(m.replace('-', "_")))) {
        return Presence::Here;
    }
    let release = host.read(&root.join("proc/sys/kernel/osrelease")).unwrap_or_default();
    let dir = root.join("lib/modules").join(release.trim());
    let listed = |file: &str| {
        host.read(&dir.join(file)).is_ok_and(|t| {
            t.lines().any(|l| {
                let path = l.split(':').next().unwrap_or_default();
                let base = path.rsplit('/').next().unwrap_or_default();
                modules.iter().any(|m| base.split(".ko").next() == Some(m))
            })
        })
    };
    if listed("modules.builtin") {
        Presence::Here
    } else if listed("modules.dep") {
        Presence::Module
    } else {
        Presence::Missing
    }
}

fn feature(
    host: &impl Host,
    setup: &Setup,
    name: &'static str,
    required: bool,
    found: (Option<&str>, &[&str], &[&str]),
    what: &str,
    fix: &str,
) -> Check {
    match presence(host, &setup.root, found.0, found.1, found.2) {
        Presence::Here => Check::ok(name, required, format!("{what} is in the kernel")),
        Presence::Module => {
            Check::ok(name, required, format!("{what} is a module the kernel loads on demand"))
        }
        Presence::Missing => Check::bad(name, required, format!("the kernel has no {what}"), fix),
    }
}

/// The kernel features banger uses: TAPs, loop devices, device-mapper's snapshot target,
/// netfilter, landlock (the helper confines itself with it) and user namespaces (the image
/// builder).
pub fn kernel_features(host: &impl Host, setup: &Setup) -> Vec<Check> {
    let mut out = vec![
        feature(
            host,
            setup,
            "kernel tun",
            true,
            (Some("tun"), &[], &["tun"]),
            "TUN/TAP",
            "a kernel with CONFIG_TUN (then `sudo modprobe tun`)",
        ),
        feature(
            host,
            setup,
            "kernel loop",
            false,
            (Some("loop-control"), &[], &["loop"]),
            "loop device support",
            "a kernel with CONFIG_BLK_DEV_LOOP (needed only for dm-snapshot roots)",
        ),
        feature(
            host,
            setup,
            "kernel device-mapper",
            false,
            (None, &["sys/module/dm_snapshot"], &["dm-snapshot"]),
            "device-mapper snapshot target",
            "none needed: each VM gets a copy of its image instead (storage = reflink or copy); for \
             instant dm-snapshot roots use a kernel with CONFIG_DM_SNAPSHOT",
        ),
        feature(
            host,
            setup,
            "kernel netfilter",
            true,
            (None, &["proc/net/ip_tables_names"], &["nf_tables", "ip_tables"]),
            "netfilter (nf_tables or ip_tables)",
            "a kernel with CONFIG_NF_TABLES or CONFIG_IP_NF_IPTABLES, and `sudo apt-get install iptables`",
        ),
    ];
    out.push(landlock(host));
    out.push(user_namespaces(host, setup));
    out
}

fn landlock(host: &impl Host) -> Check {
    const NAME: &str = "kernel landlock";
    let why = "the helper confines its own file access with it";
    match host.landlock_abi() {
        Ok(abi) => Check::ok(NAME, false, format!("landlock is enabled (ABI {abi})")),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Check::bad(
            NAME,
            false,
            format!("landlock is built in but not enabled ({why})"),
            "add landlock to the lsm= list on the kernel command line (see /sys/kernel/security/lsm) and reboot",
        ),
        Err(e) => Check::bad(
            NAME,
            false,
            format!("the kernel has no landlock ({why}): {e}"),
            "a kernel with CONFIG_SECURITY_LANDLOCK (Linux 5.13 or newer)",
        ),
    }
}

fn user_namespaces(host: &impl Host, setup: &Setup) -> Check {
    const NAME: &str = "kernel user namespaces";
    let sysctl = |key: &str| {
        host.read(&setup.root.join("proc/sys").join(key.replace('.', "/"))).ok().map(|v| v.trim().to_owned())
    };
    let off = |key: &str, want: &str| sysctl(key).filter(|v| v != want).map(|v| (key.to_owned(), v));
    let problem = match sysctl("user.max_user_namespaces").as_deref() {
        None => Some(("user.max_user_namespaces".to_owned(), "missing".to_owned())),
        Some("0") => Some(("user.max_user_namespaces".to_owned(), "0".to_owned())),
        Some(_) => off("kernel.unprivileged_userns_clone", "1")
            .or_else(|| off("kernel.apparmor_restrict_unprivileged_userns", "0")),
    };
    match problem {
        None => Check::ok(NAME, false, "users may create user namespaces (banger image build needs them)"),
        Some((key, value)) if value == "missing" => Check::bad(
            NAME,
            false,
            format!("the kernel has no user namespaces ({key} is missing)"),
            "a kernel with CONFIG_USER_NS (banger image build needs it)",
        ),
        Some((key, value)) => {
            let want = if key == "user.max_user_namespaces" {
                "15000"
            } else if key == "kernel.unprivileged_userns_clone" {
                "1"
            } else {
                "0"
            };
            Check::bad(
                NAME,
                false,
                format!(
                    "{key} is {value}, so users may not create user namespaces (banger image build needs them)"
                ),
                format!("sudo sysctl -w {key}={want}, and the same line in /etc/sysctl.d/ to keep it"),
            )
        }
    }
}

/// This user has subordinate uid and gid ranges (the image builder maps a whole root
/// filesystem's owners into a user namespace).
pub fn subordinate_ids(host: &impl Host, setup: &Setup) -> Check {
    const NAME: &str = "subordinate ids";
    let user = host.user();
    let has = |file: &str| {
        host.read(&setup.root.join(file))
            .is_ok_and(|t| t.lines().any(|l| l.split(':').next() == Some(user.as_str())))
    };
    let missing: Vec<&str> = ["etc/subuid", "etc/subgid"].into_iter().filter(|f| !has(f)).collect();
    if missing.is_empty() {
        return Check::ok(NAME, false, format!("{user} has ranges in /etc/subuid and /etc/subgid"));
    }
    let files: Vec<String> = missing.iter().map(|f| format!("/{f}")).collect();
    Check::bad(
        NAME,
        false,
        format!("{user} has no range in {} (banger image build needs one)", files.join(" and ")),
        format!(
            "sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user} (or sudo ./install.sh)"
        ),
    )
}

const GIB: u64 = 1 << 30;
/// Below this, VMs cannot be made (a failure).
pub const MIN_FREE: u64 = GIB;
/// Below this, a default image and a few VMs may not fit (a warning).
pub const LOW_FREE: u64 = 4 * GIB;

/// Free space where VM disks and images go.
pub fn free_space(host: &impl Host, setup: &Setup) -> Check {
    const NAME: &str = "free space";
    let dir: &PathBuf = &setup.state_dir;
    let fix = format!(
        "free space on the filesystem of {}, or set BANGER_HOME to a directory on a larger one",
        dir.display()
    );
    match host.free_bytes(dir) {
        Ok(free) => {
            let detail = format!("{:.1} GiB free in {}", free as f64 / GIB as f64, dir.display());
            if free < MIN_FREE {
                Check::bad(NAME, true, format!("{detail} (at least 1 GiB needed)"), fix)
            } else if free < LOW_FREE {
                Check::bad(NAME, false, format!("{detail} (an image and a few VMs need about 4 GiB)"), fix)
            } else {
                Check::ok(NAME, true, detail)
            }
        }
        Err(e) => {
            Check::bad(NAME, true, format!("cannot tell the free space in {}: {e}", dir.display()), fix)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use banger_protocol::{Capabilities, InstallId, OwnedObjects, TapInfo, VmId};
    use futures::FutureExt;
    use futures::future::BoxFuture;

    use super::*;
    use crate::daemon::helper_client::AccessProblem;
    use crate::doctor::{Outcome, passed};

    type HelperAnswer = Box<dyn Fn() -> Result<HelperFacts, HelperClientError> + Send + Sync>;

    /// A machine described by tables; by default everything is as it should be.
    struct Fake {
        open: BTreeMap<PathBuf, io::ErrorKind>,
        groups: BTreeMap<PathBuf, String>,
        files: BTreeMap<PathBuf, String>,
        existing: BTreeSet<PathBuf>,
        free: u64,
        version: String,
        images: Vec<String>,
        helper: HelperAnswer,
        limits: Option<Limits>,
        landlock: Result<u32, i32>,
    }

    fn facts() -> HelperFacts {
        HelperFacts { protocol: 9, capabilities: Capabilities::default(), owned: OwnedObjects::default() }
    }

    impl Default for Fake {
        fn default() -> Self {
            let files = [
                ("/r/proc/misc", " 58 device-mapper\n200 tun\n237 loop-control\n"),
                ("/r/proc/sys/kernel/osrelease", "6.1.0-test\n"),
                (
                    "/r/lib/modules/6.1.0-test/modules.dep",
                    "kernel/drivers/md/dm-snapshot.ko.xz: kernel/drivers/md/dm-mod.ko.xz\nkernel/net/netfilter/nf_tables.ko.xz:\n",
                ),
                ("/r/proc/sys/user/max_user_namespaces", "63000\n"),
                ("/r/etc/subuid", "alice:100000:65536\n"),
                ("/r/etc/subgid", "alice:100000:65536\n"),
                ("/r/etc/group", "kvm:x:994:\nbanger:x:995:alice\n"),
            ];
            Fake {
                open: BTreeMap::new(),
                groups: BTreeMap::new(),
                files: files.iter().map(|(p, t)| (PathBuf::from(p), (*t).to_owned())).collect(),
                existing: BTreeSet::new(),
                free: 100 * GIB,
                version: "Firecracker v1.16.1\n\n".into(),
                images: vec!["debian".into()],
                helper: Box::new(|| Ok(facts())),
                limits: Some(Limits { max_vms: 16, max_taps: 16, max_loops: 32 }),
                landlock: Ok(3),
            }
        }
    }

    impl Host for Fake {
        fn user(&self) -> String {
            "alice".into()
        }
        fn open_rw(&self, path: &Path) -> io::Result<()> {
            self.open.get(path).map_or(Ok(()), |k| Err(io::Error::from(*k)))
        }
        fn group_of(&self, path: &Path) -> Option<String> {
            self.groups.get(path).cloned()
        }
        fn read(&self, path: &Path) -> io::Result<String> {
            self.files.get(path).cloned().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn exists(&self, path: &Path) -> bool {
            self.existing.contains(path) || self.files.contains_key(path)
        }
        fn free_bytes(&self, _dir: &Path) -> io::Result<u64> {
            Ok(self.free)
        }
        fn version_of(&self, _program: &Path) -> io::Result<String> {
            Ok(self.version.clone())
        }
        fn images(&self, _dir: &Path) -> io::Result<Vec<String>> {
            Ok(self.images.clone())
        }
        fn helper<'a>(&'a self, _socket: &'a Path) -> BoxFuture<'a, Result<HelperFacts, HelperClientError>> {
            let answer = (self.helper)();
            async move { answer }.boxed()
        }
        fn limits(&self) -> Option<Limits> {
            self.limits
        }
        fn landlock_abi(&self) -> io::Result<u32> {
            self.landlock.map_err(io::Error::from_raw_os_error)
        }
    }

    fn setup() -> Setup {
        Setup {
            kvm: "/dev/kvm".into(),
            tun: "/dev/net/tun".into(),
            helper_socket: "/run/banger/helper.sock".into(),
            firecracker: Ok("/usr/local/bin/firecracker".into()),
            state_dir: "/home/alice/.local/state/banger".into(),
            images_dir: "/home/alice/.local/state/banger/images".into(),
            root: "/r".into(),
        }
    }

    fn run(host: &Fake) -> Vec<Check> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(crate::doctor::run(host, &setup()))
    }

    fn only<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check {name}"))
    }

    /// The one check that is not ok, with its fix.
    fn the_problem(host: &Fake) -> (Check, bool) {
        let checks = run(host);
        let bad: Vec<&Check> = checks.iter().filter(|c| c.outcome != Outcome::Ok).collect();
        assert_eq!(bad.len(), 1, "{checks:#?}");
        (bad[0].clone(), passed(&checks))
    }

    #[test]
    fn a_healthy_host_passes_every_check() {
        let checks = run(&Fake::default());
        assert!(checks.iter().all(|c| c.outcome == Outcome::Ok), "{checks:#?}");
        assert!(passed(&checks));
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "kvm",
                "tun",
                "helper",
                "firecracker",
                "images",
                "kernel tun",
                "kernel loop",
                "kernel device-mapper",
                "kernel netfilter",
                "kernel landlock",
                "kernel user namespaces",
                "subordinate ids",
                "free space"
            ]
        );
        assert_eq!(
            only(&checks, "kernel device-mapper").detail,
            "device-mapper snapshot target is a module the kernel loads on demand"
        );
        let helper = &only(&checks, "helper").detail;
        assert!(
            helper.contains("quota left: 16 of 16 VMs, 16 of 16 TAPs, 32 of 32 loop devices"),
            "{helper}"
        );
        assert!(helper.contains("; firewall nftables;"), "{helper}");
    }

    #[test]
    fn kvm_without_permission_names_the_group_to_join() {
        let mut host = Fake::default();
        host.open.insert("/dev/kvm".into(), io::ErrorKind::PermissionDenied);
        host.groups.insert("/dev/kvm".into(), "kvm".into());
        let (c, ok) = the_problem(&host);
        assert_eq!(c.name, "kvm");
        assert!(!ok, "a required check");
        assert_eq!(c.fix.as_deref(), Some("sudo usermod -aG kvm alice, then log in again"));
        assert!(c.line().starts_with("FAIL kvm: /dev/kvm is not usable by alice"), "{}", c.line());
        // Already listed in the group: only this login lacks it.
        host.files.insert("/r/etc/group".into(), "kvm:x:994:bob,alice\n".into());
        let (c, _) = the_problem(&host);
        assert!(c.fix.unwrap().contains("sg kvm -c 'banger ...'"));
        // Root's device: install.sh gives it a group.
        host.groups.insert("/dev/kvm".into(), "root".into());
        let (c, _) = the_problem(&host);
        assert!(c.fix.unwrap().starts_with("sudo ./install.sh (it gives /dev/kvm to group kvm"));
    }

    #[test]
    fn a_missing_kvm_says_to_enable_virtualization() {
        let mut host = Fake::default();
        host.open.insert("/dev/kvm".into(), io::ErrorKind::NotFound);
        let (c, _) = the_problem(&host);
        assert_eq!(c.detail, "there is no /dev/kvm");
        assert!(c.fix.unwrap().contains("sudo modprobe kvm_intel"));
    }

    #[test]
    fn tun_without_permission_says_chmod() {
        let mut host = Fake::default();
        host.open.insert("/dev/net/tun".into(), io::ErrorKind::PermissionDenied);
        let (c, ok) = the_problem(&host);
        assert_eq!((c.name, ok), ("tun", false));
        assert!(c.fix.unwrap().starts_with("sudo chmod 0666 /dev/net/tun"));
    }

    #[test]
    fn helper_not_running_says_how_to_start_it() {
        let host = Fake {
            helper: Box::new(|| {
                Err(HelperClientError::Unreachable {
                    socket: "/run/banger/helper.sock".into(),
                    source: io::Error::from(io::ErrorKind::ConnectionRefused),
                })
            }),
            ..Fake::default()
        };
        let (c, ok) = the_problem(&host);
        assert_eq!((c.name, ok), ("helper", false));
        assert!(c.detail.starts_with("banger-helper is not running"), "{}", c.detail);
        let fix = c.fix.unwrap();
        assert!(fix.starts_with("sudo systemctl start banger-helper.socket, or where systemd does not run: sudo banger-helper serve --policy /etc/banger/policy.toml --socket /run/banger/helper.sock"), "{fix}");
    }

    #[test]
    fn helper_without_permission_gives_the_access_problem() {
        let host = Fake {
            helper: Box::new(|| {
                Err(HelperClientError::NoAccess {
                    socket: "/run/banger/helper.sock".into(),
                    problem: AccessProblem::NotInGroup { group: "banger".into() },
                    source: io::Error::from(io::ErrorKind::PermissionDenied),
                })
            }),
            ..Fake::default()
        };
        let (c, _) = the_problem(&host);
        assert!(c.detail.starts_with("no permission"), "{}", c.detail);
        assert!(c.fix.unwrap().contains("usermod -aG banger USER"));
    }

    #[test]
    fn helper_refusing_by_policy_says_who_decides() {
        let host = Fake {
            helper: Box::new(|| {
                Err(HelperClientError::Helper(HelperError::Denied {
                    rule: "access".into(),
                    reason: "uid 1001 is not admitted".into(),
                }))
            }),
            ..Fake::default()
        };
        let (c, _) = the_problem(&host);
        assert!(
            c.detail.starts_with("banger-helper refuses this user: denied by policy rule `access`"),
            "{}",
            c.detail
        );
        assert!(c.fix.unwrap().contains("policy explain /etc/banger/policy.toml --user NAME"));
    }

    #[test]
    fn the_quota_left_counts_each_vm_once() {
        let install = InstallId::new("a").unwrap();
        let tap = |vm: &str| TapInfo {
            install: install.clone(),
            vm: VmId::new(vm).unwrap(),
            name: "bg0".into(),
            host_ip: "172.30.0.1".parse().unwrap(),
            guest_ip: "172.30.0.2".parse().unwrap(),
            prefix_len: 30,
            guest_mac: "06:00:ac:1e:00:02".into(),
        };
        let owned = OwnedObjects { taps: vec![tap("one"), tap("two")], ..OwnedObjects::default() };
        let f = HelperFacts { owned, ..facts() };
        assert_eq!(
            quota_left(&f, Some(Limits { max_vms: 4, max_taps: 2, max_loops: 8 })),
            "quota left: 2 of 4 VMs, 0 of 2 TAPs, 8 of 8 loop devices"
        );
        assert_eq!(quota_left(&f, None), "quota left unknown (the policy file is not readable)");
    }

    #[test]
    fn firecracker_missing_or_of_another_release() {
        let host = Fake::default();
        let mut s = setup();
        s.firecracker = Err("vmm binary firecracker (from the default) is not on PATH".into());
        let c = firecracker(&host, &s);
        assert_eq!(c.outcome, Outcome::Fail);
        assert_eq!(
            c.fix.as_deref(),
            Some("sudo ./install.sh installs Firecracker v1.16.1 (or one you give with --firecracker PATH)")
        );
        let host = Fake { version: "Firecracker v1.15.0\n".into(), ..Fake::default() };
        let (c, ok) = the_problem(&host);
        assert_eq!((c.outcome, ok), (Outcome::Warn, true), "another release only warns");
        assert!(
            c.detail.ends_with("is Firecracker v1.15.0; banger is tested against v1.16.1"),
            "{}",
            c.detail
        );
        let host = Fake { version: "hello\n".into(), ..Fake::default() };
        let (c, ok) = the_problem(&host);
        assert!(!ok && c.detail.contains("is it Firecracker?"), "{}", c.detail);
    }

    #[test]
    fn no_images_says_to_build_one() {
        let host = Fake { images: vec![], ..Fake::default() };
        let (c, ok) = the_problem(&host);
        assert_eq!((c.name, c.outcome, ok), ("images", Outcome::Warn, true));
        assert!(c.fix.unwrap().starts_with("banger image build"));
    }

    #[test]
    fn kernel_without_device_mapper_only_warns() {
        let mut host = Fake::default();
        host.files.insert(
            "/r/lib/modules/6.1.0-test/modules.dep".into(),
            "kernel/net/netfilter/nf_tables.ko.xz:\n".into(),
        );
        let (c, ok) = the_problem(&host);
        assert_eq!((c.name, c.outcome, ok), ("kernel device-mapper", Outcome::Warn, true));
        assert!(c.fix.unwrap().contains("each VM gets a copy of its image"));
        // Loaded now counts too.
        host.existing.insert("/r/sys/module/dm_snapshot".into());
        assert!(run(&host).iter().all(|c| c.outcome == Outcome::Ok));
    }

    #[test]
    fn kernel_without_tun_or_netfilter_fails() {
        let mut host = Fake::default();
        host.files.insert("/r/proc/misc".into(), "237 loop-control\n".into());
        let (c, ok) = the_problem(&host);
        assert_eq!((c.name, ok), ("kernel tun", false));
        assert!(c.fix.unwrap().contains("CONFIG_TUN"));
        let mut host = Fake::default();
        host.files.insert(
            "/r/lib/modules/6.1.0-test/modules.dep".into(),
            "kernel/drivers/md/dm-snapshot.ko.xz:\n".into(),
        );
        let (c, ok) = the_problem(&host);
        assert_eq!((c.name, ok), ("kernel netfilter", false));
        assert!(c.fix.unwrap().contains("CONFIG_NF_TABLES"));
        host.files.insert(
            "/r/lib/modules/6.1.0-test/modules.builtin".into(),
            "kernel/net/ipv4/netfilter/ip_tables.ko\n".into(),
        );
        assert!(run(&host).iter().all(|c| c.outcome == Outcome::Ok));
    }

    #[test]
    fn kernel_without_loop_or_landlock_warns() {
        let mut host = Fake::default();
        host.files.insert("/r/proc/misc".into(), "200 tun\n".into());
        let (c, ok) = the_problem(&host);
        assert_eq!((c.name, ok), ("kernel loop", true));
        assert!(c.fix.unwrap().contains("CONFIG_BLK_DEV_LOOP"));
        let host = Fake { landlock: Err(libc::EOPNOTSUPP), ..Fake::default() };
        let (c, ok) = the_problem(&host);
        assert_eq!((c.name, ok), ("kernel landlock", true));
        assert!(c.fix.unwrap().starts_with("add landlock to the lsm= list"));
        let host = Fake { landlock: Err(libc::ENOSYS), ..Fake::default() };
        let (c, _) = the_problem(&host);
        assert!(c.fix.unwrap().contains("CONFIG_SECURITY_LANDLOCK"));
    }

    #[test]
    fn user_namespaces_turned_off_gives_the_sysctl() {
        for (key, value, fix) in [
            ("user/max_user_namespaces", "0", "sudo sysctl -w user.max_user_namespaces=15000"),
            ("kernel/unprivileged_userns_clone", "0", "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
            (
                "kernel/apparmor_restrict_unprivileged_userns",
                "1",
                "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
            ),
        ] {
            let mut host = Fake::default();
            host.files.insert(PathBuf::from("/r/proc/sys").join(key), format!("{value}\n"));
            let (c, ok) = the_problem(&host);
            assert_eq!((c.name, ok), ("kernel user namespaces", true));
            assert!(c.fix.as_deref().unwrap().starts_with(fix), "{c:?}");
        }
    }

    #[test]
    fn missing_subordinate_ids_give_usermod() {
        let mut host = Fake::default();
        host.files.insert("/r/etc/subgid".into(), "bob:100000:65536\n".into());
        let (c, _) = the_problem(&host);
        assert_eq!(c.detail, "alice has no range in /etc/subgid (banger image build needs one)");
        assert!(
            c.fix
                .unwrap()
                .starts_with("sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 alice")
        );
    }

    #[test]
    fn little_free_space_warns_then_fails() {
        let host = Fake { free: 2 * GIB, ..Fake::default() };
        let (c, ok) = the_problem(&host);
        assert_eq!((c.name, c.outcome, ok), ("free space", Outcome::Warn, true));
        let host = Fake { free: GIB / 2, ..Fake::default() };
        let (c, ok) = the_problem(&host);
        assert_eq!((c.outcome, ok), (Outcome::Fail, false));
        assert!(c.fix.unwrap().contains("set BANGER_HOME"));
    }
}
