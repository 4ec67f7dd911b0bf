//! How long a VM's root takes to make, for each storage kind, with the product's own code: the
//! daemon's storage module (`banger::daemon::storage`) for the reflink clone and the sparse copy,
//! and for a dm-snapshot root what a VM's first start does (its sparse copy-on-write file made with
//! `create_cow`, then the helper's `LoopAttach` of the image read-only and of the COW file
//! read-write and its `DmCreate`, its operations called in-process, as `helper-bench`'s floor).
//!
//! Each image is sparse and half full: data (a pattern with no zero block) and holes alternate
//! every [`DEFAULT_EXTENT`] (or as chosen): the copy's time follows the data, a reflink's the
//! number of extents. The source stays in the page cache between rounds (it was just written);
//! every root is synced before its time is taken, as the daemon does, and removed after. One
//! untimed dm-snapshot root is made first.

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use banger::daemon::storage::{self, StorageStrategy};
use banger::model::StorageKind;
use banger_helper::kernel::linux::{LinuxDm, LinuxKernel};
use banger_helper::ops::Helper;
use banger_policy::{Peer, Policy};
use banger_protocol::{LoopRole, Request, Response, VmId, min_cow_bytes};

use super::Metric;

/// Data and holes alternate by this much in a benchmark image unless chosen otherwise.
pub const DEFAULT_EXTENT: u64 = 1 << 20;

/// The image sizes of a full run, and of a quick one (the same ratio between them).
pub const SIZES: [u64; 2] = [1 << 30, 8 << 30];
/// The image sizes of `--quick`.
pub const QUICK_SIZES: [u64; 2] = [128 << 20, 1 << 30];

/// `1GiB`, `128MiB`.
pub fn size_name(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}GiB", bytes >> 30)
    } else {
        format!("{}MiB", bytes >> 20)
    }
}

/// The metric's name for `kind` and an image of `bytes` whose data and holes alternate every
/// `extent` (named only when it is not [`DEFAULT_EXTENT`]).
pub fn metric_name(kind: StorageKind, bytes: u64, extent: u64) -> String {
    let layout =
        if extent == DEFAULT_EXTENT { String::new() } else { format!(".extent{}", size_name(extent)) };
    format!("storage.root_create.{}.{}{layout}", kind.as_str(), size_name(bytes))
}

/// A benchmark image.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its file.
    pub path: PathBuf,
    /// Its length.
    pub bytes: u64,
    /// Data and holes alternate by this much.
    pub extent: u64,
}

impl Image {
    /// Writes a sparse image of `bytes` at `path`, data in every other `extent`, synced.
    pub fn make(path: &Path, bytes: u64, extent: u64) -> anyhow::Result<Image> {
        if extent == 0 || !extent.is_multiple_of(4096) {
            bail!("the extent must be a multiple of 4 KiB, not {extent} bytes");
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.set_len(bytes)?;
        let mut buf = vec![0u8; extent as usize];
        let mut offset = 0;
        while offset < bytes {
            // No block of it reads as zeros, and no two extents are the same.
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (((offset >> 20) as usize).wrapping_mul(31) + i % 251 + 1) as u8 | 1;
            }
            let n = extent.min(bytes - offset) as usize;
            file.write_all_at(&buf[..n], offset)?;
            offset += 2 * extent;
        }
        file.sync_all()?;
        Ok(Image { path: path.to_owned(), bytes, extent })
    }

    /// Bytes of data it holds.
    pub fn data_bytes(&self) -> u64 {
        let e = self.extent;
        self.bytes / (2 * e) * e + (self.bytes % (2 * e)).min(e)
    }
}

/// Times `rounds` roots made from `image` in `dir` with the daemon's `prepare_root` and
/// `strategy` (reflink or sparse copy); fails when the root made is not of `expect`.
pub fn time_file_roots(
    image: &Image,
    dir: &Path,
    strategy: StorageStrategy,
    expect: StorageKind,
    rounds: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let dest = dir.join(format!("root-{i}"));
        let start = Instant::now();
        let made = storage::prepare_root(strategy, &image.path, &dest);
        let took = start.elapsed();
        let kind =
            made.with_context(|| format!("cannot make {} from {}", dest.display(), image.path.display()))?;
        storage::remove_root(&dest)?;
        if kind != expect {
            bail!("{} made a {} root, not a {} one", dest.display(), kind.as_str(), expect.as_str());
        }
        samples.push(took);
    }
    Ok(samples)
}

/// The helper's operations in-process, as root, for dm-snapshot roots (needs device-mapper).
pub struct DmRoots {
    rt: tokio::runtime::Runtime,
    helper: Arc<Helper<LinuxKernel>>,
    peer: Peer,
    node_dir: PathBuf,
}

impl std::fmt::Debug for DmRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmRoots").field("node_dir", &self.node_dir).finish()
    }
}

impl DmRoots {
    /// A helper with its ledger in `state` and its nodes in a directory of its own under `/dev`;
    /// fails where there is no device-mapper with the snapshot target.
    pub fn new(state: &Path) -> anyhow::Result<DmRoots> {
        let node_dir = PathBuf::from(format!("/dev/bgbench-storage-{}", std::process::id()));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let audit = state.join("audit.log");
        let policy = format!(
            "[access]\nusers = [\"0\"]\nsocket_group = \"0\"\n\n[quotas]\nmax_vms = 8\nmax_loops = 16\n\n\
             [audit]\nlog = \"{}\"\n",
            audit.display()
        );
        let policy = Policy::from_toml("policy.toml", &policy)?;
        let helper = super::in_process_helper(&rt, policy, &state.join("ledger"), &audit, || {
            LinuxDm::detect(&node_dir).map_err(|e| {
                anyhow::anyhow!("no dm-snapshot roots here ({e}); measure them in the kernel tier")
            })
        })?;
        let peer = super::root_peer("bench-storage")?;
        Ok(DmRoots { rt, helper, peer, node_dir })
    }

    fn call(&self, req: Request, fds: Vec<OwnedFd>) -> anyhow::Result<Response> {
        let op = req.op_name();
        match self.rt.block_on(self.helper.handle(&self.peer, req, fds)) {
            Response::Error(e) => bail!("{op} failed: {e}"),
            r => Ok(r),
        }
    }

    /// Times `rounds` dm-snapshot roots over `image`, each as a VM's first start makes it: the
    /// COW file in `dir`, both loop devices, the snapshot with its node. Each is torn down
    /// (untimed) before the next.
    pub fn time_roots(&self, image: &Image, dir: &Path, rounds: usize) -> anyhow::Result<Vec<Duration>> {
        let mut samples = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let vm = VmId::new(format!("bench{i}"))?;
            let cow = dir.join(format!("root-{i}.cow"));
            let made = self.make_root(image, &cow, &vm);
            let teardown = self.call(Request::TeardownVms { vms: vec![vm.clone()] }, vec![]);
            let _ = std::fs::remove_file(&cow);
            let took = made?;
            teardown?;
            samples.push(took);
        }
        Ok(samples)
    }

    fn make_root(&self, image: &Image, cow: &Path, vm: &VmId) -> anyhow::Result<Duration> {
        let start = Instant::now();
        storage::create_cow(cow, min_cow_bytes(image.bytes))?;
        let base = File::open(&image.path)?;
        let cow_file = OpenOptions::new().read(true).write(true).open(cow)?;
        for (role, read_only, fd) in
            [(LoopRole::Base, true, OwnedFd::from(base)), (LoopRole::Cow, false, OwnedFd::from(cow_file))]
        {
            self.call(Request::LoopAttach { vm: vm.clone(), role, read_only }, vec![fd])?;
        }
        match self.call(Request::DmCreate { vm: vm.clone() }, vec![])? {
            Response::Dm(info) => {
                let took = start.elapsed();
                let meta = std::fs::metadata(&info.device)?;
                if !std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
                    bail!("{} is not a block device", info.device);
                }
                Ok(took)
            }
            other => bail!("DmCreate answered {other:?}"),
        }
    }
}

impl Drop for DmRoots {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.node_dir);
    }
}

/// A btrfs filesystem on a loop device over a sparse file in a temporary directory, mounted
/// there; unmounted, detached and removed on drop. Needs root and `mkfs.btrfs`.
#[derive(Debug)]
pub struct ScratchBtrfs {
    dir: tempfile::TempDir,
    device: String,
}

impl ScratchBtrfs {
    /// Makes one of `bytes` under `parent`.
    pub fn new(parent: &Path, bytes: u64) -> anyhow::Result<ScratchBtrfs> {
        let dir = tempfile::Builder::new().prefix("bgbench-btrfs-").tempdir_in(parent)?;
        let file = dir.path().join("fs.img");
        File::create(&file)?.set_len(bytes)?;
        let run = |cmd: &mut Command| -> anyhow::Result<String> {
            let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
            if !out.status.success() {
                bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
        run(Command::new("mkfs.btrfs").arg("-q").arg(&file))?;
        let device = run(Command::new("losetup").args(["--find", "--show"]).arg(&file))?;
        let scratch = ScratchBtrfs { device, dir };
        std::fs::create_dir(scratch.mount_point())?;
        run(Command::new("mount").arg(&scratch.device).arg(scratch.mount_point()))?;
        Ok(scratch)
    }

    /// Where it is mounted.
    pub fn mount_point(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for ScratchBtrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount_point()).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// What a run measures.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The kinds, in order.
    pub kinds: Vec<StorageKind>,
    /// The image sizes.
    pub sizes: Vec<u64>,
    /// Rounds per kind and size.
    pub rounds: usize,
    /// Data and holes alternate by this much in the images.
    pub extent: u64,
}

/// Measures `plan` with images and roots in `dir`: a metric per kind and size, each compared
/// with the sparse copy of the same image when that was measured too.
pub fn measure(plan: &Plan, dir: &Path, state: &Path) -> anyhow::Result<Vec<Metric>> {
    let dm = plan.kinds.contains(&StorageKind::DmSnapshot).then(|| DmRoots::new(state)).transpose()?;
    let mut metrics = Vec::new();
    let mut warm = false;
    for &bytes in &plan.sizes {
        let image = Image::make(&dir.join(format!("image-{}", size_name(bytes))), bytes, plan.extent)?;
        eprintln!(
            "bench: storage image of {} ({} MiB of data) in {}",
            size_name(bytes),
            image.data_bytes() >> 20,
            dir.display()
        );
        if let Some(dm) = dm.as_ref().filter(|_| !warm) {
            // The first snapshot of a run pays for what the kernel and the helper set up once.
            dm.time_roots(&image, dir, 1)?;
            warm = true;
        }
        let mut copy_ms = None;
        let mut of_size = Vec::new();
        for &kind in &plan.kinds {
            let samples = match kind {
                StorageKind::DmSnapshot => {
                    dm.as_ref().expect("made above").time_roots(&image, dir, plan.rounds)?
                }
                StorageKind::Reflink => {
                    time_file_roots(&image, dir, StorageStrategy::Reflink, kind, plan.rounds)?
                }
                StorageKind::SparseCopy => {
                    time_file_roots(&image, dir, StorageStrategy::SparseCopy, kind, plan.rounds)?
                }
            };
            let m = Metric::millis(metric_name(kind, bytes, plan.extent), &samples);
            if kind == StorageKind::SparseCopy {
                copy_ms = Some(m.value);
            }
            of_size.push(m);
        }
        std::fs::remove_file(&image.path)?;
        for m in of_size {
            let is_copy = m.metric.contains(StorageKind::SparseCopy.as_str());
            metrics.push(match copy_ms {
                Some(base) if !is_copy => m.against(base),
                _ => m,
            });
        }
    }
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn an_image_is_half_data_and_a_sparse_copy_of_it_allocates_only_that() {
        let dir = tempfile::tempdir().unwrap();
        const EXTENT: u64 = DEFAULT_EXTENT;
        let image = Image::make(&dir.path().join("img"), 8 * EXTENT + 4096, EXTENT).unwrap();
        assert_eq!(image.data_bytes(), 4 * EXTENT + 4096);
        let meta = std::fs::metadata(&image.path).unwrap();
        assert_eq!(meta.len(), 8 * EXTENT + 4096);
        // The filesystem may allocate a little more than the data (tmpfs, ext4: not less).
        assert!(meta.blocks() * 512 >= 4 * EXTENT + 4096, "{} bytes allocated", meta.blocks() * 512);
        let first = std::fs::read(&image.path).unwrap();
        assert!(first[..EXTENT as usize].chunks(4096).all(|b| b.iter().any(|&x| x != 0)));
        assert!(first[EXTENT as usize..2 * EXTENT as usize].iter().all(|&x| x == 0));
        let samples =
            time_file_roots(&image, dir.path(), StorageStrategy::SparseCopy, StorageKind::SparseCopy, 2)
                .unwrap();
        assert_eq!(samples.len(), 2);
        assert!(!dir.path().join("root-0").exists(), "the roots are removed");
        assert_eq!(
            metric_name(StorageKind::SparseCopy, 1 << 30, EXTENT),
            "storage.root_create.sparse-copy.1GiB"
        );
        assert_eq!(
            metric_name(StorageKind::Reflink, 8 << 30, 64 << 20),
            "storage.root_create.reflink.8GiB.extent64MiB"
        );
        assert!(Image::make(&dir.path().join("bad"), 1 << 20, 1000).is_err());
        assert_eq!(size_name(128 << 20), "128MiB");
    }
}
