//! `bench`: banger's benchmark, one command for every figure (see `docs/benchmarks.md`).
//!
//! Run as root after building the workspace's binaries in release mode (the benchmark starts the
//! real `banger`, `bangerd`, `banger-helper` and the Firecracker test double, found next to it):
//!
//! ```text
//! cargo build --release --workspace --bins
//! sudo target/release/bench            # or: cargo run --release -p banger-tests --bin bench
//! sudo target/release/bench --quick    # a few rounds, for CI: proves it runs, asserts no timing
//! ```
//!
//! It prints a table for people and, for machines, one JSON line per metric:
//! `{"metric","value","unit","baseline","ratio","n"}` (`value` the median, `p90` beside it;
//! `baseline` and `ratio` null where the figure has none). What it measures:
//!
//! 1. `vm start` control plane: in an end-to-end world (test users, network namespaces, the real
//!    helper, the double as the VMM; [`banger_tests::e2e::World`]), one VM started and force-stopped
//!    round after round. The daemon logs each start's phases (`start timings`, from the request
//!    received to `InstanceStart` answered and the row saying `running`); the benchmark reads
//!    them back and reports each phase's median and p90, and the CLI's wall time around it.
//! 2. The CLI's latency and the memory of bangerd and the helper with many VMs (100, 10 with
//!    `--quick`; created, not started): `banger vm list` against a warm daemon, with
//!    `banger --version` as its baseline; each process's resident set from `/proc/PID/status`.
//! 3. `vm run -- true` on a stopped VM (its wall time, the start inside it, the rest: the CLI, the
//!    wait for SSH and the command), 50 VMs (5 with `--quick`) of one user started at once
//!    (starts per second, each start's phases under that load, bangerd's and the helper's
//!    resident sets with them running) and reconcile at daemon start over 1,000 VM rows (20
//!    with `--quick`), half served by stub VMMs and half dead ([`banger_tests::bench::fleet`]).
//! 4. The helper's figures (ping, one VM's host setup and teardown against shelling out and the
//!    in-process floor, a bulk teardown, its resident set with 100 VMs of 10 users):
//!    `helper-bench` run with `--json`, its lines passed on.
//! 5. A VM's root creation time per storage kind and image size ([`banger_tests::bench::storage`]),
//!    left out of `--quick` (its images take longer to write than the rest of a quick run);
//!    `bench storage` measures only it, with its own options.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use banger::model::StorageKind;
use banger_tests::bench::figure::{Figure as Metric, Phases, last_start_timings, round, rss_mib, time_ms};
use banger_tests::bench::fleet;
use banger_tests::bench::storage::{self, Plan, ScratchBtrfs};
use banger_tests::e2e::{Who, World};
use clap::Parser;

/// banger's benchmark: prints a table and one JSON line per metric.
#[derive(Debug, Parser)]
struct Args {
    /// A small run (few rounds, small sizes) that only proves every figure can be made, as CI
    /// runs it; leaves out the storage figures unless `bench storage` asks for them.
    #[arg(long, global = true)]
    quick: bool,
    /// Measured `vm start` rounds (default 30, 3 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// VMs for the CLI latency and memory figures (created, not started; default 100, 10 with
    /// --quick).
    #[arg(long)]
    vms: Option<usize>,
    /// VMs started at once for the concurrent-start figure (default 50, 5 with --quick).
    #[arg(long)]
    concurrent: Option<usize>,
    /// VM rows bangerd reconciles at start, half alive and half dead (default 1000, 20 with
    /// --quick).
    #[arg(long)]
    reconcile_vms: Option<usize>,
    /// Leave out the helper's figures (`helper-bench`).
    #[arg(long)]
    no_helper: bool,
    /// Leave out a VM's root creation time per storage kind.
    #[arg(long)]
    no_storage: bool,
    /// Measure only one group of figures.
    #[command(subcommand)]
    only: Option<Only>,
}

/// One group of figures alone.
#[derive(Debug, clap::Subcommand)]
enum Only {
    /// How long a VM's root takes to make, per storage kind and image size (1 GiB and 8 GiB;
    /// 128 MiB and 1 GiB with --quick).
    Storage(StorageArgs),
}

/// The storage figures' options.
#[derive(Debug, Clone, PartialEq, clap::Args)]
struct StorageArgs {
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

impl Default for StorageArgs {
    fn default() -> StorageArgs {
        StorageArgs {
            rounds: None,
            kinds: vec!["sparse-copy".into(), "reflink".into()],
            extent_mib: 1,
            dir: None,
        }
    }
}

/// The `vm start` control plane, round after round.
fn vm_start(rounds: usize) -> anyhow::Result<Vec<Metric>> {
    let world = World::new();
    const A: Who = Who::A;
    world.banger_ok(A, &["vm", "create", "bench"]);
    let log = world.daemon_log(A);
    let mut total = Vec::new();
    let mut wall = Vec::new();
    let mut phases = Phases::default();
    // The first start makes the VM's root; one more warms the caches.
    let warmup = 2;
    let cli = world.cli(A);
    for round in 0..rounds + warmup {
        let took = time_ms(cli.banger_in_place(&["vm", "start", "bench"]))?;
        let t = last_start_timings(&log)?;
        world.banger_ok(A, &["vm", "stop", "--force", "bench"]);
        if round < warmup {
            continue;
        }
        wall.push(took);
        total.push(t.total_us / 1e3);
        phases.add(&t);
    }
    world.banger_ok(A, &["vm", "delete", "bench"]);
    let mut out = vec![
        Metric::new("vm start control plane", "ms", total),
        Metric::new("vm start wall (cli)", "ms", wall),
    ];
    out.extend(phases.figures("vm start"));
    Ok(out)
}

/// The CLI's latency and the processes' memory with `vms` VMs (created, not started), each
/// sampled `rounds` times: `banger vm list` against a warm daemon (run as the user without the
/// test launcher) with `banger --version` (the CLI's own start, no daemon) as its baseline,
/// alternating; bangerd's resident set idle (no VM) and with the VMs; the helper's.
fn scale(vms: usize, rounds: usize) -> anyhow::Result<Vec<Metric>> {
    let world = World::new();
    const A: Who = Who::A;
    let cli = world.cli(A);
    let daemon = match world.daemon_pids(A)[..] {
        [pid] => pid,
        ref pids => bail!("expected one bangerd of the benchmark's user, found {pids:?}"),
    };
    let helper = world.helper().pid().context("the helper is not running")?;
    let sample_rss = |pid: u32| -> anyhow::Result<Vec<f64>> {
        let mut v = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            time_ms(cli.banger_in_place(&["vm", "list"]))?;
            v.push(rss_mib(pid)?);
        }
        Ok(v)
    };
    let idle = sample_rss(daemon)?;
    eprintln!("bench: creating {vms} vms");
    for i in 0..vms {
        world.banger_ok(A, &["vm", "create", &format!("scale{i}")]);
    }
    let (mut list, mut version) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    // One untimed round of each first.
    for round in 0..=rounds {
        let l = time_ms(cli.banger_in_place(&["vm", "list"]))?;
        let v = time_ms(cli.banger_in_place(&["--version"]))?;
        if round > 0 {
            list.push(l);
            version.push(v);
        }
    }
    let with_vms = sample_rss(daemon)?;
    let helper_rss = sample_rss(helper)?;
    let mib = |name: String, samples| Metric::new(name, "MiB", samples);
    Ok(vec![
        Metric::new(format!("vm list wall (cli, {vms} vms) vs banger --version"), "ms", list)
            .against(version),
        mib("bangerd rss idle".into(), idle),
        mib(format!("bangerd rss with {vms} vms"), with_vms),
        mib(format!("helper rss with {vms} vms (created)"), helper_rss),
    ])
}

/// `helper-bench --json`, next to this program; its JSON lines.
fn helper_figures(quick: bool) -> anyhow::Result<Vec<serde_json::Value>> {
    let exe = std::env::current_exe()?.with_file_name("helper-bench");
    if !exe.is_file() {
        bail!("{} not found: build it (cargo build --release -p banger-tests --bins)", exe.display());
    }
    let mut cmd = Command::new(&exe);
    cmd.arg("--json");
    if quick {
        cmd.args(["--rounds", "3", "--pings", "500", "--bulk-rounds", "1", "--bulk-vms", "5"]);
        cmd.args(["--rss-users", "2", "--rss-vms-per-user", "2"]);
    }
    let out = cmd.output().with_context(|| format!("cannot run {}", exe.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}): {}", exe.display(), out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("metric").is_some())
        .collect())
}

fn storage_kind(name: &str) -> anyhow::Result<StorageKind> {
    [StorageKind::SparseCopy, StorageKind::Reflink, StorageKind::DmSnapshot]
        .into_iter()
        .find(|k| k.as_str() == name)
        .with_context(|| format!("unknown storage kind {name:?}: use sparse-copy, reflink or dm-snapshot"))
}

/// A VM's root creation time per storage kind and image size, as JSON lines.
fn storage_figures(args: &StorageArgs, quick: bool) -> anyhow::Result<Vec<serde_json::Value>> {
    let kinds = args.kinds.iter().map(|k| storage_kind(k)).collect::<anyhow::Result<Vec<_>>>()?;
    let sizes = if quick { storage::QUICK_SIZES } else { storage::SIZES };
    let plan = Plan {
        kinds,
        sizes: sizes.to_vec(),
        rounds: args.rounds.unwrap_or(if quick { 3 } else { 5 }),
        extent: args.extent_mib << 20,
    };
    if plan.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let state = tempfile::Builder::new().prefix("bgbench-state-").tempdir()?;
    let (_scratch, dir) = match &args.dir {
        Some(dir) => (None, dir.clone()),
        None => {
            if !nix::unistd::geteuid().is_root() {
                bail!("a scratch btrfs needs root; run as root or name a directory with --dir");
            }
            // The largest image's data and one root beside it, with room to spare.
            let biggest = plan.sizes.iter().max().copied().unwrap_or(0);
            let scratch = ScratchBtrfs::new(Path::new("/tmp"), biggest + (2 << 30))?;
            let dir = scratch.mount_point();
            (Some(scratch), dir)
        }
    };
    let work = tempfile::Builder::new().prefix("bgbench-storage-").tempdir_in(&dir)?;
    eprintln!("bench: storage, {} rounds; images and roots in {}", plan.rounds, work.path().display());
    let metrics = storage::measure(&plan, work.path(), state.path())?;
    Ok(metrics
        .iter()
        .map(|m| {
            let mut v = serde_json::to_value(m).expect("a metric serializes");
            for key in ["value", "baseline", "ratio"] {
                if let Some(x) = v[key].as_f64() {
                    v[key] = round(x).into();
                }
            }
            v
        })
        .collect())
}

fn main() -> anyhow::Result<()> {
    if let Some(socket) = std::env::var_os(fleet::STUB_VMM_ENV) {
        return fleet::stub_vmm(Path::new(&socket));
    }
    let args = Args::parse();
    let started = Instant::now();
    if let Some(Only::Storage(storage)) = &args.only {
        let figures = storage_figures(storage, args.quick)?;
        print_report(&[], &figures);
        eprintln!("bench: done in {:.1} s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("bench must run as root: it creates test users, network namespaces and TAPs");
    }
    let rounds = args.rounds.unwrap_or(if args.quick { 3 } else { 30 });
    let mut start = vm_start(rounds)?;
    start.extend(scale(args.vms.unwrap_or(if args.quick { 10 } else { 100 }), rounds)?);
    {
        let world = World::new();
        start.extend(fleet::vm_run(&world, rounds)?);
        let n = args.concurrent.unwrap_or(if args.quick { 5 } else { 50 });
        start.extend(fleet::concurrent_starts(&world, n, if args.quick { 1 } else { 5 })?);
    }
    let n = args.reconcile_vms.unwrap_or(if args.quick { 20 } else { 1000 });
    start.extend(fleet::reconcile(n, if args.quick { 2 } else { 10 })?);
    let mut other = if args.no_helper { Vec::new() } else { helper_figures(args.quick)? };
    if !args.quick && !args.no_storage {
        other.extend(storage_figures(&StorageArgs::default(), false)?);
    }
    print_report(&start, &other);
    eprintln!("bench: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The table, then one JSON line per figure: `start`'s, then the JSON lines of `other`.
fn print_report(start: &[Metric], other: &[serde_json::Value]) {
    let helper = other;

    println!();
    println!("{:<64} {:>10} {:>10} {:>10} {:>7} {:>4}", "metric", "median", "p90", "baseline", "ratio", "n");
    for m in start {
        let base = m.baseline().map_or("-".into(), |b| format!("{b:.2}"));
        let ratio = m.baseline().map_or("-".into(), |b| format!("{:.2}", m.median() / b));
        println!(
            "{:<64} {:>7.2} {} {:>7.2} {} {:>10} {:>7} {:>4}",
            m.name,
            m.median(),
            m.unit,
            m.p90(),
            m.unit,
            base,
            ratio,
            m.samples.len()
        );
    }
    for v in helper {
        let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        println!(
            "{:<64} {:>7.3} {:<2} {:>10} {:>10} {:>7} {:>4}",
            v["metric"].as_str().unwrap_or_default(),
            f("value").unwrap_or(f64::NAN),
            v["unit"].as_str().unwrap_or_default(),
            f("p90").map_or("-".into(), |x| format!("{x:.3}")),
            f("baseline").map_or("-".into(), |x| format!("{x:.3}")),
            f("ratio").map_or("-".into(), |x| format!("{x:.2}")),
            v["n"].as_u64().unwrap_or(0)
        );
    }
    println!();
    for m in start {
        println!("{}", m.json());
    }
    for v in helper {
        println!("{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_a_selection_with_its_own_options() {
        let args = Args::try_parse_from([
            "bench",
            "storage",
            "--quick",
            "--kinds",
            "reflink,dm-snapshot",
            "--dir",
            "/x",
        ])
        .unwrap();
        assert!(args.quick);
        let Some(Only::Storage(s)) = args.only else { panic!("{args:?}") };
        assert_eq!(
            (s.kinds, s.dir, s.extent_mib),
            (vec!["reflink".into(), "dm-snapshot".into()], Some("/x".into()), 1)
        );
        let args = Args::try_parse_from(["bench", "--quick"]).unwrap();
        assert!(args.only.is_none() && args.quick);
        // A full run's storage figures are those of `bench storage` without options.
        let Some(Only::Storage(parsed)) = Args::try_parse_from(["bench", "storage"]).unwrap().only else {
            panic!("no storage selection")
        };
        assert_eq!(parsed, StorageArgs::default());
        let err = storage_kind("zfs").unwrap_err().to_string();
        assert!(err.contains("zfs") && err.contains("reflink"), "{err}");
    }
}
