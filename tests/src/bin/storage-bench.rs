//! `storage-bench`: how long a VM's root takes to make with each storage kind, for a small and
//! a large image (sparse, half full): a dm-snapshot (its COW file, two loop devices and the
//! snapshot, through the helper's operations), a reflink clone and a sparse copy (the daemon's
//! storage module). See `banger_tests::bench::storage`.
//!
//! ```text
//! cargo build --release -p banger-tests --bin storage-bench
//! sudo target/release/storage-bench                      # reflink and copy on a scratch btrfs
//! cargo run -p banger-tests --bin kernel-tier -- run --memory 6144 --job \
//!   'mount -t tmpfs -o size=6g bench /mnt && target/release/storage-bench --kinds dm-snapshot --dir /mnt'
//! ```
//!
//! Prints a table, then one JSON line per metric (`{"metric","value","unit","baseline","ratio",
//! "n"}`): the median over the rounds in milliseconds, against the sparse copy of the same image
//! where that was measured in the same run.

use std::path::PathBuf;

use anyhow::{Context, bail};
use banger::model::StorageKind;
use banger_tests::bench::storage::{self, Plan, ScratchBtrfs};
use banger_tests::bench::table;
use clap::Parser;

/// How long a VM's root takes to make, per storage kind and image size.
#[derive(Debug, Parser)]
struct Args {
    /// Smaller images (128 MiB and 1 GiB instead of 1 GiB and 8 GiB) and 3 rounds.
    #[arg(long)]
    quick: bool,
    /// Rounds per kind and size (default 5, 3 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// The kinds to measure, comma-separated: sparse-copy, reflink, dm-snapshot.
    #[arg(long, value_delimiter = ',', default_value = "sparse-copy,reflink")]
    kinds: Vec<String>,
    /// Data and holes alternate every this many MiB in the images (a reflink's time follows the
    /// number of extents).
    #[arg(long, value_name = "MIB", default_value_t = 1)]
    extent_mib: u64,
    /// Where images and roots go (reflink needs btrfs, XFS or another filesystem with reflinks;
    /// dm-snapshot a local filesystem such as tmpfs or ext4). Default: a scratch btrfs on a loop
    /// device in /tmp, made and removed by the benchmark (as root).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn kind(name: &str) -> anyhow::Result<StorageKind> {
    [StorageKind::SparseCopy, StorageKind::Reflink, StorageKind::DmSnapshot]
        .into_iter()
        .find(|k| k.as_str() == name)
        .with_context(|| format!("unknown storage kind {name:?}: use sparse-copy, reflink or dm-snapshot"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kinds = args.kinds.iter().map(|k| kind(k)).collect::<anyhow::Result<Vec<_>>>()?;
    let sizes = if args.quick { storage::QUICK_SIZES } else { storage::SIZES };
    let plan = Plan {
        kinds,
        sizes: sizes.to_vec(),
        rounds: args.rounds.unwrap_or(if args.quick { 3 } else { 5 }),
        extent: args.extent_mib << 20,
    };
    if plan.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let state = tempfile::Builder::new().prefix("bgbench-state-").tempdir()?;
    let (_scratch, dir) = match args.dir {
        Some(dir) => (None, dir),
        None => {
            if !nix::unistd::geteuid().is_root() {
                bail!("a scratch btrfs needs root; run as root or name a directory with --dir");
            }
            // The largest image's data and one root beside it, with room to spare.
            let biggest = plan.sizes.iter().max().copied().unwrap_or(0);
            let scratch = ScratchBtrfs::new(std::path::Path::new("/tmp"), biggest + (2 << 30))?;
            let dir = scratch.mount_point();
            (Some(scratch), dir)
        }
    };
    let work = tempfile::Builder::new().prefix("bgbench-storage-").tempdir_in(&dir)?;
    eprintln!("storage-bench: {} rounds; images and roots in {}", plan.rounds, work.path().display());
    let metrics = storage::measure(&plan, work.path(), state.path())?;
    print!("{}", table(&metrics));
    for m in &metrics {
        println!("{}", m.json_line());
    }
    Ok(())
}
