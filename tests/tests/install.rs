//! `install.sh` on this machine: without network and without `--firecracker` it stops before
//! changing anything; run twice it installs once (the manifest does not change); `banger doctor`,
//! run by the user it set up, passes every check this machine can pass; `--uninstall` leaves the
//! machine as it found it (files, groups, membership, units, udev rule, subordinate ids, device
//! modes).
//!
//! The binaries are the test build's (`--bin-dir`), the VMM the Firecracker test double
//! (`--firecracker`), so nothing is built or downloaded. The helper is started by hand, as
//! install.sh says to where systemd does not run, inside a network namespace of its own.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_tests::e2e::fixtures;

/// Everything install.sh may add or change, as found now.
fn machine_state(user: &str) -> BTreeMap<String, String> {
    let mut state = BTreeMap::new();
    let paths = [
        "/usr/local/bin/banger",
        "/usr/local/bin/bangerd",
        "/usr/local/bin/banger-helper",
        "/usr/local/bin/firecracker",
        "/usr/local/bin/jailer",
        "/etc/banger",
        "/etc/banger/policy.toml",
        "/etc/systemd/system/banger-helper.service",
        "/etc/systemd/system/banger-helper.socket",
        "/etc/udev/rules.d/70-banger.rules",
        "/var/lib/banger-install",
        "/var/lib/banger-helper",
        "/run/banger",
        "/var/log/banger",
        "/dev/banger",
        "/dev/kvm",
        "/dev/net/tun",
        "/etc/subuid",
        "/etc/subgid",
    ];
    for p in paths {
        let value = match fs::symlink_metadata(p) {
            Ok(m) => format!("uid {} gid {} mode {:o} size {}", m.uid(), m.gid(), m.mode(), m.len()),
            Err(_) => "absent".to_owned(),
        };
        state.insert(p.to_owned(), value);
    }
    for file in ["/etc/group", "/etc/gshadow"] {
        let text = fs::read_to_string(file).unwrap_or_default();
        for line in text.lines() {
            let name = line.split(':').next().unwrap_or_default();
            if name == "banger" || name == "kvm" || line.contains(user) {
                state.insert(format!("{file}: {name}"), line.to_owned());
            }
        }
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = fs::read_to_string(file).unwrap_or_default();
        let mine: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("{user}:"))).collect();
        state.insert(format!("{file} lines of {user}"), mine.join("\n"));
    }
    state
}

/// What differs between two states.
fn differences(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| format!("{k}: {:?} -> {:?}", before.get(k), after.get(k)))
        .collect()
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

fn run(cmd: &mut Command) -> Ran {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn install_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../install.sh")
}

/// install.sh with `args`, in a network namespace without any network.
fn install(args: &[&str]) -> Ran {
    run(Command::new("unshare").arg("--net").arg(install_sh()).args(args))
}

/// Undoes what the test made, whatever happened: the helper, an install, the user.
struct Cleanup {
    user: String,
    helper: Option<Child>,
    installed: bool,
}

impl Cleanup {
    fn stop_helper(&mut self) {
        if let Some(mut child) = self.helper.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.stop_helper();
        if self.installed {
            let r = install(&["--uninstall"]);
            if r.code != Some(0) {
                eprintln!("cleanup: install.sh --uninstall failed:\n{r}");
            }
        }
        let r = run(Command::new("userdel").arg(&self.user));
        if r.code != Some(0) {
            eprintln!("cleanup: userdel {} failed:\n{r}", self.user);
        }
    }
}

fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        panic!(
            "the install test needs root (it runs install.sh on this machine){}; run tests/run as root",
            if ci { " and CI=true requires it to run" } else { "" }
        );
    }
}

#[test]
#[ignore = "needs root: runs install.sh on this machine (binaries, groups, policy, devices), creates a user, then removes both"]
fn install_twice_doctor_then_uninstall_leaves_nothing() {
    require_root();
    assert!(
        !Path::new("/var/lib/banger-install").exists(),
        "install.sh has installed banger on this machine already; run ./install.sh --uninstall first"
    );
    assert!(
        !Path::new("/usr/local/bin/firecracker").exists(),
        "/usr/local/bin/firecracker exists: this test checks that install.sh stops without network when it \
         would download one"
    );

    // A user without subordinate ids, groups or home, as a fresh account would be for banger.
    let user = format!("bginst{}", std::process::id() % 100_000);
    let made = run(Command::new("useradd").args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        &user,
    ]));
    assert_eq!(made.code, Some(0), "useradd failed:\n{made}");
    let mut cleanup = Cleanup { user: user.clone(), helper: None, installed: false };

    let temp = tempfile::tempdir().unwrap();
    fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bin = temp.path().join("bin");
    fixtures::stage_binaries(&bin, &["banger", "bangerd", "banger-helper", "firecracker-double"]).unwrap();
    let bin_s = bin.to_str().unwrap();
    let double = bin.join("firecracker-double");
    let before = machine_state(&user);

    // No network and no --firecracker: the exact manual step, and nothing changed.
    let offline = install(&["--bin-dir", bin_s, "--user", &user]);
    assert_eq!(offline.code, Some(1), "{offline}");
    for needle in [
        "cannot download Firecracker v1.16.1",
        "Nothing was changed.",
        "echo '382a02a869e4d6d5cb14c40577f9545e8458021ea8b0b2d3fc10ec14d9c242e6  firecracker-v1.16.1-x86_64.tgz' | sha256sum -c",
        "--firecracker ./firecracker-v1.16.1-",
    ] {
        assert!(offline.stderr.contains(needle), "missing {needle:?}:\n{offline}");
    }
    assert_eq!(differences(&before, &machine_state(&user)), Vec::<String>::new(), "{offline}");

    // Twice: the second run adds nothing.
    let args = ["--bin-dir", bin_s, "--firecracker", double.to_str().unwrap(), "--user", &user];
    cleanup.installed = true;
    let first = install(&args);
    assert_eq!(first.code, Some(0), "first install:\n{first}");
    let manifest = fs::read_to_string("/var/lib/banger-install/manifest").unwrap();
    let second = install(&args);
    assert_eq!(second.code, Some(0), "second install:\n{second}");
    assert_eq!(fs::read_to_string("/var/lib/banger-install/manifest").unwrap(), manifest, "{second}");
    for b in ["banger", "bangerd", "banger-helper"] {
        let installed = fs::metadata(Path::new("/usr/local/bin").join(b)).unwrap();
        let built = fs::metadata(bin.join(b)).unwrap();
        assert!(installed.len() < built.len(), "{b} was not stripped: {} bytes", installed.len());
        assert_eq!(installed.mode() & 0o7777, 0o755);
    }
    let ids = run(Command::new("id").args(["-nG", &user]));
    for g in ["banger", "kvm"] {
        assert!(ids.stdout.split_whitespace().any(|x| x == g), "{user} is not in {g}: {ids}");
    }
    assert!(
        first.stdout.contains(&format!("sudo -u {user} banger vm run --name demo -- cat /etc/hostname")),
        "install.sh does not say how to run the first command with the new groups:\n{first}"
    );
    let policy = run(Command::new("/usr/local/bin/banger-helper").args([
        "policy",
        "explain",
        "/etc/banger/policy.toml",
        "--user",
        &user,
    ]));
    assert!(policy.stdout.starts_with(&format!("{user} may connect (a member of group banger")), "{policy}");

    // The helper, started by hand as install.sh says where systemd does not run.
    let start = first
        .stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("sudo /usr/local/bin/banger-helper serve"))
        .unwrap_or_else(|| panic!("install.sh does not say how to start the helper:\n{first}"));
    let words: Vec<&str> = start.split_whitespace().skip(1).collect();
    let helper_log = fs::File::create(temp.path().join("helper.log")).unwrap();
    cleanup.helper = Some(
        Command::new("unshare")
            .arg("--net")
            .args(&words)
            .stdin(Stdio::null())
            .stdout(helper_log.try_clone().unwrap())
            .stderr(helper_log)
            .spawn()
            .unwrap(),
    );
    let socket = Path::new("/run/banger/helper.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the helper did not make its socket:\n{}",
            fs::read_to_string(temp.path().join("helper.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // banger doctor, as the user, with the groups a fresh login has.
    let home = temp.path().join("home");
    fs::create_dir(&home).unwrap();
    let account = nix::unistd::User::from_name(&user).unwrap().unwrap();
    nix::unistd::chown(&home, Some(account.uid), Some(account.gid)).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    let doctor = run(Command::new("runuser")
        .args(["-u", &user, "--", "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin"])
        .arg(format!("BANGER_HOME={}", home.display()))
        .args(["/usr/local/bin/banger", "doctor"]));
    let json = run(Command::new("runuser")
        .args(["-u", &user, "--", "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin"])
        .arg(format!("BANGER_HOME={}", home.display()))
        .args(["/usr/local/bin/banger", "doctor", "--json"]));
    println!("banger doctor as {user}:\n{}", doctor.stdout);
    assert_eq!(doctor.code, Some(0), "a required check failed:\n{doctor}");
    assert_eq!(json.code, Some(0), "{json}");
    let checks: Vec<serde_json::Value> = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(checks.len(), doctor.stdout.lines().count(), "one line per check:\n{doctor}");
    let outcome = |name: &str| {
        checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no check {name}:\n{doctor}"))["outcome"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // What install.sh set up must pass.
    for name in ["kvm", "tun", "helper", "firecracker", "subordinate ids", "kernel tun", "kernel netfilter"] {
        assert_eq!(outcome(name), "ok", "{name}:\n{doctor}");
    }
    assert!(doctor.stdout.contains(&format!("admits {user}")), "{doctor}");
    assert!(
        doctor.stdout.contains("quota left: 16 of 16 VMs, 16 of 16 TAPs, 32 of 32 loop devices"),
        "{doctor}"
    );
    // What this machine may lack: no image is imported in this test, and a host without
    // device-mapper (or landlock, or user namespaces for users) has a warning, never a failure.
    // Whether KVM can really boot a guest is beyond what doctor can tell from /dev/kvm.
    let may_warn = [
        "images",
        "kernel device-mapper",
        "kernel loop",
        "kernel landlock",
        "kernel user namespaces",
        "free space",
    ];
    for c in &checks {
        let name = c["name"].as_str().unwrap();
        if c["outcome"] != "ok" {
            assert!(
                may_warn.contains(&name) && c["outcome"] == "warn",
                "{name} is {}:\n{doctor}",
                c["outcome"]
            );
            println!("this machine cannot pass: {name}");
        }
    }
    println!("this machine cannot pass either (not a doctor check): booting a guest under KVM");

    // Uninstall refuses while the helper it would remove still runs, and names it.
    let installed = machine_state(&user);
    let refused = install(&["--uninstall"]);
    let pid = cleanup.helper.as_ref().map(Child::id).unwrap();
    assert_eq!(refused.code, Some(1), "{refused}");
    assert!(refused.stderr.contains(&format!("banger-helper runs (pid {pid},")), "{refused}");
    assert!(refused.stderr.contains(&format!("stop it first (sudo kill {pid})")), "{refused}");
    assert_eq!(differences(&installed, &machine_state(&user)), Vec::<String>::new(), "{refused}");

    // Uninstall refuses while the helper's ledger still holds a VM's kernel objects (or that it
    // turned forwarding on): removing its state would orphan them.
    cleanup.stop_helper();
    let objects = Path::new("/var/lib/banger-helper/objects.json");
    let ledger = fs::read_to_string(objects).ok();
    fs::write(objects, "{\n  \"format\": 2,\n  \"entries\": [\n    {}\n  ]\n}\n").unwrap();
    let held = install(&["--uninstall"]);
    match &ledger {
        Some(text) => fs::write(objects, text).unwrap(),
        None => fs::remove_file(objects).unwrap(),
    }
    assert_eq!(held.code, Some(1), "{held}");
    assert!(held.stderr.contains("still holds kernel objects for VMs"), "{held}");
    assert!(held.stderr.contains("banger vm delete"), "{held}");

    // Uninstall: everything install.sh added goes, and what it changed is put back.
    let gone = install(&["--uninstall"]);
    assert_eq!(gone.code, Some(0), "{gone}");
    cleanup.installed = false;
    assert_eq!(differences(&before, &machine_state(&user)), Vec::<String>::new(), "{gone}");
    let again = install(&["--uninstall"]);
    assert_eq!(again.code, Some(0), "{again}");
    assert!(again.stdout.contains("nothing to remove"), "{again}");
}
