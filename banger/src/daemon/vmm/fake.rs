//! A [`Vmm`] held in memory for tests of the lifecycle: it records every call and makes each
//! "process" it spawns appear in a fake process table, serving the VM's API socket, so liveness,
//! kills and shutdowns behave as with a real VMM. Any call can be made to fail.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use super::*;
use crate::daemon::liveness::ProcessTable;
use crate::daemon::liveness::fake::FakeProcesses;

/// One call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmCall {
    /// [`Vmm::spawn`], with the VM id and API socket.
    Spawn {
        /// `--id`.
        id: String,
        /// `--api-sock`.
        api_socket: PathBuf,
    },
    /// [`Vmm::configure`].
    Configure(PathBuf, Box<VmConfig>),
    /// [`Vmm::boot`].
    Boot(PathBuf),
    /// [`Vmm::shutdown`].
    Shutdown(PathBuf),
    /// [`Vmm::relay_serial`], with the named pipe.
    RelaySerial(PathBuf),
}

/// Which call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmmOp {
    /// [`Vmm::spawn`] fails as a VMM that exits at once.
    Spawn,
    /// [`Vmm::configure`] is refused.
    Configure,
    /// [`Vmm::boot`] is refused.
    Boot,
    /// [`Vmm::shutdown`] is refused.
    Shutdown,
    /// [`Vmm::relay_serial`] fails.
    RelaySerial,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<VmmCall>,
    next_pid: i32,
    failing: Vec<VmmOp>,
    ignore_shutdown: bool,
}

/// The fake VMM.
#[derive(Debug)]
pub struct FakeVmm {
    procs: Arc<FakeProcesses>,
    /// Guards the record of calls, the PIDs handed out and the configured failures.
    state: Mutex<State>,
}

impl FakeVmm {
    /// A fake whose processes live in `procs`. PIDs start at 1000.
    pub fn new(procs: Arc<FakeProcesses>) -> Self {
        Self { procs, state: Mutex::new(State { next_pid: 1000, ..State::default() }) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<VmmCall> {
        self.state().calls.clone()
    }

    /// Makes `op` fail from now on.
    pub fn fail(&self, op: VmmOp) {
        self.state().failing.push(op);
    }

    /// Makes no call fail.
    pub fn clear_failures(&self) {
        self.state().failing.clear();
    }

    /// Makes guests ignore Ctrl-Alt-Del (the VMM keeps running until killed).
    pub fn ignore_shutdown(&self, ignore: bool) {
        self.state().ignore_shutdown = ignore;
    }

    /// Records `call`; whether `op` is to fail.
    fn enter(&self, call: VmmCall, op: VmmOp) -> bool {
        let mut s = self.state();
        s.calls.push(call);
        s.failing.contains(&op)
    }
}

fn refused(path: &str) -> FirecrackerError {
    FirecrackerError::Api {
        status: 400,
        fault_message: "the fake vmm refuses this".into(),
        path: path.into(),
    }
}

impl Vmm for FakeVmm {
    fn spawn<'a>(&'a self, spec: SpawnSpec<'a>) -> BoxFuture<'a, Result<Spawned, VmmError>> {
        let call = VmmCall::Spawn { id: spec.id.to_owned(), api_socket: spec.api_socket.to_owned() };
        let r = if self.enter(call, VmmOp::Spawn) {
            Err(VmmError::ExitedEarly {
                status: "exit status: 1".into(),
                socket_opened: false,
                hint: String::new(),
                tail: "the fake vmm exits at once".into(),
            })
        } else {
            let pid = {
                let mut s = self.state();
                s.next_pid += 1;
                s.next_pid
            };
            self.procs.add_vmm(pid, spec.api_socket);
            Ok(Spawned { pid })
        };
        async move { r }.boxed()
    }

    fn configure<'a>(
        &'a self,
        api: Api<'a>,
        config: &'a VmConfig,
    ) -> BoxFuture<'a, Result<ApiTimings, FirecrackerError>> {
        let call = VmmCall::Configure(api.socket.to_owned(), Box::new(config.clone()));
        let r =
            if self.enter(call, VmmOp::Configure) { Err(refused("/machine-config")) } else { Ok(Vec::new()) };
        async move { r }.boxed()
    }

    fn boot<'a>(&'a self, api: Api<'a>) -> BoxFuture<'a, Result<(), FirecrackerError>> {
        let r = if self.enter(VmmCall::Boot(api.socket.to_owned()), VmmOp::Boot) {
            Err(refused("/actions"))
        } else {
            Ok(())
        };
        async move { r }.boxed()
    }

    fn shutdown<'a>(&'a self, api: Api<'a>) -> BoxFuture<'a, Result<(), FirecrackerError>> {
        let api_socket = api.socket;
        let r = if self.enter(VmmCall::Shutdown(api_socket.to_owned()), VmmOp::Shutdown) {
            Err(refused("/actions"))
        } else {
            if !self.state().ignore_shutdown {
                // The guest reboots and its VMM exits: the process is gone.
                for pid in self.procs.listening_pids(api_socket).unwrap_or_default() {
                    self.procs.remove(pid);
                }
            }
            Ok(())
        };
        async move { r }.boxed()
    }

    fn relay_serial<'a>(
        &'a self,
        jail_root: &'a Path,
        in_jail: &'a str,
        _serial_log: &'a Path,
        _serial_cap: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        let fifo = jail_root.join(in_jail.trim_start_matches('/'));
        let r = if self.enter(VmmCall::RelaySerial(fifo.to_owned()), VmmOp::RelaySerial) {
            Err(VmmError::SerialFifo {
                path: fifo.to_owned(),
                source: std::io::Error::other("the fake refuses"),
            })
        } else {
            Ok(())
        };
        async move { r }.boxed()
    }
}
