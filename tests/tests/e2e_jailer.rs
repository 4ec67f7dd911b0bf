//! End to end, jailer mode: VMs of users whose configuration says `launch = "jailer"`, launched
//! by the real helper through the jailer double (a faithful Firecracker jailer 1.16.1) with the
//! statically linked Firecracker double as the policy's Firecracker. Each VMM runs as a uid of its
//! own inside its chroot under the cgroup limits of its shape and its user's totals; another user
//! reaches none of it; a user over the memory total is refused before anything is made; and
//! crashes of the daemon and of the VMM, reconcile, stop and delete leave nothing behind.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_protocol::{Request, Response, VmId};
use banger_tests::e2e::jails::{self, CgroupView, MAX_MEMORY_MIB, MAX_VCPUS};
use banger_tests::e2e::{VmView, Who, World, proc, run::wait_for};
use banger_tests::jailer::harness::ProcView;

const A: Who = Who::A;
const B: Who = Who::B;
const MIB: u64 = 1 << 20;
/// Firecracker's CFS period, as the helper writes it.
const PERIOD: u64 = 100_000;
/// What the helper adds to each VM's memory limit for the VMM itself (and per vCPU to a user's).
const VMM_OVERHEAD_MIB: u64 = 32;

/// Creates VM `name` of `who` with `vcpus` and `memory` MiB, starts it and returns its view,
/// checked to be running through the jailer with a live VMM.
#[track_caller]
fn jailed_vm(world: &World, who: Who, name: &str, vcpus: u32, memory: u32) -> VmView {
    let (v, m) = (vcpus.to_string(), memory.to_string());
    world.banger_ok(who, &["vm", "create", name, "--vcpus", &v, "--memory", &m]);
    world.banger_ok(who, &["vm", "start", name]);
    let vm = world.show(who, name);
    assert_eq!(vm.state, "running", "{vm:#?}");
    assert_eq!(vm.extra.get("launch").and_then(|l| l.as_str()), Some("jailer"), "{vm:#?}");
    let pid = vm.pid.unwrap_or_else(|| panic!("`vm show --json` has no pid: {vm:#?}"));
    assert!(proc::alive(pid), "VMM {pid} is not alive: {vm:#?}");
    vm
}

/// The jail uid `vm show --json` gives.
#[track_caller]
fn jail_uid(vm: &VmView) -> u32 {
    let uid = vm.extra.get("jail_uid").and_then(|u| u.as_u64());
    uid.unwrap_or_else(|| panic!("no jail_uid in `vm show --json`: {vm:#?}")) as u32
}

/// The jail's root on the host: the API socket is `<root>/run/firecracker.socket`.
#[track_caller]
fn jail_root(vm: &VmView) -> PathBuf {
    let api = vm.api_socket.clone().unwrap_or_else(|| panic!("no api_socket: {vm:#?}"));
    assert!(api.ends_with("run/firecracker.socket"), "{}", api.display());
    api.parent().and_then(Path::parent).expect("a jail root above run/").to_path_buf()
}

/// The jail directories, cgroups, TAPs, firewall lines and loops of the world, for asserting
/// that a step made none or left none.
#[track_caller]
fn objects(world: &World) -> Vec<String> {
    let j = world.jailing.as_ref().expect("a jailed world");
    let mut all = j.leaks();
    all.extend(world.taps().into_iter().map(|t| format!("tap {t}")));
    all.extend(world.firewall_lines().into_iter().map(|l| format!("firewall {l}")));
    all.extend(world.loops().into_iter().map(|(d, f)| format!("loop {d} on {f}")));
    all
}

/// Processes (not zombies: killed VMMs are reparented to the machine's init, which reaps them
/// when it gets to it) running as one of the world's jail uids.
fn jailed_processes(world: &World) -> Vec<String> {
    let j = world.jailing.as_ref().expect("a jailed world");
    proc::find(|p| j.is_jail_uid(p.uid) && p.state != 'Z').iter().map(|p| p.describe()).collect()
}

#[test]
#[ignore = "needs root: creates users, namespaces, TAPs, jails and cgroups"]
fn a_jailed_vm_runs_as_its_own_uid_in_its_chroot_under_the_cgroup_limits_of_its_shape() {
    let world = World::jailed();
    let jailing = world.jailing.as_ref().expect("jailed");
    let vm = jailed_vm(&world, A, "e2e", 2, 256);
    let pid = vm.pid.expect("pid");
    let uid = jail_uid(&vm);
    assert!(jailing.is_jail_uid(uid), "jail uid {uid} is not of the policy's range {:?}", jailing.spec.uids);
    let listed = world.list(A);
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0].extra.get("launch").and_then(|l| l.as_str()), Some("jailer"), "{listed:#?}");
    assert_eq!(listed[0].extra.get("jail_uid").and_then(|u| u.as_u64()), Some(u64::from(uid)));
    let text = world.banger_ok(A, &["vm", "show", "e2e"]);
    text.mentions(&[&format!("launch:    jailer (vmm runs as uid {uid})")]);

    // The VMM: the jail uid and gid throughout, no supplementary group, rooted in its jail.
    let view = ProcView::read(pid).unwrap_or_else(|e| panic!("cannot read /proc/{pid}: {e}"));
    assert_eq!(view.uids, [uid; 4], "{view:#?}");
    assert_eq!(view.gids, [uid; 4], "{view:#?}");
    assert!(view.groups.is_empty(), "{view:#?}");
    let root = jail_root(&vm);
    let dir = jailing.jail_dirs();
    assert_eq!(dir, [root.parent().unwrap().to_path_buf()], "one jail, the VM's");
    let (seen, jail) = (fs::metadata(format!("/proc/{pid}/root")).unwrap(), fs::metadata(&root).unwrap());
    assert_eq!((seen.dev(), seen.ino()), (jail.dev(), jail.ino()), "the VMM's / is not {}", root.display());
    // 0700, the group bits showing the mask of the caller's ACL entry.
    assert_eq!((jail.uid(), jail.gid(), jail.mode() & 0o7707), (uid, uid, 0o700), "{}", root.display());
    for f in ["vmlinux", "rootfs", "firecracker", "run/firecracker.socket"] {
        assert!(root.join(f).exists(), "{} is missing from the jail", f);
    }
    // Its TAP is the jail uid's.
    let tap = vm.tap.clone().expect("tap");
    assert_eq!(world.tap_owner(&tap), Some(uid), "TAP {tap} is not the jail uid's");

    // Its cgroup has the VM's limits, the parent A's totals.
    let cg: CgroupView = jails::cgroup_view(pid).unwrap_or_else(|e| panic!("{e:#}"));
    let parent = &jailing.spec.cgroup_parent;
    for group in cg.groups.values() {
        assert!(
            group.starts_with(&format!("/{parent}/u{}/", world.account(A).uid)),
            "the VMM's group {group} is not under {parent}/u<A's uid>: {cg:#?}"
        );
    }
    let own_mem = (256 + VMM_OVERHEAD_MIB) * MIB;
    let user_mem = (u64::from(MAX_MEMORY_MIB) + VMM_OVERHEAD_MIB * u64::from(MAX_VCPUS)) * MIB;
    let user_cpu = u64::from(MAX_VCPUS) * PERIOD;
    let pairs = |m: &std::collections::BTreeMap<String, String>| {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>()
    };
    let s = |k: &str, v: String| (k.to_owned(), v);
    if cg.version == 1 {
        assert_eq!(
            pairs(&cg.own),
            [
                s("cpu.cfs_period_us", PERIOD.to_string()),
                s("cpu.cfs_quota_us", (2 * PERIOD).to_string()),
                s("memory.limit_in_bytes", own_mem.to_string())
            ],
            "{cg:#?}"
        );
        assert_eq!(
            pairs(&cg.parent),
            [
                s("cpu.cfs_period_us", PERIOD.to_string()),
                s("cpu.cfs_quota_us", user_cpu.to_string()),
                s("memory.limit_in_bytes", user_mem.to_string())
            ],
            "{cg:#?}"
        );
    } else {
        assert_eq!(
            pairs(&cg.own),
            [s("cpu.max", format!("{} {PERIOD}", 2 * PERIOD)), s("memory.max", own_mem.to_string())],
            "{cg:#?}"
        );
        assert_eq!(
            pairs(&cg.parent),
            [s("cpu.max", format!("{user_cpu} {PERIOD}")), s("memory.max", user_mem.to_string())],
            "{cg:#?}"
        );
    }

    // The VMM runs its guest under the seccomp filter it inherited from the helper's launcher,
    // which forbids user namespaces: the double says on the console that it emulates no guest
    // there (a real Firecracker needs none), so `vm ssh` finds no server where a real guest
    // would answer.
    let booted = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        let logs = world.banger_ok(A, &["vm", "logs", "e2e"]);
        logs.stdout.contains("no guest is emulated").then_some(logs)
    });
    let logs = booted.unwrap_or_else(|| {
        panic!(
            "the console of the jailed VM never said how its guest runs:\n{}",
            world.banger(A, &["vm", "logs", "e2e"])
        )
    });
    logs.mentions(&["2 vcpu(s), 256 mib", "may not make a user namespace"]);
    world.cli(A).timeout(Duration::from_secs(60)).banger(&["vm", "ssh", "e2e", "--", "true"]).failed();
    world
        .banger(A, &["vm", "run", "--name", "e2e", "--timeout", "2", "--", "true"])
        .failed()
        .mentions(&["ssh"]);
    assert!(proc::alive(pid), "the VMM died when its guest had no SSH server");

    // Stop: the VMM, its jail, its cgroups and TAP go; delete leaves nothing.
    world.banger_ok(A, &["vm", "stop", "e2e"]);
    proc::wait_dead(pid);
    let stopped = world.show(A, "e2e");
    assert_eq!(stopped.state, "stopped", "{stopped:#?}");
    assert_eq!(stopped.extra.get("launch").and_then(|l| l.as_str()), Some("jailer"), "{stopped:#?}");
    assert_eq!(objects(&world), Vec::<String>::new(), "a stopped jailed VM left objects");
    world.banger_ok(A, &["vm", "delete", "e2e"]);
    world.assert_no_leaks();
}

#[test]
#[ignore = "needs root: creates users, namespaces, TAPs, jails and cgroups"]
fn user_b_reaches_neither_the_socket_nor_the_files_nor_the_process_of_a_jailed_vm_of_user_a() {
    let world = World::jailed();
    world.import_image(B);
    let a_vm = jailed_vm(&world, A, "e2e", 1, 128);
    let b_vm = jailed_vm(&world, B, "mine", 1, 128);
    let (a_pid, a_uid, b_uid) = (a_vm.pid.expect("pid"), jail_uid(&a_vm), jail_uid(&b_vm));
    assert_ne!(a_uid, b_uid, "two jails share a uid");
    let (a_root, b_root) = (jail_root(&a_vm), jail_root(&b_vm));
    let a_sock = a_vm.api_socket.clone().expect("socket").display().to_string();
    let b_sock = b_vm.api_socket.clone().expect("socket").display().to_string();

    let as_b = |program: &str, args: &[&str]| world.cli(B).program(Path::new(program), args);
    let api =
        |sock: &str| as_b("curl", &["-sS", "--max-time", "5", "--unix-socket", sock, "http://localhost/"]);
    // B reaches its own VMM's API (the probe works)…
    let own = api(&b_sock);
    own.ok();
    assert!(own.stdout.contains("\"state\""), "B's own VMM did not answer GET /:\n{own}");
    // …but not A's: neither the socket nor anything else in A's jail.
    api(&a_sock).failed().mentions_any(&["permission denied", "couldn't connect"]);
    for path in [a_root.clone(), a_root.join("run"), a_root.join("rootfs"), a_root.join("vmlinux")] {
        let p = path.display().to_string();
        as_b("cat", &[&p]).failed().mentions(&["permission denied"]);
        as_b("ls", &[&p]).failed().mentions(&["permission denied"]);
    }
    as_b("sh", &["-c", &format!("echo x > {}/run/planted", a_root.display())])
        .failed()
        .mentions(&["permission denied"]);
    // Nor A's process: no signal, not even probing for it.
    for sig in ["-0", "-KILL", "-TERM"] {
        as_b("kill", &[sig, &a_pid.to_string()]).failed().mentions(&["not permitted"]);
    }
    // B's own VMM, whose uid is another jail's, reaches nothing of A's either: its jail has
    // nothing of A's in it.
    assert!(!b_root.join("run").join("planted").exists());

    // Directly to the helper, as B with A's install id: A's jail cannot be killed.
    let a_install = world.daemon_status(A).get("install_id").and_then(|v| v.as_str()).map(str::to_owned);
    let install = a_install.expect("`daemon status --json` names A's install id");
    let vm_id = VmId::new(a_vm.id.clone()).expect("a valid VM id");
    let s = world.helper_session(
        B,
        &install,
        &[
            Request::JailKill { vm: vm_id.clone() },
            Request::TeardownVms { vms: vec![vm_id] },
            Request::ListOwned,
        ],
    );
    assert!(matches!(s.hello, Ok(Response::Hello(_))), "{s:?}");
    match s.answers.last() {
        Some(Ok(Response::Owned(o))) => {
            assert!(o.jails.iter().all(|j| j.uid != a_uid), "B's list shows A's jail: {o:?}")
        }
        other => panic!("B's ListOwned: {other:?} ({s:?})"),
    }

    // A's VM is untouched.
    assert!(proc::alive(a_pid), "A's VMM died");
    assert_eq!(ProcView::read(a_pid).unwrap().uids, [a_uid; 4]);
    let still = world.show(A, "e2e");
    assert_eq!((still.state.as_str(), still.pid), ("running", Some(a_pid)), "{still:#?}");
    assert!(a_root.join("run/firecracker.socket").exists());

    world.banger_ok(A, &["vm", "delete", "e2e"]);
    world.banger_ok(B, &["vm", "delete", "mine"]);
    world.assert_no_leaks();
}

#[test]
#[ignore = "needs root: creates users, namespaces, TAPs, jails and cgroups"]
fn a_vm_over_the_users_memory_total_is_refused_before_anything_is_made() {
    let world = World::jailed();
    let over = (MAX_MEMORY_MIB + 128).to_string();
    world.banger_ok(A, &["vm", "create", "big", "--memory", &over]);
    let before = objects(&world);
    assert_eq!(before, Vec::<String>::new(), "objects before the start");

    let out = world.banger(A, &["vm", "start", "big"]);
    out.failed().mentions(&["memory", &MAX_MEMORY_MIB.to_string()]);
    // The helper refused the launch itself, before deriving a jail or taking a uid (the daemon
    // had made the VM's TAP and NAT before asking; it removed them again, checked below).
    let audit = fs::read_to_string(&world.helper().audit_log).unwrap();
    let launches: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["op"] == "jail-launch")
        .collect();
    assert_eq!(launches.len(), 1, "{audit}");
    assert_eq!(launches[0]["result"], "error", "{audit}");
    assert!(launches[0]["error"].as_str().is_some_and(|e| e.contains("quota exceeded")), "{audit}");
    assert_eq!(launches[0]["names"], serde_json::json!([]), "a refused launch named a jail: {audit}");
    let vm = world.show(A, "big");
    assert_ne!(vm.state, "running", "{vm:#?}");
    assert_eq!(vm.pid, None, "{vm:#?}");
    assert_eq!(objects(&world), Vec::<String>::new(), "the refused start left objects");
    let parent = world.jailing.as_ref().unwrap().parent_cgroups();
    assert!(parent.is_empty(), "the refused start made cgroups: {parent:?}");
    assert!(
        jails::cgroup_mounts()
            .iter()
            .all(|m| !m.join(&world.jailing.as_ref().unwrap().spec.cgroup_parent).exists())
    );
    assert_eq!(world.jailing.as_ref().unwrap().jail_dirs(), Vec::<PathBuf>::new());
    assert_eq!(jailed_processes(&world), Vec::<String>::new());

    // Within the total, the same user's VM starts.
    world.banger_ok(A, &["vm", "create", "fits", "--memory", "256"]);
    world.banger_ok(A, &["vm", "start", "fits"]);
    assert_eq!(world.show(A, "fits").state, "running");

    world.banger_ok(A, &["vm", "delete", "big"]);
    world.banger_ok(A, &["vm", "delete", "fits"]);
    world.assert_no_leaks();
}

#[test]
#[ignore = "needs root: creates users, namespaces, TAPs, jails and cgroups"]
fn kill_9_of_the_daemon_and_of_the_jailed_vmm_then_reconcile_and_delete_leave_nothing() {
    let world = World::jailed();
    let jailing = world.jailing.as_ref().expect("jailed");
    let before = jailed_vm(&world, A, "e2e", 1, 128);
    let pid = before.pid.expect("pid");

    // kill -9 of bangerd: the next call starts a daemon that finds the jailed VM running.
    let status = world.daemon_status(A);
    let daemon = status.get("pid").and_then(|p| p.as_u64()).expect("daemon pid") as u32;
    proc::kill9(daemon);
    proc::wait_dead(daemon);
    let vms = world.list(A);
    assert_eq!(vms.len(), 1, "{vms:#?}");
    assert_eq!((vms[0].state.as_str(), vms[0].pid), ("running", Some(pid)), "{vms:#?}");
    assert_eq!(vms[0].extra.get("jail_uid"), before.extra.get("jail_uid"), "{vms:#?}");
    assert_eq!(vms[0].tap, before.tap);
    assert!(proc::alive(pid));

    // kill -9 of the VMM while the daemon is down: the next daemon reconciles, and the jail,
    // its cgroups, the TAP and the rules are gone.
    world.stop_daemon(A);
    assert!(proc::alive(pid), "`banger daemon stop` stopped the jailed VM too");
    proc::kill9(pid);
    proc::wait_dead(pid);
    let vms = world.list(A);
    assert_eq!(vms.len(), 1, "{vms:#?}");
    assert_eq!(vms[0].state, "stopped", "the first call after the VMM died must show it stopped: {vms:#?}");
    assert!(vms[0].last_error.as_deref().is_some_and(|e| !e.trim().is_empty()), "{vms:#?}");
    let left = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        (objects(&world).is_empty() && jailed_processes(&world).is_empty()).then_some(())
    });
    assert!(
        left.is_some(),
        "after reconcile: {:#?} {:#?}\n{}",
        objects(&world),
        jailed_processes(&world),
        world.diagnostics()
    );

    // It starts again in a fresh jail; deleting it at once while it runs (the helper kills the
    // VMM) leaves nothing.
    world.banger_ok(A, &["vm", "start", "e2e"]);
    let again = world.show(A, "e2e");
    assert_eq!(again.state, "running", "{again:#?}");
    let again_pid = again.pid.unwrap_or_else(|| panic!("no pid: {again:#?}"));
    assert!(proc::alive(again_pid), "{again:#?}");
    assert_eq!(jailing.jail_dirs().len(), 1);
    world.banger_ok(A, &["vm", "delete", "e2e", "--force"]);
    proc::wait_dead(again_pid);
    assert_eq!(objects(&world), Vec::<String>::new(), "delete left objects");
    world.assert_no_leaks();
}
