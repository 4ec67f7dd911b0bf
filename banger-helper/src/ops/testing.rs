//! Shared fixtures for the operations' unit tests: a helper over the fake kernel with an
//! in-memory ledger and audit log.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use banger_policy::{
    Access, Audit, AuditTarget, GuestToHost, Network, Peer, Policy, PortRule, Proto, Quotas, SysctlRule,
    Uplink,
};
use banger_protocol::{InstallId, Request, Response, VmId};

use super::Helper;
use crate::audit::AuditLog;
use crate::kernel::fake::FakeKernel;
use crate::ledger_store::Stored;

/// Uids the test policy lets in.
pub(crate) const ALLOWED: [u32; 6] = [1, 2, 3, 1000, 1001, 1002];

pub(crate) fn test_policy() -> Policy {
    Policy {
        access: Access {
            users: ALLOWED.iter().map(|u| u.to_string()).collect(),
            groups: vec![],
            socket_group: "banger".into(),
        },
        quotas: Quotas { max_vms: 16, max_taps: 16, max_loops: 32 },
        user_quotas: BTreeMap::new(),
        network: Network {
            pool: "172.30.0.0/16".parse().unwrap(),
            lease_prefix: 24,
            vm_prefix: 30,
            uplink: Uplink::Auto,
            ipv6: false,
            guest_to_guest: false,
            guest_to_host: GuestToHost {
                allow_all: false,
                allow: vec![PortRule { proto: Proto::Udp, port: 53 }],
            },
        },
        sysctls: vec![SysctlRule { key: "net.ipv4.ip_forward".into(), values: vec!["1".into()] }],
        audit: Audit { target: AuditTarget::Stderr },
    }
}

pub(crate) fn vm(s: &str) -> VmId {
    VmId::new(s).unwrap()
}

pub(crate) struct TestHelper {
    pub(crate) helper: Helper<FakeKernel>,
    pub(crate) kernel: Arc<FakeKernel>,
    pub(crate) audit: Arc<Mutex<Vec<u8>>>,
}

impl TestHelper {
    pub(crate) fn new() -> Self {
        Self::with_policy(test_policy())
    }

    pub(crate) fn with_policy(policy: Policy) -> Self {
        Self::with_state(policy, Stored::default())
    }

    pub(crate) fn with_state(policy: Policy, stored: Stored) -> Self {
        let kernel = Arc::new(FakeKernel::new());
        let (audit, buf) = AuditLog::memory();
        TestHelper { helper: Helper::new(policy, kernel.clone(), stored, None, audit), kernel, audit: buf }
    }

    pub(crate) fn peer(&self, uid: u32, install: &str) -> Peer {
        Peer {
            uid,
            gid: uid,
            pid: 4242,
            user: None,
            groups: vec![uid],
            group_names: vec![],
            install: Some(InstallId::new(install).unwrap()),
        }
    }

    pub(crate) async fn req(&self, peer: &Peer, request: Request) -> Response {
        self.helper.handle(peer, request, vec![]).await
    }

    pub(crate) async fn req_fds(&self, peer: &Peer, request: Request, fds: Vec<OwnedFd>) -> Response {
        self.helper.handle(peer, request, fds).await
    }

    pub(crate) fn audit_lines(&self) -> Vec<crate::audit::Record> {
        let buf = self.audit.lock().unwrap();
        String::from_utf8_lossy(&buf).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}
