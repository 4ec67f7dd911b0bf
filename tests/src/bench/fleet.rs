//! `bench`'s figures about many VMs and about `vm run`, in an end-to-end world
//! ([`crate::e2e::World`]) with the Firecracker test double as the VMM:
//!
//! - [`vm_run`]: `banger vm run -- true` on a stopped VM (run straight as the user, in the
//!   world's network namespace, without the test launcher's processes), its wall time, the start's control plane
//!   inside it and what is outside the start (the CLI, waiting for SSH, the command over SSH),
//!   and the guest's own boot to its SSH server (from its console) against the rest;
//!   `banger vm ssh -- true` on the running VM beside it, the command alone;
//! - [`concurrent_starts`]: N VMs of one user started at once, starts per second, each start's
//!   phases under that load, and the resident sets of bangerd and the helper with the N running;
//! - [`reconcile`]: bangerd started over N VM rows that all say `running`, half of them served by
//!   stub VMMs (a process of the user listening at the VM's API socket), half dead with a
//!   `handles.json` naming a TAP: the time to the first answer and reconcile's own time (from
//!   its log line), with how many `TeardownVms` requests the helper received for the dead half.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use banger::daemon::handles::write_scratch;
use banger::daemon::store::{Store, unix_now};
use banger::ids::new_vm_id;
use banger::model::{VmHandles, VmRuntime, VmState};
use banger::paths::Paths;

use super::figure::{Figure, Phases, last_start_timings, rss_mib, start_timings, time_ms};
use crate::e2e::world::IMAGE;
use crate::e2e::{Who, World};

const A: Who = Who::A;

/// The daemon of `who` (one).
fn daemon_pid(world: &World, who: Who) -> anyhow::Result<u32> {
    match world.daemon_pids(who)[..] {
        [pid] => Ok(pid),
        ref pids => bail!("expected one bangerd of the benchmark's user, found {pids:?}"),
    }
}

/// When the guest's SSH server started, in seconds from its boot, as its console tells: the
/// double's guest prints kernel-like `[    0.012345]` times; the last before dropbear's start line.
fn guest_sshd_at(console: &str) -> Option<f64> {
    let end = console.find("Started dropbear.service")?;
    console[..end]
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix('[')?.split_once(']')?.0.trim().parse::<f64>().ok())
        .next_back()
}

/// `vm run -- true` on a stopped VM, round after round (two untimed rounds first: the first
/// makes the VM's root), with `vm ssh -- true` on the running VM as the command alone, and the
/// guest's own boot to its SSH server (its console's times) set apart from the rest.
pub fn vm_run(world: &World, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    world.banger_ok(A, &["vm", "create", "run"]);
    let log = world.daemon_log(A);
    let (mut wall, mut control, mut outside, mut ssh) = (vec![], vec![], vec![], vec![]);
    let (mut boot, mut beyond) = (vec![], vec![]);
    let cli = world.cli(A);
    for round in 0..rounds + 2 {
        let took = time_ms(cli.banger_in_place(&["vm", "run", "--name", "run", "--", "true"]))?;
        let t = last_start_timings(&log)?;
        let vm_dir = world.show(A, "run").vm_dir.context("vm show gives no vm_dir")?;
        let console = vm_dir.join("serial.log");
        let console =
            std::fs::read_to_string(&console).with_context(|| format!("read {}", console.display()))?;
        let sshd_at = guest_sshd_at(&console)
            .with_context(|| format!("no dropbear start with a time before it on the console:\n{console}"))?;
        let alone = time_ms(cli.banger_in_place(&["vm", "ssh", "run", "--", "true"]))?;
        world.banger_ok(A, &["vm", "stop", "--force", "run"]);
        if round >= 2 {
            wall.push(took);
            control.push(t.total_us / 1e3);
            outside.push(took - t.total_us / 1e3);
            boot.push(sshd_at * 1e3);
            beyond.push(took - sshd_at * 1e3);
            ssh.push(alone);
        }
    }
    world.banger_ok(A, &["vm", "delete", "run"]);
    Ok(vec![
        Figure::new("vm run -- true wall (cli)", "ms", wall),
        Figure::new("vm run: start control plane", "ms", control),
        Figure::new("vm run: outside the start (cli, ssh wait, ssh)", "ms", outside),
        Figure::new("vm run: guest boot to its ssh server (console)", "ms", boot),
        Figure::new("vm run: beyond the guest's boot (wall - boot)", "ms", beyond),
        Figure::new("vm ssh -- true wall (cli, vm running)", "ms", ssh),
    ])
}

/// Runs `banger ARGS NAME` for every name at once, straight as the user (no launcher); fails
/// unless every one succeeds. Returns the wall time until the last one ended, in ms.
fn all_at_once(world: &World, args: &[&str], names: &[String]) -> anyhow::Result<f64> {
    let cli = world.cli(A);
    let at = Instant::now();
    let children = names
        .iter()
        .map(|name| {
            let mut argv = args.to_vec();
            argv.push(name);
            let mut cmd = cli.banger_in_place(&argv);
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            cmd.spawn().with_context(|| format!("cannot run banger {argv:?}"))
        })
        .collect::<anyhow::Result<Vec<Child>>>()?;
    let mut failed = Vec::new();
    for (child, name) in children.into_iter().zip(names) {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            failed.push(format!("{name}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    let took = at.elapsed().as_secs_f64() * 1e3;
    if !failed.is_empty() {
        bail!(
            "{} of {} `banger {}` failed: {}",
            failed.len(),
            names.len(),
            args.join(" "),
            failed.join("; ")
        );
    }
    Ok(took)
}

/// `vms` VMs of one user started at once (`banger vm start` each, all spawned together), then
/// force-stopped at once, `rounds` times after one untimed round (whose starts make the roots).
pub fn concurrent_starts(world: &World, vms: usize, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let names: Vec<String> = (0..vms).map(|i| format!("c{i}")).collect();
    for name in &names {
        world.banger_ok(A, &["vm", "create", name]);
    }
    let log = world.daemon_log(A);
    let daemon = daemon_pid(world, A)?;
    let helper = world.helper().pid().context("the helper is not running")?;
    let (mut rate, mut wall, mut control) = (vec![], vec![], vec![]);
    let (mut daemon_rss, mut helper_rss) = (vec![], vec![]);
    let mut phases = Phases::default();
    for round in 0..=rounds {
        let took = all_at_once(world, &["vm", "start"], &names)?;
        if round > 0 {
            wall.push(took);
            rate.push(vms as f64 / (took / 1e3));
            let timings = start_timings(&log)?;
            for t in &timings[timings.len().saturating_sub(vms)..] {
                control.push(t.total_us / 1e3);
                phases.add(t);
            }
            daemon_rss.push(rss_mib(daemon)?);
            helper_rss.push(rss_mib(helper)?);
        }
        all_at_once(world, &["vm", "stop", "--force"], &names)?;
    }
    for name in &names {
        world.banger_ok(A, &["vm", "delete", name]);
    }
    let mut out = vec![
        Figure::new(format!("{vms} concurrent starts: starts per second"), "/s", rate),
        Figure::new(format!("{vms} concurrent starts: wall (all ended)"), "ms", wall),
        Figure::new(format!("{vms} concurrent starts: control plane per start"), "ms", control),
    ];
    out.extend(phases.figures(&format!("{vms} concurrent starts")));
    out.push(Figure::new(format!("bangerd rss with {vms} vms running"), "MiB", daemon_rss));
    out.push(Figure::new(format!("helper rss with {vms} vms running (1 user)"), "MiB", helper_rss));
    Ok(out)
}

/// Environment variable that makes `bench` a stub VMM: it listens at the unix socket it names,
/// prints its PID, and exits (removing the socket) when its standard input ends.
pub const STUB_VMM_ENV: &str = "BANGER_BENCH_STUB_VMM";

/// The stub VMM's body (see [`STUB_VMM_ENV`]).
pub fn stub_vmm(socket: &Path) -> anyhow::Result<()> {
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .with_context(|| format!("cannot listen at {}", socket.display()))?;
    println!("{}", std::process::id());
    let mut sink = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)?;
    drop(listener);
    let _ = fs::remove_file(socket);
    Ok(())
}

/// A stub VMM of the user, in the world's host network namespace; it ends when dropped.
struct Stub {
    child: Child,
    pid: i32,
}

impl Stub {
    fn spawn(world: &World, netns: &fs::File, socket: &Path) -> anyhow::Result<Stub> {
        let acct = world.account(A);
        let (fd, uid, gid) = (netns.as_raw_fd(), acct.uid, acct.gid);
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.env_clear()
            .env(STUB_VMM_ENV, socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: setns, setgroups, setgid and setuid are async-signal-safe; the child enters the
        // namespace (which needs root) and then becomes the user, before exec.
        unsafe {
            cmd.pre_exec(move || {
                let ok = libc::setns(fd, libc::CLONE_NEWNET) == 0
                    && libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setgid(gid) == 0
                    && libc::setuid(uid) == 0;
                if ok { Ok(()) } else { Err(std::io::Error::last_os_error()) }
            });
        }
        let mut child = cmd.spawn().context("cannot start a stub vmm")?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
        let pid = line.trim().parse().with_context(|| format!("a stub vmm said {line:?}, not its pid"))?;
        Ok(Stub { child, pid })
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Gives everything under `dir` to `uid`:`gid` (files the benchmark made as root in the user's
/// state).
fn give(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    lchown(dir, Some(uid), Some(gid)).with_context(|| format!("cannot chown {}", dir.display()))?;
    if fs::symlink_metadata(dir)?.is_dir() {
        for e in fs::read_dir(dir)? {
            give(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// A PID no process can have (above the kernel's `PID_MAX_LIMIT`).
const DEAD_PID: i32 = (4 << 20) + 1;

/// The numbers of one `reconcile finished` log line.
#[derive(Debug, Default, PartialEq)]
struct Reconciled {
    kept: usize,
    demoted: usize,
    took_us: f64,
    examine_us: f64,
    teardown_us: f64,
}

fn parse_reconciled(line: &str) -> Option<Reconciled> {
    let mut r = Reconciled::default();
    for word in line.split_whitespace() {
        let Some((k, v)) = word.split_once('=') else { continue };
        match k {
            "kept" => r.kept = v.parse().ok()?,
            "demoted" => r.demoted = v.parse().ok()?,
            "took_us" => r.took_us = v.parse().ok()?,
            "examine_us" => r.examine_us = v.parse().ok()?,
            "teardown_us" => r.teardown_us = v.parse().ok()?,
            _ => {}
        }
    }
    (r.took_us > 0.0).then_some(r)
}

/// The helper's `TeardownVms` records so far.
fn teardown_requests(audit: &Path) -> anyhow::Result<usize> {
    let text = fs::read_to_string(audit).with_context(|| format!("cannot read {}", audit.display()))?;
    Ok(text.lines().filter(|l| l.contains("\"op\":\"teardown-vms\"")).count())
}

/// Reconcile at daemon start over `vms` rows saying `running`: the even ones served by stub VMMs,
/// the odd ones dead (a `handles.json` naming a gone PID and a TAP), `rounds` daemon restarts
/// after one untimed one. Between restarts the dead half is made to say `running` again.
pub fn reconcile(vms: usize, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let world = World::new();
    let acct = world.account(A).clone();
    let paths = Paths::under(&world.home(A), acct.uid)?;
    let netns = world.host_ns().file()?;
    world.stop_daemon(A);
    eprintln!("bench: reconcile, {vms} vm rows");
    let mut rows: Vec<VmRuntime> = Vec::with_capacity(vms);
    let mut stubs = Vec::with_capacity(vms / 2 + 1);
    {
        let store = Store::open(&paths.db())?;
        for i in 0..vms {
            let mut vm =
                VmRuntime::new_created(&paths, new_vm_id(), &format!("r{i}"), IMAGE, 1, 128, unix_now());
            vm.state = VmState::Running;
            fs::create_dir(&vm.vm_dir)?;
            fs::set_permissions(&vm.vm_dir, fs::Permissions::from_mode(0o700))?;
            store.insert_vm(&vm)?;
            if i % 2 == 0 {
                let stub = Stub::spawn(&world, &netns, &vm.api_socket)?;
                let handles =
                    VmHandles { pid: Some(stub.pid), tap: Some(format!("bgr{i}")), ..Default::default() };
                write_scratch(&vm.vm_dir, &handles)?;
                stubs.push(stub);
            }
            rows.push(vm);
        }
    }
    let dead: Vec<&VmRuntime> = rows.iter().skip(1).step_by(2).collect();
    let audit = world.helper().audit_log.clone();
    let log = world.daemon_log(A);
    let (mut serve, mut took, mut examine, mut teardown, mut requests) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..=rounds {
        if round > 0 {
            world.stop_daemon(A);
        }
        {
            let store = Store::open(&paths.db())?;
            for (i, vm) in dead.iter().enumerate() {
                store.set_state(&vm.id, VmState::Running, None, None)?;
                let handles =
                    VmHandles { pid: Some(DEAD_PID), tap: Some(format!("bgd{i}")), ..Default::default() };
                write_scratch(&vm.vm_dir, &handles)?;
            }
        }
        give(paths.state_dir(), acct.uid, acct.gid)?;
        let before = teardown_requests(&audit)?;
        let at = Instant::now();
        world.banger_ok(A, &["image", "list"]);
        let first_answer = at.elapsed().as_secs_f64() * 1e3;
        let text = fs::read_to_string(&log)?;
        let r = text
            .lines()
            .rev()
            .find(|l| l.contains("reconcile finished"))
            .and_then(parse_reconciled)
            .with_context(|| format!("no `reconcile finished` line with took_us in {}", log.display()))?;
        if (r.kept, r.demoted) != (stubs.len(), dead.len()) {
            bail!(
                "reconcile kept {} and demoted {}; expected {} and {}",
                r.kept,
                r.demoted,
                stubs.len(),
                dead.len()
            );
        }
        if round > 0 {
            serve.push(first_answer);
            took.push(r.took_us / 1e3);
            examine.push(r.examine_us / 1e3);
            teardown.push(r.teardown_us / 1e3);
            requests.push((teardown_requests(&audit)? - before) as f64);
        }
    }
    world.stop_daemon(A);
    drop(stubs);
    let (alive, dead) = (vms.div_ceil(2), vms / 2);
    let what = format!("{vms} vms, {alive} alive, {dead} dead");
    Ok(vec![
        Figure::new(format!("reconcile at daemon start ({what}): first answer (cli)"), "ms", serve),
        Figure::new(format!("reconcile ({what})"), "ms", took),
        Figure::new(format!("reconcile: liveness of every vm ({what})"), "ms", examine),
        Figure::new(format!("reconcile: teardown and demotion of the {dead} dead"), "ms", teardown),
        Figure::new(
            format!("reconcile: teardown requests to the helper for {dead} dead"),
            "requests",
            requests,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_ssh_start_is_read_off_its_console() {
        let console = "[    0.000120] Linux version (double)\n[    0.004500] eth0: 172.30.0.2\n\
                       [    0.031250] sshd: keys converted\n[  OK  ] Started dropbear.service - Lightweight SSH server.\n\
                       [    0.040000] login:\n";
        assert_eq!(guest_sshd_at(console), Some(0.03125));
        assert_eq!(guest_sshd_at("[    0.1] no ssh server\n"), None);
        assert_eq!(guest_sshd_at("[  OK  ] Started dropbear.service\n"), None);
    }

    #[test]
    fn a_reconcile_line_is_read_back() {
        let line = "2026-12-08T01:00:00.000Z  INFO banger::daemon::reconcile: reconcile finished kept=500 demoted=500 undetermined=0 orphans=0 helper_unreachable=false took_us=2100 examine_us=1500 teardown_us=600";
        assert_eq!(
            parse_reconciled(line),
            Some(Reconciled {
                kept: 500,
                demoted: 500,
                took_us: 2100.0,
                examine_us: 1500.0,
                teardown_us: 600.0
            })
        );
        assert_eq!(parse_reconciled("reconcile finished kept=1"), None);
    }

    #[test]
    fn no_process_has_the_dead_pid() {
        assert!(!std::path::PathBuf::from(format!("/proc/{DEAD_PID}")).exists());
    }
}
