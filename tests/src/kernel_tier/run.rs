//! One run of the tier: prepare the cache, write the jobs and the initramfs into a directory of
//! the run (`runs/run-PID` in the cache), boot, and read each job's status back.
//!
//! The run's directory is shared with the guest (writable) at the same path, so a job can leave
//! logs there (`$BANGER_KERNEL_TIER_OUT`); it also keeps the console (`console.log`), the job
//! scripts and their statuses. It is removed after a run whose jobs all passed, unless asked to
//! keep it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::guest_init::SETUP_FAILED;
use super::initramfs::{self, InitramfsError};
use super::jobs::{self, Job, JobError};
use super::prepare::{self, PrepareError, Prepared};
use super::qemu::{self, Boot, Machine};
use super::{MARKER_ENV, OUT_ENV};

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The tier's cache directory.
    pub cache: PathBuf,
    /// The jobs, run in order in one boot.
    pub jobs: Vec<Job>,
    /// Extra environment for every job (after the passed-on variables).
    pub env: Vec<(String, String)>,
    /// The jobs' working directory (a host path; the same in the guest).
    pub cwd: PathBuf,
    /// The time limit of the whole boot.
    pub timeout: Duration,
    /// Show every kernel message on the console.
    pub verbose: bool,
    /// Keep the run's directory even when every job passed.
    pub keep: bool,
}

/// How a run went (its jobs ran; each may have failed).
#[derive(Debug)]
pub struct RunReport {
    /// What was booted.
    pub prepared: Prepared,
    /// Each job's exit status, `None` for a job that did not finish.
    pub statuses: Vec<Option<i32>>,
    /// The time the cache took to be ready (short when it was).
    pub prepare_time: Duration,
    /// From starting qemu to the first job's start.
    pub boot_to_job: Option<Duration>,
    /// Each job's duration, for the jobs that finished.
    pub job_times: Vec<Option<Duration>>,
    /// From starting qemu to its end.
    pub boot_time: Duration,
    /// The run's directory, if kept.
    pub kept: Option<PathBuf>,
}

impl RunReport {
    /// The run's exit code: the first failing job's status, else 0.
    pub fn exit_code(&self) -> i32 {
        self.statuses.iter().map(|s| s.unwrap_or(1)).find(|&s| s != 0).unwrap_or(0)
    }
}

/// Why a run did not produce every job's status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The cache could not be prepared (or the tier is unavailable here).
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    /// A job was ill-formed.
    #[error(transparent)]
    Job(#[from] JobError),
    /// There was nothing to run.
    #[error("no job to run: give a program after `--` or --job COMMAND")]
    NoJobs,
    /// The run's directory could not be written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs could not be built.
    #[error("building the initramfs")]
    Initramfs(#[source] InitramfsError),
    /// qemu could not be started.
    #[error("starting qemu ({binary})")]
    Spawn {
        /// The qemu binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The guest's set-up failed before the jobs.
    #[error("the guest's set-up failed: {reason}; console in {console}")]
    GuestSetup {
        /// What the guest's init reported.
        reason: String,
        /// The console log.
        console: PathBuf,
    },
    /// The boot ended before every job had finished.
    #[error(
        "{end} after {secs:.1} s; {done} of {total} jobs finished; console in {console}",
        secs = elapsed.as_secs_f64()
    )]
    Incomplete {
        /// How qemu ended.
        end: String,
        /// How long the boot ran.
        elapsed: Duration,
        /// Jobs finished.
        done: usize,
        /// Jobs in all.
        total: usize,
        /// The console log.
        console: PathBuf,
        /// Whether it ran into the time limit.
        timed_out: bool,
    },
}

impl RunError {
    /// True when the boot ran into its time limit.
    pub fn timed_out(&self) -> bool {
        matches!(self, RunError::Incomplete { timed_out: true, .. })
    }
}

/// Runs `options.jobs` in one boot of the tier.
pub fn run(options: &RunOptions) -> Result<RunReport, RunError> {
    if options.jobs.is_empty() {
        return Err(RunError::NoJobs);
    }
    let started = Instant::now();
    let (prepared, lock) = prepare::prepare(&options.cache, false)?;
    let prepare_time = started.elapsed();

    let out = run_dir(&options.cache)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunError::Io { path, source }
    };
    let env = job_env(&options.env, &out);
    for (i, job) in options.jobs.iter().enumerate() {
        let path = out.join(format!("job-{}.sh", i + 1));
        std::fs::write(&path, jobs::script(job, &env, &options.cwd)?).map_err(io(&path))?;
    }
    let initramfs = out.join("initramfs.cpio");
    initramfs::build(&prepared, &out, options.jobs.len(), &initramfs).map_err(RunError::Initramfs)?;

    let console = out.join("console.log");
    let log = std::fs::File::create(&console).map_err(io(&console))?;
    let cmdline = qemu::cmdline(options.verbose);
    let vmlinux = prepared.vmlinux();
    let machine = Machine {
        kernel: &vmlinux,
        initramfs: &initramfs,
        cmdline: &cmdline,
        root: Path::new("/"),
        out: &out,
    };
    let install = prepared.qemu();
    let mut cmd = install.command();
    cmd.args(qemu::args(&install, &machine));
    let boot = qemu::boot(cmd, options.timeout, log)
        .map_err(|source| RunError::Spawn { binary: install.binary, source })?;
    drop(lock);
    // Rebuilt for every run: not worth keeping.
    let _ = std::fs::remove_file(&initramfs);

    let statuses: Vec<Option<i32>> = (1..=options.jobs.len())
        .map(|i| std::fs::read_to_string(out.join(format!("status-{i}"))).ok()?.trim().parse().ok())
        .collect();
    let done = statuses.iter().filter(|s| s.is_some()).count();
    if let Ok(reason) = std::fs::read_to_string(out.join("setup-error")) {
        return Err(RunError::GuestSetup { reason: reason.trim().to_string(), console });
    }
    let reported = boot.guest_code().is_some_and(|code| code != SETUP_FAILED || done > 0);
    if done < options.jobs.len() || !reported {
        return Err(RunError::Incomplete {
            end: boot.describe_end(),
            elapsed: boot.started.elapsed(),
            done,
            total: options.jobs.len(),
            console,
            timed_out: boot.status.is_none(),
        });
    }
    let (boot_to_job, job_times) = timings(&boot, options.jobs.len());
    let mut report = RunReport {
        prepared,
        statuses,
        prepare_time,
        boot_to_job,
        job_times,
        boot_time: boot.marks.last().map_or(boot.started.elapsed(), |(t, _)| *t - boot.started),
        kept: None,
    };
    if options.keep || report.exit_code() != 0 {
        report.kept = Some(out);
    } else {
        let _ = std::fs::remove_dir_all(&out);
    }
    Ok(report)
}

/// A fresh directory for this run.
fn run_dir(cache: &Path) -> Result<PathBuf, RunError> {
    let out = cache.join("runs").join(format!("run-{}", std::process::id()));
    let io = |source| RunError::Io { path: out.clone(), source };
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(io)?;
    }
    std::fs::create_dir_all(&out).map_err(io)?;
    Ok(out)
}

/// Every job's environment: the passed-on variables set here, the tier's marker and the run's
/// directory, a home, then `extra`.
pub fn job_env(extra: &[(String, String)], out: &Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = jobs::PASSED_ENV
        .iter()
        .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
        .collect();
    env.push((MARKER_ENV.into(), "1".into()));
    env.push((OUT_ENV.into(), out.to_string_lossy().into_owned()));
    env.push(("HOME".into(), "/root".into()));
    env.extend(extra.iter().cloned());
    env
}

/// Boot-to-first-job time and each job's time, from the marks the guest's init printed.
fn timings(boot: &Boot, jobs: usize) -> (Option<Duration>, Vec<Option<Duration>>) {
    let at = |text: &str| boot.marks.iter().find(|(_, l)| l.starts_with(text)).map(|(t, _)| *t);
    let first = at("kernel-tier: job 1 starts").map(|t| t - boot.started);
    let times = (1..=jobs)
        .map(|i| {
            let start = at(&format!("kernel-tier: job {i} starts"))?;
            let end = at(&format!("kernel-tier: job {i} exited"))?;
            Some(end - start)
        })
        .collect();
    (first, times)
}
