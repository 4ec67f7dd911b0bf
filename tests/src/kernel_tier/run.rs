//! One run of the tier: prepare the cache, then
//!
//! 1. write the jobs and the initramfs into a directory of the run (`runs/run-PID` in the cache),
//! 2. boot,
//! 3. read each job's status back (or why the guest did not report every one).
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
    /// The guest's memory, in MiB.
    pub memory_mib: u32,
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

    // Step 1: the run's directory, its jobs and initramfs.
    let out = run_dir(&options.cache)?;
    write_jobs(options, &out)?;
    let initramfs = out.join("initramfs.cpio");
    initramfs::build(&prepared, &out, options.jobs.len(), &initramfs).map_err(RunError::Initramfs)?;

    // Step 2: the boot.
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
        memory_mib: options.memory_mib,
    };
    let install = prepared.qemu();
    let mut cmd = install.command();
    cmd.args(qemu::args(&install, &machine));
    let boot = qemu::boot(cmd, options.timeout, log)
        .map_err(|source| RunError::Spawn { binary: install.binary, source })?;
    drop(lock);
    // Rebuilt for every run: not worth keeping.
    let _ = std::fs::remove_file(&initramfs);

    // Step 3: what the guest reported.
    let statuses = collect(&boot, &out, options.jobs.len(), console)?;
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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + use<> {
    let path = path.to_path_buf();
    move |source| RunError::Io { path, source }
}

/// Writes `job-N.sh` for each job into the run's directory `out`.
fn write_jobs(options: &RunOptions, out: &Path) -> Result<(), RunError> {
    let env = job_env(&options.env, out);
    for (i, job) in options.jobs.iter().enumerate() {
        let path = out.join(format!("job-{}.sh", i + 1));
        std::fs::write(&path, jobs::script(job, &env, &options.cwd)?).map_err(io(&path))?;
    }
    Ok(())
}

/// Each job's status as the guest wrote it to `out`, or why not every job has one.
fn collect(boot: &Boot, out: &Path, jobs: usize, console: PathBuf) -> Result<Vec<Option<i32>>, RunError> {
    let statuses: Vec<Option<i32>> = (1..=jobs)
        .map(|i| std::fs::read_to_string(out.join(format!("status-{i}"))).ok()?.trim().parse().ok())
        .collect();
    let done = statuses.iter().filter(|s| s.is_some()).count();
    if let Ok(reason) = std::fs::read_to_string(out.join("setup-error")) {
        return Err(RunError::GuestSetup { reason: reason.trim().to_string(), console });
    }
    let reported = boot.guest_code().is_some_and(|code| code != SETUP_FAILED || done > 0);
    if done < jobs || !reported {
        return Err(RunError::Incomplete {
            end: boot.describe_end(),
            elapsed: boot.started.elapsed(),
            done,
            total: jobs,
            console,
            timed_out: boot.status.is_none(),
        });
    }
    Ok(statuses)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::ExitStatus;

    /// A boot whose qemu exited with `code` (`None`: killed at the time limit), the guest having
    /// printed `marks` at the given seconds after the start.
    fn boot(code: Option<i32>, marks: &[(u64, &str)]) -> Boot {
        let started = Instant::now();
        Boot {
            status: code.map(|c| ExitStatus::from_raw(c << 8)),
            started,
            marks: marks.iter().map(|(s, l)| (started + Duration::from_secs(*s), l.to_string())).collect(),
        }
    }

    #[test]
    fn every_status_and_a_debug_exit_make_a_report() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("status-1"), "0\n").unwrap();
        std::fs::write(dir.path().join("status-2"), "101\n").unwrap();
        let statuses = collect(&boot(Some((101 << 1) | 1), &[]), dir.path(), 2, "c".into()).unwrap();
        assert_eq!(statuses, [Some(0), Some(101)]);
    }

    #[test]
    fn a_missing_status_a_panic_or_the_time_limit_are_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("status-1"), "0\n").unwrap();
        let err = collect(&boot(Some(1), &[]), dir.path(), 2, "c".into()).unwrap_err();
        assert!(matches!(err, RunError::Incomplete { done: 1, total: 2, timed_out: false, .. }), "{err}");
        let err = collect(&boot(Some(0), &[]), dir.path(), 1, "c".into()).unwrap_err();
        assert!(err.to_string().starts_with("the guest ended without reporting"), "{err}");
        let err = collect(&boot(None, &[]), dir.path(), 1, "c".into()).unwrap_err();
        assert!(err.timed_out(), "{err}");
    }

    #[test]
    fn a_setup_failure_names_its_step() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("setup-error"), "mounting the host's root (9p tag hostroot)\n")
            .unwrap();
        let err =
            collect(&boot(Some((125 << 1) | 1), &[]), dir.path(), 1, "/r/console.log".into()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the guest's set-up failed: mounting the host's root (9p tag hostroot); console in /r/console.log"
        );
    }

    #[test]
    fn timings_come_from_the_guest_marks() {
        let marks = [
            (3, "kernel-tier: guest ready after 2.9 s of guest time"),
            (4, "kernel-tier: job 1 starts"),
            (6, "kernel-tier: job 1 exited with status 0"),
            (6, "kernel-tier: job 2 starts"),
        ];
        let (first, times) = timings(&boot(None, &marks), 2);
        assert_eq!(first, Some(Duration::from_secs(4)));
        assert_eq!(times, [Some(Duration::from_secs(2)), None]);
    }

    #[test]
    fn the_exit_code_is_the_first_failing_jobs() {
        let report = |statuses: Vec<Option<i32>>| RunReport {
            prepared: Prepared {
                tree: "/t".into(),
                kernel_release: "r".into(),
                kernel_package: "p".into(),
                qemu_version: "q".into(),
            },
            statuses,
            prepare_time: Duration::ZERO,
            boot_to_job: None,
            job_times: vec![],
            boot_time: Duration::ZERO,
            kept: None,
        };
        assert_eq!(report(vec![Some(0), Some(0)]).exit_code(), 0);
        assert_eq!(report(vec![Some(0), Some(5), Some(7)]).exit_code(), 5);
        assert_eq!(report(vec![None, Some(0)]).exit_code(), 1);
    }
}
