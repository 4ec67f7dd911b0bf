//! Jailed VMMs on Linux, made by the launcher ([`crate::launcher`]): each call is one order on
//! the channel to it, answered before the next is sent.
//!
//! The channel is a blocking socket behind a mutex: `launch` and `remove` run on tokio's
//! blocking pool, so an exchange runs to its end even when the operation that asked for it is
//! dropped, and the next order never reads the answer to an earlier one. Any failure of the
//! channel (the launcher died, a malformed answer) marks the launcher gone for good:
//! [`Jails::available`] turns false and every later call fails with an error that says to
//! restart the helper. Without a `[jailer]` in the policy there is no launcher
//! ([`LinuxJails::unavailable`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use banger_protocol::frame;

use crate::jail::{self, JailConfig};
use crate::kernel::{JailOrder, JailState, Jails, KResult, KernelError};
use crate::launcher::Launcher;
use crate::launcher::message::{Answer, Order};

/// Jails as this helper can make them.
#[derive(Debug)]
pub struct LinuxJails {
    launcher: Option<Connected>,
}

#[derive(Debug)]
struct Connected {
    channel: Arc<Channel>,
    config: JailConfig,
}

#[derive(Debug)]
struct Channel {
    socket: Mutex<UnixStream>,
    gone: AtomicBool,
    pid: nix::unistd::Pid,
}

impl LinuxJails {
    /// No jails: the policy has no `[jailer]`.
    pub fn unavailable() -> Self {
        LinuxJails { launcher: None }
    }

    /// Jails made by `launcher`.
    pub fn new(launcher: Launcher) -> Self {
        let channel =
            Channel { socket: Mutex::new(launcher.channel), gone: AtomicBool::new(false), pid: launcher.pid };
        LinuxJails { launcher: Some(Connected { channel: Arc::new(channel), config: launcher.config }) }
    }

    fn channel(&self, op: &'static str, object: &str) -> KResult<Arc<Channel>> {
        match &self.launcher {
            None => Err(KernelError::other(
                op,
                object,
                "the policy has no [jailer] section, so this helper makes no jails",
            )),
            Some(c) if c.channel.gone.load(Ordering::Acquire) => Err(gone(op, object)),
            Some(c) => Ok(Arc::clone(&c.channel)),
        }
    }
}

fn gone(op: &'static str, object: &str) -> KernelError {
    KernelError::other(
        op,
        object,
        "the jail launcher is gone (see the helper's log for why): restart banger-helper to make or remove jails again",
    )
}

impl Channel {
    /// One exchange: the order (with `fds`), then its answer.
    fn exchange(
        &self,
        op: &'static str,
        object: &str,
        order: &Order,
        fds: &[BorrowedFd<'_>],
    ) -> KResult<Answer> {
        let socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        if self.gone.load(Ordering::Acquire) {
            return Err(gone(op, object));
        }
        let sent = frame::send_blocking(socket.as_fd(), order, fds);
        let answer = sent.and_then(|()| frame::recv_blocking::<Answer>(socket.as_fd()).map(|(a, _fds)| a));
        let checked =
            answer.map_err(|e| e.to_string()).and_then(|a| a.check().map(|()| a).map_err(|e| e.to_string()));
        match checked {
            Ok(a) => Ok(a),
            Err(why) => {
                self.gone.store(true, Ordering::Release);
                tracing::error!(
                    "the jail launcher (PID {}) is gone: {why}; no jail can be made or removed until the helper restarts",
                    self.pid
                );
                Err(gone(op, object))
            }
        }
    }

    /// Whether the launcher's end is still open (it never writes between answers, so a hang-up
    /// or error event means it is gone).
    fn open(&self) -> bool {
        if self.gone.load(Ordering::Acquire) {
            return false;
        }
        let Ok(socket) = self.socket.try_lock() else {
            // An exchange is under way: it will tell.
            return true;
        };
        let mut pfd = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd for a descriptor `socket` keeps open; a zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        let hung =
            n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
        if hung {
            self.gone.store(true, Ordering::Release);
            tracing::error!("the jail launcher (PID {}) is gone: its end of the channel closed", self.pid);
        }
        !hung
    }
}

fn unexpected(op: &'static str, object: &str, answer: &Answer) -> KernelError {
    KernelError::other(op, object, format!("the jail launcher answered {answer:?}"))
}

impl Jails for LinuxJails {
    fn available(&self) -> bool {
        self.launcher.as_ref().is_some_and(|c| c.channel.open())
    }

    fn root(&self, id: &str) -> String {
        match &self.launcher {
            Some(c) => jail::root(&c.config, id).display().to_string(),
            None => format!("<no chroot base>/firecracker/{id}/root"),
        }
    }

    async fn launch(&self, order: &JailOrder, fds: Vec<OwnedFd>) -> KResult<i32> {
        const OP: &str = "jail launch";
        let channel = self.channel(OP, &order.id)?;
        let id = order.id.clone();
        let order = Order::launch(order);
        let answer = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            channel.exchange(OP, &id, &order, &borrowed).map(|a| (a, id))
        })
        .await
        .map_err(|e| KernelError::other(OP, "the jail launcher's channel", e.to_string()))??;
        match answer {
            (Answer::Launched(pid), _) => Ok(pid),
            (Answer::Failed(f), _) => Err(f.into_kernel_error(OP)),
            (other, id) => Err(unexpected(OP, &id, &other)),
        }
    }

    async fn remove(&self, id: &str, uid: u32, pid: Option<i32>) -> KResult<()> {
        const OP: &str = "jail remove";
        let channel = self.channel(OP, id)?;
        let order = Order::Remove { id: id.to_owned(), uid, pid };
        let object = id.to_owned();
        let answer = tokio::task::spawn_blocking(move || channel.exchange(OP, &object, &order, &[]))
            .await
            .map_err(|e| KernelError::other(OP, "the jail launcher's channel", e.to_string()))??;
        match answer {
            Answer::Removed => Ok(()),
            Answer::Failed(f) => Err(f.into_kernel_error(OP)),
            other => Err(unexpected(OP, id, &other)),
        }
    }

    fn list(&self) -> KResult<Vec<JailState>> {
        const OP: &str = "jail list";
        if self.launcher.is_none() {
            return Ok(Vec::new());
        }
        let channel = self.channel(OP, "the chroot base")?;
        match channel.exchange(OP, "the chroot base", &Order::List, &[])? {
            Answer::Listed(jails) => Ok(jails.into_iter().map(|j| j.into_state()).collect()),
            Answer::Failed(f) => Err(f.into_kernel_error(OP)),
            other => Err(unexpected(OP, "the chroot base", &other)),
        }
    }
}
