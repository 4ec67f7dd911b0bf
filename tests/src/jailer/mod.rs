//! `jailer-double`: Firecracker's jailer 1.16.1, reproduced for tests on machines without it.
//!
//! It takes the same arguments, builds the same jail (paths, modes, owners, device nodes), sets
//! up cgroups v1 or v2 the same way, and fails with the same messages and exit status as the real
//! jailer (checked against its source, `src/jailer` and `src/utils` at v1.16.1, and against the
//! real binary's observed behaviour recorded in the project's Firecracker notes). It is a test
//! tool, never a product default. See `tests/README.md` for what it does not reproduce.
//!
//! What it does, in order (each step in the module that owns it):
//!
//! 1. [`process::sanitize`]: close every descriptor from 3 up, clear the environment.
//! 2. [`args`]: parse the command line (`--help` and `--version` print and exit 0).
//! 3. [`config`]: validate in the jailer's order: the id, the exec file, the chroot base, uid,
//!    gid, the parent cgroup, the cgroup version, each `--cgroup` (finding its hierarchy in
//!    `/proc/mounts`, [`cgroup`]), each `--resource-limit`; read the userfaultfd minor from
//!    `/proc/misc`. With `--cgroup-version 2` and no `--cgroup`, the jailer moves itself into
//!    `<unified>/<parent cgroup>` when that exists.
//! 4. [`jail`]: create `<base>/<exec file name>/<id>/root`; copy the exec file into it (opened
//!    without truncation, so a running copy fails with "Text file busy"), owned by uid:gid.
//! 5. [`process`]: join `--netns`; set the open-files limit (2048 unless `--resource-limit
//!    no-file=N`) and `fsize`.
//! 6. [`cgroup`]: create each cgroup, write its values, then add the jailer's PID to each.
//! 7. With `--daemonize`, open `/dev/null` while it is still reachable.
//! 8. [`chroot`]: a new mount namespace, every mount a slave, the jail bind-mounted on itself,
//!    `pivot_root` into it, the old root detached and removed.
//! 9. [`jail`]: `/`, `/dev`, `/dev/net`, `/run` made 0700 and owned by uid:gid; device nodes
//!    `/dev/net/tun`, `/dev/kvm`, `/dev/urandom` (a failure there is only a warning) and, when
//!    the host has it, `/dev/userfaultfd`, each 0600 and owned by uid:gid.
//! 10. [`process`]: with `--daemonize`, fork (the jailer exits 0), `setsid`, fork again (so the
//!     VMM is neither session nor group leader), standard descriptors on `/dev/null`.
//! 11. With `--new-pid-ns`, fork into a new PID namespace: the parent writes the child's host
//!     PID to `/<exec file name>.pid` and exits 0. Without it, the jailer writes its own PID.
//! 12. Exec `/<exec file name> --id ID --start-time-us .. --start-time-cpu-us ..
//!     --parent-cpu-time-us .. <words after -->` as uid:gid with no supplementary groups.
//!
//! Nothing is ever cleaned up: the jail and the cgroups stay after the VMM ends, as with the real
//! jailer. [`harness`] has what tests need to run it and inspect a jail.

pub mod args;
pub mod cgroup;
pub mod chroot;
pub mod config;
pub mod harness;
pub mod jail;
pub mod process;
mod sys;

use std::fmt;
use std::path::Path;
use std::process::ExitCode;

use args::ArgParseError;
use cgroup::CgroupError;
use chroot::ChrootError;
use config::ConfigError;
use jail::JailError;
use process::ProcessError;

/// Where the jailer looks for cgroup mounts.
pub const PROC_MOUNTS: &str = "/proc/mounts";
/// Where the jailer looks for the userfaultfd device's minor number.
pub const PROC_MISC: &str = "/proc/misc";

/// Every way the jailer fails. The message is the real jailer's; `Debug` prints the real
/// jailer's `Debug` form (its variant names), which it prints after `Error: `.
#[derive(thiserror::Error)]
pub enum JailerError {
    /// The command line is wrong.
    #[error("Failed to parse arguments: {0}")]
    ArgumentParsing(#[source] ArgParseError),
    /// An argument's value is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Cgroups could not be found or set up.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The jail's files could not be made.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// The jail could not be entered.
    #[error(transparent)]
    Chroot(#[from] ChrootError),
    /// A process step (netns, limits, daemon, PID namespace, exec) failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

impl fmt::Debug for JailerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JailerError::ArgumentParsing(e) => write!(f, "ArgumentParsing({e:?})"),
            JailerError::Config(e) => fmt::Debug::fmt(e, f),
            JailerError::Cgroup(e) => fmt::Debug::fmt(e, f),
            JailerError::Jail(e) => fmt::Debug::fmt(e, f),
            JailerError::Chroot(e) => fmt::Debug::fmt(e, f),
            JailerError::Process(e) => fmt::Debug::fmt(e, f),
        }
    }
}

/// A path as the jailer's messages show it: its `Debug` form without the quotes.
pub(crate) fn unquoted(path: &Path) -> String {
    format!("{path:?}").replace('"', "")
}

/// Ends the process as the jailer's `main` does on an error: the message, then `Error: <Debug>`,
/// on stderr, exit status 1.
fn fail(e: &JailerError) -> ExitCode {
    eprintln!("{e}");
    eprintln!("Error: {e:?}");
    ExitCode::from(1)
}

/// The jailer's `main` (see the module documentation for the steps).
pub fn main() -> ExitCode {
    // Step 1.
    if let Err(e) = process::sanitize() {
        panic!("Failed to sanitize the Jailer process: {e}");
    }
    // Step 2. Like the jailer, a word that is not UTF-8 makes it panic here.
    let words: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args::parse(&words) {
        Ok(p) => p,
        Err(e) => return fail(&JailerError::ArgumentParsing(e)),
    };
    let arguments = match parsed {
        args::Command::Help => {
            print!("{}", args::help_text());
            return ExitCode::SUCCESS;
        }
        args::Command::Version => {
            print!("{}", args::version_text());
            return ExitCode::SUCCESS;
        }
        args::Command::Jail(a) => a,
    };
    let clocks = process::Clocks::start();
    // Step 3.
    let host = config::Host { proc_mounts: Path::new(PROC_MOUNTS), proc_misc: Path::new(PROC_MISC) };
    let result = config::Config::from_args(&arguments, &host).and_then(|config| run(config, clocks));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Steps 4 to 12; returns only on an error (or in a parent that has nothing left to do).
fn run(config: config::Config, mut clocks: process::Clocks) -> Result<(), JailerError> {
    // Step 4.
    jail::create_chroot_dir(&config.chroot_dir)?;
    let exec_name = jail::copy_exec_file(&config.exec_file, &config.chroot_dir, config.uid, config.gid)?;
    let jailed_exec = Path::new("/").join(&exec_name);
    // Step 5.
    if let Some(netns) = &config.netns {
        process::join_netns(netns)?;
    }
    config.limits.install()?;
    // Step 6.
    if let Some(plan) = &config.cgroups {
        plan.apply(std::process::id())?;
    }
    // Step 7.
    let dev_null = if config.daemonize { Some(process::open_dev_null()?) } else { None };
    // Step 8.
    chroot::enter(&config.chroot_dir)?;
    // Step 9.
    jail::setup_folders(config.uid, config.gid)?;
    jail::make_device_nodes(config.uid, config.gid, config.uffd_minor)?;
    clocks.jailer_done();
    // Step 10.
    if let Some(dev_null) = dev_null {
        process::daemonize(dev_null, &mut clocks)?;
    }
    let launch = process::Launch {
        exec_file: &jailed_exec,
        id: &config.id,
        uid: config.uid,
        gid: config.gid,
        extra: &config.extra,
        clocks: &clocks,
    };
    // Steps 11 and 12.
    let pid_file = jail::pid_file_path(&jailed_exec);
    if config.new_pid_ns {
        process::exec_in_new_pid_ns(&launch, config.daemonize, |child| jail::write_pid_file(&pid_file, child))
    } else {
        jail::write_pid_file(&pid_file, std::process::id())?;
        Err(launch.exec().into())
    }
}
