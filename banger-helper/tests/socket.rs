//! The socket on disk when the helper is started by hand (`sudo banger-helper serve ...`, whatever
//! the umask): the directory and the socket get the modes SECURITY.md states, a directory left
//! with a wrong mode by an earlier run is set right, and a path someone else could write to is
//! refused.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use banger_protocol::{HelperError, Request, Response};
use common::*;

/// A policy admitting the members of the socket group, as README suggests (`groups = ["banger"]`).
fn group_policy() -> String {
    format!("[access]\ngroups = [\"{SOCKET_GID}\"]\nsocket_group = \"{SOCKET_GID}\"\n")
}

/// Owner uid, group and mode (without the file type) of `path`, not following a link.
fn owner_mode(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// A member of the socket group (and of no group the policy names otherwise) says hello and pings.
fn member_session(socket: &Path, uid: u32) -> Vec<Response> {
    let socket = socket.to_owned();
    as_uid(uid, move || match Client::connect(&socket, "byhand") {
        Ok((c, hello)) => vec![hello, c.call(Request::Ping)],
        Err(e) => vec![client_error(e)],
    })
}

/// Runs `serve` in `ns`, which must fail within 10 s (else it is killed), and returns its standard
/// error.
fn failed_start(ns: &Netns, dir: &Path, socket: &Path) -> String {
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, group_policy()).unwrap();
    let log = dir.join(format!("fail-{}.log", socket.to_string_lossy().len()));
    let mut child =
        Helper::command(&ns.name, socket, &policy, &dir.join("state-fail"), &log).spawn().unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "the helper started on {}:\n{err}", socket.display());
    err
}

#[test]
#[ignore = "needs root: starts the real helper"]
fn a_by_hand_start_under_umask_077_serves_group_members() {
    if !root_or_skip("a_by_hand_start_under_umask_077_serves_group_members") {
        return;
    }
    let member = 61070;
    let ns = Netns::new("byhand");
    // README's layout, under a private root: --socket /run/banger/helper.sock
    // --state-dir /var/lib/banger-helper, neither directory there yet.
    let root = temp_dir();
    let base = root.path().to_owned();
    let run_dir = base.join("run/banger");
    let socket = run_dir.join("helper.sock");
    let state = base.join("var/lib/banger-helper");
    let h = Helper::start_at(&ns, temp_dir(), &group_policy(), socket.clone(), state.clone());
    assert_eq!(owner_mode(&base.join("run")), (0, 0, 0o755));
    assert_eq!(owner_mode(&run_dir), (0, 0, 0o755));
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_socket());
    assert_eq!(owner_mode(&socket), (0, SOCKET_GID, 0o660));
    let r = member_session(&socket, member);
    assert!(matches!(r[0], Response::Hello(_)), "{r:?}\n{}", h.log_text());
    assert_eq!(r[1], Response::Pong);

    // An earlier run left the directory 0700 (with its stale socket): it is set right.
    let dir = h.stop();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let h = Helper::start_at(&ns, dir, &group_policy(), socket.clone(), state.clone());
    assert_eq!(owner_mode(&run_dir), (0, 0, 0o755));
    assert_eq!(owner_mode(&socket), (0, SOCKET_GID, 0o660));
    assert!(h.log_text().contains("mode 0700 set to 0755"), "{}", h.log_text());
    let r = member_session(&socket, member);
    assert!(matches!(r[0], Response::Hello(_)), "{r:?}\n{}", h.log_text());
    drop(h);
    ns.finish();
}

#[test]
#[ignore = "needs root: starts the real helper"]
fn socket_paths_others_could_write_are_refused() {
    if !root_or_skip("socket_paths_others_could_write_are_refused") {
        return;
    }
    let user = 61071;
    let ns = Netns::new("sockdir");
    let root = temp_dir();
    let base = root.path();
    let sub = |name: &str, uid: u32, mode: u32| -> PathBuf {
        let d = base.join(name);
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(uid), Some(uid)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
        d
    };
    // The socket's own directory owned by a user: not fixed, refused (its owner could replace
    // the socket whatever its mode).
    let theirs = sub("theirs", user, 0o755);
    let err = failed_start(&ns, base, &theirs.join("helper.sock"));
    assert!(err.contains(&format!("owned by uid {user}, not root")) && err.contains("chown root"), "{err}");
    // A directory above it that a user owns.
    let above = sub("above", user, 0o755);
    let err = failed_start(&ns, base, &above.join("run/helper.sock"));
    assert!(err.contains(&format!("{} is owned by uid {user}", above.display())), "{err}");
    assert!(!above.join("run").exists(), "created a directory inside a user's directory");
    // A shared directory (holding other files) that its group may write: left alone, refused.
    let shared = sub("shared", 0, 0o775);
    std::fs::write(shared.join("other"), "").unwrap();
    let err = failed_start(&ns, base, &shared.join("helper.sock"));
    assert!(err.contains("mode 0775") && err.contains("writable by others than root"), "{err}");
    assert_eq!(owner_mode(&shared), (0, 0, 0o775));
    // A root-owned link to a user's directory.
    std::os::unix::fs::symlink(&theirs, base.join("link")).unwrap();
    let err = failed_start(&ns, base, &base.join("link/helper.sock"));
    assert!(err.contains(&format!("{} is owned by uid {user}", theirs.display())), "{err}");
    // A shared directory others cannot search: left alone, served, and the log says why members
    // may not get in.
    let private = sub("private", 0, 0o700);
    std::fs::write(private.join("other"), "").unwrap();
    let socket = private.join("helper.sock");
    let h = Helper::start_at(&ns, temp_dir(), &group_policy(), socket.clone(), base.join("state"));
    assert_eq!(owner_mode(&private), (0, 0, 0o700));
    assert!(h.log_text().contains("does not let members of the socket group"), "{}", h.log_text());
    let r = member_session(&socket, user);
    assert!(
        matches!(&r[0], Response::Error(HelperError::Kernel { detail, .. }) if detail.contains("ermission denied")),
        "{r:?}"
    );
    drop(h);
    ns.finish();
}
