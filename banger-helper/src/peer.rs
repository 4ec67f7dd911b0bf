//! Who is on the other end of a connection, as the kernel says: uid, gid and pid from
//! SO_PEERCRED, and the supplementary groups from SO_PEERGROUPS — both captured by the kernel when
//! the peer connected, so a later exec, setuid or pid reuse cannot change them. Names come from
//! the account databases, only to match the policy's user and group names, looked up on a
//! blocking thread so a slow database never stalls the runtime ([`Lookups`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use banger_policy::Peer;
use nix::unistd::{Gid, Group, Uid, User};
use tokio::sync::Semaphore;

/// Why the peer could not be identified.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the peer's credentials")]
pub struct PeerError(#[source] pub io::Error);

/// The supplementary groups the peer had when it connected (SO_PEERGROUPS, Linux 4.13).
pub fn peer_groups(sock: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a writable buffer of `len` bytes that outlives the call; the kernel
        // writes at most `len` bytes and stores the size it needs in `len`.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65_536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

/// How long the account databases may take to name a peer.
pub const NAMES_TIMEOUT: Duration = Duration::from_secs(10);

/// How many lookups in the account databases may run at once.
pub const MAX_LOOKUPS: usize = 16;

/// What the kernel says about a peer: uid, gid and pid (SO_PEERCRED) and groups (SO_PEERGROUPS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's primary gid.
    pub gid: u32,
    /// The peer's pid at connect time (0 if the kernel has none, e.g. from another pid namespace
    /// whose process is gone).
    pub pid: i32,
    /// The primary and supplementary gids.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// The peer by numbers only, without names.
    pub fn peer(&self) -> Peer {
        let Credentials { uid, gid, pid, ref groups } = *self;
        Peer { uid, gid, pid, user: None, groups: groups.clone(), group_names: vec![], install: None }
    }
}

/// Reads the peer's credentials from a connected unix socket; two system calls, nothing that can
/// wait.
pub fn credentials(stream: &tokio::net::UnixStream) -> Result<Credentials, PeerError> {
    let cred = stream.peer_cred().map_err(PeerError)?;
    let mut groups = peer_groups(stream.as_fd()).map_err(PeerError)?;
    if !groups.contains(&cred.gid()) {
        groups.insert(0, cred.gid());
    }
    groups.dedup();
    Ok(Credentials { uid: cred.uid(), gid: cred.gid(), pid: cred.pid().unwrap_or(0), groups })
}

/// Looks peers' names up in the account databases (which may be remote: LDAP, sssd): on
/// blocking threads, at most [`MAX_LOOKUPS`] at once, each answer awaited for a limited time.
/// A lookup that does not answer in time goes on in the background holding its place, so a
/// stuck database never has more than [`MAX_LOOKUPS`] threads waiting on it.
#[derive(Debug, Clone)]
pub struct Lookups {
    /// One permit per lookup running; a permit is held by the thread until its lookup returns.
    running: Arc<Semaphore>,
    /// How long a peer waits for its names, its turn included.
    timeout: Duration,
}

impl Lookups {
    /// At most `max` lookups at once, each peer waiting at most `timeout` for its names.
    pub fn new(max: usize, timeout: Duration) -> Lookups {
        Lookups { running: Arc::new(Semaphore::new(max)), timeout }
    }

    /// The peer with its names; a peer whose names did not come in time has none, so only rules
    /// by number can admit it.
    pub async fn identify(&self, creds: Credentials) -> Peer {
        let running = self.running.clone();
        let Credentials { uid, gid, pid, groups } = creds.clone();
        let lookup = async move {
            let permit = running.acquire_owned().await.ok()?;
            tokio::task::spawn_blocking(move || {
                let peer = with_names(uid, gid, pid, groups);
                drop(permit);
                peer
            })
            .await
            .ok()
        };
        match tokio::time::timeout(self.timeout, lookup).await {
            Ok(Some(peer)) => peer,
            Ok(None) | Err(_) => {
                tracing::warn!(
                    "uid {uid}: the account databases did not answer in time; going by numbers only"
                );
                creds.peer()
            }
        }
    }
}

/// Fills in the user and group names of a peer from the account databases.
pub fn with_names(uid: u32, gid: u32, pid: i32, groups: Vec<u32>) -> Peer {
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten().map(|u| u.name);
    let group_names = groups
        .iter()
        .filter_map(|g| Group::from_gid(Gid::from_raw(*g)).ok().flatten().map(|g| g.name))
        .collect();
    Peer { uid, gid, pid, user, groups, group_names, install: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn identifies_this_process() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let creds = credentials(&a).unwrap();
        let peer = Lookups::new(MAX_LOOKUPS, NAMES_TIMEOUT).identify(creds.clone()).await;
        assert_eq!(peer.uid, nix::unistd::getuid().as_raw());
        assert_eq!(peer.gid, nix::unistd::getgid().as_raw());
        assert_eq!(peer.pid, std::process::id() as i32);
        assert!(peer.groups.contains(&peer.gid));
        let mine: Vec<u32> = nix::unistd::getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
        for g in mine {
            assert!(peer.groups.contains(&g), "group {g} missing from {:?}", peer.groups);
        }
        assert_eq!(peer.install, None);
        assert_eq!(
            (peer.uid, peer.gid, peer.pid, &peer.groups),
            (creds.uid, creds.gid, creds.pid, &creds.groups)
        );
        assert_eq!(creds.peer().user, None);
    }

    #[tokio::test]
    async fn without_a_free_lookup_in_time_the_peer_goes_by_numbers() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let creds = credentials(&a).unwrap();
        let lookups = Lookups::new(1, Duration::from_millis(100));
        // Every lookup is taken (as by threads stuck in a database that does not answer).
        let _stuck = lookups.running.clone().acquire_owned().await.unwrap();
        let start = std::time::Instant::now();
        let peer = lookups.identify(creds.clone()).await;
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(peer, creds.peer());
    }
}
