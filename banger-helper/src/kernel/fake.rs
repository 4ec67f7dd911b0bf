//! A recording fake of the kernel for unit tests of the operations (compiled only with them): it
//! keeps links, firewall rules, loop devices, dm targets with their nodes and sysctls in memory,
//! records every call in order,
//! fails any call on request, and can stop an operation forever right after a call (as a helper
//! killed there would), so rollback, idempotence, crash recovery and "keep going past a failure"
//! can be tested without root.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use banger_policy::Network;
use banger_protocol::FirewallBackend;
use nix::errno::Errno;

use super::{
    BackingFile, DevNum, Dm, DmStatus, Firewall, JailOrder, JailState, Jails, KResult, Kernel, KernelError,
    LinkOwner, Links, LoopStatus, Loops, NodeStatus, Sysctl, snapshot_params,
};
use crate::firewall::VmRules;
use crate::firewall::iptables::{Change, FirewallBatch, FirewallView, plan_vm_rules, vm_rules};
use crate::names::VmKey;
use crate::sysctl_key::SysctlKey;

/// A TAP or other link in the fake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeLink {
    /// `Some(uid)` for a TAP the fake created.
    pub tap_owner: Option<u32>,
    /// Addresses.
    pub addresses: Vec<(Ipv4Addr, u8)>,
    /// Permanent neighbour entries.
    pub neighbours: Vec<(Ipv4Addr, [u8; 6])>,
    /// Routes to a guest alone: (guest, source).
    pub guest_routes: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Up or not.
    pub up: bool,
}

/// Owner and mode of a device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeState {
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
}

/// A loop device in the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLoop {
    /// What it is attached to.
    pub status: Option<LoopStatus>,
    /// Its node.
    pub node: NodeState,
    /// Someone holds the device open (then it cannot be removed).
    pub held_open: bool,
}

/// The major number of loop devices, as the fake numbers them.
pub const LOOP_MAJOR: u32 = 7;
/// The major number the fake gives dm targets.
pub const DM_MAJOR: u32 = 254;

/// A dm target in the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDm {
    /// Its uuid.
    pub uuid: String,
    /// Its device number.
    pub dev: DevNum,
    /// Its length in sectors.
    pub sectors: u64,
    /// Its table's parameters.
    pub params: String,
    /// Someone holds it open (then it cannot be removed).
    pub held_open: bool,
}

/// A node in the fake's node directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeNode {
    /// A block device node.
    pub block: bool,
    /// The device it names.
    pub rdev: DevNum,
    /// Owner and mode.
    pub node: NodeState,
}

/// A jail in the fake: the order it was made with and its VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeJail {
    /// What the helper ordered.
    pub order: JailOrder,
    /// How many descriptors came with the order.
    pub fds: usize,
    /// The VMM's PID (none for a jail directory left without a process).
    pub pid: Option<i32>,
    /// Its VMM still runs.
    pub alive: bool,
}

/// The host directory the fake's jails are under.
pub const FAKE_JAIL_BASE: &str = "/fake/jails/firecracker";

/// A failure to inject: calls named `op` whose object contains `object` fail with `errno`,
/// `times` times.
#[derive(Debug, Clone)]
struct Injected {
    op: &'static str,
    object: String,
    errno: Errno,
    times: usize,
}

/// Everything the fake kernel holds.
#[derive(Debug, Default)]
pub struct FakeWorld {
    /// Links by name.
    pub links: BTreeMap<String, FakeLink>,
    /// The interface of the default route.
    pub default_route: Option<String>,
    /// The helper's firewall chains.
    pub firewall: FirewallView,
    /// How many batches were applied.
    pub firewall_batches: usize,
    /// Loop devices by number.
    pub loops: BTreeMap<u32, FakeLoop>,
    /// Backing files by descriptor number.
    pub backing: HashMap<RawFd, BackingFile>,
    /// How long inspecting a backing file takes (a filesystem that does not answer).
    pub inspect_delay: Option<std::time::Duration>,
    /// The kernel has device-mapper with the snapshot target.
    pub dm_available: bool,
    /// dm targets by name.
    pub dms: BTreeMap<String, FakeDm>,
    /// The node directory's entries, by name.
    pub nodes: BTreeMap<String, FakeNode>,
    /// The minor number of the next dm target.
    pub next_dm_minor: u32,
    /// Sysctl values by key.
    pub sysctls: BTreeMap<String, String>,
    /// Jails can be made (the policy has `[jailer]` and its launcher runs).
    pub jails_available: bool,
    /// Jails by id.
    pub jails: BTreeMap<String, FakeJail>,
    /// The PID the next jailed VMM gets.
    pub next_pid: i32,
    /// Every call, in order: `op object`.
    pub calls: Vec<String>,
    injected: Vec<Injected>,
    /// The next call of this op makes its change and then never returns.
    hang_after: Option<&'static str>,
}

/// The fake kernel. Implements every kernel trait on itself.
#[derive(Debug, Default)]
pub struct FakeKernel {
    world: Mutex<FakeWorld>,
}

impl FakeKernel {
    /// A fake with a default route via `eth0`, `ip_forward` at 0, IPv6 sysctls present for any
    /// link, no loop device yet, and device-mapper with the snapshot target.
    pub fn new() -> Self {
        let mut w =
            FakeWorld { default_route: Some("eth0".into()), dm_available: true, ..FakeWorld::default() };
        w.links.insert("eth0".into(), FakeLink { up: true, ..FakeLink::default() });
        w.sysctls.insert("net.ipv4.ip_forward".into(), "0".into());
        FakeKernel { world: Mutex::new(w) }
    }

    /// [`FakeKernel::new`] on a kernel without device-mapper.
    pub fn without_dm() -> Self {
        let k = Self::new();
        k.world().dm_available = false;
        k
    }

    /// The world, for setting up and checking a test.
    pub fn world(&self) -> MutexGuard<'_, FakeWorld> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next `times` calls of `op` on an object containing `object` fail with `errno`.
    pub fn fail(&self, op: &'static str, object: &str, errno: Errno, times: usize) {
        self.world().injected.push(Injected { op, object: object.to_owned(), errno, times });
    }

    /// Makes the next call of `op` (`create_tap`, `loop_attach` or `dm_create`) do its work and
    /// then never return, like a helper killed right after it.
    pub fn hang_after(&self, op: &'static str) {
        self.world().hang_after = Some(op);
    }

    /// Whether the call of `op` that just ran must now hang (once).
    fn hangs(&self, op: &'static str) -> bool {
        let mut w = self.world();
        let hang = w.hang_after == Some(op);
        if hang {
            w.hang_after = None;
        }
        hang
    }

    /// Registers what `inspect` reports for descriptor `fd`.
    pub fn register_backing(&self, fd: BorrowedFd<'_>, file: BackingFile) {
        self.world().backing.insert(fd.as_raw_fd(), file);
    }

    /// The recorded calls.
    pub fn calls(&self) -> Vec<String> {
        self.world().calls.clone()
    }

    /// Records a call and returns the injected failure for it, if any.
    fn call(&self, op: &'static str, object: &str) -> KResult<MutexGuard<'_, FakeWorld>> {
        let mut w = self.world();
        w.calls.push(format!("{op} {object}"));
        if let Some(inj) =
            w.injected.iter_mut().find(|i| i.op == op && object.contains(&i.object) && i.times > 0)
        {
            inj.times -= 1;
            return Err(KernelError::errno(op, object, inj.errno));
        }
        Ok(w)
    }
}

impl Links for FakeKernel {
    async fn create_tap(&self, name: &str, owner: u32) -> KResult<()> {
        {
            let mut w = self.call("create_tap", name)?;
            if w.links.contains_key(name) {
                return Err(KernelError::errno("create_tap", name, Errno::EEXIST));
            }
            w.links.insert(name.to_owned(), FakeLink { tap_owner: Some(owner), ..FakeLink::default() });
        }
        if self.hangs("create_tap") {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn add_address(&self, name: &str, addr: Ipv4Addr, prefix: u8) -> KResult<()> {
        let mut w = self.call("add_address", name)?;
        let link =
            w.links.get_mut(name).ok_or_else(|| KernelError::errno("add_address", name, Errno::ENODEV))?;
        link.addresses.push((addr, prefix));
        Ok(())
    }

    async fn add_neighbour(&self, name: &str, addr: Ipv4Addr, mac: [u8; 6]) -> KResult<()> {
        let mut w = self.call("add_neighbour", name)?;
        let link =
            w.links.get_mut(name).ok_or_else(|| KernelError::errno("add_neighbour", name, Errno::ENODEV))?;
        link.neighbours.push((addr, mac));
        Ok(())
    }

    async fn add_guest_route(&self, name: &str, guest: Ipv4Addr, host: Ipv4Addr) -> KResult<()> {
        let mut w = self.call("add_guest_route", name)?;
        let link = w
            .links
            .get_mut(name)
            .ok_or_else(|| KernelError::errno("add_guest_route", name, Errno::ENODEV))?;
        if !link.up {
            return Err(KernelError::errno("add_guest_route", name, Errno::ENETDOWN));
        }
        link.guest_routes.push((guest, host));
        Ok(())
    }

    async fn set_up(&self, name: &str) -> KResult<()> {
        let mut w = self.call("set_up", name)?;
        let link = w.links.get_mut(name).ok_or_else(|| KernelError::errno("set_up", name, Errno::ENODEV))?;
        link.up = true;
        Ok(())
    }

    async fn set_owner(&self, name: &str, owner: u32) -> KResult<()> {
        let mut w = self.call("set_owner", name)?;
        if let Some(link) = w.links.get_mut(name) {
            link.tap_owner = Some(owner);
        }
        Ok(())
    }

    async fn owner(&self, name: &str) -> KResult<LinkOwner> {
        let w = self.call("link_owner", name)?;
        Ok(match w.links.get(name) {
            None => LinkOwner::Absent,
            Some(FakeLink { tap_owner: Some(uid), .. }) => LinkOwner::Uid(*uid),
            Some(_) => LinkOwner::Unowned,
        })
    }

    async fn list(&self) -> KResult<Vec<String>> {
        let w = self.call("list", "links")?;
        Ok(w.links.keys().cloned().collect())
    }

    async fn delete(&self, names: &[String]) -> Vec<KResult<()>> {
        self.world().calls.push(format!("delete_links {}", names.join(",")));
        names
            .iter()
            .map(|n| {
                let mut w = self.call("delete_link", n)?;
                w.links.remove(n);
                let disable = format!("net.ipv6.conf.{n}.disable_ipv6");
                w.sysctls.remove(&disable);
                Ok(())
            })
            .collect()
    }

    async fn default_route_interface(&self) -> KResult<Option<String>> {
        let w = self.call("default_route", "")?;
        Ok(w.default_route.clone())
    }
}

/// The fake firewall keeps the iptables backend's rules ([`crate::firewall`]) in memory.
impl Firewall for FakeKernel {
    fn backend(&self) -> FirewallBackend {
        FirewallBackend::Iptables
    }

    async fn vms(&self) -> KResult<BTreeSet<VmKey>> {
        let w = self.call("firewall_read", "")?;
        Ok(w.firewall.vms())
    }

    async fn update(&self, net: &Network, up: &[VmRules], down: &[VmKey]) -> KResult<bool> {
        let view = self.call("firewall_read", "")?.firewall.clone();
        let up: Vec<_> = up.iter().map(|r| (r.key.clone(), vm_rules(r, net))).collect();
        let batch = plan_vm_rules(&view, &up, down);
        if batch.is_empty() {
            return Ok(false);
        }
        let mut w = self.call("firewall_apply", &batch.render())?;
        let next = apply_to_view(&w.firewall, &batch)
            .map_err(|e| KernelError::other("iptables-restore", "banger chains", e))?;
        w.firewall = next;
        w.firewall_batches += 1;
        Ok(true)
    }
}

impl Loops for FakeKernel {
    fn inspect(&self, fd: BorrowedFd<'_>) -> KResult<BackingFile> {
        let w = self.call("loop_inspect", &fd.as_raw_fd().to_string())?;
        let delay = w.inspect_delay;
        let found = w
            .backing
            .get(&fd.as_raw_fd())
            .cloned()
            .ok_or_else(|| KernelError::errno("statx", "fd", Errno::EBADF));
        drop(w);
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        found
    }

    fn remove(&self, n: u32) -> KResult<()> {
        let mut w = self.call("loop_remove", &format!("/dev/loop{n}"))?;
        match w.loops.get(&n) {
            None => Err(KernelError::errno("LOOP_CTL_REMOVE", format!("/dev/loop{n}"), Errno::ENODEV)),
            Some(l) if l.status.is_some() || l.held_open => {
                Err(KernelError::errno("LOOP_CTL_REMOVE", format!("/dev/loop{n}"), Errno::EBUSY))
            }
            Some(_) => {
                w.loops.remove(&n);
                Ok(())
            }
        }
    }

    fn add(&self) -> KResult<u32> {
        let mut w = self.call("loop_add", "any")?;
        let n = (0..).find(|n| !w.loops.contains_key(n)).unwrap_or(u32::MAX);
        // A new node, as devtmpfs makes it: root:disk, 0660.
        w.loops.insert(
            n,
            FakeLoop { status: None, node: NodeState { uid: 0, gid: 6, mode: 0o660 }, held_open: false },
        );
        Ok(n)
    }

    fn make_root_only(&self, n: u32) -> KResult<()> {
        let mut w = self.call("loop_root_only", &format!("/dev/loop{n}"))?;
        let l = w
            .loops
            .get_mut(&n)
            .ok_or_else(|| KernelError::errno("chown", format!("/dev/loop{n}"), Errno::ENOENT))?;
        l.node = NodeState { uid: 0, gid: 0, mode: 0o600 };
        Ok(())
    }

    fn attach(&self, n: u32, fd: BorrowedFd<'_>, read_only: bool) -> KResult<()> {
        let mut w = self.call("loop_attach", &format!("/dev/loop{n} ro={read_only}"))?;
        let b = w
            .backing
            .get(&fd.as_raw_fd())
            .cloned()
            .ok_or_else(|| KernelError::errno("LOOP_CONFIGURE", "fd", Errno::EBADF))?;
        let l = w
            .loops
            .get_mut(&n)
            .ok_or_else(|| KernelError::errno("LOOP_CONFIGURE", format!("/dev/loop{n}"), Errno::ENXIO))?;
        if l.status.is_some() {
            return Err(KernelError::errno("LOOP_CONFIGURE", format!("/dev/loop{n}"), Errno::EBUSY));
        }
        l.status = Some(LoopStatus { backing_dev: b.id.dev, backing_ino: b.id.ino });
        drop(w);
        if self.hangs("loop_attach") {
            // A synchronous call stops for good by parking its thread until the process ends.
            loop {
                std::thread::park();
            }
        }
        Ok(())
    }

    fn status(&self, n: u32) -> KResult<Option<LoopStatus>> {
        let w = self.call("loop_status", &format!("/dev/loop{n}"))?;
        Ok(w.loops.get(&n).and_then(|l| l.status))
    }

    fn detach(&self, n: u32) -> KResult<()> {
        let mut w = self.call("loop_detach", &format!("/dev/loop{n}"))?;
        if let Some(l) = w.loops.get_mut(&n) {
            l.status = None;
        }
        Ok(())
    }

    fn device_number(&self, n: u32) -> KResult<DevNum> {
        let w = self.call("loop_device_number", &format!("/dev/loop{n}"))?;
        if !w.loops.contains_key(&n) {
            return Err(KernelError::errno("stat", format!("/dev/loop{n}"), Errno::ENOENT));
        }
        Ok(DevNum { major: LOOP_MAJOR, minor: n })
    }

    fn has_configure(&self) -> bool {
        true
    }
}

impl Dm for FakeKernel {
    fn probe(&self) -> bool {
        self.world().dm_available
    }

    fn create_snapshot(
        &self,
        name: &str,
        uuid: &str,
        sectors: u64,
        origin: DevNum,
        cow: DevNum,
    ) -> KResult<DevNum> {
        let params = snapshot_params(origin, cow);
        let mut w = self.call("dm_create", &format!("{name} {params}"))?;
        if !w.dm_available {
            return Err(KernelError::errno("DM_DEV_CREATE", name, Errno::ENODEV));
        }
        if w.dms.contains_key(name) || w.dms.values().any(|d| d.uuid == uuid) {
            return Err(KernelError::errno("DM_DEV_CREATE", name, Errno::EBUSY));
        }
        // The table names two attached loop devices, by number, or it does not load.
        let attached =
            |d: DevNum| d.major == LOOP_MAJOR && w.loops.get(&d.minor).is_some_and(|l| l.status.is_some());
        if !attached(origin) || !attached(cow) || sectors == 0 {
            return Err(KernelError::errno("DM_TABLE_LOAD", name, Errno::EINVAL));
        }
        let dev = DevNum { major: DM_MAJOR, minor: w.next_dm_minor };
        w.next_dm_minor += 1;
        w.dms.insert(
            name.to_owned(),
            FakeDm { uuid: uuid.to_owned(), dev, sectors, params, held_open: false },
        );
        drop(w);
        if self.hangs("dm_create") {
            loop {
                std::thread::park();
            }
        }
        Ok(dev)
    }

    fn remove(&self, name: &str) -> KResult<()> {
        let mut w = self.call("dm_remove", name)?;
        match w.dms.get(name) {
            None => Err(KernelError::errno("DM_DEV_REMOVE", name, Errno::ENXIO)),
            Some(d) if d.held_open => Err(KernelError::errno("DM_DEV_REMOVE", name, Errno::EBUSY)),
            Some(_) => {
                w.dms.remove(name);
                Ok(())
            }
        }
    }

    fn info(&self, name: &str) -> KResult<Option<DmStatus>> {
        let w = self.call("dm_info", name)?;
        Ok(w.dms.get(name).map(|d| DmStatus { dev: d.dev, uuid: d.uuid.clone() }))
    }

    fn list(&self) -> KResult<Vec<String>> {
        let w = self.call("dm_list", "")?;
        Ok(w.dms.keys().cloned().collect())
    }

    fn node_path(&self, name: &str) -> String {
        format!("/dev/banger/{name}")
    }

    fn make_node(&self, name: &str, dev: DevNum, owner: u32) -> KResult<()> {
        self.release_node(name)?;
        let mut w = self.call("dm_node_make", &format!("{name} {dev} uid={owner}"))?;
        let node = NodeState { uid: owner, gid: 0, mode: 0o600 };
        w.nodes.insert(name.to_owned(), FakeNode { block: true, rdev: dev, node });
        Ok(())
    }

    fn node(&self, name: &str) -> KResult<Option<NodeStatus>> {
        let w = self.call("dm_node", name)?;
        Ok(w.nodes.get(name).map(|n| NodeStatus {
            block: n.block,
            rdev: n.rdev,
            uid: n.node.uid,
            mode: n.node.mode,
        }))
    }

    fn release_node(&self, name: &str) -> KResult<()> {
        let mut w = self.call("dm_node_release", name)?;
        if let Some(n) = w.nodes.get_mut(name) {
            n.node = NodeState { uid: 0, gid: 0, mode: 0o600 };
        }
        w.nodes.remove(name);
        Ok(())
    }

    fn nodes(&self) -> KResult<Vec<String>> {
        let w = self.call("dm_nodes", "")?;
        Ok(w.nodes.keys().cloned().collect())
    }
}

impl Sysctl for FakeKernel {
    fn read(&self, key: &SysctlKey) -> KResult<String> {
        let w = self.call("sysctl_read", key.as_str())?;
        w.sysctls
            .get(key.as_str())
            .cloned()
            .ok_or_else(|| KernelError::errno("read", key.as_str(), Errno::ENOENT))
    }

    fn write(&self, key: &SysctlKey, value: &str) -> KResult<()> {
        let mut w = self.call("sysctl_write", &format!("{key}={value}"))?;
        let per_link = key.as_str().starts_with("net.ipv6.conf.")
            && key.as_str().split('.').nth(3).is_some_and(|l| w.links.contains_key(l));
        if !per_link && !w.sysctls.contains_key(key.as_str()) {
            return Err(KernelError::errno("write", key.as_str(), Errno::ENOENT));
        }
        w.sysctls.insert(key.as_str().to_owned(), value.to_owned());
        Ok(())
    }

    fn exists(&self, key: &SysctlKey) -> bool {
        let w = self.world();
        w.sysctls.contains_key(key.as_str())
            || (key.as_str().starts_with("net.ipv6.conf.")
                && key.as_str().split('.').nth(3).is_some_and(|l| w.links.contains_key(l)))
    }
}

impl Kernel for FakeKernel {
    type Links = Self;
    type Firewall = Self;
    type Loops = Self;
    type Dm = Self;
    type Sysctl = Self;
    type Jails = Self;
    fn links(&self) -> &Self {
        self
    }
    fn firewall(&self) -> &Self {
        self
    }
    fn loops(&self) -> &Self {
        self
    }
    fn dm(&self) -> &Self {
        self
    }
    fn sysctl(&self) -> &Self {
        self
    }
    fn jails(&self) -> &Self {
        self
    }
}

/// Jails as a map: a launch that fails leaves nothing; a removal that fails leaves the jail as it
/// was. Calls are recorded as `jail_launch <id>`, `jail_remove <id> uid=<uid> pid=<pid>`.
impl Jails for FakeKernel {
    fn available(&self) -> bool {
        self.world().jails_available
    }
    fn root(&self, id: &str) -> String {
        format!("{FAKE_JAIL_BASE}/{id}/root")
    }
    async fn launch(&self, order: &JailOrder, fds: Vec<std::os::fd::OwnedFd>) -> KResult<i32> {
        let pid = {
            let mut w = self.call("jail_launch", &order.id)?;
            if w.jails.contains_key(&order.id) {
                return Err(KernelError::errno("jail_launch", order.id.clone(), Errno::EEXIST));
            }
            w.next_pid += 1;
            let pid = 1000 + w.next_pid;
            let jail = FakeJail { order: order.clone(), fds: fds.len(), pid: Some(pid), alive: true };
            w.jails.insert(order.id.clone(), jail);
            pid
        };
        if self.hangs("jail_launch") {
            std::future::pending::<()>().await;
        }
        Ok(pid)
    }
    async fn remove(&self, id: &str, uid: u32, pid: Option<i32>) -> KResult<()> {
        let mut w = self.call("jail_remove", &format!("{id} uid={uid} pid={pid:?}"))?;
        w.jails.remove(id);
        Ok(())
    }
    fn list(&self) -> KResult<Vec<JailState>> {
        let w = self.call("jail_list", "")?;
        Ok(w.jails
            .iter()
            .map(|(id, j)| JailState { id: id.clone(), pid: j.pid, alive: j.alive, uid: Some(j.order.uid) })
            .collect())
    }
}

/// Applies a batch to a view the way `iptables-restore --noflush` would, for the fake kernel and
/// the tests. Fails (changing nothing) on a deletion of something absent or a creation of
/// something present, like the real tool.
pub fn apply_to_view(view: &FirewallView, batch: &FirewallBatch) -> Result<FirewallView, String> {
    let mut v = view.clone();
    let order = |c: &Change| match c {
        Change::CreateChain(..) => 0,
        Change::Delete(_) => 1,
        Change::Append(_) => 2,
        Change::InsertJump(..) => 3,
        Change::DeleteJump(..) => 4,
        Change::DeleteChain(..) => 5,
    };
    let mut changes: Vec<&Change> = batch.changes.iter().collect();
    changes.sort_by_key(|c| order(c));
    for c in changes {
        match c {
            Change::CreateChain(t, name) => {
                if !v.chains.insert((*t, name)) {
                    return Err(format!("chain {name} already exists"));
                }
            }
            Change::InsertJump(t, name) => *v.jumps.entry((*t, name)).or_default() += 1,
            Change::Delete(r) => {
                let i =
                    v.rules.iter().position(|x| x == r).ok_or_else(|| format!("no such rule: {}", r.spec))?;
                v.rules.remove(i);
            }
            Change::Append(r) => {
                if !v.chains.contains(&(r.table, r.chain)) {
                    return Err(format!("no chain {}", r.chain));
                }
                v.rules.push(r.clone());
            }
            Change::DeleteJump(t, name) => match v.jumps.get_mut(&(*t, name)) {
                Some(n) if *n > 0 => *n -= 1,
                _ => return Err(format!("no jump to {name}")),
            },
            Change::DeleteChain(t, name) => {
                if v.rules.iter().any(|r| r.table == *t && r.chain == *name) {
                    return Err(format!("chain {name} is not empty"));
                }
                if v.jumps.get(&(*t, name)).copied().unwrap_or(0) > 0 {
                    return Err(format!("chain {name} is still referenced"));
                }
                if !v.chains.remove(&(*t, name)) {
                    return Err(format!("no chain {name}"));
                }
            }
        }
    }
    v.jumps.retain(|_, n| *n > 0);
    Ok(v)
}
