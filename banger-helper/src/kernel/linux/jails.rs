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
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use banger_protocol::frame;

use crate::jail;
use crate::kernel::{JailOrder, JailState, Jails, KResult, KernelError};
use crate::launcher::Launcher;
use crate::launcher::message::{Answer, Order};

/// Jails as this helper can make them.
#[derive(Debug)]
pub struct LinuxJails {
    launcher: Option<Connected>,
}

struct Connected {
    channel: Arc<Channel>,
    root: Box<dyn Fn(&str) -> PathBuf + Send + Sync>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected").field("channel", &self.channel).finish_non_exhaustive()
    }
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
        let config = launcher.config;
        Self::connect(launcher.channel, launcher.pid, move |id| jail::root(&config, id))
    }

    /// Jails made by the launcher `pid` at the other end of `channel`, with their roots where
    /// `root` puts them.
    pub fn connect(
        channel: UnixStream,
        pid: nix::unistd::Pid,
        root: impl Fn(&str) -> PathBuf + Send + Sync + 'static,
    ) -> Self {
        let channel = Channel { socket: Mutex::new(channel), gone: AtomicBool::new(false), pid };
        LinuxJails { launcher: Some(Connected { channel: Arc::new(channel), root: Box::new(root) }) }
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
            Some(c) => (c.root)(id).display().to_string(),
            None => format!("<no chroot base>/firecracker/{id}/root"),
        }
    }

    async fn launch(&self, order: &JailOrder, fds: Vec<OwnedFd>) -> KResult<i32> {
        const OP: &str = "jail launch";
        let channel = self.channel(OP, &order.id)?;
        let id = order.id.clone();
        let order = Order::Launch(order.clone());
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
            Answer::Listed(jails) => Ok(jails),
            Answer::Failed(f) => Err(f.into_kernel_error(OP)),
            other => Err(unexpected(OP, "the chroot base", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::sync::Mutex as StdMutex;

    use banger_protocol::{JailFiles, VmShape};
    use nix::errno::Errno;

    use super::*;
    use crate::kernel::UserLimits;
    use crate::launcher::{self, Backend};

    /// A received file: its device and inode.
    type Inode = (u64, u64);

    /// What the launcher's side was asked, and what it answers.
    #[derive(Default)]
    struct Recorder {
        launched: StdMutex<Vec<(JailOrder, Vec<Inode>)>>,
        removed: StdMutex<Vec<(String, u32, Option<i32>)>>,
    }

    impl Backend for Recorder {
        fn launch(&self, order: &JailOrder, fds: Vec<OwnedFd>) -> KResult<i32> {
            let inodes =
                fds.iter().map(|f| nix::sys::stat::fstat(f).map(|s| (s.st_dev, s.st_ino)).unwrap()).collect();
            self.launched.lock().unwrap().push((order.clone(), inodes));
            if order.id == "bg-exists" {
                return Err(KernelError::errno("jailer", "bg-exists", Errno::EEXIST));
            }
            Ok(4242)
        }
        fn remove(&self, id: &str, uid: u32, pid: Option<i32>) -> KResult<()> {
            self.removed.lock().unwrap().push((id.to_owned(), uid, pid));
            Ok(())
        }
        fn list(&self) -> KResult<Vec<JailState>> {
            Ok(vec![JailState { id: "bg-a".into(), pid: Some(7), alive: true, uid: Some(900_000) }])
        }
    }

    fn order(id: &str) -> JailOrder {
        JailOrder {
            id: id.to_owned(),
            uid: 900_001,
            caller: 1000,
            shape: VmShape { vcpus: 2, mem_mib: 256 },
            user_cgroup: "banger/u1000".into(),
            user_limits: UserLimits { vcpus: 4, mem_mib: 2048 },
            tap: Some("bgt1".into()),
            files: JailFiles { initrd: false, work: true },
        }
    }

    fn files(n: usize) -> (tempfile::TempDir, Vec<OwnedFd>) {
        let dir = tempfile::tempdir().unwrap();
        let fds = (0..n)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, b"x").unwrap();
                std::fs::File::open(p).unwrap().into()
            })
            .collect();
        (dir, fds)
    }

    /// A launcher's conversation on a thread, with `backend`; returns the helper's side and the
    /// thread (which ends with the conversation).
    fn connected(
        backend: Arc<Recorder>,
    ) -> (LinuxJails, std::thread::JoinHandle<Result<(), launcher::ConversationError>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || launcher::serve(&*backend, theirs.as_fd()));
        let jails = LinuxJails::connect(ours, nix::unistd::getpid(), |id| {
            PathBuf::from(format!("/base/fc/{id}/root"))
        });
        (jails, serving)
    }

    #[tokio::test]
    async fn orders_reach_the_launcher_with_their_descriptors_and_answers_come_back() {
        let backend = Arc::new(Recorder::default());
        let (jails, serving) = connected(Arc::clone(&backend));
        assert!(jails.available());
        assert_eq!(jails.root("bg-a"), "/base/fc/bg-a/root");

        let (_dir, fds) = files(3);
        let want: Vec<Inode> =
            fds.iter().map(|f| nix::sys::stat::fstat(f).map(|s| (s.st_dev, s.st_ino)).unwrap()).collect();
        assert_eq!(jails.launch(&order("bg-a"), fds).await, Ok(4242));
        assert_eq!(backend.launched.lock().unwrap()[0], (order("bg-a"), want));

        let (_dir, fds) = files(3);
        let e = jails.launch(&order("bg-exists"), fds).await.unwrap_err();
        assert_eq!(e, KernelError::errno("jail launch", "bg-exists (jailer)", Errno::EEXIST));

        assert_eq!(jails.remove("bg-a", 900_001, Some(99)).await, Ok(()));
        assert_eq!(backend.removed.lock().unwrap()[0], ("bg-a".to_owned(), 900_001, Some(99)));
        // The reconcile's order for a leftover directory whose uid is not known.
        assert_eq!(jails.remove("bg-b", 0, None).await, Ok(()));
        assert_eq!(backend.removed.lock().unwrap()[1], ("bg-b".to_owned(), 0, None));
        assert_eq!(
            jails.list(),
            Ok(vec![JailState { id: "bg-a".into(), pid: Some(7), alive: true, uid: Some(900_000) }])
        );
        assert!(jails.available(), "failures of an order leave the launcher running");
        drop(jails);
        assert!(serving.join().unwrap().is_ok(), "the launcher ends when the helper's end closes");
    }

    #[tokio::test]
    async fn a_malformed_order_ends_the_conversation_and_the_helper_says_why_after() {
        let backend = Arc::new(Recorder::default());
        let (jails, serving) = connected(Arc::clone(&backend));
        // Two descriptors for an order that names three: the launcher refuses it and ends.
        let (_dir, fds) = files(2);
        let e = jails.launch(&order("bg-a"), fds).await.unwrap_err();
        assert!(e.to_string().contains("jail launch on bg-a failed: the jail launcher is gone"), "{e}");
        assert!(matches!(serving.join().unwrap(), Err(launcher::ConversationError::Malformed(_))));
        assert!(backend.launched.lock().unwrap().is_empty(), "nothing ran");
        assert!(!jails.available());
        let (_dir, fds) = files(3);
        let e = jails.launch(&order("bg-b"), fds).await.unwrap_err();
        assert!(e.to_string().contains("restart banger-helper"), "{e}");
        assert!(jails.remove("bg-b", 900_001, None).await.is_err());
        assert!(jails.list().is_err());
    }

    #[tokio::test]
    async fn a_launcher_that_is_gone_makes_jails_unavailable() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let jails = LinuxJails::connect(ours, nix::unistd::getpid(), |id| PathBuf::from(id));
        assert!(jails.available());
        drop(theirs);
        assert!(!jails.available(), "a closed end is seen without an order");
        let (_dir, fds) = files(3);
        let e = jails.launch(&order("bg-a"), fds).await.unwrap_err();
        assert!(e.to_string().contains("the jail launcher is gone"), "{e}");
    }

    #[tokio::test]
    async fn a_malformed_answer_is_the_launchers_end() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let jails = LinuxJails::connect(ours, nix::unistd::getpid(), |id| PathBuf::from(id));
        let answering = std::thread::spawn(move || {
            let _ = frame::recv_blocking::<Order>(theirs.as_fd()).unwrap();
            frame::send_blocking(theirs.as_fd(), &Answer::Launched(-3), &[]).unwrap();
            theirs
        });
        assert!(jails.list().unwrap_err().to_string().contains("the jail launcher is gone"));
        assert!(!jails.available());
        drop(answering.join().unwrap());
    }

    #[tokio::test]
    async fn without_a_jailer_section_nothing_is_made() {
        let jails = LinuxJails::unavailable();
        assert!(!jails.available());
        assert_eq!(jails.list(), Ok(Vec::new()));
        let (_dir, fds) = files(3);
        let e = jails.launch(&order("bg-a"), fds).await.unwrap_err();
        assert!(e.to_string().contains("no [jailer] section"), "{e}");
    }
}
