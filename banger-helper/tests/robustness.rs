//! The helper against hostile or unlucky clients and restarts: garbage and oversized frames,
//! peers the policy refuses, a restart on the same ledger, socket activation, and start-up errors.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use banger_protocol::frame::{FrameError, recv_blocking};
use banger_protocol::{HelperError, Request, Response};
use common::*;

/// Reads one answer, telling "closed" apart.
fn next(c: &Client) -> Response {
    match recv_blocking::<Response>(std::os::fd::AsFd::as_fd(&c.sock)) {
        Ok((r, _)) => r,
        Err(FrameError::Closed) => client_error("closed".into()),
        Err(e) => client_error(format!("recv: {e}")),
    }
}

fn closed() -> Response {
    client_error("closed".into())
}

#[test]
#[ignore = "needs root: the real helper in a network namespace"]
fn hostile_frames_close_only_their_connection() {
    if !root_or_skip("hostile_frames_close_only_their_connection") {
        return;
    }
    let a = 61041;
    let ns = Netns::new("hostile");
    let h = Helper::start(&ns, &policy(&[a], ""));
    let socket = h.socket.clone();
    let r = as_uid(a, move || {
        let (good, hello) = Client::connect(&socket, "h").unwrap();
        let mut out = vec![hello, good.call(Request::Ping)];
        // Garbage after hello: answered "invalid request", then closed.
        let (bad, _) = Client::connect(&socket, "h").unwrap();
        bad.send_raw_frame(&[0xff; 40]).unwrap();
        out.push(next(&bad));
        out.push(next(&bad));
        // An oversized length: closed without reading on.
        let (big, _) = Client::connect(&socket, "h").unwrap();
        (&big.sock).write_all(&u32::MAX.to_be_bytes()).unwrap();
        out.push(next(&big));
        // Trailing bytes after a valid request.
        let (trail, _) = Client::connect(&socket, "h").unwrap();
        let mut bytes = banger_protocol::codec::encode(&Request::Ping).unwrap();
        bytes.extend_from_slice(b"xx");
        trail.send_raw_frame(&bytes).unwrap();
        out.push(next(&trail));
        // Garbage instead of hello.
        let raw = UnixStream::connect(&socket).unwrap();
        let pre = Client { sock: raw };
        pre.send_raw_frame(b"hello?").unwrap();
        out.push(next(&pre));
        // A request before hello.
        let early = Client { sock: UnixStream::connect(&socket).unwrap() };
        out.push(early.call(Request::ListOwned));
        out.push(next(&early));
        // Half a frame, then hang up.
        let mut half = UnixStream::connect(&socket).unwrap();
        half.write_all(&100u32.to_be_bytes()).unwrap();
        half.write_all(b"abc").unwrap();
        drop(half);
        // The first connection still works, and so does a new one.
        out.push(good.call(Request::Ping));
        let (again, _) = Client::connect(&socket, "h").unwrap();
        out.push(again.call(Request::Ping));
        out
    });
    assert!(matches!(r[0], Response::Hello(_)));
    assert_eq!(r[1], Response::Pong);
    assert!(matches!(r[2], Response::Error(HelperError::InvalidRequest { .. })), "{:?}", r[2]);
    assert_eq!(r[3], closed());
    assert_eq!(r[4], closed(), "oversized frame");
    assert!(matches!(r[5], Response::Error(HelperError::InvalidRequest { .. })), "trailing: {:?}", r[5]);
    assert!(matches!(r[6], Response::Error(HelperError::InvalidRequest { .. })), "{:?}", r[6]);
    assert!(matches!(r[7], Response::Error(HelperError::InvalidRequest { .. })), "{:?}", r[7]);
    assert_eq!(r[8], closed());
    assert_eq!(r[9], Response::Pong, "the good connection was affected");
    assert_eq!(r[10], Response::Pong);
    let mut h = h;
    assert!(h.alive());
    drop(h);
    ns.finish();
}

#[test]
#[ignore = "needs root: the real helper in a network namespace"]
fn every_refusal_before_hello_is_audited() {
    if !root_or_skip("every_refusal_before_hello_is_audited") {
        return;
    }
    let (member, stranger) = (61050, 61051);
    let ns = Netns::new("preaudit");
    let h = Helper::start(&ns, &policy(&[member], ""));
    let socket = h.socket.clone();
    let r = as_uid(member, move || {
        let raw = || Client { sock: UnixStream::connect(&socket).unwrap() };
        let mut out = Vec::new();
        // A request instead of hello.
        let c = raw();
        out.push(c.call(Request::ListOwned));
        out.push(next(&c));
        // Hello carrying a descriptor.
        let c = raw();
        let null = std::fs::File::open("/dev/null").unwrap();
        let hello = Request::Hello {
            version: banger_protocol::PROTOCOL_VERSION,
            install_id: banger_protocol::InstallId::new("a").unwrap(),
        };
        out.push(c.call_fds(hello, &[std::os::fd::AsFd::as_fd(&null)]));
        out.push(next(&c));
        // Garbage, and an oversized length, instead of hello.
        let c = raw();
        c.send_raw_frame(b"hello?").unwrap();
        out.push(next(&c));
        out.push(next(&c));
        let c = raw();
        (&c.sock).write_all(&u32::MAX.to_be_bytes()).unwrap();
        out.push(next(&c));
        out
    });
    let invalid = |r: &Response| matches!(r, Response::Error(HelperError::InvalidRequest { .. }));
    assert!(invalid(&r[0]) && r[1] == closed(), "{r:?}");
    assert!(invalid(&r[2]) && r[3] == closed(), "{r:?}");
    assert!(invalid(&r[4]) && r[5] == closed(), "{r:?}");
    assert_eq!(r[6], closed());
    // A peer the policy does not admit.
    let r = session(&h, stranger, "s", vec![]);
    assert!(matches!(&r[0], Response::Error(HelperError::Denied { .. })), "{r:?}");

    // Each refusal left one record naming the uid, the pid, what was refused and why.
    let want = [
        (member, "list-owned", "E005", "the first request must be hello"),
        (member, "hello", "E005", "hello takes no file descriptors"),
        (member, "frame", "E005", "invalid request"),
        (member, "frame", "E005", "over the 65536-byte cap"),
        (stranger, "hello", "E001", "may not use banger-helper"),
    ];
    let audit = wait_for_audit(&h, want.len());
    assert_eq!(audit.len(), want.len(), "{audit:#?}");
    for (rec, (uid, op, code, why)) in audit.iter().zip(want) {
        assert_eq!(
            (rec.uid, rec.op.as_str(), rec.result.as_str(), rec.code.as_deref()),
            (uid, op, "error", Some(code))
        );
        assert!(rec.pid > 1, "{rec:?}");
        assert!(rec.error.as_deref().unwrap_or("").contains(why), "{rec:?} lacks {why:?}");
    }
    drop(h);
    ns.finish();
}

/// The helper's audit records once there are at least `n` (the helper writes a record after
/// answering some refusals), waiting at most 5 s.
fn wait_for_audit(h: &Helper, n: usize) -> Vec<banger_helper::audit::Record> {
    let start = std::time::Instant::now();
    loop {
        let audit = h.audit();
        if audit.len() >= n || start.elapsed() > std::time::Duration::from_secs(5) {
            return audit;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root: the real helper in a network namespace"]
fn refused_peers_are_denied_and_disconnected() {
    if !root_or_skip("refused_peers_are_denied_and_disconnected") {
        return;
    }
    let (allowed, stranger) = (61042, 61043);
    let ns = Netns::new("deny");
    let h = Helper::start(&ns, &policy(&[allowed], ""));
    let socket = h.socket.clone();
    let r = as_uid(stranger, move || {
        let (c, hello) = Client::connect(&socket, "x").unwrap();
        vec![hello, next(&c)]
    });
    assert!(matches!(&r[0], Response::Error(HelperError::Denied { rule, .. }) if rule == "access"), "{r:?}");
    assert_eq!(r[1], closed());
    // Without the socket's group, the socket itself is out of reach (mode 0660).
    let socket = h.socket.clone();
    let r = as_uid_with(allowed, false, move || match UnixStream::connect(&socket) {
        Ok(_) => vec![Response::Pong],
        Err(e) => vec![client_error(e.to_string())],
    });
    assert!(
        matches!(&r[0], Response::Error(HelperError::Kernel { detail, .. }) if detail.contains("ermission denied")),
        "{r:?}"
    );
    let log = h.log_text();
    assert!(
        log.lines().any(|l| l.contains(&format!("\"uid\":{stranger}"))
            && l.contains("\"op\":\"hello\"")
            && l.contains("E001")),
        "no audit record of the refusal:\n{log}"
    );
    drop(h);
    ns.finish();
}

/// TAPs and NAT through a restart (loop devices and dm targets through a helper killed and
/// restarted: `dm.rs`, in the kernel tier).
#[test]
#[ignore = "needs root: the real helper and TAPs"]
fn the_ledger_survives_a_restart_and_is_reconciled() {
    if !root_or_skip("the_ledger_survives_a_restart_and_is_reconciled") {
        return;
    }
    let a = 61044;
    let ns = Netns::new("restart");
    let pol = policy(&[a], "");
    let h = Helper::start(&ns, &pol);
    let r = session(
        &h,
        a,
        "r",
        vec![
            Request::TapCreate { vm: vm("keep") },
            Request::TapCreate { vm: vm("lose") },
            Request::NatUp { vm: vm("keep") },
            Request::ListOwned,
        ],
    );
    let Response::Owned(before) = &r[4] else { panic!("{r:?}\n{}", h.log_text()) };
    let Response::Tap(lose) = &r[2] else { panic!("{r:?}") };
    assert_eq!((before.taps.len(), before.nat.len()), (2, 1));

    let dir = h.stop();
    // While the helper is down, one TAP disappears.
    ns.sh(&["ip", "link", "del", &lose.name]);
    let h = Helper::start_in(&ns, dir, &pol);
    assert!(h.log_text().contains("1 dropped"), "{}", h.log_text());
    let r = session(&h, a, "r", vec![Request::ListOwned, Request::TapCreate { vm: vm("keep") }]);
    let Response::Owned(after) = &r[1] else { panic!("{r:?}") };
    assert_eq!(after.nat, before.nat);
    assert_eq!(after.taps.len(), 1);
    assert_eq!(after.taps[0].vm, vm("keep"));
    assert_eq!(r[2], Response::Tap(after.taps[0].clone()), "the same tap, from the ledger");
    assert_eq!(after.lease, before.lease);

    let r = session(&h, a, "r", vec![Request::TeardownVms { vms: vec![vm("keep"), vm("lose")] }]);
    assert!(matches!(&r[1], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
    assert!(ns.taps().is_empty() && ns.banger_rules().is_empty());
    drop(h);
    ns.finish();
}

#[test]
#[ignore = "needs root: the real helper with a socket passed as systemd does"]
fn serves_a_socket_passed_by_systemd() {
    if !root_or_skip("serves_a_socket_passed_by_systemd") {
        return;
    }
    let a = 61045;
    let ns = Netns::new("sdsock");
    let dir = temp_dir();
    let socket = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    std::os::unix::fs::chown(&socket, Some(0), Some(SOCKET_GID)).unwrap();
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o660)).unwrap();
    let policy_file = dir.path().join("policy.toml");
    std::fs::write(&policy_file, policy(&[a], "")).unwrap();
    let log = dir.path().join("log");
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec ip netns exec \"$0\" \"$1\" serve --socket /nonexistent/ignored.sock --policy \"$2\" --state-dir \"$3\"")
        .arg(&ns.name)
        .arg(HELPER)
        .arg(&policy_file)
        .arg(dir.path().join("state"))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: dup2 and fcntl are async-signal-safe; they put the listener on descriptor 3 without
    // close-on-exec, as systemd does (dup2 onto itself would keep the flag, hence the fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if fd != 3 && libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let s = socket.clone();
    let r = as_uid(a, move || match Client::connect(&s, "sd") {
        Ok((c, hello)) => vec![hello, c.call(Request::Ping)],
        Err(e) => vec![client_error(e), client_error("no ping".into())],
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let status = child.wait().unwrap();
    let mut text = String::new();
    std::fs::File::open(&log).unwrap().read_to_string(&mut text).unwrap();
    assert!(matches!(r[0], Response::Hello(_)), "{r:?}\n{text}");
    assert_eq!(r[1], Response::Pong);
    assert!(text.contains("passed by systemd"), "{text}");
    assert!(status.success(), "{status}\n{text}");
    ns.finish();
}

#[test]
#[ignore = "needs root: starts the real helper"]
fn start_up_errors_are_clear() {
    if !root_or_skip("start_up_errors_are_clear") {
        return;
    }
    let ns = Netns::new("startup");
    let dir = temp_dir();
    let p = dir.path();
    let serve = |policy: &str, socket: &str, state: &str, uid: Option<u32>| {
        let policy_file = p.join(format!("{socket}.toml"));
        std::fs::write(&policy_file, policy).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, HELPER, "serve", "--socket"])
            .arg(p.join(socket))
            .arg("--policy")
            .arg(&policy_file)
            .arg("--state-dir")
            .arg(p.join(state));
        if let Some(uid) = uid {
            // Drop root only for the helper itself, after `ip netns exec` entered the namespace.
            cmd = Command::new("setpriv");
            cmd.args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &uid.to_string(),
                "--clear-groups",
                HELPER,
                "serve",
                "--socket",
            ])
            .arg(p.join(socket))
            .arg("--policy")
            .arg(&policy_file);
        }
        let out = cmd.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = serve(&policy(&[1], ""), "a.sock", "a", Some(61046));
    assert!(!ok && err.contains("must run as root"), "{err}");
    let (ok, err) =
        serve("[access]\nusers = []\nsocket_group = \"bgh-no-such-group\"\n", "b.sock", "b", None);
    assert!(!ok && err.contains("`bgh-no-such-group`") && err.contains("groupadd"), "{err}");
    let (ok, err) = serve("[access]\nbogus = 1\n", "c.sock", "c", None);
    assert!(!ok && err.contains(".toml:2"), "{err}");
    // A second helper on a running helper's socket, or on its state directory, is refused.
    let h = Helper::start(&ns, &policy(&[1], ""));
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, HELPER, "serve", "--socket"])
        .arg(&h.socket)
        .arg("--policy")
        .arg(h.dir.path().join("policy.toml"))
        .arg("--state-dir")
        .arg(p.join("other-state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("already serving"), "{err}");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, HELPER, "serve", "--socket"])
        .arg(p.join("d.sock"))
        .arg("--policy")
        .arg(h.dir.path().join("policy.toml"))
        .arg("--state-dir")
        .arg(&h.state)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("in use by another banger-helper"), "{err}");
    drop(h);
    ns.finish();
}

#[test]
#[ignore = "needs root: the real helper in a network namespace"]
fn the_helper_runs_confined_and_still_resolves_names() {
    if !root_or_skip("the_helper_runs_confined_and_still_resolves_names") {
        return;
    }
    let ns = Netns::new("confined");
    // Admitted by user name (nobody) and by group name (daemon, gid 1): the account databases
    // must still be readable inside the sandbox.
    let h = Helper::start(
        &ns,
        &format!("[access]\nusers = [\"nobody\"]\ngroups = [\"daemon\"]\nsocket_group = \"{SOCKET_GID}\"\n"),
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", h.pid())).unwrap();
    let field =
        |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or("").to_owned();
    assert_eq!(field("Name:"), "banger-helper");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "seccomp filter mode");
    assert_eq!(field("Seccomp_filters:"), "2", "the allowlist and the clone3 filter");
    // CAP_CHOWN (0), CAP_NET_ADMIN (12), CAP_NET_RAW (13), and with device-mapper CAP_SYS_ADMIN
    // (21) and CAP_MKNOD (27), kept; the programs the helper runs can gain only CAP_NET_ADMIN and
    // CAP_NET_RAW (the bounding set).
    let device_mapper = h.log_text().contains("with the snapshot target");
    let kept = if device_mapper { "0000000008203001" } else { "0000000000003001" };
    for set in ["CapEff:", "CapPrm:"] {
        assert_eq!(field(set), kept, "{set}");
    }
    assert_eq!(field("CapBnd:"), "0000000000003000");
    assert_eq!(field("CapInh:"), "0000000000000000");
    assert_eq!(field("CapAmb:"), "0000000000000000");
    let log = h.log_text();
    assert!(log.contains("landlock fully enforced"), "{log}");
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", h.pid())).unwrap();
    assert_eq!(children.trim(), "", "without [jailer] in the policy no jail launcher is forked");
    assert!(!log.contains("jail launcher"), "{log}");

    let nobody = session(&h, 65534, "c", vec![Request::Ping]);
    assert!(matches!(nobody[0], Response::Hello(_)), "nobody by name: {nobody:?}");
    let socket = h.socket.clone();
    let by_group = as_uid_groups(61047, &[SOCKET_GID, 1], move || match Client::connect(&socket, "c") {
        Ok((_, hello)) => vec![hello],
        Err(e) => vec![client_error(e)],
    });
    assert!(matches!(by_group[0], Response::Hello(_)), "daemon by group name: {by_group:?}");
    let stranger = session(&h, 61048, "c", vec![]);
    assert!(matches!(&stranger[0], Response::Error(HelperError::Denied { .. })), "{stranger:?}");

    // An account change replaces /etc/group and /etc/passwd with new files; names must still
    // resolve afterwards (a sandbox rule on the old files would lock every group member out).
    let temp_group = format!("bgh-lock-{}", std::process::id());
    let added = std::process::Command::new("groupadd").args(["--system", &temp_group]).status().unwrap();
    assert!(added.success(), "groupadd {temp_group}");
    let socket = h.socket.clone();
    let after = as_uid_groups(61047, &[SOCKET_GID, 1], move || match Client::connect(&socket, "c") {
        Ok((_, hello)) => vec![hello],
        Err(e) => vec![client_error(e)],
    });
    let removed = std::process::Command::new("groupdel").arg(&temp_group).status().unwrap();
    assert!(removed.success(), "groupdel {temp_group}");
    assert!(matches!(after[0], Response::Hello(_)), "by group name after groupadd: {after:?}");
    drop(h);
    ns.finish();
}

#[test]
#[ignore = "needs root: the real helper in a network namespace"]
fn the_open_file_limit_is_raised_and_bounds_the_connections() {
    if !root_or_skip("the_open_file_limit_is_raised_and_bounds_the_connections") {
        return;
    }
    let ns = Netns::new("nofile");
    let h = Helper::start_limited(&ns, temp_dir(), &policy(&[61049], ""), Some(256));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", h.pid())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums[0], nums[1], "soft limit not raised to the hard one: {line}");
    assert_ne!(nums[0], "256", "{line}");
    let log = h.log_text();
    assert!(log.contains(&format!("open-file limit {}", nums[1])), "{log}");
    drop(h);
    ns.finish();
}

#[test]
#[ignore = "needs root: the real helper in a network namespace"]
fn peers_not_admitted_and_greedy_members_cannot_crowd_out_a_member() {
    if !root_or_skip("peers_not_admitted_and_greedy_members_cannot_crowd_out_a_member") {
        return;
    }
    let (greedy, silent_member, member) = (61056, 61057, 61058);
    let (silent_stranger, stranger) = (61059, 61060);
    let ns = Netns::new("crowd");
    let h = Helper::start(&ns, &policy(&[greedy, silent_member, member], ""));
    let baseline = open_fds(h.pid());
    // Each opens more connections than any cap, and then goes idle: strangers (not admitted)
    // silent or saying hello, a member silent before hello, a member after hello.
    let held = [
        hold_connections(&h.socket, silent_stranger, 300, false),
        hold_connections(&h.socket, stranger, 300, true),
        hold_connections(&h.socket, silent_member, 300, false),
        hold_connections(&h.socket, greedy, 300, true),
    ];
    for c in &held {
        assert_eq!(c.opened, 300);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));

    // Another member is still served, at once.
    let start = std::time::Instant::now();
    let r = session(&h, member, "m", vec![Request::Ping]);
    let took = start.elapsed();
    assert!(matches!(r[0], Response::Hello(_)), "{r:?}\n{}", h.log_text());
    assert_eq!(r[1], Response::Pong);
    assert!(took < std::time::Duration::from_secs(1), "served after {took:?}");

    // The helper holds 64 connections for each member and at most 2 for each stranger.
    let during = open_fds(h.pid());
    assert!(during <= baseline + 2 * 64 + 2 * 2 + 4, "{during} descriptors open, {baseline} before");

    // Every connection not held was refused once, and recorded: over a cap (`connect`, conflict),
    // or, saying hello while not admitted, by the policy.
    let audit = h.audit();
    let count = |uid: u32, op: &str, code: &str| {
        audit.iter().filter(|r| r.uid == uid && r.op == op && r.code.as_deref() == Some(code)).count()
    };
    let over_cap = |uid| count(uid, "connect", "E003");
    let summary: Vec<_> = [greedy, silent_member, silent_stranger, stranger]
        .map(|u| (u, over_cap(u), count(u, "hello", "E001"), count(u, "hello", "ok")))
        .into();
    assert_eq!(over_cap(greedy), 300 - 64, "{summary:?}");
    assert_eq!(audit.iter().filter(|r| r.uid == greedy && r.op == "hello" && r.result == "ok").count(), 64);
    assert_eq!(over_cap(silent_member), 300 - 64, "{summary:?}");
    assert_eq!(over_cap(silent_stranger), 300 - 2, "{summary:?}");
    assert_eq!(over_cap(stranger) + count(stranger, "hello", "E001"), 300, "{summary:?}");
    let named = audit.iter().filter(|r| r.code.as_deref() == Some("E003")).all(|r| {
        let e = r.error.as_deref().unwrap_or("");
        e.contains(&format!("uid {} ", r.uid)) && e.contains("the most one")
    });
    assert!(named, "a refusal over a cap does not name the uid's cap");

    // Strangers' slots last only until their refusal: their silent connections are refused
    // after 2 s.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(open_fds(h.pid()) <= baseline + 2 * 64 + 4);
    let audit = h.audit();
    let late = audit
        .iter()
        .filter(|r| {
            r.uid == silent_stranger && r.error.as_deref().unwrap_or("").contains("no hello within 2 s")
        })
        .count();
    assert_eq!(late, 2);
    drop(held);
    drop(h);
    ns.finish();
}

#[test]
#[ignore = "needs root: the real helper in a network namespace"]
fn routine_successes_are_summarised_and_everything_else_kept() {
    if !root_or_skip("routine_successes_are_summarised_and_everything_else_kept") {
        return;
    }
    let a = 61061;
    let ns = Netns::new("auditflood");
    let h = Helper::start(&ns, &policy(&[a], ""));
    let mut reqs: Vec<Request> = (0..500).map(|_| Request::Ping).collect();
    reqs.push(Request::TapCreate { vm: vm("x") });
    reqs.extend((0..499).map(|_| Request::Ping));
    reqs.push(Request::NatUp { vm: vm("no-tap") });
    reqs.extend((0..3).map(|_| Request::ListOwned));
    reqs.push(Request::TeardownVms { vms: vec![vm("x")] });
    let r = session(&h, a, "flood", reqs);
    assert!(matches!(r[0], Response::Hello(_)), "{r:?}");
    assert_eq!(r.iter().filter(|r| **r == Response::Pong).count(), 999);
    assert!(matches!(r[501], Response::Tap(_)), "{:?}", r[501]);
    assert!(matches!(&r[1001], Response::Error(HelperError::NotFound { .. })), "{:?}", r[1001]);
    assert!(matches!(&r[1005], Response::Teardown(t) if t.failures.is_empty()), "{:?}", r[1005]);

    // The session's connection is closed: its summaries are written.
    let want: Vec<(&str, &str, Option<u64>)> = vec![
        ("hello", "ok", None),
        ("ping", "ok", None),
        ("tap-create", "ok", None),
        ("nat-up", "error", None),
        ("list-owned", "ok", None),
        ("teardown-vms", "ok", None),
        ("ping", "ok", Some(998)),
        ("list-owned", "ok", Some(2)),
    ];
    let audit = wait_for_audit(&h, want.len());
    let got: Vec<_> = audit.iter().map(|r| (r.op.as_str(), r.result.as_str(), r.count)).collect();
    assert_eq!(got, want);
    for rec in &audit {
        assert_eq!((rec.uid, rec.install.as_deref()), (a, Some("flood")), "{rec:?}");
    }
    let summary = &audit[6];
    assert!(
        summary.since.as_deref().is_some_and(|s| s >= audit[1].time.as_str() && s <= summary.time.as_str())
    );
    let tap = &audit[2].names;
    assert!(
        !tap.is_empty() && tap.iter().all(|n| audit[5].names.contains(n)),
        "the TAP's name, in both records"
    );
    assert!(ns.taps().is_empty());
    drop(h);
    ns.finish();
}
