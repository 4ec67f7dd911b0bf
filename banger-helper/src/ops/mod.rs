//! The helper's operations and the one function every request goes through.
//!
//! [`Helper::respond`] runs each request in the same order, whatever it is:
//!
//! 1. it observes the request's inputs: how many descriptors came with it, whether the helper can
//!    make dm-snapshot targets and jails here, and for a loop attach (where it can) the backing
//!    file, for a jail launch each of its files, inspected before any lock is taken
//!    ([`banger_policy::Observed`]);
//! 2. mutating requests take the state lock, so they never interleave (ping does not);
//! 3. [`banger_policy::authorize`] decides on the peer, the request, the ledger and what was
//!    observed — the only place a request is allowed or refused — and hands over a
//!    [`Grant`] (the lease and slot of a new TAP, the TAP a NAT goes over, how a loop is attached,
//!    the loop devices a dm-snapshot goes over);
//! 4. the operation acts on the grant: it derives every kernel name itself from
//!    `(uid, install, vm)` and calls the kernel through the [`Kernel`] traits, undoing a partial
//!    setup on failure ([`rollback`]). It can still fail on the kernel, on kernel state that is
//!    not policy (a link of the derived name that is someone else's), or on a broken invariant
//!    ([`HelperError::Internal`]), never on a rule;
//! 5. every change of the ledger goes through [`State::commit`]: written ahead of the kernel
//!    call that makes an object, settled after, removed once the kernel has let the object go;
//! 6. the answer and the names the operation touched go into the audit log.
//!
//! Each operation lives in its own module: [`tap`], [`nat`], [`loopdev`], [`dm`], [`jail`],
//! [`list`], [`teardown`], and the start-up [`reconcile`] with the kernel.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use banger_policy::{Decision, Grant, Ledger, Observed, Peer, Policy, authorize};
use banger_protocol::{
    Capabilities, HelloReply, HelperError, InstallId, PROTOCOL_VERSION, Request, Response,
};
use tokio::sync::Mutex;

use crate::audit::{AuditLog, Record};
use crate::kernel::{Dm as _, Firewall as _, Jails as _, Kernel, Loops as _};
use crate::ledger_store::LedgerStore;

pub mod dm;
pub mod forwarding;
pub mod jail;
pub mod list;
pub mod loopdev;
pub mod nat;
pub mod reconcile;
mod rollback;
pub mod tap;
pub mod teardown;

/// The ledger in memory and the file it is saved to.
#[derive(Debug)]
pub struct State {
    /// The ownership ledger.
    pub ledger: Ledger,
    /// Where it is saved; `None` keeps it in memory only (tests, benchmarks of the floor).
    store: Option<LedgerStore>,
    /// The value `net.ipv4.ip_forward` had before this helper turned it on (see [`forwarding`]),
    /// saved beside the ledger.
    forwarding: Option<String>,
    /// When this machine booted ([`crate::ledger_store::boot_epoch`]), to date that record.
    boot: i64,
}

impl State {
    /// The one way the ledger changes: `change` is applied, the result saved, and if it cannot be
    /// saved the ledger is put back exactly as it was and the operation fails with
    /// [`HelperError::Internal`]. A change that changes nothing saves nothing.
    pub(crate) fn commit(&mut self, change: impl FnOnce(&mut Ledger)) -> Result<(), HelperError> {
        let before = self.ledger.clone();
        change(&mut self.ledger);
        if self.ledger == before {
            return Ok(());
        }
        let Some(store) = &mut self.store else { return Ok(()) };
        store.save(&self.ledger).map_err(|e| {
            self.ledger = before;
            tracing::error!("{e}: {:?}", std::error::Error::source(&e));
            HelperError::internal(format!("the ledger could not be saved ({e})"))
        })
    }

    /// Records (saved first) that the helper holds `ip_forward` on and the value it had before,
    /// or, with `None`, that it does not.
    pub(crate) fn set_forwarding(&mut self, earlier: Option<String>) -> Result<(), HelperError> {
        if let Some(store) = &self.store {
            store.save_forwarding(earlier.as_deref(), self.boot).map_err(|e| {
                tracing::error!("{e}: {:?}", std::error::Error::source(&e));
                HelperError::internal(format!("the forwarding record could not be saved ({e})"))
            })?;
        }
        self.forwarding = earlier;
        Ok(())
    }
}

/// The caller of one request: uid and the install it said hello for.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The peer's uid.
    pub uid: u32,
    /// The install the connection said hello for.
    pub install: &'a InstallId,
}

/// What an operation did: its answer, and the kernel names it derived (for the audit record,
/// also when it failed).
pub(crate) struct Done<T> {
    /// The names, e.g. the TAP or the loop device.
    pub(crate) names: Vec<String>,
    /// The answer.
    pub(crate) result: Result<T, HelperError>,
}

impl<T> Done<T> {
    pub(crate) fn new(names: Vec<String>, result: Result<T, HelperError>) -> Self {
        Done { names, result }
    }

    fn map(self, f: impl FnOnce(T) -> Response) -> Done<Response> {
        Done { names: self.names, result: self.result.map(f) }
    }
}

/// The helper: policy, kernel, ledger and audit log.
pub struct Helper<K: Kernel> {
    policy: Policy,
    kernel: Arc<K>,
    /// Guards the ledger and its file. Every mutating operation holds it from its authorization
    /// to its last ledger change, so two operations never interleave their kernel changes.
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

impl<K: Kernel> Helper<K> {
    /// A helper over `kernel` with this policy and ledger. `store` is where the ledger is saved
    /// (`None`: memory only).
    pub fn new(
        policy: Policy,
        kernel: Arc<K>,
        ledger: Ledger,
        store: Option<LedgerStore>,
        audit: AuditLog,
    ) -> Self {
        // What the helper can do here now: dm-snapshots only where the kernel has device-mapper
        // and the helper kept what it needs for it; jails where the policy has `[jailer]` and
        // its launcher runs; direct mode unless the policy forces the jailer; the firewall
        // backend chosen at start.
        let capabilities = Capabilities {
            device_mapper: kernel.dm().probe(),
            jailer: policy.jailer.is_some() && kernel.jails().available(),
            loop_configure: kernel.loops().has_configure(),
            ipv6: policy.network.ipv6,
            direct: !policy.force_jailer(),
            firewall: kernel.firewall().backend(),
        };
        let boot = crate::ledger_store::boot_epoch();
        let forwarding = store.as_ref().and_then(|s| {
            s.load_forwarding(boot)
                .map_err(|e| tracing::error!("{e}; net.ipv4.ip_forward will not be put back"))
                .ok()
                .flatten()
        });
        Helper {
            policy,
            kernel,
            state: Mutex::new(State { ledger, store, forwarding, boot }),
            audit,
            capabilities,
            inspect_timeout: loopdev::INSPECT_TIMEOUT,
        }
    }

    /// The policy in force (the server sorts arriving peers into its connection pools by it).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Who a TAP or dm node made for `uid` is handed to: `uid`, or root when the policy forces
    /// the jailer (the jail's uid takes the TAP at launch; a drive goes into the jail as a node of
    /// its own), so that a user never holds a device to run a VMM outside a jail.
    pub(crate) fn handed_owner(&self, uid: u32) -> u32 {
        if self.policy.force_jailer() { 0 } else { uid }
    }

    /// What this helper can do here, as `Hello` answers it. Jails are asked for each time: a
    /// launcher that died takes them away.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities { jailer: self.jails_available(), ..self.capabilities.clone() }
    }

    /// Whether a jail can be launched now: the policy has `[jailer]` and its launcher runs.
    fn jails_available(&self) -> bool {
        self.capabilities.jailer && self.kernel.jails().available()
    }

    /// Waits for the operation in progress, if any, and keeps every later one from starting: for
    /// shutdown, so no operation is cut in half. The state lock is never released again.
    pub async fn quiesce(&self) {
        std::mem::forget(self.state.lock().await);
    }

    /// A copy of the ledger as it is now.
    pub async fn snapshot(&self) -> Ledger {
        self.state.lock().await.ledger.clone()
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

    /// The audit log (the server records refusals made before a request reaches [`Helper::respond`]).
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    fn check_hello(&self, peer: &Peer, request: &Request, version: u32) -> Result<HelloReply, HelperError> {
        if let Decision::Refuse(e) =
            authorize(&self.policy, peer, request, &Ledger::default(), &Observed::default())
        {
            return Err(e);
        }
        if version != PROTOCOL_VERSION {
            return Err(HelperError::VersionMismatch { client: version, helper: PROTOCOL_VERSION });
        }
        Ok(HelloReply {
            version: PROTOCOL_VERSION,
            helper_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: self.capabilities(),
        })
    }

    /// [`Helper::respond`], writing the audit record at once: for callers without a connection
    /// whose routine successes the server would summarise (benchmarks of the floor, tests).
    pub async fn handle(&self, peer: &Peer, request: Request, fds: Vec<OwnedFd>) -> Response {
        let (response, record) = self.respond(peer, request, fds).await;
        self.audit.write(&record);
        response
    }

    /// Handles one request of a peer (after its `Hello`, which [`Helper::hello`] answers), with
    /// the descriptors that came with it; hands its audit record back (the server writes it, or
    /// summarises a connection's routine successes, see [`crate::audit::Summaries`]).
    pub async fn respond(&self, peer: &Peer, request: Request, fds: Vec<OwnedFd>) -> (Response, Record) {
        let Done { names, result } = self.dispatch(peer, &request, fds).await;
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

    async fn dispatch(&self, peer: &Peer, request: &Request, fds: Vec<OwnedFd>) -> Done<Response> {
        let refused = |e| Done::new(vec![], Err(e));
        // Step 1: what came with the request. The backing file is inspected before the lock:
        // nothing its filesystem does can hold up anyone else. Without device-mapper no loop is
        // attached, so nothing is inspected.
        let device_mapper = self.capabilities.device_mapper;
        let mut observed = Observed {
            fds: fds.len(),
            backing: None,
            device_mapper,
            jail_files: None,
            jails: self.jails_available(),
        };
        let mut backing_fd = None;
        let mut jail_fds = Vec::new();
        if let (Request::LoopAttach { .. }, [_], true) = (request, fds.as_slice(), device_mapper) {
            let (fd, inspected) = self.inspect_backing(fds.into_iter().next().expect("one fd")).await;
            (backing_fd, observed.backing) = (fd, Some(inspected));
        } else if matches!(request, Request::JailLaunch { .. }) && fds.len() == request.expected_fds() {
            // Each descriptor the way a loop backing file is inspected: before the lock, bounded.
            let mut inspected = Vec::new();
            for fd in fds {
                let (fd, file) = self.inspect_backing(fd).await;
                jail_fds.extend(fd);
                inspected.push(file);
            }
            observed.jail_files = Some(inspected);
        } else {
            drop(fds);
        }
        if let Request::Ping = request {
            return match authorize(&self.policy, peer, request, &Ledger::default(), &observed) {
                Decision::Allow(_) => Done::new(vec![], Ok(Response::Pong)),
                Decision::Refuse(e) => refused(e),
            };
        }
        // Steps 2 and 3: the lock, then the decision.
        let mut st = self.state.lock().await;
        let grant = match authorize(&self.policy, peer, request, &st.ledger, &observed) {
            Decision::Allow(grant) => grant,
            Decision::Refuse(e) => return refused(e),
        };
        let Some(install) = peer.install.as_ref() else {
            return refused(HelperError::internal("a request was granted before the handshake"));
        };
        let c = Caller { uid: peer.uid, install };
        // Step 4: the operation, on what was granted.
        match (request, grant) {
            (Request::Hello { .. }, _) => {
                refused(HelperError::invalid("hello was already answered on this connection"))
            }
            (Request::Ping, _) => Done::new(vec![], Ok(Response::Pong)),
            (Request::ListOwned, Grant::Proceed) => {
                Done::new(vec![], Ok(Response::Owned(self.list_owned(&st, c))))
            }
            (Request::TapCreate { .. }, Grant::TapExisting(entry)) => {
                self.tap_existing(&mut st, c, entry).await.map(Response::Tap)
            }
            (Request::TapCreate { vm }, Grant::TapNew { lease, new_lease, slot }) => {
                self.tap_new(&mut st, c, vm, lease, new_lease, slot).await.map(Response::Tap)
            }
            (Request::NatUp { vm }, Grant::Nat { tap, host_ip, guest_ip }) => {
                self.nat_up(&mut st, c, vm, tap, host_ip, guest_ip).await.map(Response::Nat)
            }
            (Request::LoopAttach { vm, role, .. }, Grant::Loop { read_only, backing, size }) => {
                match backing_fd {
                    Some(fd) => self
                        .loop_attach(&mut st, c, vm, *role, read_only, backing, size, fd)
                        .map(Response::Loop),
                    None => refused(HelperError::internal("loop-attach was granted without its descriptor")),
                }
            }
            (Request::DmCreate { vm }, Grant::Dm(grant)) => {
                self.dm_create(&mut st, c, vm, *grant).await.map(Response::Dm)
            }
            (Request::TeardownVms { vms }, Grant::Proceed) => {
                self.teardown(&mut st, c, vms).await.map(Response::Teardown)
            }
            (Request::JailLaunch { vm, shape, files }, Grant::Jail(grant)) => {
                if jail_fds.len() != request.expected_fds() {
                    return refused(HelperError::internal("jail-launch was granted without its descriptors"));
                }
                self.jail_launch(&mut st, c, vm, *shape, *files, *grant, jail_fds).await.map(Response::Jail)
            }
            (Request::JailKill { vm }, Grant::JailKill(entry)) => {
                self.jail_kill(&mut st, c, vm, entry).await.map(Response::Teardown)
            }
            (request, grant) => refused(HelperError::internal(format!(
                "the policy granted {grant:?} for {}",
                request.op_name()
            ))),
        }
    }
}

#[cfg(test)]
mod agreement;
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
        assert!(reply.capabilities.device_mapper, "the fake kernel has device-mapper");
        assert!(!reply.capabilities.jailer, "no [jailer] in the policy");
        assert!(reply.capabilities.direct);
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
