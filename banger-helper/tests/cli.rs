//! The command line without root: `--version`, `policy check`, `policy explain`.

use std::process::Command;

const HELPER: &str = env!("CARGO_BIN_EXE_banger-helper");

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(HELPER).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version() {
    let (ok, out, _) = run(&["--version"]);
    assert!(ok);
    assert_eq!(out.trim(), format!("banger-helper {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn policy_check_names_the_line_of_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[access]\nusers = [\"alice\"]\n").unwrap();
    let (ok, out, err) = run(&["policy", "check", good.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("ok"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[access]\nusers = [\"alice\"]\n\n[quotas]\nmax_vms = -1\n").unwrap();
    let (ok, _, err) = run(&["policy", "check", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains(&format!("{}:5:", bad.display())), "{err}");

    let (ok, _, err) = run(&["policy", "check", dir.path().join("missing.toml").to_str().unwrap()]);
    assert!(!ok && err.contains("missing.toml") && err.contains("cannot read"), "{err}");
}

#[test]
fn policy_check_fails_when_the_host_does_not_fit_the_jailer_section() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    // A dynamically linked "firecracker" and a chroot base everyone may write.
    std::fs::write(
        &file,
        "[access]\nusers = [\"alice\"]\n[jailer]\njailer = \"/usr/bin/env\"\nfirecracker = \"/bin/sh\"\n\
         chroot_base = \"/tmp\"\nuid_range = \"3900000000-3900000099\"\n",
    )
    .unwrap();
    let (ok, out, err) = run(&["policy", "check", file.to_str().unwrap()]);
    assert!(!ok && !out.contains("ok"), "{out}");
    assert!(err.contains("jailer.firecracker: /bin/sh is dynamically linked"), "{err}");
    assert!(
        err.contains(
            "jailer.chroot_base: /tmp is writable by its group and others (mode 1777); chmod go-w /tmp"
        ),
        "{err}"
    );
    let (ok, out, _) = run(&["policy", "explain", file.to_str().unwrap()]);
    assert!(ok && out.contains("Jailed VMs run /bin/sh through /usr/bin/env"), "{out}");
}

#[test]
fn policy_explain_speaks_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[access]\nusers = [\"alice\"]\n").unwrap();
    let (ok, out, err) = run(&["policy", "explain", file.to_str().unwrap(), "--user", "alice"]);
    assert!(ok, "{err}");
    assert!(out.contains("alice"), "{out}");
}
