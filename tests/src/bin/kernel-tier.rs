//! `kernel-tier`: runs test binaries as root inside Debian's stock kernel booted under qemu with
//! software emulation, for the kernel features this machine lacks (device-mapper above all).
//! See `banger_tests::kernel_tier` and tests/README.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use banger_tests::kernel_tier::jobs::{self, Job};
use banger_tests::kernel_tier::prepare::PrepareError;
use banger_tests::kernel_tier::run::RunError;
use banger_tests::kernel_tier::{self, RunOptions, RunReport, Unavailable, cargo};
use clap::{Args, Parser, Subcommand};

/// Exit status when the tier cannot run here and that is allowed (not under `CI=true`).
const EXIT_SKIPPED: u8 = 77;
/// Exit status when the boot ran into its time limit.
const EXIT_TIMEOUT: u8 = 124;
/// Exit status when the tier itself failed (cache, qemu, the guest's set-up).
const EXIT_TIER_FAILED: u8 = 125;

#[derive(Parser, Debug)]
#[command(
    about = "Run test binaries as root in Debian's stock kernel under qemu (software emulation)",
    after_help = "Exit status: the job's (with several jobs, the first failing one's); 77 when the \
                  tier cannot run here (skipped; under CI=true that is 1 instead); 124 when the boot \
                  ran into --timeout; 125 when the tier itself failed (cache, qemu, the guest's set-up)."
)]
struct Cli {
    /// The cache directory [default: $BANGER_KERNEL_TIER_CACHE, else kernel-tier in the cargo
    /// target directory]
    #[arg(long, global = true)]
    cache: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Say whether the tier can run here (preparing its cache if needed), and if not, why.
    Check,
    /// Fetch and unpack the kernel, qemu and busybox into the cache (idempotent).
    Prepare {
        /// Resolve and fetch again even if the cache is ready (e.g. for a newer kernel).
        #[arg(long)]
        refresh: bool,
    },
    /// Boot once and run jobs in the guest as root.
    Run {
        #[command(flatten)]
        boot: BootArgs,
        /// A job as a shell command line; repeat for several jobs in the same boot.
        #[arg(long = "job", value_name = "COMMAND")]
        jobs: Vec<String>,
        /// A program and its arguments to run (after the --job jobs).
        #[arg(last = true, value_name = "PROGRAM [ARGS]")]
        program: Vec<String>,
    },
    /// Build the test binaries the manifest names and run them all in one boot.
    Suite {
        #[command(flatten)]
        boot: BootArgs,
        /// The manifest.
        #[arg(long, default_value = "tests/kernel-tier.list")]
        manifest: PathBuf,
    },
}

#[derive(Args, Debug)]
struct BootArgs {
    /// Time limit of the whole boot, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    timeout: u64,
    /// NAME=VALUE in every job's environment (CI, RUST_BACKTRACE, PATH, RUST_LOG and
    /// RUST_TEST_THREADS are passed on when set; BANGER_KERNEL_TIER=1 always).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Show every kernel message (otherwise warnings and worse).
    #[arg(long)]
    verbose: bool,
    /// Keep the run's directory (console.log, job scripts, statuses) even when every job passed.
    #[arg(long)]
    keep: bool,
    /// The guest's memory in MiB (its tmpfs `/run` may fill half of it).
    #[arg(long, value_name = "MIB", default_value_t = kernel_tier::qemu::DEFAULT_MEMORY_MIB)]
    memory: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let exe = std::env::current_exe().ok();
    let cache = cli.cache.clone().unwrap_or_else(|| kernel_tier::default_cache_dir(exe.as_deref()));
    match cli.command {
        Cmd::Check => check(&cache),
        Cmd::Prepare { refresh } => match kernel_tier::prepare::prepare(&cache, refresh) {
            Ok((prepared, _)) => {
                println!("kernel-tier: prepared {}", prepared.tree.display());
                ExitCode::SUCCESS
            }
            Err(e) => prepare_failed(e),
        },
        Cmd::Run { boot, jobs, program } => {
            let mut all: Vec<Job> = jobs.into_iter().map(Job::Shell).collect();
            if !program.is_empty() {
                all.push(Job::Argv(program));
            }
            run(&cache, boot, all)
        }
        Cmd::Suite { boot, manifest } => suite(&cache, boot, &manifest),
    }
}

fn check(cache: &std::path::Path) -> ExitCode {
    let prepared = match kernel_tier::prepare::prepare(cache, false) {
        Ok((prepared, _)) => prepared,
        Err(e) => return prepare_failed(e),
    };
    let qemu = prepared.qemu();
    match qemu.command().arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let why = format!(
                "{} --version: {}: {}",
                qemu.binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return fail(&why);
        }
        Err(e) => return fail(&format!("{}: {e}", qemu.binary.display())),
    }
    println!(
        "kernel-tier: ready: kernel {} ({}), {}, cache {}",
        prepared.kernel_release,
        prepared.kernel_package,
        prepared.qemu_version,
        prepared.tree.display()
    );
    ExitCode::SUCCESS
}

fn suite(cache: &std::path::Path, boot: BootArgs, manifest: &std::path::Path) -> ExitCode {
    let started = Instant::now();
    let selections = match cargo::read_manifest(manifest) {
        Ok(s) => s,
        Err(e) => return fail(&chain(&e)),
    };
    let packages = match cargo::workspace_packages() {
        Ok(p) => p,
        Err(e) => return fail(&chain(&e)),
    };
    let mut all = Vec::new();
    for selection in &selections {
        match cargo::build(selection, &packages) {
            Ok(binaries) => all.extend(binaries.iter().map(|b| cargo::job(b, &selection.test_args))),
            Err(e) => return fail(&chain(&e)),
        }
    }
    eprintln!("kernel-tier: {} test binaries from {}", all.len(), manifest.display());
    let code = run(cache, boot, all);
    eprintln!("kernel-tier: suite took {:.1} s in all", started.elapsed().as_secs_f64());
    code
}

fn run(cache: &std::path::Path, boot: BootArgs, jobs_to_run: Vec<Job>) -> ExitCode {
    let mut env = Vec::new();
    for setting in &boot.env {
        match jobs::parse_env(setting) {
            Ok(pair) => env.push(pair),
            Err(e) => return fail(&e.to_string()),
        }
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let options = RunOptions {
        cache: cache.to_path_buf(),
        jobs: jobs_to_run.clone(),
        env,
        cwd,
        timeout: Duration::from_secs(boot.timeout),
        verbose: boot.verbose,
        keep: boot.keep,
        memory_mib: boot.memory,
    };
    match kernel_tier::run(&options) {
        Ok(report) => {
            summarize(&report, &jobs_to_run);
            ExitCode::from(report.exit_code().clamp(0, 255) as u8)
        }
        Err(RunError::Prepare(e)) => prepare_failed(e),
        Err(e) => {
            eprintln!("kernel-tier: error: {}", chain(&e));
            ExitCode::from(if e.timed_out() { EXIT_TIMEOUT } else { EXIT_TIER_FAILED })
        }
    }
}

fn summarize(report: &RunReport, jobs_run: &[Job]) {
    for (i, job) in jobs_run.iter().enumerate() {
        let status = report.statuses[i].map_or("did not finish".into(), |s| format!("exited with {s}"));
        let time = report.job_times[i].map_or(String::new(), |t| format!(" in {:.1} s", t.as_secs_f64()));
        eprintln!("kernel-tier: job {} {status}{time}: {}", i + 1, jobs::describe(job));
    }
    let boot_to_job = report.boot_to_job.map_or("?".into(), |t| format!("{:.1} s", t.as_secs_f64()));
    eprintln!(
        "kernel-tier: kernel {}; cache ready in {:.1} s; boot to first job {boot_to_job}; whole boot {:.1} s",
        report.prepared.kernel_release,
        report.prepare_time.as_secs_f64(),
        report.boot_time.as_secs_f64()
    );
    if let Some(dir) = &report.kept {
        eprintln!("kernel-tier: run directory kept: {}", dir.display());
    }
}

fn prepare_failed(e: PrepareError) -> ExitCode {
    match e {
        PrepareError::Unavailable(Unavailable { reason }) => unavailable(&reason),
        e => fail(&chain(&e)),
    }
}

/// The tier cannot run here: skipped, or a failure under CI=true.
fn unavailable(reason: &str) -> ExitCode {
    if kernel_tier::under_ci() {
        eprintln!("kernel-tier: cannot run, and CI=true requires it: {reason}");
        return ExitCode::FAILURE;
    }
    eprintln!("kernel-tier: skipped: {reason}");
    ExitCode::from(EXIT_SKIPPED)
}

fn fail(why: &str) -> ExitCode {
    eprintln!("kernel-tier: error: {why}");
    ExitCode::from(EXIT_TIER_FAILED)
}

/// An error and its causes, each once.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
