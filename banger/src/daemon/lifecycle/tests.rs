//! The lifecycle through its seams: a fake helper, process table, VMM and root-disk tools, so
//! every path runs without root, processes or e2fsprogs (except where a test says otherwise).
//! The storage kinds, dm-snapshot starts, image checks and work disks are in [`storage`].

mod jailer;
mod storage;

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use banger_protocol::{HelperError, Request, VmId};

use super::*;
use crate::api_types::{CreateVm, VmView};
use crate::config::Config;
use crate::daemon::guest_prep::fake::{FakePrep, HOST_KEY, PrepCall, PrepOp, USER_KEY, Written};
use crate::daemon::handles::{read_scratch, scratch_path};
use crate::daemon::helper_client::fake::FakeHelper;
use crate::daemon::liveness::fake::{FakeProcesses, Read};
use crate::daemon::liveness::{PidState, ProcessTable};
use crate::daemon::personalize::RootForm;
use crate::daemon::storage::StorageStrategy;
use crate::daemon::store::{ImageRecord, Store};
use crate::daemon::vmm::fake::{FakeVmm, VmmCall, VmmOp};
use crate::daemon::vmm::{DirectVmm, Vmm};
use crate::daemon::{Daemon, Deps};
use crate::model::VmHandles;
use crate::paths::Paths;

struct Env {
    dir: tempfile::TempDir,
    daemon: Daemon,
    helper: Arc<FakeHelper>,
    procs: Arc<FakeProcesses>,
    vmm: Arc<FakeVmm>,
    prep: Arc<FakePrep>,
}

/// A daemon over a temp install with one image and fakes for everything it reaches.
fn env() -> Env {
    env_with(|_, fake| fake)
}

/// Like [`env`], with the VMM `vmm` returns (given the install's directory and the fake VMM).
fn env_with(vmm: impl FnOnce(&Path, Arc<FakeVmm>) -> Arc<dyn Vmm>) -> Env {
    env_full(|c| c, vmm)
}

/// Like [`env`], with the settings `config` makes of the test's.
fn env_config(config: impl FnOnce(Config) -> Config) -> Env {
    env_full(config, |_, fake| fake)
}

fn env_full(
    config: impl FnOnce(Config) -> Config,
    vmm: impl FnOnce(&Path, Arc<FakeVmm>) -> Arc<dyn Vmm>,
) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::under(&dir.path().join("h"), nix::unistd::getuid().as_raw()).unwrap();
    paths.ensure_dirs().unwrap();
    // The configured VMM binary must exist; the fake never runs it.
    let fc = dir.path().join("firecracker");
    std::fs::write(&fc, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&fc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = Store::open_in_memory().unwrap();
    import_test_image(&store, &paths, dir.path());
    let procs = Arc::new(FakeProcesses::new());
    // Jailed VMMs appear in the same process table as the fake VMM's.
    let helper = Arc::new(
        FakeHelper::new(store.install_id().clone()).with_processes(procs.clone(), dir.path().join("jails")),
    );
    let fake_vmm = Arc::new(FakeVmm::new(procs.clone()));
    let prep = Arc::new(FakePrep::default());
    let deps = Deps {
        helper: helper.clone(),
        procs: procs.clone(),
        vmm: vmm(dir.path(), fake_vmm.clone()),
        prep: prep.clone(),
    };
    let config = config(Config { firecracker: fc, ..Config::default() });
    let daemon = Daemon::new(paths, config, store, deps).with_timeouts(Timeouts {
        stop_grace: Duration::from_millis(200),
        kill_wait: Duration::from_millis(200),
    });
    Env { dir, daemon, helper, procs, vmm: fake_vmm, prep }
}

/// The size of the test image's root filesystem.
const ROOTFS_BYTES: u64 = 4 << 20;

/// Imports image `base`: an ELF header for a kernel, and a sparse file with an ext4
/// superblock's magic as its root filesystem (no e2fsprogs needed).
pub(crate) fn import_test_image(store: &Store, paths: &Paths, scratch: &Path) {
    let kernel = scratch.join("vmlinux");
    let mut k = vec![0u8; 4096];
    k[..4].copy_from_slice(b"\x7fELF");
    (k[4], k[5]) = (2, 1);
    k[18..20].copy_from_slice(&62u16.to_le_bytes());
    std::fs::write(&kernel, k).unwrap();
    let rootfs = scratch.join("rootfs.ext4");
    let f = std::fs::File::create(&rootfs).unwrap();
    f.set_len(ROOTFS_BYTES).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &0xEF53u16.to_le_bytes(), 1024 + 56).unwrap();
    let initrd = scratch.join("initrd.img");
    std::fs::write(&initrd, b"initrd").unwrap();
    let files = crate::daemon::images::ImageFiles { kernel: &kernel, rootfs: &rootfs, initrd: Some(&initrd) };
    crate::daemon::images::import(store, paths, "base", files).unwrap();
}

impl Env {
    fn vm(&self, name: &str) -> VmRuntime {
        self.daemon.with_store(|s| s.get_vm_by_name(name)).unwrap().unwrap()
    }

    fn scratch(&self, view: &VmView) -> Option<VmHandles> {
        read_scratch(&view.vm_dir).unwrap()
    }

    fn pinned(&self, id: &str) -> bool {
        let id: VmId = id.parse().unwrap();
        crate::ssh::pinned_host_key(&self.daemon.paths.known_hosts(), &id).unwrap().is_some()
    }

    fn ops(&self) -> Vec<&'static str> {
        self.helper.calls().iter().map(Request::op_name).collect()
    }

    fn owns_nothing(&self) -> bool {
        let o = self.helper.owned();
        o.taps.is_empty() && o.nat.is_empty() && o.loops.is_empty() && o.dms.is_empty() && o.jails.is_empty()
    }
}

/// What the fake personalization saw for a VM named `hostname` without a work disk.
fn written(hostname: &str, form: RootForm) -> Written {
    Written { hostname: hostname.into(), keys: vec![USER_KEY.into()], work_disk: false, form }
}

fn create(name: &str) -> CreateVm {
    CreateVm {
        name: name.into(),
        image: Some("base".into()),
        vcpus: None,
        memory_mib: None,
        work_disk_bytes: None,
    }
}

/// Just the kind of each VMM call.
fn kinds(calls: &[VmmCall]) -> Vec<&'static str> {
    calls
        .iter()
        .map(|c| match c {
            VmmCall::Spawn { .. } => "spawn",
            VmmCall::Configure(..) => "configure",
            VmmCall::Boot(_) => "boot",
            VmmCall::Shutdown(_) => "shutdown",
            VmmCall::RelaySerial(_) => "relay-serial",
        })
        .collect()
}

#[tokio::test]
async fn create_validates_and_refuses_duplicates_without_side_effects() {
    let e = env();
    let vm = e.daemon.create(create("dev")).await.unwrap();
    assert_eq!((vm.name.as_str(), vm.state.as_str()), ("dev", "created"));
    assert!(vm.vm_dir.is_dir());

    let dup = e.daemon.create(create("dev")).await.unwrap_err();
    assert_eq!(dup.status(), 409, "{dup}");
    assert!(dup.to_string().contains("already exists"), "{dup}");

    let bad = e.daemon.create(create("Bad_Name")).await.unwrap_err();
    assert_eq!(bad.status(), 400);
    assert!(bad.to_string().contains("invalid vm name"), "{bad}");

    let unknown =
        e.daemon.create(CreateVm { image: Some("nope".into()), ..create("other") }).await.unwrap_err();
    assert_eq!(unknown.status(), 404, "{unknown}");
    assert!(unknown.to_string().contains("nope") && unknown.to_string().contains("base"), "{unknown}");

    let vcpus = e.daemon.create(CreateVm { vcpus: Some(64), ..create("other") }).await.unwrap_err();
    assert_eq!(vcpus.status(), 400, "{vcpus}");
    let memory = e.daemon.create(CreateVm { memory_mib: Some(64), ..create("other") }).await.unwrap_err();
    assert_eq!(memory.status(), 400, "{memory}");

    // Only the first create left anything.
    let list = e.daemon.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(std::fs::read_dir(e.daemon.paths.vms_dir()).unwrap().count(), 1);
    assert!(e.helper.calls().is_empty(), "create never needs the helper");
}

#[tokio::test]
async fn start_runs_every_step_in_order_and_records_what_runs() {
    let e = env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    let vm = e.daemon.start("dev").await.unwrap();

    assert_eq!(vm.state, "running");
    let pid = vm.pid.expect("a live vmm");
    let tap = vm.tap.clone().expect("a tap");
    assert!(tap.starts_with("faketap"), "{tap}");
    // The handles: the cache and handles.json agree.
    let id: VmId = vm.id.parse().unwrap();
    let cached = e.daemon.cache.get(&id).unwrap();
    assert_eq!((cached.pid, cached.tap.as_deref()), (Some(pid), Some(tap.as_str())));
    assert_eq!(e.scratch(&vm), Some(cached));
    // The helper was asked what it offers (the launch mode; whether it makes dm-snapshots:
    // the fake does not, by default), then made the TAP, then NAT.
    assert_eq!(e.ops(), ["ping", "tap-create", "nat-up"]);
    let owned = e.helper.owned();
    assert_eq!((owned.taps.len(), owned.nat.len()), (1, 1));
    // The keys were made at create; the root was made (a clone where the filesystem has them,
    // else a copy), then personalized with the user's key and the VM's host key (read again),
    // and the host key pinned.
    let host_key = created.vm_dir.join("ssh_host_ed25519_key");
    assert_eq!(
        e.prep.calls(),
        [
            PrepCall::UserKey,
            PrepCall::HostKey(host_key.clone()),
            PrepCall::PrepareRoot(StorageStrategy::CloneOrCopy, created.vm_dir.join("root.ext4")),
            PrepCall::UserKey,
            PrepCall::HostKey(host_key),
            PrepCall::Personalize(created.vm_dir.join("root.ext4"), written("dev", RootForm::File)),
        ]
    );
    let pin = crate::ssh::pinned_host_key(&e.daemon.paths.known_hosts(), &id).unwrap().unwrap();
    assert!(HOST_KEY.starts_with(&pin), "{pin}");
    // The VMM was spawned at the VM's socket, configured, then booted.
    let calls = e.vmm.calls();
    assert_eq!(kinds(&calls), ["spawn", "configure", "boot"]);
    let VmmCall::Configure(socket, config) = &calls[1] else { unreachable!() };
    assert_eq!(socket, &vm.api_socket);
    assert_eq!((config.machine.vcpu_count, config.machine.mem_size_mib), (2, 1024));
    assert_eq!(config.network_interfaces[0].host_dev_name, tap);
    assert_eq!(config.drives[0].path_on_host, vm.vm_dir.join("root.ext4"));
    let args = config.boot_source.boot_args.as_deref().unwrap();
    let guest = vm.guest_ip.unwrap();
    assert!(args.contains(&format!("ip={guest}::")) && args.contains(":dev:eth0:off"), "{args}");
    assert!(args.contains(" net.ifnames=0 "), "eth0 keeps its name: {args}");
    let image = e.daemon.with_store(|s| s.get_image("base")).unwrap().unwrap();
    assert_eq!(config.boot_source.initrd_path, image.initrd.map(|i| i.path), "the image's initrd is booted");
    assert!(config.boot_source.initrd_path.is_some());
    assert!(
        config.metrics.as_ref().unwrap().metrics_path.is_file(),
        "the metrics file exists before configure"
    );
    // The row keeps the address and how the root was made.
    let row = e.vm("dev");
    assert_eq!((row.state, row.guest_ip, row.last_error), (VmState::Running, Some(guest), None));
    assert_eq!(vm.storage.as_deref(), Some("sparse-copy"));

    // Starting a running VM changes nothing.
    let again = e.daemon.start("dev").await.unwrap();
    assert_eq!(again.pid, Some(pid));
    assert_eq!(e.vmm.calls().len(), 3);
}

#[tokio::test]
async fn each_start_begins_the_console_and_vmm_logs_again_and_sends_the_vmm_its_log() {
    let e = env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    let vmm_log = created.vm_dir.join(crate::model::VMM_LOG);
    std::fs::write(&created.log_path, "the last run's console\n").unwrap();
    std::fs::write(&vmm_log, "the last run's vmm log\n").unwrap();
    e.daemon.start("dev").await.unwrap();
    for log in [&created.log_path, &vmm_log] {
        assert!(!log.exists(), "{} begun again", log.display());
        let old = std::fs::read_to_string(crate::daemon::logs::rotated_path(log)).unwrap();
        assert!(old.starts_with("the last run's"), "{old}");
    }
    let config = e
        .vmm
        .calls()
        .into_iter()
        .find_map(|c| match c {
            VmmCall::Configure(_, config) => Some(config),
            _ => None,
        })
        .unwrap();
    assert_eq!(config.logger.unwrap().log_path, vmm_log, "firecracker logs apart from the console");
}

#[tokio::test]
async fn stop_shuts_the_guest_down_then_tears_everything_down() {
    let e = env();
    e.daemon.create(create("dev")).await.unwrap();
    let running = e.daemon.start("dev").await.unwrap();
    e.helper.clear_calls();

    let vm = e.daemon.stop("dev", Shutdown::Guest).await.unwrap();
    assert_eq!((vm.state.as_str(), vm.pid, vm.tap.as_deref()), ("stopped", None, None));
    assert_eq!(vm.guest_ip, None, "a stopped vm has no current address");
    assert_eq!(e.daemon.list().await.unwrap()[0].guest_ip, None);
    assert_eq!(kinds(&e.vmm.calls()), ["spawn", "configure", "boot", "shutdown"]);
    assert!(e.procs.kills().is_empty(), "the guest shut down by itself");
    assert_eq!(e.ops(), ["teardown-vms"]);
    assert!(e.owns_nothing());
    let id: VmId = running.id.parse().unwrap();
    assert_eq!(e.daemon.cache.get(&id), None);
    assert!(!scratch_path(&running.vm_dir).exists());
    assert_eq!((e.vm("dev").state, e.vm("dev").last_error), (VmState::Stopped, None));
    // The host key stays pinned: the disk keeps the key.
    assert!(e.pinned(&running.id));
}

#[tokio::test]
async fn a_later_start_keeps_the_host_key_and_its_pin_and_makes_no_key() {
    let e = env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    e.daemon.start("dev").await.unwrap();
    e.daemon.stop("dev", Shutdown::Kill).await.unwrap();
    let known_hosts = e.daemon.paths.known_hosts();
    let before = std::fs::metadata(&known_hosts).unwrap();
    let calls = e.prep.calls().len();

    e.daemon.start("dev").await.unwrap();
    // The same host key, read from the VM's directory; nothing to write has changed, so the
    // root is left as the guest left it; the pin, already right, is not written again (no file
    // replaced, no fsync).
    let host_key = created.vm_dir.join("ssh_host_ed25519_key");
    assert_eq!(e.prep.calls()[calls..], [PrepCall::UserKey, PrepCall::HostKey(host_key.clone())]);
    let after = std::fs::metadata(&known_hosts).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((after.ino(), after.mtime_nsec()), (before.ino(), before.mtime_nsec()));
    assert!(e.pinned(&created.id));

    // A personalization that fails leaves no stamp: the next start writes the root again.
    e.daemon.stop("dev", Shutdown::Kill).await.unwrap();
    std::fs::write(created.vm_dir.join("personalized"), b"stale").unwrap();
    e.prep.fail(Some(crate::daemon::guest_prep::fake::PrepOp::Personalize));
    assert!(e.daemon.start("dev").await.is_err());
    assert!(!created.vm_dir.join("personalized").exists(), "the stamp outlived a failed personalization");
    e.prep.fail(None);
    e.daemon.start("dev").await.unwrap();
    assert!(created.vm_dir.join("personalized").exists());

    // A root made again is another file: personalized again. So is one whose stamp is lost.
    let root = created.vm_dir.join("root.ext4");
    let personalized =
        |e: &Env| e.prep.calls().iter().filter(|c| matches!(c, PrepCall::Personalize(..))).count();
    for change in ["root made again", "stamp lost"] {
        e.daemon.stop("dev", Shutdown::Kill).await.unwrap();
        match change {
            "root made again" => {
                let len = std::fs::metadata(&root).unwrap().len();
                std::fs::remove_file(&root).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
                std::fs::File::create(&root).unwrap().set_len(len).unwrap();
            }
            _ => std::fs::remove_file(created.vm_dir.join("personalized")).unwrap(),
        }
        let before = personalized(&e);
        e.daemon.start("dev").await.unwrap();
        assert_eq!(personalized(&e), before + 1, "{change}");
        assert_eq!(
            e.prep.calls().last(),
            Some(&PrepCall::Personalize(root.clone(), written("dev", RootForm::File))),
            "{change}"
        );
    }
}

#[tokio::test]
async fn a_guest_that_ignores_ctrl_alt_del_is_killed_after_the_grace_period() {
    let e = env();
    e.daemon.create(create("dev")).await.unwrap();
    let running = e.daemon.start("dev").await.unwrap();
    e.vmm.ignore_shutdown(true);
    let vm = e.daemon.stop("dev", Shutdown::Guest).await.unwrap();
    assert_eq!(vm.state, "stopped");
    assert_eq!(e.procs.kills(), [running.pid.unwrap()]);
    assert!(e.owns_nothing());
}

#[tokio::test]
async fn a_stop_waits_the_grace_period_it_is_given_then_kills() {
    let e = env();
    e.daemon.create(create("dev")).await.unwrap();
    let running = e.daemon.start("dev").await.unwrap();
    e.vmm.ignore_shutdown(true);
    let begun = std::time::Instant::now();
    let vm = e.daemon.stop("dev", Shutdown::GuestWithin(Duration::from_millis(700))).await.unwrap();
    let took = begun.elapsed();
    assert_eq!(vm.state, "stopped");
    assert!(
        took >= Duration::from_millis(700),
        "waited the 700 ms asked for, not the 200 ms default: {took:?}"
    );
    assert_eq!(kinds(&e.vmm.calls()).last(), Some(&"shutdown"));
    assert_eq!(e.procs.kills(), [running.pid.unwrap()]);
    assert!(e.owns_nothing());
}

#[tokio::test]
async fn a_forced_stop_or_delete_kills_the_vmm_without_asking_the_guest() {
    let e = env();
    e.daemon.create(create("dev")).await.unwrap();
    let first = e.daemon.start("dev").await.unwrap();
    e.vmm.ignore_shutdown(true);
    let begun = std::time::Instant::now();
    let vm = e.daemon.stop("dev", Shutdown::Kill).await.unwrap();
    assert!(begun.elapsed() < Duration::from_millis(200), "no grace period: {:?}", begun.elapsed());
    assert_eq!(vm.state, "stopped");
    assert!(!kinds(&e.vmm.calls()).contains(&"shutdown"), "{:?}", e.vmm.calls());
    assert_eq!(e.procs.kills(), [first.pid.unwrap()]);
    assert!(e.owns_nothing());

    let second = e.daemon.start("dev").await.unwrap();
    assert_eq!(e.daemon.delete("dev", Shutdown::Kill).await.unwrap(), None);
    assert!(!kinds(&e.vmm.calls()).contains(&"shutdown"));
    assert_eq!(e.procs.kills(), [first.pid.unwrap(), second.pid.unwrap()]);
    assert!(e.owns_nothing() && !second.vm_dir.exists());
}

#[tokio::test]
async fn restart_stops_then_starts_a_new_vmm() {
    let e = env();
    e.daemon.create(create("dev")).await.unwrap();
    let first = e.daemon.start("dev").await.unwrap();
    let vm = e.daemon.restart("dev").await.unwrap();
    assert_eq!(vm.state, "running");
    assert_ne!(vm.pid, first.pid, "a new vmm");
    assert_eq!(e.procs.pid_state(first.pid.unwrap()).unwrap(), PidState::Gone);
    assert_eq!(
        kinds(&e.vmm.calls()),
        ["spawn", "configure", "boot", "shutdown", "spawn", "configure", "boot"]
    );
    assert_eq!(e.ops(), ["ping", "tap-create", "nat-up", "teardown-vms", "ping", "tap-create", "nat-up"]);
    // The root is made and personalized once.
    let prepared = e.prep.calls().iter().filter(|c| matches!(c, PrepCall::PrepareRoot(..))).count();
    let personalized = e.prep.calls().iter().filter(|c| matches!(c, PrepCall::Personalize(..))).count();
    assert_eq!((prepared, personalized), (1, 1));
    let id: VmId = vm.id.parse().unwrap();
    assert_eq!(e.daemon.cache.get(&id).unwrap().pid, vm.pid);
    assert_eq!(e.scratch(&vm).unwrap().pid, vm.pid);
}

#[tokio::test]
async fn delete_of_a_running_vm_stops_it_and_removes_everything() {
    let e = env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    e.daemon.start("dev").await.unwrap();
    assert_eq!(e.daemon.delete("dev", Shutdown::Guest).await.unwrap(), None);
    assert!(!created.vm_dir.exists());
    assert!(!e.pinned(&created.id));
    assert!(e.owns_nothing());
    assert_eq!(kinds(&e.vmm.calls()).last(), Some(&"shutdown"));
    assert_eq!(e.daemon.show("dev").await.unwrap_err().status(), 404);
    assert!(e.daemon.list().await.unwrap().is_empty());
    // The name is free again.
    e.daemon.create(create("dev")).await.unwrap();
}

#[tokio::test]
async fn a_failing_step_undoes_itself_and_every_step_before_it() {
    for step in StartStep::ALL {
        let e = env();
        let created = e.daemon.create(create("dev")).await.unwrap();
        let image = e.vm_image();
        match step {
            // The image was written to (and made writable for that).
            StartStep::Image => {
                std::fs::set_permissions(&image.kernel_path, std::fs::Permissions::from_mode(0o644)).unwrap();
                std::fs::write(&image.kernel_path, "not the kernel").unwrap();
            }
            // The TAP exists when NAT fails.
            StartStep::Network => e.helper.fail("nat-up", HelperError::invalid("no uplink")),
            // Steps of dm-snapshot roots only: see `storage`.
            StartStep::BaseLoop | StartStep::CowLoop | StartStep::Snapshot => continue,
            StartStep::RootDisk => e.prep.fail(Some(PrepOp::PrepareRoot)),
            StartStep::Personalize => e.prep.fail(Some(PrepOp::Personalize)),
            StartStep::Spawn => e.vmm.fail(VmmOp::Spawn),
            StartStep::Configure => e.vmm.fail(VmmOp::Configure),
            StartStep::Boot => e.vmm.fail(VmmOp::Boot),
        }
        let err = e.daemon.start("dev").await.unwrap_err();
        assert!(
            matches!(&err, DaemonError::Start { step: s, undo: None, .. } if *s == step),
            "{step}: {err:?}"
        );
        let text = chain(&err);
        assert!(text.starts_with(&format!("cannot start vm dev: {step} failed: ")), "{text}");

        let vm = e.daemon.show("dev").await.unwrap();
        assert_eq!(vm.state, "failed", "{step}");
        let last = vm.last_error.clone().unwrap();
        assert!(last.starts_with(&format!("{step} failed: ")), "{step}: {last}");
        assert!((vm.pid, vm.tap.as_deref()) == (None, None), "{step}: {vm:?}");
        // The network is gone (asked of the helper last), the vmm killed if it ran, the
        // handles forgotten, the host key unpinned. A changed image stops the start before
        // anything is asked of the helper.
        if step == StartStep::Image {
            assert!(e.ops().is_empty(), "{:?}", e.ops());
            assert_eq!(err.status(), 409, "{err}");
        } else {
            assert_eq!(e.ops().last(), Some(&"teardown-vms"), "{step}");
            assert_eq!(e.teardowns(), 1, "{step}: one teardown undoes every kernel step");
        }
        assert!(e.owns_nothing(), "{step}");
        let spawned = step >= StartStep::Configure;
        assert_eq!(e.procs.kills().len(), usize::from(spawned), "{step}");
        let id: VmId = vm.id.parse().unwrap();
        assert_eq!(e.daemon.cache.get(&id), None, "{step}");
        assert!(!scratch_path(&created.vm_dir).exists(), "{step}");
        assert!(!e.pinned(&created.id), "{step}");

        // Once the cause is gone the same VM starts.
        std::fs::copy(e.dir.path().join("vmlinux"), &image.kernel_path).unwrap();
        e.helper.clear_failures();
        e.prep.fail(None);
        e.vmm.clear_failures();
        assert_eq!(e.daemon.start("dev").await.unwrap().state, "running", "{step}");
    }
}

#[tokio::test]
async fn a_tap_the_helper_refused_is_not_torn_down() {
    let e = env();
    e.daemon.create(create("dev")).await.unwrap();
    e.helper.fail(
        "tap-create",
        HelperError::Denied { rule: "access.users".into(), reason: "uid 1000 is not allowed".into() },
    );
    let err = e.daemon.start("dev").await.unwrap_err();
    assert!(matches!(err, DaemonError::Start { step: StartStep::Network, .. }), "{err:?}");
    assert!(chain(&err).contains("not allowed"), "{err}");
    assert_eq!(e.ops(), ["ping", "tap-create"], "nothing was made, so nothing is torn down");
    assert_eq!(e.daemon.show("dev").await.unwrap().state, "failed");
}

#[tokio::test]
async fn a_failed_start_through_a_real_vmm_says_what_the_vmm_printed_and_the_fix() {
    // A "vmm" that cannot open /dev/kvm, started as a real process, with a shell relay.
    let e = env_with(|dir, _| {
        let relay = dir.join("relay");
        std::fs::write(&relay, "#!/bin/sh\n[ \"$1\" = serial-relay ] && exec cat >> \"$2\"\n").unwrap();
        std::fs::set_permissions(&relay, std::fs::Permissions::from_mode(0o755)).unwrap();
        Arc::new(DirectVmm::new(relay))
    });
    std::fs::write(
        &e.daemon.config.firecracker,
        "#!/bin/sh\necho 'Error creating KVM object: Permission denied (os error 13)'\nexit 1\n",
    )
    .unwrap();
    e.daemon.create(create("dev")).await.unwrap();
    let err = e.daemon.start("dev").await.unwrap_err();
    assert_eq!(err.status(), 500);
    let err = chain(&err);
    assert!(err.contains("spawning the vmm failed"), "{err}");
    assert!(err.contains("/dev/kvm") && err.contains("kvm group"), "{err}");

    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!(vm.state, "failed");
    assert!(vm.last_error.as_deref().unwrap_or("").contains("KVM object"), "{vm:?}");
    assert!(vm.pid.is_none() && vm.tap.is_none());
    assert!(e.owns_nothing());
    assert!(!scratch_path(&vm.vm_dir).exists());
    // The root was made once and is kept.
    assert_eq!(vm.storage.as_deref(), Some("sparse-copy"));
    drop(e.dir);
}

#[tokio::test]
async fn start_without_a_helper_says_how_to_start_it() {
    let e = env();
    e.daemon.create(create("dev")).await.unwrap();
    e.helper.set_unreachable(true);
    let err = e.daemon.start("dev").await.unwrap_err();
    assert_eq!(err.status(), 503, "{err}");
    assert!(chain(&err).contains("sudo banger-helper serve"), "{err}");
    // List and show still work without the helper.
    assert_eq!(e.daemon.list().await.unwrap()[0].state, "failed");
}

#[tokio::test]
async fn a_missing_vmm_binary_is_refused_before_anything_is_made() {
    let e = env();
    std::fs::remove_file(&e.daemon.config.firecracker).unwrap();
    let daemon = Daemon::new(
        e.daemon.paths.clone(),
        e.daemon.config.clone(),
        Store::open_in_memory().unwrap(),
        Deps { helper: e.helper.clone(), procs: e.procs.clone(), vmm: e.vmm.clone(), prep: e.prep.clone() },
    );
    daemon.with_store(|s| s.insert_image(&e.vm_image())).unwrap();
    daemon.create(create("dev")).await.unwrap();
    let err = daemon.start("dev").await.unwrap_err();
    assert_eq!(err.status(), 400, "{err}");
    assert!(chain(&err).contains("BANGER_FIRECRACKER"), "{err}");
    assert!(e.helper.calls().is_empty() && e.vmm.calls().is_empty());
    assert_eq!(daemon.show("dev").await.unwrap().state, "created");
}

impl Env {
    fn vm_image(&self) -> ImageRecord {
        self.daemon.with_store(|s| s.get_image("base")).unwrap().unwrap()
    }
}

#[tokio::test]
async fn stopping_a_stopped_vm_changes_nothing_and_delete_removes_everything() {
    let e = env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    let stopped = e.daemon.stop("dev", Shutdown::Guest).await.unwrap();
    assert_eq!(stopped.state, "created");
    assert!(e.helper.calls().is_empty());
    e.daemon.delete("dev", Shutdown::Guest).await.unwrap();
    assert!(!created.vm_dir.exists());
    assert_eq!(e.daemon.show("dev").await.unwrap_err().status(), 404);
    assert!(e.daemon.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_vmm_that_died_under_a_running_daemon_is_demoted_with_its_objects_removed() {
    let e = env();
    e.daemon.create(create("dev")).await.unwrap();
    let view = e.daemon.start("dev").await.unwrap();
    let id: VmId = view.id.parse().unwrap();
    assert!(view.pid.is_some());

    // The VMM exits; the next read notices, tears down and demotes.
    e.procs.make_zombie(view.pid.unwrap());
    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!(vm.state, "stopped");
    assert!(vm.last_error.unwrap().contains("vmm exited"));
    assert!(e.owns_nothing());
    assert!(e.daemon.cache.get(&id).is_none());

    // `vm list` does the same.
    let view = e.daemon.start("dev").await.unwrap();
    e.procs.make_zombie(view.pid.unwrap());
    let listed = e.daemon.list().await.unwrap();
    assert_eq!((listed[0].state.as_str(), listed[0].pid), ("stopped", None));
    assert!(listed[0].last_error.as_deref().unwrap().contains("vmm exited"));
    assert!(e.owns_nothing());
}

#[tokio::test]
async fn vm_list_answers_from_the_rows_and_the_cache_with_one_liveness_check_per_running_vm() {
    let e = env();
    for name in ["a", "b", "c"] {
        e.daemon.create(create(name)).await.unwrap();
    }
    let a = e.daemon.start("a").await.unwrap();
    let b = e.daemon.start("b").await.unwrap();
    // The handles come from the cache, not from the VMs' directories.
    for vm in [&a, &b] {
        std::fs::remove_file(scratch_path(&vm.vm_dir)).unwrap();
    }
    e.helper.clear_calls();
    e.procs.clear_reads();

    let list = e.daemon.list().await.unwrap();
    let listed = |name: &str| list.iter().find(|v| v.name == name).unwrap();
    for vm in [&a, &b] {
        let v = listed(&vm.name);
        assert_eq!((v.state.as_str(), v.pid, &v.tap, v.guest_ip), ("running", vm.pid, &vm.tap, vm.guest_ip));
        assert!(v.pid.is_some() && v.tap.is_some(), "{v:?}");
    }
    assert_eq!((listed("c").state.as_str(), listed("c").pid), ("created", None));
    assert!(e.helper.calls().is_empty(), "vm list never needs the helper");
    let mut reads = e.procs.reads();
    reads.sort();
    let mut expected = Vec::new();
    for vm in [&a, &b] {
        expected.push(Read::State(vm.pid.unwrap()));
        expected.push(Read::ListensAt(vm.pid.unwrap(), vm.api_socket.clone()));
    }
    expected.sort();
    assert_eq!(reads, expected, "one liveness check per running vm, none for the others");
}

#[tokio::test]
async fn a_stopped_vm_can_be_deleted_while_the_helper_is_down_with_a_warning() {
    let e = env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    e.helper.set_unreachable(true);
    let warning = e.daemon.delete("dev", Shutdown::Guest).await.unwrap().expect("a warning");
    assert!(warning.contains("banger-helper") && warning.contains("next daemon start"), "{warning}");
    assert!(!created.vm_dir.exists());
    assert_eq!(e.daemon.show("dev").await.unwrap_err().status(), 404);
    // With the helper up, deleting asks it and warns about nothing.
    e.helper.set_unreachable(false);
    e.daemon.create(create("dev")).await.unwrap();
    assert_eq!(e.daemon.delete("dev", Shutdown::Guest).await.unwrap(), None);
}

#[test]
fn boot_args_carry_the_guest_address() {
    let paths = Paths::under(Path::new("/home/u/.b"), 1000).unwrap();
    let vm = VmRuntime::new_created(&paths, crate::ids::new_vm_id(), "dev", "base", 1, 128, 0);
    let args = boot_args(&vm.name, Ipv4Addr::new(172, 30, 0, 2), Ipv4Addr::new(172, 30, 0, 1), 30);
    assert!(args.contains("ip=172.30.0.2::172.30.0.1:255.255.255.252:dev:eth0:off"), "{args}");
    assert!(args.starts_with("console=ttyS0 reboot=k panic=1"), "{args}");
}

// Failed transitions: each ends in a state that says what happened, the VM keeps its handles,
// and the next command or the background refresh finishes the teardown.

/// Starts `dev` and returns its view and id.
async fn running(e: &Env) -> (VmView, VmId) {
    e.daemon.create(create("dev")).await.unwrap();
    let vm = e.daemon.start("dev").await.unwrap();
    let id = vm.id.parse().unwrap();
    (vm, id)
}

fn busy() -> HelperError {
    HelperError::kernel("RTM_DELLINK", nix::errno::Errno::EBUSY)
}

impl Env {
    /// How many teardowns reached the helper.
    fn teardowns(&self) -> usize {
        self.ops().iter().filter(|op| **op == "teardown-vms").count()
    }

    /// The VM still holds its TAP and NAT, and its handles are kept in the cache and the file.
    #[track_caller]
    fn holds_its_devices(&self, vm: &VmView, id: &VmId) {
        let owned = self.helper.owned();
        assert_eq!((owned.taps.len(), owned.nat.len()), (1, 1), "{owned:?}");
        let kept = self.daemon.cache.get(id).expect("the handles are kept");
        assert!(kept.tap.is_some(), "{kept:?}");
        assert_eq!(self.scratch(vm), Some(kept));
    }

    /// Everything is gone: the helper's objects, the cache entry, `handles.json`.
    #[track_caller]
    fn holds_nothing(&self, vm: &VmView, id: &VmId) {
        assert!(self.owns_nothing(), "{:?}", self.helper.owned());
        assert_eq!(self.daemon.cache.get(id), None);
        assert!(!scratch_path(&vm.vm_dir).exists());
    }
}

#[tokio::test]
async fn a_stop_the_helper_cannot_finish_leaves_the_vm_stopped_until_the_refresh_finishes_it() {
    let e = env();
    let (started, id) = running(&e).await;
    e.helper.set_unreachable(true);

    let err = e.daemon.stop("dev", Shutdown::Guest).await.unwrap_err();
    assert!(matches!(err, DaemonError::Incomplete { op: Op::Stop, .. }), "{err:?}");
    assert_eq!(err.status(), 503);
    let text = chain(&err);
    assert!(
        text.starts_with("vm dev is stopped, but removing its network and disk devices failed"),
        "{text}"
    );
    assert!(
        text.contains("`banger vm stop dev` retries now") && text.contains("sudo banger-helper serve"),
        "{text}"
    );

    // The guest is down; the VM says so, and why its devices are still there.
    assert_eq!(kinds(&e.vmm.calls()).last(), Some(&"shutdown"));
    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!((vm.state.as_str(), vm.pid, vm.last_error.as_deref()), ("stopped", None, None));
    let pending = vm.cleanup_pending.clone().expect("the teardown is pending");
    assert!(pending.contains("cannot reach banger-helper"), "{pending}");
    e.holds_its_devices(&started, &id);

    // Nothing changes while the helper stays away.
    e.daemon.refresh_all().await;
    e.holds_its_devices(&started, &id);

    // Once it is back, the next background pass finishes the teardown.
    e.helper.set_unreachable(false);
    e.daemon.refresh_all().await;
    e.holds_nothing(&started, &id);
    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!((vm.state.as_str(), vm.last_error, vm.cleanup_pending), ("stopped", None, None));
    assert_eq!(e.vm("dev").cleanup_pending, None);
}

#[tokio::test]
async fn a_stop_the_helper_refuses_is_retried_with_backoff_and_finished_by_the_next_stop() {
    let e = env();
    let (started, id) = running(&e).await;
    e.helper.fail_teardown_of(&id, busy());

    let err = e.daemon.stop("dev", Shutdown::Guest).await.unwrap_err();
    assert_eq!(err.status(), 500, "{err}");
    assert!(chain(&err).contains("RTM_DELLINK"), "{err}");
    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!(vm.state, "stopped");
    assert!(vm.cleanup_pending.as_deref().is_some_and(|p| p.contains("RTM_DELLINK")), "{vm:?}");
    e.holds_its_devices(&started, &id);

    // A refusal is retried at the next pass, then only after a pause that grows.
    assert_eq!(e.teardowns(), 1);
    e.daemon.refresh_all().await;
    assert_eq!(e.teardowns(), 2);
    e.daemon.refresh_all().await;
    assert_eq!(e.teardowns(), 2, "one pass is skipped after the first refusal");
    e.daemon.refresh_all().await;
    assert_eq!(e.teardowns(), 3);

    // The next stop retries at once and finishes.
    e.helper.clear_failures();
    let vm = e.daemon.stop("dev", Shutdown::Guest).await.unwrap();
    assert_eq!((vm.state.as_str(), vm.cleanup_pending), ("stopped", None));
    e.holds_nothing(&started, &id);
}

#[tokio::test]
async fn a_delete_the_helper_cannot_finish_keeps_the_vm_until_a_delete_can() {
    let e = env();
    let (started, id) = running(&e).await;
    e.helper.set_unreachable(true);

    let err = e.daemon.delete("dev", Shutdown::Guest).await.unwrap_err();
    assert!(matches!(err, DaemonError::Incomplete { op: Op::Delete, .. }), "{err:?}");
    assert_eq!(err.status(), 503);
    assert!(chain(&err).starts_with("vm dev is not deleted"), "{err}");
    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!(vm.state, "stopped");
    assert!(vm.last_error.as_deref().is_some_and(|l| l.contains("banger vm delete dev")), "{vm:?}");
    assert!(vm.cleanup_pending.is_some());
    assert!(started.vm_dir.is_dir() && e.pinned(&started.id));
    e.holds_its_devices(&started, &id);

    // A second delete with the helper back removes everything, without a warning.
    e.helper.set_unreachable(false);
    assert_eq!(e.daemon.delete("dev", Shutdown::Guest).await.unwrap(), None);
    assert!(e.owns_nothing());
    assert!(!started.vm_dir.exists() && !e.pinned(&started.id));
    assert_eq!(e.daemon.show("dev").await.unwrap_err().status(), 404);
}

#[tokio::test]
async fn a_stopped_vm_with_devices_left_is_not_deleted_while_the_helper_is_down() {
    let e = env();
    let (started, id) = running(&e).await;
    e.helper.set_unreachable(true);
    e.daemon.stop("dev", Shutdown::Guest).await.unwrap_err();
    // Not running, but holding devices: the delete must not forget them.
    let err = e.daemon.delete("dev", Shutdown::Guest).await.unwrap_err();
    assert!(matches!(err, DaemonError::Incomplete { op: Op::Delete, .. }), "{err:?}");
    assert_eq!(e.daemon.show("dev").await.unwrap().state, "stopped");
    e.holds_its_devices(&started, &id);
    // The refresh removes them; the delete then needs nothing of the helper's.
    e.helper.set_unreachable(false);
    e.daemon.refresh_all().await;
    e.holds_nothing(&started, &id);
    assert_eq!(e.daemon.delete("dev", Shutdown::Guest).await.unwrap(), None);
}

#[tokio::test]
async fn a_restart_whose_stop_fails_is_finished_by_the_next_start() {
    let e = env();
    let (started, id) = running(&e).await;
    e.helper.fail("teardown-vms", busy());

    let err = e.daemon.restart("dev").await.unwrap_err();
    assert!(matches!(err, DaemonError::Incomplete { op: Op::Restart, .. }), "{err:?}");
    assert!(chain(&err).contains("`banger vm restart dev` retries now"), "{err}");
    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!(vm.state, "stopped");
    assert!(vm.cleanup_pending.is_some());
    e.holds_its_devices(&started, &id);

    e.helper.clear_failures();
    let vm = e.daemon.start("dev").await.unwrap();
    assert_eq!((vm.state.as_str(), vm.cleanup_pending), ("running", None));
    assert_ne!(vm.pid, started.pid);
    assert_eq!(
        e.ops(),
        ["ping", "tap-create", "nat-up", "teardown-vms", "teardown-vms", "ping", "tap-create", "nat-up"],
        "the leftover teardown comes first"
    );
}

#[tokio::test]
async fn a_failed_start_whose_undo_fails_is_cleaned_up_by_the_refresh() {
    let e = env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    let id: VmId = created.id.parse().unwrap();
    e.helper.fail("nat-up", HelperError::invalid("no uplink"));
    e.helper.fail("teardown-vms", busy());

    let err = e.daemon.start("dev").await.unwrap_err();
    assert!(matches!(&err, DaemonError::Start { step: StartStep::Network, undo: Some(_), .. }), "{err:?}");
    let text = chain(&err);
    assert!(text.contains("undoing it is incomplete") && text.contains("no uplink"), "{text}");
    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!(vm.state, "failed");
    let last = vm.last_error.clone().unwrap();
    assert!(last.starts_with("setting up the network failed") && last.contains("no uplink"), "{last}");
    assert!(vm.cleanup_pending.as_deref().is_some_and(|p| p.contains("RTM_DELLINK")), "{vm:?}");
    assert_eq!(e.helper.owned().taps.len(), 1, "the tap it made is still there");

    e.helper.clear_failures();
    e.daemon.refresh_all().await;
    e.holds_nothing(&created, &id);
    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!((vm.state.as_str(), vm.last_error, vm.cleanup_pending), ("failed", Some(last), None));
}

#[tokio::test]
async fn a_start_whose_undo_fails_for_the_same_reason_says_that_reason_once() {
    let e = env();
    e.daemon.create(create("dev")).await.unwrap();
    // The helper goes away after making the TAP: the NAT and the undo's teardown both fail.
    e.helper.unreachable_from("nat-up");
    let err = e.daemon.start("dev").await.unwrap_err();
    let text = chain(&err);
    assert!(text.contains("undoing it is incomplete for the same reason"), "{text}");
    assert_eq!(text.matches("cannot reach banger-helper").count(), 1, "each cause once: {text}");
    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!(vm.state, "failed");
    assert!(vm.cleanup_pending.as_deref().is_some_and(|p| p.contains("cannot reach")), "{vm:?}");
}

#[tokio::test]
async fn a_vmm_that_died_while_the_helper_is_down_is_demoted_then_cleaned_up_in_the_background() {
    let e = env();
    let (started, id) = running(&e).await;
    e.helper.set_unreachable(true);
    e.procs.make_zombie(started.pid.unwrap());

    // The background pass notices without any read.
    e.daemon.refresh_all().await;
    let row = e.vm("dev");
    assert_eq!(row.state, VmState::Stopped);
    assert!(row.last_error.as_deref().is_some_and(|l| l.contains("vmm exited")), "{row:?}");
    assert!(row.cleanup_pending.is_some(), "{row:?}");
    e.holds_its_devices(&started, &id);

    e.helper.set_unreachable(false);
    e.daemon.refresh_all().await;
    e.holds_nothing(&started, &id);
    let row = e.vm("dev");
    assert_eq!(row.cleanup_pending, None);
    assert!(row.last_error.as_deref().is_some_and(|l| l.contains("vmm exited")), "the reason stays");
}

#[tokio::test]
async fn rows_left_starting_or_stopping_by_an_unrecorded_end_are_settled_by_the_refresh() {
    let e = env();
    let (started, id) = running(&e).await;
    e.daemon.with_store(|s| s.set_state(&id, VmState::Stopping, None, None)).unwrap();
    e.daemon.create(create("two")).await.unwrap();
    let two = e.vm("two");
    e.daemon.with_store(|s| s.set_state(&two.id, VmState::Starting, None, None)).unwrap();

    e.daemon.refresh_all().await;
    assert_eq!(e.procs.kills(), [started.pid.unwrap()], "the vmm of the unfinished stop is killed");
    e.holds_nothing(&started, &id);
    assert_eq!((e.vm("dev").state, e.vm("dev").last_error), (VmState::Stopped, None));
    let two = e.vm("two");
    assert_eq!(
        (two.state, two.last_error.as_deref()),
        (VmState::Failed, Some(refresh::REASON_START_UNRECORDED))
    );
}

#[tokio::test]
async fn the_refresh_does_nothing_when_nothing_waits() {
    let e = env();
    running(&e).await;
    e.daemon.create(create("idle")).await.unwrap();
    e.helper.clear_calls();
    let before = e.vmm.calls().len();
    e.daemon.refresh_all().await;
    assert!(e.helper.calls().is_empty());
    assert_eq!(e.vmm.calls().len(), before);
    assert!(e.procs.kills().is_empty());
    assert_eq!(e.vm("dev").state, VmState::Running);
}
