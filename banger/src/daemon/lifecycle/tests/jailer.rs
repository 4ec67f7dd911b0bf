//! The lifecycle in both launch modes through the same fakes, and what jailer mode alone does:
//! the descriptors sent with `JailLaunch`, the VMM configured with paths inside the jail through
//! the jail's socket, the console through `PUT /serial`, the helper's kill instead of a signal,
//! the mode chosen (and kept) at the first start, and reconcile after a daemon restart.

use std::os::unix::fs::MetadataExt;

use banger_protocol::{JailFiles, VmShape, jail_paths};

use super::*;
use crate::config::{LaunchMode, Origin};
use crate::daemon::helper_client::fake::{FAKE_JAIL_UID, JailLaunch};
use crate::daemon::liveness::vm_alive;
use crate::daemon::reconcile::Reconciler;
use crate::model::StorageKind;

/// A daemon whose user asks for `mode` and whose helper can launch through the jailer.
fn mode_env(mode: LaunchMode) -> Env {
    let e =
        env_config(|c| Config { launch: mode, launch_origin: Origin::File("/u/config.toml".into()), ..c });
    e.helper.set_jailer(true);
    e
}

impl Env {
    fn alive(&self, name: &str) -> bool {
        let vm = self.vm(name);
        vm_alive(&vm, &self.daemon.cache.get(&vm.id).unwrap_or_default(), self.procs.as_ref())
    }
}

/// (device, inode) of a file.
fn ident(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

#[tokio::test]
async fn both_modes_start_stop_restart_survive_a_killed_vmm_and_delete_without_leftovers() {
    for mode in LaunchMode::ALL {
        let e = mode_env(mode);
        e.daemon.create(create("dev")).await.unwrap();
        let vm = e.daemon.start("dev").await.unwrap();
        assert_eq!((vm.state.as_str(), vm.launch.as_deref()), ("running", Some(mode.as_str())), "{mode}");
        assert!(e.alive("dev"), "{mode}");
        assert_eq!(e.vm("dev").launch, Some(mode), "{mode}: recorded at the first start");
        let jails = e.helper.owned().jails.len();
        assert_eq!(jails, usize::from(mode == LaunchMode::Jailer), "{mode}");

        // A stop shuts the guest down; nothing is left.
        let stopped = e.daemon.stop("dev", Shutdown::Guest).await.unwrap();
        assert_eq!((stopped.state.as_str(), stopped.pid), ("stopped", None), "{mode}");
        assert!(e.owns_nothing(), "{mode}: {:?}", e.helper.owned());
        assert!(e.procs.kills().is_empty(), "{mode}: the guest shut down by itself");

        // A restart gives a new VMM.
        let first = e.daemon.start("dev").await.unwrap();
        let again = e.daemon.restart("dev").await.unwrap();
        assert_eq!(again.state, "running", "{mode}");
        assert!(again.pid.is_some(), "{mode}");
        if mode == LaunchMode::Direct {
            assert_ne!(again.pid, first.pid, "{mode}");
        }
        assert!(e.alive("dev"), "{mode}");

        // The VMM dies behind the daemon's back (kill -9): noticed, torn down, restartable.
        let pid = e.daemon.show("dev").await.unwrap().pid.unwrap();
        e.procs.remove(pid);
        let seen = e.daemon.show("dev").await.unwrap();
        assert_eq!(seen.state, "stopped", "{mode}");
        assert!(e.owns_nothing(), "{mode}: {:?}", e.helper.owned());
        assert_eq!(e.daemon.start("dev").await.unwrap().state, "running", "{mode}");

        // Delete stops and removes everything.
        e.daemon.delete("dev", Shutdown::Guest).await.unwrap();
        assert!(e.daemon.list().await.unwrap().is_empty(), "{mode}");
        assert!(e.owns_nothing(), "{mode}: {:?}", e.helper.owned());
        assert!(e.procs.kills().is_empty(), "{mode}: no signal is sent by the daemon");
    }
}

#[tokio::test]
async fn a_jailed_start_sends_the_files_as_descriptors_and_configures_the_vmm_inside_its_jail() {
    let e = mode_env(LaunchMode::Jailer);
    let plain =
        e.daemon.create(CreateVm { vcpus: Some(3), memory_mib: Some(768), ..create("dev") }).await.unwrap();
    let disk = e.daemon.create(CreateVm { work_disk_bytes: Some(1 << 30), ..create("disk") }).await.unwrap();
    let image = e.daemon.with_store(|s| s.get_image("base")).unwrap().unwrap();
    let vm = e.daemon.start("dev").await.unwrap();
    e.daemon.start("disk").await.unwrap();

    // The helper was asked what it offers, made the network, then launched the jail with the
    // VM's shape and its files in the protocol's order: kernel, initrd, root, work disk.
    assert_eq!(&e.ops()[..4], ["ping", "tap-create", "nat-up", "jail-launch"]);
    let launches = e.helper.jail_launches();
    let root = plain.vm_dir.join("root.ext4");
    let initrd = image.initrd.as_ref().unwrap().path.clone();
    assert_eq!(
        launches[0],
        JailLaunch {
            vm: plain.id.parse().unwrap(),
            shape: VmShape { vcpus: 3, mem_mib: 768 },
            files: JailFiles { initrd: true, work: false },
            fds: vec![ident(&image.kernel_path), ident(&initrd), ident(&root)],
            writable: vec![false, false, true],
        }
    );
    let work = disk.work_disk.clone().unwrap();
    assert_eq!(launches[1].files, JailFiles { initrd: true, work: true });
    assert_eq!(launches[1].fds[2..], [ident(&disk.vm_dir.join("root.ext4")), ident(&work)]);
    assert_eq!(launches[1].writable, [false, false, true, true], "the drives are writable");

    // The handles hold the jail (handles.json too); the view says how the VM runs.
    let id: VmId = vm.id.parse().unwrap();
    let jail = e.helper.jail_of(&id).unwrap();
    let handles = e.daemon.cache.get(&id).unwrap();
    assert_eq!(handles.pid, jail.pid);
    let held = handles.jail.clone().unwrap();
    assert_eq!((held.id.as_str(), held.uid), (jail.id.as_str(), FAKE_JAIL_UID));
    assert_eq!(e.scratch(&vm), Some(handles));
    assert_eq!((vm.launch.as_deref(), vm.jail_uid, vm.pid), (Some("jailer"), Some(jail.uid), jail.pid));
    assert_eq!(vm.api_socket, Path::new(&jail.api_socket));

    // No VMM was spawned by the daemon; the jail's socket got the whole configuration, with
    // every path inside the jail, the console into the jail's pipe and no log or metrics file.
    let calls = e.vmm.calls();
    assert_eq!(kinds(&calls[..4]), ["configure", "boot", "relay-serial", "configure"]);
    let VmmCall::Configure(socket, config) = &calls[0] else { unreachable!() };
    assert_eq!(socket, Path::new(&jail.api_socket));
    assert_eq!(config.boot_source.kernel_image_path, Path::new(jail_paths::KERNEL));
    assert_eq!(config.boot_source.initrd_path.as_deref(), Some(Path::new(jail_paths::INITRD)));
    assert_eq!(config.drives[0].path_on_host, Path::new(jail_paths::ROOT_DRIVE));
    assert_eq!(config.vsock.as_ref().unwrap().uds_path, Path::new(jail_paths::VSOCK));
    assert_eq!(config.serial.as_ref().unwrap().serial_out_path, Path::new(jail_paths::SERIAL));
    assert_eq!((config.logger.as_ref(), config.metrics.as_ref()), (None, None));
    assert_eq!((config.machine.vcpu_count, config.machine.mem_size_mib), (3, 768));
    assert_eq!(calls[1], VmmCall::Boot(jail.api_socket.clone().into()));
    assert_eq!(calls[2], VmmCall::RelaySerial(Path::new(&jail.root).join("run/serial")));
    let VmmCall::Configure(_, config) = &calls[3] else { unreachable!() };
    assert_eq!(config.drives[1].path_on_host, Path::new(jail_paths::WORK_DRIVE));

    // A direct VM's view says so; a VM never started says nothing yet.
    let other = mode_env(LaunchMode::Direct);
    other.daemon.create(create("d")).await.unwrap();
    assert_eq!(other.daemon.show("d").await.unwrap().launch, None);
    let d = other.daemon.start("d").await.unwrap();
    assert_eq!((d.launch.as_deref(), d.jail_uid), (Some("direct"), None));
    assert!(other.helper.jail_launches().is_empty());

    // A jailed VM has a console log, and no log of its VMM's own.
    e.daemon.logs("dev", 1024, false, true).await.unwrap();
    let err = e.daemon.logs("dev", 1024, true, true).await.unwrap_err();
    assert_eq!(err.status(), 409, "{err}");
    assert!(err.to_string().contains("banger vm logs dev"), "{err}");
}

#[tokio::test]
async fn a_jailed_stop_asks_the_guest_through_the_jail_then_the_helper_kills_what_is_left() {
    let e = mode_env(LaunchMode::Jailer);
    e.daemon.create(create("dev")).await.unwrap();
    let vm = e.daemon.start("dev").await.unwrap();
    let id: VmId = vm.id.parse().unwrap();
    let jail = e.helper.jail_of(&id).unwrap();
    e.vmm.ignore_shutdown(true);
    e.helper.clear_calls();
    let stopped = e.daemon.stop("dev", Shutdown::Guest).await.unwrap();
    assert_eq!(stopped.state, "stopped");
    assert_eq!(e.vmm.calls().last(), Some(&VmmCall::Shutdown(jail.api_socket.clone().into())));
    // The guest ignored Ctrl-Alt-Del: after the grace period the helper killed the VMM (the
    // user cannot signal the jail's uid), then tore the rest down.
    assert_eq!(e.ops(), ["jail-kill", "teardown-vms"]);
    assert!(e.procs.kills().is_empty());
    assert_eq!(e.procs.pid_state(jail.pid.unwrap()).unwrap(), PidState::Gone);
    assert!(e.owns_nothing());
    assert!(!Path::new(&jail.root).exists(), "the jail is gone");
    assert!(!scratch_path(&vm.vm_dir).exists());

    // Killed at once: no Ctrl-Alt-Del.
    e.daemon.start("dev").await.unwrap();
    let before = e.vmm.calls().len();
    e.helper.clear_calls();
    e.daemon.stop("dev", Shutdown::Kill).await.unwrap();
    assert_eq!(e.vmm.calls().len(), before, "no shutdown asked");
    assert_eq!(e.ops(), ["jail-kill", "teardown-vms"]);
}

#[tokio::test]
async fn a_helper_that_cannot_jail_refuses_a_jailed_start_naming_the_setting_and_the_admins_fix() {
    let e = mode_env(LaunchMode::Jailer);
    e.helper.set_jailer(false);
    e.daemon.create(create("dev")).await.unwrap();
    let err = e.daemon.start("dev").await.unwrap_err();
    assert_eq!(err.status(), 409, "{err}");
    let text = chain(&err);
    for part in ["launch = \"jailer\"", "/u/config.toml", "[jailer]", "restart banger-helper"] {
        assert!(text.contains(part), "{part}: {text}");
    }
    assert_eq!(e.ops(), ["ping"], "nothing was made");
    assert!(e.owns_nothing());
    let row = e.vm("dev");
    assert_eq!((row.state, row.launch), (VmState::Failed, None), "no mode is fixed by a refused start");

    // A shape no jail can have (a row from before the bounds) is refused before anything is
    // made.
    let e = mode_env(LaunchMode::Jailer);
    e.daemon.create(create("small")).await.unwrap();
    let mut row = e.vm("small");
    row.memory_mib = 64;
    e.daemon.with_store(|s| s.update_vm(&row)).unwrap();
    let err = e.daemon.start("small").await.unwrap_err();
    assert_eq!(err.status(), 400, "{err}");
    assert!(chain(&err).contains("128 MiB"), "{err}");
    assert!(e.owns_nothing());
}

#[tokio::test]
async fn the_mode_is_fixed_at_the_first_start_unless_the_helpers_policy_forces_the_jailer() {
    // Started directly once, a VM stays direct although the setting now says jailer.
    let e = mode_env(LaunchMode::Jailer);
    e.daemon.create(create("dev")).await.unwrap();
    let mut row = e.vm("dev");
    row.launch = Some(LaunchMode::Direct);
    e.daemon.with_store(|s| s.update_vm(&row)).unwrap();
    assert_eq!(e.daemon.start("dev").await.unwrap().launch.as_deref(), Some("direct"));
    assert!(e.helper.jail_launches().is_empty());

    // Jailed once, a VM stays jailed although the setting says direct.
    let e = mode_env(LaunchMode::Direct);
    e.daemon.create(create("dev")).await.unwrap();
    let mut row = e.vm("dev");
    row.launch = Some(LaunchMode::Jailer);
    e.daemon.with_store(|s| s.update_vm(&row)).unwrap();
    assert_eq!(e.daemon.start("dev").await.unwrap().launch.as_deref(), Some("jailer"));

    // A helper that allows no direct mode jails every VM, a direct one included (recorded).
    let e = mode_env(LaunchMode::Direct);
    e.helper.set_direct(false);
    e.daemon.create(create("dev")).await.unwrap();
    let mut row = e.vm("dev");
    row.launch = Some(LaunchMode::Direct);
    e.daemon.with_store(|s| s.update_vm(&row)).unwrap();
    let vm = e.daemon.start("dev").await.unwrap();
    assert_eq!(vm.launch.as_deref(), Some("jailer"));
    assert_eq!(e.vm("dev").launch, Some(LaunchMode::Jailer));
    assert_eq!(e.helper.jail_launches().len(), 1);
    assert!(kinds(&e.vmm.calls()).iter().all(|k| *k != "spawn"));
}

#[tokio::test]
async fn where_the_jailer_is_forced_a_new_root_is_a_file_of_the_vms_own_not_a_dm_snapshot() {
    // The helper keeps dm nodes root's when it forces the jailer: the daemon could neither
    // personalize one nor send it to the jail.
    let e = mode_env(LaunchMode::Jailer);
    e.helper.set_device_mapper(true);
    e.helper.set_direct(false);
    e.daemon.create(create("dev")).await.unwrap();
    let vm = e.daemon.start("dev").await.unwrap();
    assert_eq!(vm.launch.as_deref(), Some("jailer"));
    assert_ne!(e.vm("dev").storage, Some(StorageKind::DmSnapshot));
    assert!(e.helper.owned().loops.is_empty() && e.helper.owned().dms.is_empty());
    assert_eq!(e.helper.jail_launches().len(), 1);
    // Where direct mode is allowed, the same helper's dm-snapshots are used.
    let e = mode_env(LaunchMode::Direct);
    e.helper.set_device_mapper(true);
    e.daemon.create(create("dev")).await.unwrap();
    e.daemon.start("dev").await.unwrap();
    assert_eq!(e.vm("dev").storage, Some(StorageKind::DmSnapshot));
}

#[tokio::test]
async fn a_jailed_start_failing_after_the_launch_kills_the_jail_and_tears_everything_down() {
    for (op, step) in [(VmmOp::Configure, StartStep::Configure), (VmmOp::Boot, StartStep::Boot)] {
        let e = mode_env(LaunchMode::Jailer);
        e.daemon.create(create("dev")).await.unwrap();
        e.vmm.fail(op);
        let err = e.daemon.start("dev").await.unwrap_err();
        assert!(matches!(err, DaemonError::Start { step: s, undo: None, .. } if s == step), "{err:?}");
        assert_eq!(
            e.ops(),
            ["ping", "tap-create", "nat-up", "jail-launch", "jail-kill", "teardown-vms"],
            "{step}"
        );
        assert!(e.owns_nothing(), "{step}");
        assert!(e.procs.kills().is_empty());
        assert_eq!(e.daemon.show("dev").await.unwrap().state, "failed");
    }

    // A launch the helper refused made nothing of its own: only the network is taken back.
    let e = mode_env(LaunchMode::Jailer);
    e.daemon.create(create("dev")).await.unwrap();
    e.helper.fail("jail-launch", HelperError::Denied { rule: "quota.memory".into(), reason: "over".into() });
    let err = e.daemon.start("dev").await.unwrap_err();
    assert!(matches!(err, DaemonError::Start { step: StartStep::Spawn, .. }), "{err:?}");
    assert!(chain(&err).contains("quota.memory"), "{err}");
    assert_eq!(e.ops(), ["ping", "tap-create", "nat-up", "jail-launch", "teardown-vms"]);
    assert!(e.owns_nothing());
}

#[tokio::test]
async fn after_a_daemon_restart_a_jailed_vm_is_found_through_its_handles_or_the_helpers_list() {
    let e = mode_env(LaunchMode::Jailer);
    e.daemon.create(create("kept")).await.unwrap();
    e.daemon.create(create("lost")).await.unwrap();
    e.daemon.create(create("dead")).await.unwrap();
    for name in ["kept", "lost", "dead"] {
        e.daemon.start(name).await.unwrap();
    }
    let (kept, lost, dead) = (e.vm("kept"), e.vm("lost"), e.vm("dead"));
    let want_kept = e.daemon.cache.get(&kept.id).unwrap();
    let want_lost = e.daemon.cache.get(&lost.id).unwrap();
    // bangerd is killed: its cache is gone. "lost" loses its handles.json too; "dead"'s VMM
    // exits meanwhile.
    for vm in [&kept, &lost, &dead] {
        e.daemon.cache.remove(&vm.id);
    }
    std::fs::remove_file(scratch_path(&lost.vm_dir)).unwrap();
    let dead_pid = e.helper.jail_of(&dead.id).unwrap().pid.unwrap();
    e.procs.remove(dead_pid);

    let report = {
        let reconciler =
            Reconciler::new(&e.daemon.store, &e.daemon.cache, e.helper.as_ref(), e.procs.as_ref());
        reconciler.run().await.unwrap()
    };
    let mut kept_ids = report.kept.clone();
    kept_ids.sort();
    let mut want_ids = vec![kept.id.clone(), lost.id.clone()];
    want_ids.sort();
    assert_eq!(kept_ids, want_ids, "{report:?}");
    assert_eq!(e.daemon.cache.get(&kept.id), Some(want_kept));
    // The lost handles came back from the helper's list (the TAP and the jail), and were written.
    let back = e.daemon.cache.get(&lost.id).unwrap();
    assert_eq!(
        (back.pid, back.jail.clone(), back.tap.clone()),
        (want_lost.pid, want_lost.jail, want_lost.tap)
    );
    assert_eq!(read_scratch(&lost.vm_dir).unwrap().as_ref(), Some(&back));
    assert!(e.alive("kept") && e.alive("lost"));
    // The dead one was demoted and its jail removed with the rest of its objects.
    assert_eq!(report.demoted.len(), 1, "{report:?}");
    assert_eq!(report.demoted[0].vm, dead.id);
    assert!(report.demoted[0].held.iter().any(|h| h.starts_with("jail ")), "{report:?}");
    assert_eq!(e.helper.jail_of(&dead.id), None);
    assert_eq!(e.vm("dead").state, VmState::Stopped);
    assert!(e.procs.kills().is_empty());
}

#[tokio::test]
async fn an_interrupted_jailed_start_is_undone_by_the_helpers_kill_at_reconcile() {
    let e = mode_env(LaunchMode::Jailer);
    e.daemon.create(create("dev")).await.unwrap();
    e.daemon.start("dev").await.unwrap();
    let vm = e.vm("dev");
    // bangerd died before recording `running`.
    e.daemon.with_store(|s| s.set_state(&vm.id, VmState::Starting, None, None)).unwrap();
    e.daemon.cache.remove(&vm.id);
    e.helper.clear_calls();
    let report = Reconciler::new(&e.daemon.store, &e.daemon.cache, e.helper.as_ref(), e.procs.as_ref())
        .run()
        .await
        .unwrap();
    assert_eq!(report.demoted.len(), 1, "{report:?}");
    assert!(report.demoted[0].killed.is_some());
    assert_eq!(e.ops(), ["list-owned", "jail-kill", "teardown-vms"]);
    assert!(e.owns_nothing());
    assert!(e.procs.kills().is_empty(), "never a signal to the jail's uid");
    assert_eq!(e.vm("dev").state, VmState::Failed);
}
