//! Who is on the other end of a connection, as the kernel says: uid, gid and pid from
//! SO_PEERCRED, and the supplementary groups from SO_PEERGROUPS — both captured by the kernel when
//! the peer connected, so a later exec, setuid or pid reuse cannot change them. Names come from
//! the account databases, only to match the policy's user and group names, looked up on a
//! blocking thread so a slow database never stalls the runtime.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use banger_policy::Peer;
use nix::unistd::{Gid, Group, Uid, User};

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

/// Identifies the peer of a connected unix socket. The names are looked up on a blocking thread
/// (the account databases may be remote: LDAP, sssd) for at most [`NAMES_TIMEOUT`]; a peer whose
/// names did not come in time has none, so only rules by number can admit it.
pub async fn identify(stream: &tokio::net::UnixStream) -> Result<Peer, PeerError> {
    let cred = stream.peer_cred().map_err(PeerError)?;
    let mut groups = peer_groups(stream.as_fd()).map_err(PeerError)?;
    if !groups.contains(&cred.gid()) {
        groups.insert(0, cred.gid());
    }
    groups.dedup();
    let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid().unwrap_or(0));
    let numbers = groups.clone();
    let lookup = tokio::task::spawn_blocking(move || with_names(uid, gid, pid, numbers));
    match tokio::time::timeout(NAMES_TIMEOUT, lookup).await {
        Ok(Ok(peer)) => Ok(peer),
        Ok(Err(e)) => Err(PeerError(io::Error::other(e))),
        Err(_) => {
            tracing::warn!("uid {uid}: the account databases did not answer in time; going by numbers only");
            Ok(Peer { uid, gid, pid, user: None, groups, group_names: vec![], install: None })
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
        let peer = identify(&a).await.unwrap();
        assert_eq!(peer.uid, nix::unistd::getuid().as_raw());
        assert_eq!(peer.gid, nix::unistd::getgid().as_raw());
        assert_eq!(peer.pid, std::process::id() as i32);
        assert!(peer.groups.contains(&peer.gid));
        let mine: Vec<u32> = nix::unistd::getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
        for g in mine {
            assert!(peer.groups.contains(&g), "group {g} missing from {:?}", peer.groups);
        }
        assert_eq!(peer.install, None);
    }
}
