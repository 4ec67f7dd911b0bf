//! `bangerd` start-up: one daemon per install, logging to a capped file, reconcile, then serve.
//!
//! 1. Refuse to run as root.
//! 2. Resolve paths and settings; create the private directories.
//! 3. Take the install's daemon lock (`run/bangerd.lock`, flock): a second daemon started in a
//!    race exits quietly, leaving the first to answer.
//! 4. Log to `bangerd.log` (size-capped, rotated).
//! 5. Open the store, build the helper client, remove what imports interrupted by a stop left
//!    (`images::sweep_staging`), reconcile every VM with the system, then start the
//!    background refresh (every few seconds: VMMs that died, teardowns to retry).
//! 6. Bind the socket (mode 0600; a stale file from a killed daemon is replaced, which is safe
//!    since we hold the lock) and serve until `POST /v1/daemon/stop` or SIGTERM.

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};

use crate::config::Config;
use crate::daemon::guest_prep::HostTools;
use crate::daemon::helper_client::SocketHelper;
use crate::daemon::liveness::ProcFs;
use crate::daemon::logs::{DAEMON_LOG_CAP, RotatingFile};
use crate::daemon::store::Store;
use crate::daemon::vmm::DirectVmm;
use crate::daemon::{Daemon, Deps};
use crate::paths::Paths;

/// Refuses uid 0 with the reason.
pub fn refuse_root(program: &str) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        bail!(
            "{program} must not run as root: run it as the user who owns the vms (root's part is banger-helper, started by the admin)"
        );
    }
    Ok(())
}

/// Runs the daemon until it is told to stop. Returns `Ok(false)` when another daemon of this
/// install already runs.
pub fn run() -> anyhow::Result<bool> {
    refuse_root("bangerd")?;
    let paths = Paths::from_env()?;
    paths.ensure_dirs()?;
    let config = Config::load(paths.config_file())?;

    let lock_path = paths.run_dir().join("bangerd.lock");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    let _lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(false),
        Err((_, e)) => return Err(e).with_context(|| format!("cannot lock {}", lock_path.display())),
    };

    let log = RotatingFile::open(&paths.daemon_log(), DAEMON_LOG_CAP)
        .with_context(|| format!("cannot open the daemon log {}", paths.daemon_log().display()))?;
    let log = Arc::new(Mutex::new(log));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BANGER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .with_writer(move || LogWriter(log.clone()))
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(paths, config))?;
    Ok(true)
}

/// A handle on the shared capped log for one tracing event.
struct LogWriter(Arc<Mutex<RotatingFile>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

async fn serve(paths: Paths, config: Config) -> anyhow::Result<()> {
    let store = Store::open(&paths.db())?;
    let install_id = store.install_id().clone();
    tracing::info!(
        pid = std::process::id(),
        install = %install_id,
        helper = %config.helper_socket.display(),
        firecracker = %config.firecracker.display(),
        "bangerd starting"
    );
    let helper = Arc::new(SocketHelper::new(config.helper_socket.clone(), install_id));
    let relay = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("bangerd"));
    let deps = Deps {
        helper,
        procs: Arc::new(ProcFs::default()),
        vmm: Arc::new(DirectVmm::new(relay)),
        prep: Arc::new(HostTools),
    };
    for path in crate::daemon::images::sweep_staging(&paths) {
        tracing::info!(path = %path.display(), "removed the files of an import interrupted by a stop");
    }
    let daemon = Arc::new(Daemon::new(paths.clone(), config, store, deps));

    match daemon.reconcile().await {
        Ok(report) => tracing::info!(?report, "reconciled"),
        Err(e) => {
            tracing::error!(error = %crate::daemon::chain(&e), "reconcile failed; serving anyway")
        }
    }

    // VMMs that die, teardowns that failed, rows an operation could not finish: settled in the
    // background from now on (see `lifecycle::refresh`).
    tokio::spawn(daemon.clone().refresh_in_background());

    let socket = paths.daemon_socket();
    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale socket {}", socket.display())),
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %socket.display(), "serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let d = daemon.clone();
    tokio::select! {
        () = crate::daemon::api::serve(listener, d) => {}
        _ = term.recv() => {}
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("bangerd stopped; vms keep running");
    Ok(())
}
