//! The helper's operations and the one function every request goes through.
//!
//! [`Helper::handle`] runs each request in the same order, whatever it is:
//!
//! 1. the descriptors that came with it are counted against [`Request::expected_fds`] (any other
//!    count is refused and every descriptor closed);
//! 2. mutating requests take the state lock, so they never interleave (ping and hello do not);
//! 3. [`banger_policy::authorize`] decides on the peer, the request and the ledger;
//! 4. the operation checks the ledger again (ownership, quotas, what exists) and derives every
//!    kernel name itself from `(uid, install, vm)`;
//! 5. it calls the kernel through the [`Kernel`] traits, undoing a partial setup on failure;
//! 6. it records the result in the ledger (written atomically) and in the audit log.
//!
//! Each operation lives in its own module: [`lease`], [`tap`], [`nat`], [`sysctl`], [`loopdev`],
//! [`list`], [`teardown`], and the start-up [`reconcile`] with the kernel.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use banger_policy::{Decision, Ledger, ObjectKind, Peer, Policy, authorize};
use banger_protocol::{
    Capabilities, HelloReply, HelperError, InstallId, PROTOCOL_VERSION, Request, Response,
};
use tokio::sync::{Mutex, MutexGuard};

use crate::audit::{AuditLog, Record};
use crate::kernel::{Kernel, Loops as _};
use crate::ledger_store::{LedgerStore, Stored};

pub mod lease;
pub mod list;
pub mod loopdev;
pub mod nat;
pub mod reconcile;
mod rollback;
pub mod sysctl;
pub mod tap;
pub mod teardown;

/// The ledger in memory and the file it is saved to.
#[derive(Debug)]
pub struct State {
    /// The ledger and loop backing identities.
    pub stored: Stored,
    /// Where it is saved; `None` keeps it in memory only (tests, benchmarks of the floor).
    store: Option<LedgerStore>,
}

impl State {
    /// Saves the ledger.
    fn persist(&mut self) -> Result<(), HelperError> {
        match &mut self.store {
            Some(store) => store.save(&self.stored).map_err(|e| {
                tracing::error!("{e}: {:?}", std::error::Error::source(&e));
                HelperError::Kernel { op: "ledger-write".into(), errno: 0, detail: e.to_string() }
            }),
            None => Ok(()),
        }
    }
}

/// The caller of one request: uid, its install and its user name.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The peer's uid.
    pub uid: u32,
    /// The install the connection said hello for.
    pub install: &'a InstallId,
    /// The peer's user name, if it has one.
    pub user: Option<&'a str>,
}

/// The helper: policy, kernel, ledger and audit log.
pub struct Helper<K: Kernel> {
    policy: Policy,
    kernel: Arc<K>,
    /// Guards the ledger and its file. Every mutating operation holds it from its authorization
    /// to its ledger update, so two operations never interleave their kernel changes.
    state: Mutex<State>,
    audit: AuditLog,
    capabilities: Capabilities,
    /// How long inspecting a loop backing file may take.
    pub(crate) inspect_timeout: std::time::Duration,
}

impl<K: Kernel> std::fmt::Debug for Helper<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helper").field("capabilities", &self.capabilities).finish_non_exhaustive()
    }
}

/// What an operation hands back: the answer, and the names it derived for the audit record.
type OpResult = Result<Response, HelperError>;

impl<K: Kernel> Helper<K> {
    /// A helper over `kernel` with this policy and ledger. `store` is where the ledger is saved
    /// (`None`: memory only).
    pub fn new(
        policy: Policy,
        kernel: Arc<K>,
        stored: Stored,
        store: Option<LedgerStore>,
        audit: AuditLog,
    ) -> Self {
        let capabilities = Capabilities {
            device_mapper: Path::new("/dev/mapper/control").exists(),
            jailer: false,
            loop_configure: kernel.loops().has_configure(),
            ipv6: policy.network.ipv6,
        };
        Helper {
            policy,
            kernel,
            state: Mutex::new(State { stored, store }),
            audit,
            capabilities,
            inspect_timeout: loopdev::INSPECT_TIMEOUT,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The kernel.
    pub fn kernel(&self) -> &Arc<K> {
        &self.kernel
    }

    /// Waits for the operation in progress, if any, and keeps every later one from starting: for
    /// shutdown, so no operation is cut in half. The state lock is never released again.
    pub async fn quiesce(&self) {
        std::mem::forget(self.state.lock().await);
    }

    /// A copy of the ledger as it is now.
    pub async fn snapshot(&self) -> Stored {
        self.state.lock().await.stored.clone()
    }

    /// Answers a `Hello`: the peer must be allowed by the policy and speak this protocol version.
    /// On success the install is recorded on `peer`.
    pub fn hello(
        &self,
        peer: &mut Peer,
        version: u32,
        install: InstallId,
    ) -> Result<HelloReply, HelperError> {
        let request = Request::Hello { version, install_id: install.clone() };
        let result = self.check_hello(peer, &request, version);
        let names = vec![format!("install={install}")];
        self.audit.write(&Record::new(
            peer.uid,
            peer.pid,
            Some(install.as_str()),
            request.op_name(),
            names,
            result.as_ref().map(|_| ()),
        ));
        if result.is_ok() {
            peer.install = Some(install);
        }
        result
    }

    /// The audit log (the server records refusals made before a request reaches [`Helper::handle`]).
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    fn check_hello(&self, peer: &Peer, request: &Request, version: u32) -> Result<HelloReply, HelperError> {
        if let Decision::Refuse(e) = authorize(&self.policy, peer, request, &Ledger::default()) {
            return Err(e);
        }
        if version != PROTOCOL_VERSION {
            return Err(HelperError::VersionMismatch { client: version, helper: PROTOCOL_VERSION });
        }
        Ok(HelloReply {
            version: PROTOCOL_VERSION,
            helper_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: self.capabilities.clone(),
        })
    }

    /// Handles one request of a peer that has said hello, with the descriptors that came with it,
    /// and writes its audit record.
    pub async fn handle(&self, peer: &Peer, request: Request, fds: Vec<OwnedFd>) -> Response {
        let (response, record) = self.respond(peer, request, fds).await;
        self.audit.write(&record);
        response
    }

    /// [`Helper::handle`], handing the audit record back instead of writing it (the server
    /// summarises a connection's routine successes, see [`crate::audit::Summaries`]).
    pub async fn respond(&self, peer: &Peer, request: Request, fds: Vec<OwnedFd>) -> (Response, Record) {
        let mut names = Vec::new();
        let result = self.dispatch(peer, &request, fds, &mut names).await;
        let record = Record::new(
            peer.uid,
            peer.pid,
            peer.install.as_ref().map(InstallId::as_str),
            request.op_name(),
            names,
            result.as_ref().map(|_| ()),
        );
        (result.unwrap_or_else(Response::Error), record)
    }

    async fn dispatch(
        &self,
        peer: &Peer,
        request: &Request,
        mut fds: Vec<OwnedFd>,
        names: &mut Vec<String>,
    ) -> OpResult {
        if fds.len() != request.expected_fds() {
            let got = fds.len();
            drop(fds);
            return Err(HelperError::invalid(format!(
                "{} takes {} file descriptor(s), {got} arrived; all were closed",
                request.op_name(),
                request.expected_fds()
            )));
        }
        let Some(install) = peer.install.as_ref() else {
            return Err(HelperError::invalid("the first request on a connection must be hello"));
        };
        let c = Caller { uid: peer.uid, install, user: peer.user.as_deref() };
        match request {
            Request::Hello { .. } => {
                Err(HelperError::invalid("hello was already answered on this connection"))
            }
            Request::Ping => {
                if let Decision::Refuse(e) = authorize(&self.policy, peer, request, &Ledger::default()) {
                    return Err(e);
                }
                Ok(Response::Pong)
            }
            Request::LeaseSubnet => {
                let mut st = self.lock_authorized(peer, request).await?;
                self.lease(&mut st, c).map(Response::Lease)
            }
            Request::TapCreate { vm } => {
                let mut st = self.lock_authorized(peer, request).await?;
                self.tap_create(&mut st, c, vm, names).await.map(Response::Tap)
            }
            Request::TapDelete { vm } => {
                let mut st = self.lock_authorized(peer, request).await?;
                self.tap_delete(&mut st, c, vm, names).await.map(|()| Response::Done)
            }
            Request::NatUp { vm } => {
                let mut st = self.lock_authorized(peer, request).await?;
                self.nat_up(&mut st, c, vm, names).await.map(Response::Nat)
            }
            Request::NatDown { vm } => {
                let mut st = self.lock_authorized(peer, request).await?;
                self.nat_down(&mut st, c, vm, names).await.map(|()| Response::Done)
            }
            Request::SysctlSet { key, value } => {
                let _st = self.lock_authorized(peer, request).await?;
                self.sysctl_set(key, value, names).map(|()| Response::Done)
            }
            Request::LoopAttach { vm, role, read_only } => {
                let fd =
                    fds.pop().ok_or_else(|| HelperError::invalid("loop-attach needs the backing file"))?;
                // Before the lock: inspecting the file must never hold up anyone else.
                let backing = self.inspect_backing(fd).await?;
                let mut st = self.lock_authorized(peer, request).await?;
                self.loop_attach(&mut st, c, vm, *role, *read_only, backing, names).map(Response::Loop)
            }
            Request::LoopDetach { vm, role } => {
                let mut st = self.lock_authorized(peer, request).await?;
                self.loop_detach(&mut st, c, vm, *role, names).map(|()| Response::Done)
            }
            Request::ListOwned => {
                let st = self.lock_authorized(peer, request).await?;
                Ok(Response::Owned(self.list_owned(&st, c)))
            }
            Request::TeardownVms { vms } => {
                let mut st = self.lock_authorized(peer, request).await?;
                self.teardown(&mut st, c, vms, names).await.map(Response::Teardown)
            }
        }
    }

    /// Takes the state lock and runs the policy decision under it.
    async fn lock_authorized(
        &self,
        peer: &Peer,
        request: &Request,
    ) -> Result<MutexGuard<'_, State>, HelperError> {
        let st = self.state.lock().await;
        match authorize(&self.policy, peer, request, &st.stored.ledger) {
            Decision::Allow => Ok(st),
            Decision::Refuse(e) => Err(e),
        }
    }

    /// Refuses a new VM or object over the caller's quotas (checked again here, under the lock,
    /// after [`authorize`]). `new_vm`: the request would give the caller one more VM.
    fn check_quota(
        &self,
        st: &State,
        c: Caller<'_>,
        kind: ObjectKind,
        new_vm: bool,
    ) -> Result<(), HelperError> {
        let q = self.policy.quotas_for_uid(c.user, c.uid);
        let ledger = &st.stored.ledger;
        let (resource, limit, have) = match kind {
            ObjectKind::Tap => ("taps", q.max_taps, ledger.count_taps(c.uid)),
            ObjectKind::Loop(_) => ("loops", q.max_loops, ledger.count_loops(c.uid)),
            ObjectKind::Nat => ("vms", q.max_vms, ledger.count_vms(c.uid)),
        };
        if have >= limit {
            return Err(HelperError::QuotaExceeded { resource: resource.into(), limit });
        }
        if new_vm && ledger.count_vms(c.uid) >= q.max_vms {
            return Err(HelperError::QuotaExceeded { resource: "vms".into(), limit: q.max_vms });
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use banger_protocol::{HelperError, InstallId, PROTOCOL_VERSION, Request, Response};

    use super::testing::*;

    #[tokio::test]
    async fn hello_checks_access_and_version_and_records_the_install() {
        let t = TestHelper::new();
        let mut stranger = t.peer(4242, "home");
        stranger.install = None;
        let r = t.helper.hello(&mut stranger, PROTOCOL_VERSION, InstallId::new("home").unwrap());
        assert!(matches!(&r, Err(HelperError::Denied { rule, .. }) if rule == "access"), "{r:?}");
        assert_eq!(stranger.install, None);

        let mut p = t.peer(1000, "x");
        p.install = None;
        let r = t.helper.hello(&mut p, PROTOCOL_VERSION + 1, InstallId::new("home").unwrap());
        assert!(matches!(r, Err(HelperError::VersionMismatch { .. })), "{r:?}");
        let reply = t.helper.hello(&mut p, PROTOCOL_VERSION, InstallId::new("home").unwrap()).unwrap();
        assert_eq!(reply.version, PROTOCOL_VERSION);
        assert!(reply.capabilities.loop_configure);
        assert_eq!(p.install, Some(InstallId::new("home").unwrap()));

        let audit = t.audit_lines();
        assert_eq!(audit.len(), 3);
        assert_eq!(
            (audit[0].uid, audit[0].result.as_str(), audit[0].code.as_deref()),
            (4242, "error", Some("E001"))
        );
        assert_eq!(audit[2].result, "ok");
    }

    #[tokio::test]
    async fn requests_need_hello_and_every_one_is_audited_with_its_names() {
        let t = TestHelper::new();
        let mut p = t.peer(1000, "home");
        p.install = None;
        let r = t.req(&p, Request::ListOwned).await;
        assert!(matches!(r, Response::Error(HelperError::InvalidRequest { .. })), "{r:?}");
        let p = t.peer(1000, "home");
        assert_eq!(t.req(&p, Request::Ping).await, Response::Pong);
        let r = t
            .req(&p, Request::Hello { version: PROTOCOL_VERSION, install_id: InstallId::new("x").unwrap() })
            .await;
        assert!(matches!(r, Response::Error(HelperError::InvalidRequest { .. })), "{r:?}");
        let Response::Tap(tap) = t.req(&p, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
        let audit = t.audit_lines();
        assert_eq!(audit.len(), 4);
        let last = audit.last().unwrap();
        assert_eq!((last.op.as_str(), last.install.as_deref(), last.pid), ("tap-create", Some("home"), 4242));
        assert_eq!(last.names, vec![tap.name]);
    }
}
