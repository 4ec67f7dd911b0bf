//! Why a daemon operation failed: [`DaemonError`]. Each variant keeps its cause as a typed
//! source and maps to one HTTP status ([`DaemonError::status`]). [`chain`] renders an error and
//! its causes on one line, each once, where an error leaves the daemon: the API's answer, the
//! log, a VM's `last_error`.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use banger_protocol::HelperError;

use crate::config::ConfigError;
use crate::daemon::firecracker::FirecrackerError;
use crate::daemon::handles::HandlesError;
use crate::daemon::helper_client::HelperClientError;
use crate::daemon::images::{ImageError, ImageErrorKind};
use crate::daemon::lifecycle::{Op, StartStep};
use crate::daemon::personalize::PersonalizeError;
use crate::daemon::storage::StorageError;
use crate::daemon::store::StoreError;
use crate::daemon::vmm::VmmError;
use crate::daemon::work_disk::WorkDiskError;
use crate::ids::NameError;
use crate::paths::PathsError;
use crate::ssh::SshError;

/// The most vCPUs a VM may have (Firecracker's limit).
pub const MAX_VCPUS: u32 = crate::config::MAX_VCPUS;

/// The least memory a VM may be given, in MiB.
pub const MIN_VM_MEMORY_MIB: u32 = 128;

/// Why a daemon operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A VM name that is not a DNS label (400).
    #[error(transparent)]
    Name(#[from] NameError),
    /// A vCPU count out of range (400).
    #[error("--vcpus {0} is out of range: use 1 to {MAX_VCPUS}")]
    Vcpus(u32),
    /// Too little memory (400).
    #[error("--memory {0} MiB is too small: use at least {MIN_VM_MEMORY_MIB}")]
    Memory(u32),
    /// A path of the VM too long for a unix socket (400).
    #[error(transparent)]
    SocketPath(#[from] PathsError),
    /// The VMM binary could not be found when the daemon started (400).
    #[error(transparent)]
    VmmBinary(Arc<ConfigError>),
    /// The request body could not be read (400).
    #[error("cannot read the request body")]
    BodyRead(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The request body is not what the endpoint takes (400).
    #[error("invalid request body")]
    Body(#[source] serde_json::Error),
    /// A query parameter the endpoint does not take, or a value it cannot use (400).
    #[error("invalid {key}={value:?} in the request: {expected}")]
    Query {
        /// The parameter.
        key: String,
        /// Its value.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// No VM has this name (404).
    #[error("no vm named {0:?}: see `banger vm list` for your vms")]
    NoSuchVm(String),
    /// A VM of this name exists (409).
    #[error("a vm named {0:?} already exists: pick another name or `banger vm delete {0}` first")]
    VmExists(String),
    /// An image operation failed (status by its kind).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The store refused (409) or failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The helper could not be reached (503) or failed (500).
    #[error(transparent)]
    Helper(#[from] HelperClientError),
    /// The helper removed a VM's kernel objects only in part (500).
    #[error("banger-helper could not remove the {object} of vm {vm}")]
    Teardown {
        /// The VM's name.
        vm: String,
        /// What it could not remove.
        object: String,
        /// Why.
        #[source]
        source: HelperError,
    },
    /// A file or directory of the daemon's own (500).
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The handle cache or `handles.json` (500).
    #[error(transparent)]
    Handles(#[from] HandlesError),
    /// The VM's root disk: a kind this host cannot make (409), or a failure (500).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The process table or a jailed VMM's socket could not be read (500).
    #[error(transparent)]
    Liveness(#[from] crate::daemon::liveness::LivenessError),
    /// The VM's launch mode: one the helper cannot give here (409) or a shape a jail cannot
    /// have (400).
    #[error(transparent)]
    Launch(#[from] crate::daemon::launch::LaunchError),
    /// The VM's work disk: a size out of range (400), or a failure (500).
    #[error(transparent)]
    WorkDisk(#[from] WorkDiskError),
    /// Writing hostname and keys into the root (500).
    #[error(transparent)]
    Personalize(#[from] PersonalizeError),
    /// The user's key or the VM's pinned host key (500).
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// The VMM could not be started (500).
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The VMM refused a request (500). `hint` says how to fix a device it could not open.
    #[error("{source}{hint}")]
    VmmApi {
        /// A fix, when the answer names a device the user cannot open.
        hint: String,
        /// The refusal.
        #[source]
        source: FirecrackerError,
    },
    /// A blocking task of the daemon died (500).
    #[error("an internal task of bangerd failed")]
    Task(#[source] tokio::task::JoinError),
    /// A start failed at `step`; the steps before it were undone (status of the cause).
    #[error("cannot start vm {vm}: {step} failed{}", undo_note(.undo.as_deref(), .source))]
    Start {
        /// The VM's name.
        vm: String,
        /// The step that failed.
        step: StartStep,
        /// Why undoing the steps made so far is incomplete, if it is.
        undo: Option<String>,
        /// Why the step failed.
        #[source]
        source: Box<DaemonError>,
    },
    /// A stop, restart or delete shut the guest down but could not remove its kernel objects:
    /// the VM is `stopped` with its teardown pending, retried in the background (status of the
    /// cause).
    #[error("{}", incomplete(.vm, *.op))]
    Incomplete {
        /// The VM's name.
        vm: String,
        /// What was asked.
        op: Op,
        /// Why the teardown failed.
        #[source]
        source: Box<DaemonError>,
    },
}

/// What a failed start says of its undo: the undo's own cause, unless it is the start's (a
/// helper that went away makes both fail alike), which the line already ends with.
fn undo_note(undo: Option<&str>, cause: &DaemonError) -> String {
    match undo {
        None => String::new(),
        Some(u) if chain(cause).contains(u) => {
            " and undoing it is incomplete for the same reason (bangerd retries in the background)".into()
        }
        Some(u) => format!(" and undoing it is incomplete ({u}; bangerd retries in the background)"),
    }
}

fn incomplete(vm: &str, op: Op) -> String {
    match op {
        Op::Delete => format!(
            "vm {vm} is not deleted: its guest is shut down, but removing its network and disk devices failed; run `banger vm delete {vm}` again (bangerd also retries the removal in the background)"
        ),
        Op::Stop | Op::Restart => format!(
            "vm {vm} is stopped, but removing its network and disk devices failed; bangerd retries in the background, and `banger vm {op} {vm}` retries now"
        ),
    }
}

impl DaemonError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            DaemonError::Name(_)
            | DaemonError::Vcpus(_)
            | DaemonError::Memory(_)
            | DaemonError::SocketPath(_)
            | DaemonError::VmmBinary(_)
            | DaemonError::BodyRead(_)
            | DaemonError::Body(_)
            | DaemonError::Query { .. } => 400,
            DaemonError::NoSuchVm(_) => 404,
            DaemonError::VmExists(_) => 409,
            DaemonError::Image(e) => match e.kind() {
                ImageErrorKind::NotFound => 404,
                ImageErrorKind::Conflict => 409,
                ImageErrorKind::Invalid => 400,
                ImageErrorKind::Failed => 500,
            },
            DaemonError::Store(
                StoreError::DuplicateName { .. }
                | StoreError::DuplicateImage { .. }
                | StoreError::ImageInUse { .. },
            ) => 409,
            DaemonError::Helper(e) if e.is_unreachable() => 503,
            DaemonError::Storage(e) if e.is_unavailable() => 409,
            DaemonError::Launch(crate::daemon::launch::LaunchError::Shape { .. }) => 400,
            DaemonError::Launch(_) => 409,
            DaemonError::WorkDisk(e) if e.is_invalid() => 400,
            DaemonError::Start { source, .. } | DaemonError::Incomplete { source, .. } => source.status(),
            DaemonError::Store(_)
            | DaemonError::Helper(_)
            | DaemonError::Teardown { .. }
            | DaemonError::Io { .. }
            | DaemonError::Handles(_)
            | DaemonError::Liveness(_)
            | DaemonError::Storage(_)
            | DaemonError::WorkDisk(_)
            | DaemonError::Personalize(_)
            | DaemonError::Ssh(_)
            | DaemonError::Vmm(_)
            | DaemonError::VmmApi { .. }
            | DaemonError::Task(_) => 500,
        }
    }

    /// A refusal by the VMM, with a hint when it names a device the user cannot open.
    pub fn vmm_api(source: FirecrackerError) -> DaemonError {
        let hint = crate::daemon::vmm::device_hint(&chain(&source));
        DaemonError::VmmApi { hint, source }
    }
}

/// An error and its `source()` chain on one line (`error: cause: cause`), each text once: a
/// cause whose text the line already holds is left out.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_cause() {
        let unreachable = HelperClientError::Unreachable {
            socket: "/run/banger/helper.sock".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        let e = DaemonError::Start {
            vm: "dev".into(),
            step: StartStep::Network,
            undo: None,
            source: Box::new(DaemonError::Helper(unreachable)),
        };
        assert_eq!(e.status(), 503);
        let text = chain(&e);
        assert!(
            text.starts_with(
                "cannot start vm dev: setting up the network failed: cannot reach banger-helper"
            ),
            "{text}"
        );
        assert!(text.ends_with("connection refused"), "{text}");
        assert_eq!(text.matches("cannot reach").count(), 1, "each cause once: {text}");

        assert_eq!(DaemonError::NoSuchVm("x".into()).status(), 404);
        assert_eq!(DaemonError::VmExists("x".into()).status(), 409);
        assert_eq!(DaemonError::Vcpus(64).status(), 400);
        let dup = DaemonError::Store(StoreError::DuplicateName { name: "x".into() });
        assert_eq!(dup.status(), 409);
    }

    #[test]
    fn a_vmm_refusal_naming_a_device_carries_the_fix() {
        let e = DaemonError::vmm_api(FirecrackerError::Api {
            status: 400,
            fault_message: "Open tap device failed: Permission denied (os error 13)".into(),
            path: "/network-interfaces/eth0".into(),
        });
        let text = chain(&e);
        assert!(text.contains("/network-interfaces/eth0") && text.contains("chmod 0666"), "{text}");
    }
}
