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
//! 3. The helper's figures (ping, one VM's host setup and teardown against shelling out and the
//!    in-process floor, a bulk teardown): `helper-bench` run with `--json`, its lines passed on.
//! 4. A VM's root creation time per storage kind and image size ([`banger_tests::bench::storage`]),
//!    left out of `--quick` (its images take longer to write than the rest of a quick run);
//!    `bench storage` measures only it, with its own options.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use banger::model::StorageKind;
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

/// One figure.
struct Metric {
    name: String,
    unit: &'static str,
    samples: Vec<f64>,
    baseline: Option<Vec<f64>>,
}

/// The `p`th percentile of `v` (nearest rank; `v` sorted).
fn pct(v: &[f64], p: usize) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

impl Metric {
    fn median(&self) -> f64 {
        pct(&sorted(&self.samples), 50)
    }

    fn p90(&self) -> f64 {
        pct(&sorted(&self.samples), 90)
    }

    fn baseline(&self) -> Option<f64> {
        self.baseline.as_ref().map(|b| pct(&sorted(b), 50))
    }

    fn json(&self) -> serde_json::Value {
        let (value, baseline) = (self.median(), self.baseline());
        serde_json::json!({
            "metric": self.name,
            "value": round(value),
            "unit": self.unit,
            "baseline": baseline.map(round),
            "ratio": baseline.map(|b| round(value / b.max(1e-9))),
            "n": self.samples.len(),
            "p90": round(self.p90()),
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The phases of one start, as the daemon logged them (`phase=MICROS,…`), and its total.
#[derive(Debug, Default)]
struct StartTimings {
    total_us: f64,
    phases: Vec<(String, f64)>,
}

/// The last `start timings` line of a daemon log.
fn last_start_timings(log: &Path) -> anyhow::Result<StartTimings> {
    let text = std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("start timings"))
        .with_context(|| format!("no `start timings` line in {}", log.display()))?;
    parse_timings(line).with_context(|| format!("cannot parse {line:?}"))
}

fn parse_timings(line: &str) -> Option<StartTimings> {
    let mut t = StartTimings::default();
    for word in line.split_whitespace() {
        if let Some(v) = word.strip_prefix("total_us=") {
            t.total_us = v.parse().ok()?;
        } else if let Some(v) = word.strip_prefix("phases=") {
            for part in v.split(',') {
                let (name, us) = part.split_once('=')?;
                t.phases.push((name.replace('_', " "), us.parse().ok()?));
            }
        }
    }
    (t.total_us > 0.0).then_some(t)
}

/// The `vm start` control plane, round after round.
fn vm_start(rounds: usize) -> anyhow::Result<Vec<Metric>> {
    let world = World::new();
    const A: Who = Who::A;
    world.banger_ok(A, &["vm", "create", "bench"]);
    let log = world.daemon_log(A);
    let mut total = Vec::new();
    let mut wall = Vec::new();
    let mut phases: Vec<(String, Vec<f64>)> = Vec::new();
    // The first start makes the VM's root; one more warms the caches.
    let warmup = 2;
    for round in 0..rounds + warmup {
        let at = Instant::now();
        world.banger_ok(A, &["vm", "start", "bench"]);
        let took = at.elapsed();
        let t = last_start_timings(&log)?;
        world.banger_ok(A, &["vm", "stop", "--force", "bench"]);
        if round < warmup {
            continue;
        }
        wall.push(took.as_secs_f64() * 1e3);
        total.push(t.total_us / 1e3);
        for (name, us) in t.phases {
            match phases.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(us / 1e3),
                None => phases.push((name, vec![us / 1e3])),
            }
        }
    }
    world.banger_ok(A, &["vm", "delete", "bench"]);
    let mut out = vec![
        Metric { name: "vm start control plane".into(), unit: "ms", samples: total, baseline: None },
        Metric { name: "vm start wall (cli)".into(), unit: "ms", samples: wall, baseline: None },
    ];
    out.extend(phases.into_iter().map(|(name, samples)| Metric {
        name: format!("vm start: {name}"),
        unit: "ms",
        samples,
        baseline: None,
    }));
    Ok(out)
}

/// Runs `cmd` to completion, quietly; its wall time in milliseconds.
fn time_ms(mut cmd: Command) -> anyhow::Result<f64> {
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let at = Instant::now();
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    let took = at.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

/// The resident set of `pid` in MiB (`VmRSS` of `/proc/PID/status`).
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_rss_mib(&text).with_context(|| format!("no VmRSS line in {path}"))
}

fn parse_rss_mib(status: &str) -> Option<f64> {
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
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
    let mib = |name: String, samples| Metric { name, unit: "MiB", samples, baseline: None };
    Ok(vec![
        Metric {
            name: format!("vm list wall (cli, {vms} vms) vs banger --version"),
            unit: "ms",
            samples: list,
            baseline: Some(version),
        },
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
    println!("{:<50} {:>10} {:>10} {:>10} {:>7} {:>4}", "metric", "median", "p90", "baseline", "ratio", "n");
    for m in start {
        let base = m.baseline().map_or("-".into(), |b| format!("{b:.2}"));
        let ratio = m.baseline().map_or("-".into(), |b| format!("{:.2}", m.median() / b));
        println!(
            "{:<50} {:>7.2} {} {:>7.2} {} {:>10} {:>7} {:>4}",
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
            "{:<50} {:>7.3} {:<2} {:>10} {:>10} {:>7} {:>4}",
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
    fn a_start_timings_line_is_read_back() {
        let line = "2026-12-07T22:00:00.000Z  INFO banger::daemon::lifecycle::start: start timings vm=bench total_us=5321 phases=row_starting=120,image=40,helper=900,vmm_spawn_to_api_socket=2100";
        let t = parse_timings(line).unwrap();
        assert_eq!(t.total_us, 5321.0);
        assert_eq!(t.phases[0], ("row starting".to_owned(), 120.0));
        assert_eq!(t.phases[3], ("vmm spawn to api socket".to_owned(), 2100.0));
        assert!(parse_timings("start timings vm=x").is_none());
    }

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

    #[test]
    fn the_resident_set_is_read_from_proc_status() {
        let status = "Name:\tbangerd\nVmPeak:\t  20000 kB\nVmRSS:\t    6144 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_mib(status), Some(6.0));
        assert_eq!(parse_rss_mib("Name:\tx\n"), None);
        let mine = rss_mib(std::process::id()).unwrap();
        assert!(mine > 0.5 && mine < 4096.0, "{mine} MiB");
    }

    #[test]
    fn medians_and_ratios() {
        let m = Metric {
            name: "x".into(),
            unit: "ms",
            samples: vec![5.0, 1.0, 3.0, 2.0, 4.0],
            baseline: Some(vec![2.0, 2.0, 1.0]),
        };
        assert_eq!((m.median(), m.p90(), m.baseline()), (3.0, 5.0, Some(2.0)));
        let j = m.json();
        assert_eq!(j["ratio"], 1.5);
        assert_eq!(j["n"], 5);
    }
}
