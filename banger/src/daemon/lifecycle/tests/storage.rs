//! The lifecycle's storage through the fakes: how the root's kind is chosen (and kept), a
//! dm-snapshot start's steps and their undo, the copy-on-write file, image checks, `image rm`
//! of an image in use, and work disks.

use std::os::unix::fs::MetadataExt;

use banger_protocol::{LoopRole, min_cow_bytes};

use super::*;
use crate::config::{Origin, StorageMode};
use crate::daemon::firecracker::VmConfig;

impl Env {
    /// The configuration the VMM got at its latest `configure`.
    fn last_config(&self) -> VmConfig {
        let calls = self.vmm.calls();
        let config = calls.iter().rev().find_map(|c| match c {
            VmmCall::Configure(_, config) => Some(config.clone()),
            _ => None,
        });
        *config.expect("the vmm was configured")
    }

    /// The helper's requests, in order.
    fn requests(&self) -> Vec<Request> {
        self.helper.calls()
    }
}

/// A daemon whose helper offers dm-snapshots.
fn dm_env() -> Env {
    let e = env();
    e.helper.set_device_mapper(true);
    e
}

fn with_storage(mode: StorageMode) -> Env {
    env_config(|c| Config { storage: mode, storage_origin: Origin::Env(crate::config::ENV_STORAGE), ..c })
}

// Choosing the kind.

#[tokio::test]
async fn auto_takes_a_dm_snapshot_where_the_helper_offers_one_else_a_clone_else_a_copy() {
    let e = dm_env();
    e.daemon.create(create("dm")).await.unwrap();
    assert_eq!(e.daemon.start("dm").await.unwrap().storage.as_deref(), Some("dm-snapshot"));

    let e = env();
    e.prep.set_reflink(true);
    e.daemon.create(create("clone")).await.unwrap();
    assert_eq!(e.daemon.start("clone").await.unwrap().storage.as_deref(), Some("reflink"));
    e.prep.set_reflink(false);
    e.daemon.create(create("copy")).await.unwrap();
    assert_eq!(e.daemon.start("copy").await.unwrap().storage.as_deref(), Some("sparse-copy"));
    let strategies: Vec<StorageStrategy> = e
        .prep
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            PrepCall::PrepareRoot(s, _) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(strategies, [StorageStrategy::CloneOrCopy, StorageStrategy::CloneOrCopy]);
}

#[tokio::test]
async fn a_forced_kind_is_used_without_asking_the_helper_what_it_offers() {
    for (mode, strategy, kind) in [
        (StorageMode::Copy, StorageStrategy::SparseCopy, "sparse-copy"),
        (StorageMode::Reflink, StorageStrategy::Reflink, "reflink"),
    ] {
        let e = with_storage(mode);
        e.helper.set_device_mapper(true);
        e.prep.set_reflink(true);
        let created = e.daemon.create(create("dev")).await.unwrap();
        let vm = e.daemon.start("dev").await.unwrap();
        assert_eq!(vm.storage.as_deref(), Some(kind), "{mode}");
        assert_eq!(e.prep.calls()[2], PrepCall::PrepareRoot(strategy, created.vm_dir.join("root.ext4")));
        // The helper is asked what it offers once, for the launch mode; the kind does not
        // depend on it.
        assert_eq!(e.ops(), ["ping", "tap-create", "nat-up"], "{mode}");
    }

    let e = with_storage(StorageMode::DmSnapshot);
    e.helper.set_device_mapper(true);
    e.daemon.create(create("dev")).await.unwrap();
    assert_eq!(e.daemon.start("dev").await.unwrap().storage.as_deref(), Some("dm-snapshot"));
}

#[tokio::test]
async fn a_forced_kind_the_host_cannot_make_fails_the_start_saying_what_to_set() {
    // dm-snapshot where the helper has no device-mapper.
    let e = with_storage(StorageMode::DmSnapshot);
    let created = e.daemon.create(create("dev")).await.unwrap();
    let err = e.daemon.start("dev").await.unwrap_err();
    assert!(matches!(err, DaemonError::Start { step: StartStep::RootDisk, undo: None, .. }), "{err:?}");
    assert_eq!(err.status(), 409);
    let text = chain(&err);
    assert!(
        text.contains("storage = \"dm-snapshot\" (from $BANGER_STORAGE) cannot be used here")
            && text.contains("set storage = \"auto\""),
        "{text}"
    );
    let vm = e.daemon.show("dev").await.unwrap();
    assert_eq!((vm.state.as_str(), vm.storage), ("failed", None));
    assert!(e.owns_nothing());
    assert_eq!(std::fs::read_dir(&created.vm_dir).unwrap().count(), 0, "no root was made");

    // reflink where the filesystem cannot clone.
    let e = with_storage(StorageMode::Reflink);
    let created = e.daemon.create(create("dev")).await.unwrap();
    let err = e.daemon.start("dev").await.unwrap_err();
    assert!(matches!(err, DaemonError::Start { step: StartStep::RootDisk, .. }), "{err:?}");
    assert_eq!(err.status(), 409);
    assert!(chain(&err).contains("storage = \"reflink\" needs a filesystem with reflinks"), "{err}");
    assert_eq!(e.daemon.show("dev").await.unwrap().storage, None);
    assert!(!created.vm_dir.join("root.ext4").exists());
    assert!(e.owns_nothing());
}

#[tokio::test]
async fn a_vm_keeps_the_kind_its_root_got() {
    // A copy stays a copy when the helper later offers dm-snapshots.
    let e = env();
    e.daemon.create(create("copy")).await.unwrap();
    e.daemon.start("copy").await.unwrap();
    e.daemon.stop("copy", Shutdown::Guest).await.unwrap();
    e.helper.set_device_mapper(true);
    let vm = e.daemon.start("copy").await.unwrap();
    assert_eq!(vm.storage.as_deref(), Some("sparse-copy"));
    assert!(!e.ops().contains(&"loop-attach") && !e.ops().contains(&"dm-create"), "{:?}", e.ops());

    // A dm-snapshot stays one: where the helper cannot make it any more, the start says so.
    let e = dm_env();
    let created = e.daemon.create(create("dm")).await.unwrap();
    e.daemon.start("dm").await.unwrap();
    e.daemon.stop("dm", Shutdown::Guest).await.unwrap();
    e.helper.set_device_mapper(false);
    e.helper.clear_calls();
    let err = e.daemon.start("dm").await.unwrap_err();
    assert!(matches!(err, DaemonError::Start { step: StartStep::BaseLoop, .. }), "{err:?}");
    assert_eq!(err.status(), 409);
    assert!(chain(&err).contains("the root of this vm is a dm-snapshot"), "{err}");
    assert_eq!(e.ops(), ["ping", "tap-create", "nat-up", "teardown-vms"]);
    let vm = e.daemon.show("dm").await.unwrap();
    assert_eq!((vm.state.as_str(), vm.storage.as_deref()), ("failed", Some("dm-snapshot")));
    assert!(created.vm_dir.join("root.cow").is_file(), "the guest's writes are kept");
    assert!(e.owns_nothing());
}

// A dm-snapshot start.

#[tokio::test]
async fn a_dm_snapshot_start_attaches_the_image_read_only_and_the_cow_read_write_and_boots_the_dm_node() {
    let e = dm_env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    let image = e.vm_image();
    let vm = e.daemon.start("dev").await.unwrap();
    assert_eq!((vm.state.as_str(), vm.storage.as_deref()), ("running", Some("dm-snapshot")));

    // In order: network, the capability, the base loop, the COW loop, the snapshot.
    let id: VmId = vm.id.parse().unwrap();
    assert_eq!(
        e.requests(),
        [
            Request::Ping,
            Request::TapCreate { vm: id.clone() },
            Request::NatUp { vm: id.clone() },
            Request::LoopAttach { vm: id.clone(), role: LoopRole::Base, read_only: true },
            Request::LoopAttach { vm: id.clone(), role: LoopRole::Cow, read_only: false },
            Request::DmCreate { vm: id.clone() },
        ]
    );
    // The COW file: the VM's own, private, sparse, large enough for every chunk of the image.
    let cow = created.vm_dir.join("root.cow");
    let meta = std::fs::metadata(&cow).unwrap();
    assert_eq!(meta.len(), min_cow_bytes(ROOTFS_BYTES));
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert!(meta.blocks() * 512 <= 4096, "the cow file is sparse");
    assert_eq!(e.vm("dev").overlay_path, cow);
    assert!(!created.vm_dir.join("root.ext4").exists(), "no copy of the image");

    // The helper got the image opened read-only and the COW file opened read-write.
    let handles = e.daemon.cache.get(&id).unwrap();
    let backing = |dev: &Option<String>| e.helper.backing(dev.as_deref().unwrap()).unwrap();
    let (base, cow_b) = (backing(&handles.base_loop), backing(&handles.cow_loop));
    let image_meta = std::fs::metadata(&image.rootfs_path).unwrap();
    assert_eq!((base.dev, base.ino, base.writable), (image_meta.dev(), image_meta.ino(), false));
    assert_eq!((cow_b.dev, cow_b.ino, cow_b.writable), (meta.dev(), meta.ino(), true));

    // The handles name all of it, in the cache and handles.json alike.
    let dm = e.helper.owned().dms[0].clone();
    assert_eq!((handles.dm_name.as_deref(), handles.dm_dev.as_deref()), (Some(&*dm.name), Some(&*dm.device)));
    assert_eq!(e.scratch(&vm), Some(handles));

    // Personalized through the dm node; the VMM's root drive is the dm node.
    assert_eq!(
        e.prep.calls()[2..],
        [
            PrepCall::UserKey,
            PrepCall::HostKey(vm.vm_dir.join("ssh_host_ed25519_key")),
            PrepCall::Personalize(dm.device.clone().into(), written("dev", RootForm::BlockDevice))
        ]
    );
    let config = e.last_config();
    assert_eq!(config.drives.len(), 1);
    assert_eq!(
        (config.drives[0].path_on_host.clone(), config.drives[0].is_root_device),
        (dm.device.into(), true)
    );
    assert!(!config.drives[0].is_read_only);
    // The image is as imported.
    assert_eq!(crate::daemon::images::sha256_file(&image.rootfs_path).unwrap(), image.rootfs_sha256);
}

#[tokio::test]
async fn the_cow_file_keeps_the_guests_writes_across_stop_start_and_restart_and_goes_with_delete() {
    let e = dm_env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    e.daemon.start("dev").await.unwrap();
    let cow = created.vm_dir.join("root.cow");
    let inode = std::fs::metadata(&cow).unwrap().ino();
    // What the guest wrote through its snapshot lands in the COW file.
    let guest = b"written by the guest";
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&cow).unwrap(),
        guest,
        1 << 20,
    )
    .unwrap();
    let kept = || {
        let bytes = std::fs::read(&cow).unwrap();
        assert_eq!(std::fs::metadata(&cow).unwrap().ino(), inode, "the same cow file");
        assert_eq!(&bytes[1 << 20..(1 << 20) + guest.len()], guest);
        assert_eq!(bytes.len() as u64, min_cow_bytes(ROOTFS_BYTES));
    };

    e.daemon.stop("dev", Shutdown::Guest).await.unwrap();
    assert!(e.owns_nothing(), "stop removes the dm-snapshot and its loops");
    kept();
    e.daemon.start("dev").await.unwrap();
    kept();
    e.daemon.restart("dev").await.unwrap();
    kept();
    assert_eq!(e.helper.owned().dms.len(), 1);
    let teardowns = e.teardowns();
    assert_eq!(teardowns, 2, "one per stop");

    // A COW file smaller than its image needs (from an older release) grows at the next start.
    e.daemon.stop("dev", Shutdown::Guest).await.unwrap();
    std::fs::File::options().write(true).open(&cow).unwrap().set_len(2 << 20).unwrap();
    e.daemon.start("dev").await.unwrap();
    assert_eq!(std::fs::metadata(&cow).unwrap().len(), min_cow_bytes(ROOTFS_BYTES));

    e.daemon.delete("dev", Shutdown::Guest).await.unwrap();
    assert!(!cow.exists() && !created.vm_dir.exists());
    assert!(e.owns_nothing());
}

/// Makes the dm start fail at `step`.
fn fail_at(e: &Env, step: StartStep) {
    let refused = HelperError::invalid("refused for the test");
    match step {
        StartStep::BaseLoop => e.helper.fail_loop_attach(LoopRole::Base, refused),
        StartStep::CowLoop => e.helper.fail_loop_attach(LoopRole::Cow, refused),
        StartStep::Snapshot => e.helper.fail("dm-create", refused),
        StartStep::Personalize => e.prep.fail(Some(PrepOp::Personalize)),
        StartStep::Spawn => e.vmm.fail(VmmOp::Spawn),
        StartStep::Configure => e.vmm.fail(VmmOp::Configure),
        StartStep::Boot => e.vmm.fail(VmmOp::Boot),
        other => unreachable!("{other}"),
    }
}

#[tokio::test]
async fn a_dm_start_failing_at_any_later_step_undoes_the_snapshot_and_its_loops() {
    let steps = [
        StartStep::BaseLoop,
        StartStep::CowLoop,
        StartStep::Snapshot,
        StartStep::Personalize,
        StartStep::Spawn,
        StartStep::Configure,
        StartStep::Boot,
    ];
    for step in steps {
        let e = dm_env();
        let created = e.daemon.create(create("dev")).await.unwrap();
        fail_at(&e, step);
        let err = e.daemon.start("dev").await.unwrap_err();
        assert!(
            matches!(&err, DaemonError::Start { step: s, undo: None, .. } if *s == step),
            "{step}: {err:?}"
        );
        assert!(chain(&err).starts_with(&format!("cannot start vm dev: {step} failed: ")), "{err}");

        // The kernel steps ran in order up to the failing one, then one teardown took back
        // everything the helper made (the snapshot before its loops, on the helper's side).
        let want: Vec<&str> = ["ping", "tap-create", "nat-up", "loop-attach", "loop-attach", "dm-create"]
            .into_iter()
            .take(match step {
                StartStep::BaseLoop => 4,
                StartStep::CowLoop => 5,
                _ => 6,
            })
            .chain(["teardown-vms"])
            .collect();
        assert_eq!(e.ops(), want, "{step}");
        assert!(e.owns_nothing(), "{step}: {:?}", e.helper.owned());
        let id: VmId = created.id.parse().unwrap();
        assert_eq!(e.daemon.cache.get(&id), None, "{step}");
        assert!(!scratch_path(&created.vm_dir).exists(), "{step}");
        assert_eq!(e.procs.kills().len(), usize::from(step >= StartStep::Configure), "{step}");
        let vm = e.daemon.show("dev").await.unwrap();
        assert_eq!((vm.state.as_str(), vm.cleanup_pending), ("failed", None), "{step}");
        // The root stays the VM's: made once, kept.
        assert_eq!(vm.storage.as_deref(), Some("dm-snapshot"), "{step}");
        assert!(created.vm_dir.join("root.cow").is_file(), "{step}");

        // With the cause gone it starts over the same COW file.
        e.helper.clear_failures();
        e.prep.fail(None);
        e.vmm.clear_failures();
        assert_eq!(e.daemon.start("dev").await.unwrap().state, "running", "{step}");
    }
}

#[tokio::test]
async fn a_dm_start_whose_undo_fails_keeps_its_handles_until_the_refresh_removes_them() {
    let e = dm_env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    let id: VmId = created.id.parse().unwrap();
    e.helper.fail("dm-create", HelperError::invalid("no snapshot target"));
    e.helper.fail_teardown_of(&id, HelperError::kernel("LOOP_CTL_REMOVE", nix::errno::Errno::EBUSY));

    let err = e.daemon.start("dev").await.unwrap_err();
    assert!(matches!(&err, DaemonError::Start { step: StartStep::Snapshot, undo: Some(_), .. }), "{err:?}");
    assert_eq!(e.teardowns(), 1, "the teardown is sent once, by the latest kernel step");
    let vm = e.daemon.show("dev").await.unwrap();
    assert!(vm.cleanup_pending.as_deref().is_some_and(|p| p.contains("LOOP_CTL_REMOVE")), "{vm:?}");
    let kept = e.daemon.cache.get(&id).expect("the handles are kept");
    assert!(kept.base_loop.is_some() && kept.cow_loop.is_some() && kept.dm_dev.is_none(), "{kept:?}");
    assert_eq!(e.scratch(&vm), Some(kept));

    e.helper.clear_failures();
    e.daemon.refresh_all().await;
    assert!(e.owns_nothing());
    assert_eq!(e.daemon.cache.get(&id), None);
    assert_eq!(e.daemon.show("dev").await.unwrap().cleanup_pending, None);
}

#[tokio::test]
async fn a_root_that_was_never_recorded_is_made_again() {
    // A crash between making the root and recording its kind leaves a file no guest used.
    let e = dm_env();
    let created = e.daemon.create(create("dev")).await.unwrap();
    std::fs::write(created.vm_dir.join("root.cow"), "left by a crash").unwrap();
    std::fs::write(created.vm_dir.join("root.ext4"), "left by a crash").unwrap();
    e.daemon.start("dev").await.unwrap();
    assert_eq!(
        std::fs::metadata(created.vm_dir.join("root.cow")).unwrap().len(),
        min_cow_bytes(ROOTFS_BYTES)
    );
    assert!(!created.vm_dir.join("root.ext4").exists());
}

// Images.

#[tokio::test]
async fn a_changed_image_refuses_the_start_naming_the_image_and_a_rewritten_one_is_trusted_again() {
    let e = dm_env();
    e.daemon.create(create("dev")).await.unwrap();
    let image = e.vm_image();
    std::fs::set_permissions(&image.rootfs_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::File::options().write(true).open(&image.rootfs_path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"changed", 8192).unwrap();

    let err = e.daemon.start("dev").await.unwrap_err();
    assert!(matches!(err, DaemonError::Start { step: StartStep::Image, .. }), "{err:?}");
    assert_eq!(err.status(), 409);
    let text = chain(&err);
    assert!(text.contains("image \"base\" has changed since it was imported"), "{text}");
    assert!(text.contains("banger image rm base"), "{text}");
    assert!(e.helper.calls().is_empty(), "nothing was made");
    assert_eq!(e.daemon.show("dev").await.unwrap().state, "failed");

    // The original bytes back: hashed once, found intact, protected and recorded again.
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 7], 8192).unwrap();
    drop(f);
    e.daemon.start("dev").await.unwrap();
    let now = e.vm_image();
    assert_ne!(now.rootfs_identity, image.rootfs_identity);
    assert_eq!(
        now.rootfs_identity,
        Some(crate::daemon::file_identity::FileIdentity::read(&now.rootfs_path).unwrap())
    );
    assert_eq!(std::fs::metadata(&now.rootfs_path).unwrap().mode() & 0o7777, 0o444);
}

#[tokio::test]
async fn image_rm_is_refused_while_vms_use_the_image_and_names_them() {
    let e = env();
    e.daemon.create(create("web")).await.unwrap();
    e.daemon.create(create("db")).await.unwrap();
    let err = e.daemon.remove_image("base").await.unwrap_err();
    assert_eq!(err.status(), 409, "{err}");
    let text = chain(&err);
    assert!(text.contains("image \"base\" is used by vm(s) db, web: delete them first"), "{text}");
    assert!(e.vm_image().rootfs_path.is_file());

    e.daemon.delete("web", Shutdown::Guest).await.unwrap();
    e.daemon.delete("db", Shutdown::Guest).await.unwrap();
    e.daemon.remove_image("base").await.unwrap();
    assert!(e.daemon.images().await.unwrap().is_empty());
}

// Work disks.

fn with_disk(name: &str, bytes: u64) -> CreateVm {
    CreateVm { work_disk_bytes: Some(bytes), ..create(name) }
}

#[tokio::test]
async fn a_work_disk_is_made_at_create_attached_as_the_second_drive_and_mounted_by_fstab() {
    let e = dm_env();
    let created = e.daemon.create(with_disk("dev", 10 << 30)).await.unwrap();
    let disk = created.vm_dir.join("work.ext4");
    assert_eq!(
        (created.work_disk.as_deref(), created.work_disk_bytes),
        (Some(disk.as_path()), Some(10 << 30))
    );
    assert_eq!(e.prep.calls()[2..], [PrepCall::WorkDisk(disk.clone(), 10 << 30)]);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 10 << 30);
    assert!(e.helper.calls().is_empty(), "create never needs the helper");
    let row = e.vm("dev");
    assert_eq!((row.work_disk_path.as_deref(), row.work_disk_bytes), (Some(disk.as_path()), Some(10 << 30)));

    let vm = e.daemon.start("dev").await.unwrap();
    assert_eq!((vm.work_disk.as_deref(), vm.work_disk_bytes), (Some(disk.as_path()), Some(10 << 30)));
    let drives = e.last_config().drives;
    assert_eq!(drives.len(), 2);
    assert_eq!((drives[1].drive_id.as_str(), &drives[1].path_on_host), ("work", &disk));
    assert!(!drives[1].is_root_device && !drives[1].is_read_only);
    let personalized = e.prep.calls().into_iter().find_map(|c| match c {
        PrepCall::Personalize(_, w) => Some(w),
        _ => None,
    });
    assert!(personalized.unwrap().work_disk, "the fstab line and mount point are written");

    // It survives stop and start.
    let inode = std::fs::metadata(&disk).unwrap().ino();
    e.daemon.stop("dev", Shutdown::Guest).await.unwrap();
    e.daemon.start("dev").await.unwrap();
    assert_eq!(std::fs::metadata(&disk).unwrap().ino(), inode);
    assert_eq!(e.prep.calls().iter().filter(|c| matches!(c, PrepCall::WorkDisk(..))).count(), 1);

    // It goes with the VM.
    e.daemon.delete("dev", Shutdown::Guest).await.unwrap();
    assert!(!disk.exists());
}

#[tokio::test]
async fn bad_work_disks_leave_nothing_behind() {
    let e = env();
    let err = e.daemon.create(with_disk("small", 1 << 20)).await.unwrap_err();
    assert_eq!(err.status(), 400, "{err}");
    assert!(err.to_string().contains("16 MiB to 16 TiB"), "{err}");
    assert!(e.prep.calls().is_empty(), "refused before anything is made");

    e.prep.fail(Some(PrepOp::WorkDisk));
    let err = e.daemon.create(with_disk("nomkfs", 1 << 30)).await.unwrap_err();
    assert_eq!(err.status(), 500, "{err}");
    assert!(err.to_string().contains("install e2fsprogs"), "{err}");
    assert!(e.daemon.list().await.unwrap().is_empty());
    assert_eq!(std::fs::read_dir(e.daemon.paths.vms_dir()).unwrap().count(), 0);

    // A work disk gone from under a VM fails its start saying which file.
    e.prep.fail(None);
    let created = e.daemon.create(with_disk("dev", 1 << 30)).await.unwrap();
    std::fs::remove_file(created.work_disk.as_ref().unwrap()).unwrap();
    let err = e.daemon.start("dev").await.unwrap_err();
    assert!(matches!(err, DaemonError::Start { step: StartStep::Configure, .. }), "{err:?}");
    assert!(chain(&err).contains("work.ext4"), "{err}");
    assert!(e.owns_nothing());
}
