//! The systemd units, install.sh, the Debian package, README and the helper agree: the binary
//! the units run is where install.sh and the package install it, the socket unit makes the
//! socket and its directory as the helper does by hand, README's by-hand command names the units'
//! paths, and `systemd-analyze verify` accepts the units, bangerd's user unit too (where
//! systemd-analyze is installed).

use std::path::{Path, PathBuf};
use std::process::Command;

use banger_helper::cli::{DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use banger_helper::socket::{DIR_MODE, SOCKET_MODE};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The values of `key=` in a unit file, in order.
fn values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines().filter_map(|l| l.strip_prefix(&prefix)).map(str::to_owned).collect()
}

fn value(unit: &str, key: &str) -> String {
    let v = values(unit, key);
    assert_eq!(v.len(), 1, "{key}= {v:?}");
    v[0].clone()
}

/// The helper as the units name it: a bare name, which systemd looks up in `/usr/local/bin`
/// (install.sh) and `/usr/bin` (the Debian package).
const UNIT_HELPER: &str = "banger-helper";

#[test]
fn the_units_run_the_binary_install_sh_and_the_package_install() {
    let service = read("packaging/banger-helper.service");
    let policy = banger_policy::DEFAULT_POLICY_PATH;
    assert_eq!(value(&service, "ExecStartPre"), format!("{UNIT_HELPER} policy check {policy}"));
    assert_eq!(
        value(&service, "ExecStart"),
        format!("{UNIT_HELPER} serve --policy {policy} --state-dir {DEFAULT_STATE_DIR}")
    );
    assert_eq!(format!("/var/lib/{}", value(&service, "StateDirectory")), DEFAULT_STATE_DIR);
    let install = read("install.sh");
    assert!(
        install.lines().any(|l| l == "PREFIX=/usr/local") && install.lines().any(|l| l == "BIN=$PREFIX/bin")
    );
    assert!(
        install.lines().any(|l| l == "POLICY=$ETC/policy.toml")
            && install.lines().any(|l| l == "ETC=/etc/banger")
    );
    assert!(install.contains(&format!("HELPER_STATE={DEFAULT_STATE_DIR}")));
    let manifest = read("banger-helper/Cargo.toml");
    assert!(
        manifest.contains(r#"["target/release/banger-helper", "usr/bin/", "755"]"#),
        "the Debian package installs the helper to /usr/bin"
    );
    assert!(
        manifest.contains(r#"["../packaging/policy.toml", "etc/banger/policy.toml", "644"]"#),
        "the Debian package installs the policy where the unit reads it"
    );
    assert!(read("SECURITY.md").contains("running `banger-helper`"), "SECURITY.md names the unit's binary");
}

#[test]
fn the_unit_bounds_the_helper_to_the_capabilities_it_keeps() {
    let service = read("packaging/banger-helper.service");
    let mut bounding: Vec<String> =
        value(&service, "CapabilityBoundingSet").split_whitespace().map(str::to_owned).collect();
    bounding.sort();
    let mut kept: Vec<String> =
        banger_helper::hardening::caps::kept(true).iter().map(|c| c.to_string()).collect();
    kept.sort();
    assert_eq!(bounding, kept, "with device-mapper, the helper keeps exactly what the unit allows");
    let devices = values(&service, "DeviceAllow");
    assert!(devices.contains(&"/dev/mapper/control rw".to_owned()), "{devices:?}");
    assert!(devices.contains(&"block-device-mapper rwm".to_owned()), "the dm nodes are made: {devices:?}");
}

#[test]
fn the_jailer_drop_in_bounds_the_launcher_to_the_capabilities_it_keeps() {
    let service = read("packaging/banger-helper.service");
    let drop_in = read("packaging/banger-helper-jailer.conf");
    let mut bounding: Vec<String> = [&service, &drop_in]
        .iter()
        .flat_map(|u| {
            value(u, "CapabilityBoundingSet").split_whitespace().map(str::to_owned).collect::<Vec<_>>()
        })
        .collect();
    bounding.sort();
    bounding.dedup();
    let mut kept: Vec<String> = banger_helper::hardening::caps::kept(true)
        .iter()
        .chain(banger_helper::launcher::confine::KEPT.iter())
        .map(|c| c.to_string())
        .collect();
    kept.sort();
    kept.dedup();
    assert_eq!(bounding, kept, "the unit with the drop-in allows what the helper and its launcher keep");
    let devices = values(&drop_in, "DeviceAllow");
    for node in ["/dev/kvm rwm", "/dev/net/tun rwm", "/dev/urandom rwm", "/dev/userfaultfd rwm"] {
        assert!(devices.contains(&node.to_owned()), "the jailer makes {node}: {devices:?}");
    }
    assert_eq!(value(&drop_in, "KillMode"), "process", "jailed VMMs outlive a helper restart");
}

#[test]
fn the_socket_unit_makes_what_the_helper_makes_by_hand() {
    let socket = read("packaging/banger-helper.socket");
    assert_eq!(value(&socket, "ListenStream"), DEFAULT_SOCKET);
    assert_eq!(value(&socket, "SocketUser"), "root");
    assert_eq!(value(&socket, "SocketGroup"), banger_policy::Policy::default_policy().access.socket_group);
    assert_eq!(value(&socket, "SocketMode"), format!("{SOCKET_MODE:04o}"));
    assert_eq!(value(&socket, "DirectoryMode"), format!("{DIR_MODE:04o}"));
}

#[test]
fn readme_starts_by_hand_what_the_units_start() {
    let readme = read("README.md");
    let start = readme.find("sudo banger-helper serve").expect("README's by-hand command");
    let command: String = readme[start..].lines().take(2).collect::<Vec<_>>().join(" ").replace('\\', " ");
    let words: Vec<&str> = command.split_whitespace().collect();
    let arg = |flag: &str| words.iter().position(|w| *w == flag).map(|i| words[i + 1]);
    assert_eq!(arg("--policy"), Some(banger_policy::DEFAULT_POLICY_PATH), "{command}");
    assert_eq!(arg("--socket"), Some(DEFAULT_SOCKET), "{command}");
    assert_eq!(arg("--state-dir"), Some(DEFAULT_STATE_DIR), "{command}");
}

#[test]
fn systemd_accepts_the_units() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("systemd-analyze is not installed, and CI=true: the units must be verified in CI");
        }
        eprintln!("SKIPPED: systemd_accepts_the_units needs systemd-analyze");
        return;
    };
    assert!(out.status.success());
    // The units as installed, except that the service runs the binary just built (verify checks
    // that the command exists).
    let dir = tempfile::tempdir().unwrap();
    let service = read("packaging/banger-helper.service")
        .replace(&format!("={UNIT_HELPER} "), &format!("={} ", env!("CARGO_BIN_EXE_banger-helper")));
    std::fs::write(dir.path().join("banger-helper.service"), service).unwrap();
    std::fs::copy(repo().join("packaging/banger-helper.socket"), dir.path().join("banger-helper.socket"))
        .unwrap();
    let verify = || {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.path().join("banger-helper.socket"))
            .arg(dir.path().join("banger-helper.service"))
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let (ok, text) = verify();
    assert!(ok && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
    // With the jailer drop-in beside it.
    let drop_ins = dir.path().join("banger-helper.service.d");
    std::fs::create_dir(&drop_ins).unwrap();
    std::fs::copy(repo().join("packaging/banger-helper-jailer.conf"), drop_ins.join("jailer.conf")).unwrap();
    let (ok, text) = verify();
    assert!(ok && text.trim().is_empty(), "systemd-analyze verify with the jailer drop-in:\n{text}");

    // bangerd's user unit, checked by a user manager's rules (which need a runtime directory);
    // verify only checks that the command exists, so any binary stands in for bangerd.
    let unit = read("packaging/bangerd.service");
    assert_eq!(value(&unit, "ExecStart"), "bangerd", "looked up in /usr/local/bin, then /usr/bin");
    let runtime = tempfile::tempdir().unwrap();
    let unit =
        unit.replace("ExecStart=bangerd", &format!("ExecStart={}", env!("CARGO_BIN_EXE_banger-helper")));
    std::fs::write(dir.path().join("bangerd.service"), unit).unwrap();
    let out = Command::new("systemd-analyze")
        .env("XDG_RUNTIME_DIR", runtime.path())
        .args(["--user", "verify", "--man=no"])
        .arg(dir.path().join("bangerd.service"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze --user verify:\n{text}");
}
