//! `banger-helper serve`, step by step:
//!
//! 1. refuse to run as anyone but root;
//! 2. raise the soft open-file limit to the hard one; take systemd's socket if one was passed,
//!    close every other inherited descriptor, empty the environment;
//! 3. read the policy and check the host against its `[jailer]` (binaries, chroot base, uid
//!    range: [`crate::policy_cmd::check_host`]); when it has one, set up the jail configuration
//!    and fork the jail launcher ([`crate::launcher`]): a root process joined to the helper by a
//!    socketpair, which confines itself to what a launch needs (the helper's rules would be
//!    inherited by the jailer and Firecracker) and serves the helper alone; resolve the socket
//!    group;
//! 4. bind the socket unless systemd passed one ([`crate::socket`]: a root-owned 0755 directory,
//!    the socket `root:<policy's group>` 0660, whatever the umask); open the state directory
//!    (locked against a second helper) and load the ledger; open the audit log; locate
//!    the iptables tools and their backend (the legacy one needs its lock file in the sandbox);
//!    look for device-mapper with the snapshot target and, where it is found, make or check the
//!    node directory ([`LinuxDm::detect`]) — with every privilege still held, since whether the
//!    helper keeps those of device-mapper depends on it;
//! 5. lock down ([`crate::hardening::lock_down`]): no new privileges, capabilities (those of
//!    device-mapper only where it was found), landlock, seccomp — everything after this runs
//!    confined, including the runtime's threads;
//! 6. start the runtime, open the kernel access (jails through the launcher), reconcile the ledger
//!    with the kernel, serve until SIGTERM or SIGINT, and let the operation in progress finish.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_policy::{Policy, PolicyError};
use nix::unistd::Group;

use crate::audit::{AuditLog, AuditOpenError};
use crate::hardening::{self, HardeningError, Sandbox};
use crate::kernel::Firewall as _;
use crate::kernel::linux::dm::Unavailable;
use crate::kernel::linux::{LinuxDm, LinuxFirewall, LinuxJails, LinuxKernel};
use crate::launcher::{self, LauncherError};
use crate::ledger_store::{LedgerStore, StoreError};
use crate::ops::Helper;
use crate::server::{self, ServerConfig};
use crate::socket::{self, SocketError};
use crate::systemd::{self, SystemdError};

/// What `serve` was told.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The socket path.
    pub socket: PathBuf,
    /// The policy file.
    pub policy: PathBuf,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The directory of dm-snapshot nodes.
    pub node_dir: PathBuf,
}

/// Why the helper could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Not root.
    #[error(
        "banger-helper serve must run as root (it creates TAPs, loop devices and firewall rules, then drops what it does not need); start it with systemd (banger-helper.socket) or sudo"
    )]
    NotRoot,
    /// systemd's socket is unusable.
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    /// The policy file could not be read.
    #[error(transparent)]
    PolicyFile(#[from] LoadPolicyError),
    /// The host does not fit the policy's `[jailer]`.
    #[error(transparent)]
    Host(#[from] crate::policy_cmd::HostCheckError),
    /// The socket group does not exist.
    #[error(
        "socket group `{0}` does not exist: create it with `groupadd --system {0}` and add the users who may run VMs, or name another group in the policy's access.socket_group"
    )]
    NoGroup(String),
    /// The socket could not be made or used.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The ledger could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit log could not be opened.
    #[error(transparent)]
    Audit(#[from] AuditOpenError),
    /// The helper could not confine itself.
    #[error(transparent)]
    Hardening(#[from] HardeningError),
    /// The kernel access could not be set up.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::linux::LinuxKernelError),
    /// device-mapper is there, but the node directory is unusable.
    #[error(transparent)]
    NodeDir(#[from] crate::kernel::linux::dm::NodeDirError),
    /// The jail launcher could not start.
    #[error(transparent)]
    Launcher(#[from] LauncherError),
    /// The runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] io::Error),
}

/// Why a policy file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadPolicyError {
    /// Reading failed.
    #[error("{path}: cannot read the policy")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The policy is invalid.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
}

/// Reads and validates a policy file.
pub fn load_policy(path: &Path) -> Result<Policy, LoadPolicyError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|source| LoadPolicyError::Read { path: name.clone(), source })?;
    Ok(Policy::from_toml(&name, &text)?)
}

/// The gid of the socket group: a decimal gid, or a group name that must exist.
pub fn socket_gid(group: &str) -> Result<u32, ServeError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) | Err(_) => Err(ServeError::NoGroup(group.to_owned())),
    }
}

/// Runs the helper until SIGTERM or SIGINT.
pub fn serve(opts: &ServeOptions) -> Result<(), ServeError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(ServeError::NotRoot);
    }
    let nofile = hardening::raise_nofile()?;
    let passed = systemd::take_listener()?;
    hardening::close_inherited_fds(passed.as_ref().map(AsRawFd::as_raw_fd));
    hardening::clear_environment();

    let policy = load_policy(&opts.policy)?;
    crate::policy_cmd::check_host(&policy, &crate::policy_cmd::SystemHost)?;
    let launcher = match &policy.jailer {
        Some(jailer) => {
            let close: Vec<_> = passed.iter().map(AsFd::as_fd).collect();
            let launcher = launcher::start(jailer, &close)?;
            tracing::info!("jail launcher started (PID {})", launcher.pid);
            Some(launcher)
        }
        None => None,
    };
    let listener = match passed {
        Some(fd) => {
            tracing::info!("serving the socket passed by systemd");
            UnixListener::from(fd)
        }
        None => {
            let gid = socket_gid(&policy.access.socket_group)?;
            socket::bind(&opts.socket, gid)?
        }
    };
    listener.set_nonblocking(true).map_err(|source| SocketError::Io { path: opts.socket.clone(), source })?;
    let (store, ledger) = LedgerStore::open(&opts.state_dir)?;
    let audit = AuditLog::open(&policy.audit.target)?;
    // VMs whose NAT the ledger holds and whose TAP is there (after a reboot the ledger still
    // lists the VMs that ran, but their TAPs and rules are gone).
    let running_nat = crate::ops::nat::ledger_nats(&ledger, &[])
        .iter()
        .any(|r| Path::new("/sys/class/net").join(&r.tap).exists());
    let firewall = LinuxFirewall::choose(&policy.network, running_nat)?;
    tracing::info!("firewall: {}", firewall.backend());
    let xtables_lock = if firewall.legacy_iptables() {
        let lock = PathBuf::from("/run/xtables.lock");
        let _ = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock);
        Some(lock)
    } else {
        None
    };
    let dm = match LinuxDm::detect(&opts.node_dir) {
        Ok(dm) => dm,
        Err(Unavailable::NodeDir(e)) => return Err(e.into()),
        Err(why) => {
            tracing::info!("no dm-snapshot roots on this host, so no loop devices either: {why}");
            LinuxDm::absent()
        }
    };
    let node_dir = dm.node_dir().map(Path::to_owned);
    let sandbox = Sandbox { state_dir: opts.state_dir.clone(), xtables_lock, node_dir };
    let report = hardening::lock_down(&sandbox)?;
    tracing::info!(
        "confined: capabilities kept {:?}; landlock {}; seccomp allows {} system calls",
        report.kept,
        report.landlock,
        report.seccomp_syscalls
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("banger-helper")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(async move {
        let found = dm.node_dir().is_some();
        let jails = launcher.map_or_else(LinuxJails::unavailable, LinuxJails::new);
        let kernel = Arc::new(LinuxKernel::new(firewall, dm, jails)?);
        let helper = Arc::new(Helper::new(policy, kernel, ledger, Some(store), audit));
        if found && !helper.capabilities().device_mapper {
            tracing::warn!(
                "device-mapper is there, but the helper cannot use it confined (it needs CAP_SYS_ADMIN and CAP_MKNOD in its capability bounding set); no dm-snapshot roots, so no loop devices either"
            );
        }
        let r = helper.reconcile().await;
        tracing::info!(
            "ledger reconciled: {} dropped, {} unknown objects reported, {} checks failed",
            r.dropped.len(),
            r.unknown.len(),
            r.errors.len()
        );
        for e in &r.errors {
            tracing::warn!("reconcile: {e}");
        }
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|source| SocketError::Io { path: opts.socket.clone(), source })?;
        tracing::info!("serving");
        let config = ServerConfig::for_nofile(nofile);
        let c = &config.caps;
        tracing::info!(
            "open-file limit {nofile}: at most {} admitted connections ({} per uid), {} being identified ({} per uid), {} of peers not admitted ({} per uid)",
            c.admitted.total,
            c.admitted.per_uid,
            c.arriving.total,
            c.arriving.per_uid,
            c.not_admitted.total,
            c.not_admitted.per_uid
        );
        server::run(helper, listener, config, shutdown_signal()).await;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
