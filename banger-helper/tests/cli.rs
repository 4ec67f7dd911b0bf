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
fn policy_explain_speaks_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[access]\nusers = [\"alice\"]\n").unwrap();
    let (ok, out, err) = run(&["policy", "explain", file.to_str().unwrap(), "--user", "alice"]);
    assert!(ok, "{err}");
    assert!(out.contains("alice"), "{out}");
}
