//! An in-memory [`HelperApi`] that records every request, keeps the objects a helper would,
//! and fails on demand. Its names are its own (`faketapN`, `fakedmN` and `/dev/fakedmN`), not
//! the helper's. Whether it offers dm-snapshot roots is configured
//! ([`FakeHelper::set_device_mapper`]; off by default, like a helper on a host without
//! device-mapper). Jailer launches are offered when configured
//! ([`FakeHelper::set_jailer`]): a launch records its descriptors (count, order and what each
//! is), answers a [`JailInfo`] under a jail root of the fake's own, and, given a process table
//! ([`FakeHelper::with_processes`]), makes its "VMM" there: a process running as the jail's uid
//! that serves the jail's API socket, as the jailer's Firecracker would.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use banger_protocol::{LeaseInfo, TeardownFailure, jail_paths};

use crate::daemon::liveness::PidState;
use crate::daemon::liveness::fake::{FakeProcess, FakeProcesses};

use super::*;

/// The socket path fake errors name.
pub const FAKE_SOCKET: &str = "/run/banger/fake-helper.sock";

#[derive(Debug, Default)]
struct State {
    taps: Vec<TapInfo>,
    nat: Vec<NatInfo>,
    loops: Vec<LoopInfo>,
    dms: Vec<DmInfo>,
    jails: Vec<JailInfo>,
    launches: Vec<JailLaunch>,
    jailer: bool,
    direct: bool,
    next_jail: u32,
    /// What each loop device (by name) is attached to.
    backing: HashMap<String, Backing>,
    calls: Vec<Request>,
    unreachable: bool,
    /// The operation whose first request makes the fake unreachable from then on.
    unreachable_from: Option<&'static str>,
    device_mapper: bool,
    failures: HashMap<&'static str, HelperError>,
    loop_failures: HashMap<LoopRole, HelperError>,
    teardown_failures: HashMap<VmId, HelperError>,
    next_subnet: u32,
    next_loop: u32,
    next_dm: u32,
}

/// One `JailLaunch` the fake received, with what its descriptors were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailLaunch {
    /// The VM.
    pub vm: VmId,
    /// Its shape.
    pub shape: VmShape,
    /// Which optional files were announced.
    pub files: JailFiles,
    /// (device, inode) of each descriptor, in the order they came.
    pub fds: Vec<(u64, u64)>,
    /// Whether each descriptor was open for writing, in the same order.
    pub writable: Vec<bool>,
}

/// The first uid the fake gives a jail (like a policy's range).
pub const FAKE_JAIL_UID: u32 = 900_000;

/// The first PID of a fake jailed VMM.
pub const FAKE_JAIL_PID: i32 = 5000;

/// The file a fake loop device was attached to, as its descriptor showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backing {
    /// The file's device.
    pub dev: u64,
    /// The file's inode.
    pub ino: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Whether the descriptor was open for writing.
    pub writable: bool,
}

/// A helper held in memory. Objects are tagged with the fake's install id (objects of
/// other installs can be added with the `insert_*` methods); `list_owned` returns all of
/// them, `teardown_vms` removes only this install's, like the real helper.
#[derive(Debug)]
pub struct FakeHelper {
    install: InstallId,
    /// Where the fake's jails are (a directory of the test's).
    jail_base: PathBuf,
    /// Where jailed VMMs appear, when given.
    procs: Option<Arc<FakeProcesses>>,
    /// Guards the fake's objects, its record of requests and its configured failures.
    state: Mutex<State>,
}

/// The lease every fake hands out.
pub const FAKE_LEASE: LeaseInfo = LeaseInfo { network: Ipv4Addr::new(172, 30, 0, 0), prefix_len: 16 };

impl FakeHelper {
    /// A fake acting for `install`.
    pub fn new(install: InstallId) -> Self {
        Self {
            install,
            jail_base: std::env::temp_dir().join("banger-fake-jails"),
            procs: None,
            state: Mutex::new(State { direct: true, ..State::default() }),
        }
    }

    /// The same fake, whose jailed VMMs run in `procs` with their jails under `jail_base`.
    pub fn with_processes(mut self, procs: Arc<FakeProcesses>, jail_base: impl Into<PathBuf>) -> Self {
        self.procs = Some(procs);
        self.jail_base = jail_base.into();
        self
    }

    /// Whether the fake can launch through the jailer (its `Hello` capability; `JailLaunch` is
    /// refused without, as the helper refuses it without a `[jailer]` policy).
    pub fn set_jailer(&self, on: bool) {
        self.state().jailer = on;
    }

    /// Whether the fake's policy allows direct mode (`false`: it forces the jailer).
    pub fn set_direct(&self, on: bool) {
        self.state().direct = on;
    }

    /// Every `JailLaunch` so far, with its descriptors.
    pub fn jail_launches(&self) -> Vec<JailLaunch> {
        self.state().launches.clone()
    }

    /// The jail of `vm` (this install's) that the fake holds.
    pub fn jail_of(&self, vm: &VmId) -> Option<JailInfo> {
        self.state().jails.iter().find(|j| j.install == self.install && &j.vm == vm).cloned()
    }

    /// Removes a jail's VMM (killed or exited) and the jail.
    fn remove_jail(&self, s: &mut State, vm: &VmId) {
        let gone: Vec<JailInfo> =
            s.jails.iter().filter(|j| j.install == self.install && &j.vm == vm).cloned().collect();
        s.jails.retain(|j| !(j.install == self.install && &j.vm == vm));
        for j in gone {
            if let (Some(procs), Some(pid)) = (&self.procs, j.pid) {
                procs.remove(pid);
            }
            let _ = std::fs::remove_dir_all(PathBuf::from(&j.root).parent().unwrap_or(Path::new(&j.root)));
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every request that reached the fake, in order (`LoopAttach` without its fd).
    pub fn calls(&self) -> Vec<Request> {
        self.state().calls.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// Makes every request fail with [`HelperClientError::Unreachable`] (not recorded).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.state().unreachable = unreachable;
    }

    /// Makes the fake unreachable from the first request of `op` on, that one included (a
    /// helper that went away in the middle of a start).
    pub fn unreachable_from(&self, op: &'static str) {
        self.state().unreachable_from = Some(op);
    }

    /// Whether the fake offers dm-snapshot roots (its `Hello` capability; `DmCreate` is refused
    /// as the helper refuses it without).
    pub fn set_device_mapper(&self, on: bool) {
        self.state().device_mapper = on;
    }

    /// What loop device `device` is attached to, if the fake made it.
    pub fn backing(&self, device: &str) -> Option<Backing> {
        self.state().backing.get(device).copied()
    }

    /// Makes every request of operation `op` (a [`Request::op_name`]) fail with `error`.
    pub fn fail(&self, op: &'static str, error: HelperError) {
        self.state().failures.insert(op, error);
    }

    /// Makes every `LoopAttach` of `role` fail with `error`.
    pub fn fail_loop_attach(&self, role: LoopRole, error: HelperError) {
        self.state().loop_failures.insert(role, error);
    }

    /// Undoes every [`FakeHelper::fail`], [`FakeHelper::fail_loop_attach`] and
    /// [`FakeHelper::fail_teardown_of`].
    pub fn clear_failures(&self) {
        let mut s = self.state();
        s.failures.clear();
        s.loop_failures.clear();
        s.teardown_failures.clear();
    }

    /// Makes teardowns report `error` for `vm` and leave its objects in place.
    pub fn fail_teardown_of(&self, vm: &VmId, error: HelperError) {
        self.state().teardown_failures.insert(vm.clone(), error);
    }

    /// Adds a TAP (of any install), as if made earlier.
    pub fn insert_tap(&self, tap: TapInfo) {
        self.state().taps.push(tap);
    }

    /// Adds NAT (of any install), as if made earlier.
    pub fn insert_nat(&self, nat: NatInfo) {
        self.state().nat.push(nat);
    }

    /// Adds a loop device (of any install), as if made earlier.
    pub fn insert_loop(&self, l: LoopInfo) {
        self.state().loops.push(l);
    }

    /// Everything the fake holds now.
    pub fn owned(&self) -> OwnedObjects {
        let s = self.state();
        OwnedObjects {
            lease: Some(FAKE_LEASE),
            taps: s.taps.clone(),
            nat: s.nat.clone(),
            loops: s.loops.clone(),
            dms: s.dms.clone(),
            jails: s.jails.clone(),
        }
    }

    /// Adds a dm-snapshot (of any install), as if made earlier.
    pub fn insert_dm(&self, dm: DmInfo) {
        self.state().dms.push(dm);
    }

    /// A TAP the fake would make for `vm` of `install` as the `index`-th VM: named `faketapN`
    /// (not the way the helper derives names), in the `index`-th /30 of the fake lease.
    pub fn tap_for(install: &InstallId, vm: &VmId, index: u32) -> TapInfo {
        let base = u32::from(FAKE_LEASE.network) + index * 4;
        let guest = Ipv4Addr::from(base + 2);
        let [_, _, g3, g4] = guest.octets();
        TapInfo {
            install: install.clone(),
            vm: vm.clone(),
            name: format!("faketap{index}"),
            host_ip: Ipv4Addr::from(base + 1),
            guest_ip: guest,
            prefix_len: 30,
            guest_mac: format!("06:00:ac:1e:{g3:02x}:{g4:02x}"),
        }
    }

    /// Records `req` and applies the configured failure, if any.
    fn enter(&self, req: Request) -> Result<MutexGuard<'_, State>, HelperClientError> {
        let mut s = self.state();
        if s.unreachable_from == Some(req.op_name()) {
            s.unreachable = true;
        }
        if s.unreachable {
            return Err(HelperClientError::Unreachable {
                socket: FAKE_SOCKET.into(),
                source: io::Error::from(io::ErrorKind::ConnectionRefused),
            });
        }
        let op = req.op_name();
        s.calls.push(req);
        if let Some(e) = s.failures.get(op) {
            return Err(HelperClientError::Helper(e.clone()));
        }
        Ok(s)
    }

    fn mine(&self, install: &InstallId, vm: &VmId, other_vm: &VmId) -> bool {
        install == &self.install && vm == other_vm
    }
}

impl HelperApi for FakeHelper {
    fn ping(&self) -> BoxFuture<'_, Result<(), HelperClientError>> {
        let r = self.enter(Request::Ping).map(drop);
        async move { r }.boxed()
    }

    fn capabilities(&self) -> BoxFuture<'_, Result<Capabilities, HelperClientError>> {
        // The socket client pings to learn them; so does the fake, for the record of calls.
        let r = self.enter(Request::Ping).map(|s| Capabilities {
            device_mapper: s.device_mapper,
            jailer: s.jailer,
            direct: s.direct,
            ..Capabilities::default()
        });
        async move { r }.boxed()
    }

    fn tap_create(&self, vm: &VmId) -> BoxFuture<'_, Result<TapInfo, HelperClientError>> {
        let r = self.enter(Request::TapCreate { vm: vm.clone() }).map(|mut s| {
            if let Some(t) = s.taps.iter().find(|t| self.mine(&t.install, &t.vm, vm)) {
                return t.clone();
            }
            let tap = Self::tap_for(&self.install, vm, s.next_subnet);
            s.next_subnet += 1;
            s.taps.push(tap.clone());
            tap
        });
        async move { r }.boxed()
    }

    fn nat_up(&self, vm: &VmId) -> BoxFuture<'_, Result<NatInfo, HelperClientError>> {
        let r = self.enter(Request::NatUp { vm: vm.clone() }).and_then(|mut s| {
            if let Some(n) = s.nat.iter().find(|n| self.mine(&n.install, &n.vm, vm)) {
                return Ok(n.clone());
            }
            let Some(tap) = s.taps.iter().find(|t| self.mine(&t.install, &t.vm, vm)) else {
                return Err(HelperClientError::Helper(HelperError::NotFound {
                    what: format!("tap of vm {vm}: create it before its nat"),
                }));
            };
            let nat = NatInfo {
                install: self.install.clone(),
                vm: vm.clone(),
                guest_ip: tap.guest_ip,
                uplink: "eth0".into(),
            };
            s.nat.push(nat.clone());
            Ok(nat)
        });
        async move { r }.boxed()
    }

    fn loop_attach(
        &self,
        vm: &VmId,
        role: LoopRole,
        read_only: bool,
        file: OwnedFd,
    ) -> BoxFuture<'_, Result<LoopInfo, HelperClientError>> {
        let r = self.enter(Request::LoopAttach { vm: vm.clone(), role, read_only }).and_then(|mut s| {
            if let Some(e) = s.loop_failures.get(&role) {
                return Err(HelperClientError::Helper(e.clone()));
            }
            // Like the helper: a regular file, read-write only when asked and the fd allows it.
            let st = nix::sys::stat::fstat(&file)
                .map_err(|e| HelperClientError::Helper(HelperError::kernel("fstat", e)))?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(HelperClientError::Helper(HelperError::invalid(
                    "the backing file must be a regular file",
                )));
            }
            let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
                .map_err(|e| HelperClientError::Helper(HelperError::kernel("fcntl", e)))?;
            let writable = flags & libc::O_ACCMODE == libc::O_RDWR;
            let read_only = read_only || !writable;
            if let Some(l) = s.loops.iter().find(|l| self.mine(&l.install, &l.vm, vm) && l.role == role) {
                return Ok(l.clone());
            }
            let device = format!("/dev/loop{}", s.next_loop);
            s.next_loop += 1;
            let backing = Backing { dev: st.st_dev, ino: st.st_ino, size: st.st_size as u64, writable };
            s.backing.insert(device.clone(), backing);
            let info = LoopInfo { install: self.install.clone(), vm: vm.clone(), role, device, read_only };
            s.loops.push(info.clone());
            Ok(info)
        });
        async move { r }.boxed()
    }

    fn dm_create(&self, vm: &VmId) -> BoxFuture<'_, Result<DmInfo, HelperClientError>> {
        let r = self.enter(Request::DmCreate { vm: vm.clone() }).and_then(|mut s| {
            if !s.device_mapper {
                return Err(HelperClientError::Helper(HelperError::Conflict {
                    what: "this fake helper offers no dm-snapshot roots".into(),
                }));
            }
            if let Some(d) = s.dms.iter().find(|d| self.mine(&d.install, &d.vm, vm)) {
                return Ok(d.clone());
            }
            // Like the helper: over this VM's base and copy-on-write loops, sized as the base.
            let find = |role| s.loops.iter().find(|l| self.mine(&l.install, &l.vm, vm) && l.role == role);
            let (Some(base), Some(_)) = (find(LoopRole::Base), find(LoopRole::Cow)) else {
                return Err(HelperClientError::Helper(HelperError::NotFound {
                    what: format!("base and cow loops of vm {vm}: attach them before its dm-snapshot"),
                }));
            };
            let sectors = s.backing.get(&base.device).map_or(0, |b| b.size / 512);
            let n = s.next_dm;
            s.next_dm += 1;
            let dm = DmInfo {
                install: self.install.clone(),
                vm: vm.clone(),
                name: format!("fakedm{n}"),
                device: format!("/dev/fakedm{n}"),
                sectors,
            };
            s.dms.push(dm.clone());
            Ok(dm)
        });
        async move { r }.boxed()
    }

    fn list_owned(&self) -> BoxFuture<'_, Result<OwnedObjects, HelperClientError>> {
        let r = self.enter(Request::ListOwned).map(drop).map(|()| self.owned());
        async move { r }.boxed()
    }

    fn teardown_vms(&self, vms: &[VmId]) -> BoxFuture<'_, Result<TeardownReport, HelperClientError>> {
        let r = self.enter(Request::TeardownVms { vms: vms.to_vec() }).map(|mut s| {
            let mut report = TeardownReport::default();
            for vm in vms {
                if let Some(e) = s.teardown_failures.get(vm).cloned() {
                    report.failures.push(TeardownFailure {
                        vm: vm.clone(),
                        object: format!("tap of vm {vm}"),
                        error: e,
                    });
                    continue;
                }
                // Like the helper: a VM's jail goes with the rest of its objects.
                self.remove_jail(&mut s, vm);
                s.taps.retain(|t| !self.mine(&t.install, &t.vm, vm));
                s.nat.retain(|n| !self.mine(&n.install, &n.vm, vm));
                s.dms.retain(|d| !self.mine(&d.install, &d.vm, vm));
                let gone: Vec<String> = s
                    .loops
                    .iter()
                    .filter(|l| self.mine(&l.install, &l.vm, vm))
                    .map(|l| l.device.clone())
                    .collect();
                for device in gone {
                    s.backing.remove(&device);
                }
                s.loops.retain(|l| !self.mine(&l.install, &l.vm, vm));
                report.torn_down.push(vm.clone());
            }
            report
        });
        async move { r }.boxed()
    }

    fn jail_launch(
        &self,
        vm: &VmId,
        shape: VmShape,
        files: JailFiles,
        fds: Vec<OwnedFd>,
    ) -> BoxFuture<'_, Result<JailInfo, HelperClientError>> {
        let r = self.enter(Request::JailLaunch { vm: vm.clone(), shape, files }).and_then(|mut s| {
            // Like the frame layer: exactly the announced descriptors.
            if fds.len() != files.count() {
                return Err(HelperClientError::Helper(HelperError::invalid(format!(
                    "jail-launch announced {} descriptors and carried {}",
                    files.count(),
                    fds.len()
                ))));
            }
            let mut ids = Vec::new();
            let mut writable = Vec::new();
            for fd in &fds {
                let st = nix::sys::stat::fstat(fd)
                    .map_err(|e| HelperClientError::Helper(HelperError::kernel("fstat", e)))?;
                let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
                    .map_err(|e| HelperClientError::Helper(HelperError::kernel("fcntl", e)))?;
                ids.push((st.st_dev, st.st_ino));
                writable.push(flags & libc::O_ACCMODE == libc::O_RDWR);
            }
            s.launches.push(JailLaunch { vm: vm.clone(), shape, files, fds: ids, writable });
            if !s.jailer {
                return Err(HelperClientError::Helper(HelperError::Denied {
                    rule: "jailer".into(),
                    reason: "this fake helper's policy has no [jailer] section".into(),
                }));
            }
            if let Some(j) = s.jails.iter().find(|j| self.mine(&j.install, &j.vm, vm)) {
                return Ok(j.clone());
            }
            let n = s.next_jail;
            s.next_jail += 1;
            let id = format!("fakejail{n}");
            let root = self.jail_base.join(&id).join("root");
            let run = root.join(jail_paths::RUN_DIR.trim_start_matches('/'));
            std::fs::create_dir_all(&run)
                .map_err(|e| HelperClientError::Helper(HelperError::invalid(e.to_string())))?;
            let api_socket = root.join(jail_paths::API_SOCKET.trim_start_matches('/'));
            let uid = FAKE_JAIL_UID + n;
            let pid = FAKE_JAIL_PID + n as i32;
            if let Some(procs) = &self.procs {
                // The jailed Firecracker: its own uid, serving the socket at the jail's path.
                procs.add(
                    pid,
                    FakeProcess {
                        state: PidState::Live('S'),
                        cmdline: vec![
                            "firecracker".into(),
                            "--api-sock".into(),
                            jail_paths::API_SOCKET.into(),
                        ],
                        listening: vec![api_socket.clone()],
                        uid,
                    },
                );
            }
            let jail = JailInfo {
                install: self.install.clone(),
                vm: vm.clone(),
                id,
                uid,
                pid: Some(pid),
                root: root.display().to_string(),
                api_socket: api_socket.display().to_string(),
                shape,
            };
            s.jails.push(jail.clone());
            Ok(jail)
        });
        async move { r }.boxed()
    }

    fn jail_kill(&self, vm: &VmId) -> BoxFuture<'_, Result<TeardownReport, HelperClientError>> {
        let r = self.enter(Request::JailKill { vm: vm.clone() }).map(|mut s| {
            if let Some(e) = s.teardown_failures.get(vm).cloned() {
                let failure =
                    TeardownFailure { vm: vm.clone(), object: format!("jail of vm {vm}"), error: e };
                return TeardownReport { torn_down: Vec::new(), failures: vec![failure] };
            }
            self.remove_jail(&mut s, vm);
            TeardownReport { torn_down: vec![vm.clone()], failures: Vec::new() }
        });
        async move { r }.boxed()
    }
}
