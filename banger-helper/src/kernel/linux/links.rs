//! Links on Linux: TAPs are made with the tun driver's ioctls (the driver refuses creation over
//! netlink); everything else — addresses, neighbours, a guest's route, link state, deletion, the
//! default route — goes over rtnetlink, on a connection opened in the helper's network namespace.

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use futures::future::join_all;
use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteMetric, RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::kernel::{KResult, KernelError, LinkOwner, Links};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Fail instead of attaching when the interface exists.
const IFF_TUN_EXCL: libc::c_short = -0x8000;

nix::ioctl_write_ptr_bad!(tun_set_iff, linux_raw_sys::ioctl::TUNSETIFF, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_owner, linux_raw_sys::ioctl::TUNSETOWNER);
nix::ioctl_write_int_bad!(tun_set_persist, linux_raw_sys::ioctl::TUNSETPERSIST);

/// The flags a TAP is created with; Firecracker opens it with the same ones (minus EXCL).
pub const TAP_FLAGS: libc::c_short = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;

/// Links over rtnetlink and the tun ioctls.
#[derive(Debug, Clone)]
pub struct NetlinkLinks {
    handle: Handle,
}

fn nl_err(op: &'static str, object: &str, e: rtnetlink::Error) -> KernelError {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => {
            KernelError::errno(op, object, Errno::from_raw(-m.raw_code()))
        }
        other => KernelError::other(op, object, other.to_string()),
    }
}

fn is_errno(e: &rtnetlink::Error, errno: Errno) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if -m.raw_code() == errno as i32)
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_group(m: &LinkMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Group(g) => Some(*g),
            _ => None,
        })
        .unwrap_or(0)
}

/// Builds an `ifreq` naming `name` (at most 15 bytes, checked by the caller's derivation).
fn ifreq(name: &str, flags: libc::c_short) -> Result<libc::ifreq, Errno> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(Errno::EINVAL);
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags;
    Ok(req)
}

/// Creates the persistent TAP with the tun ioctls. Closing the descriptor before TUNSETPERSIST
/// succeeded removes the device again, so a failure here leaves nothing.
fn create_tap_ioctls(name: &str, owner: u32) -> Result<(), (&'static str, Errno)> {
    let tun = open("/dev/net/tun", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| ("open /dev/net/tun", e))?;
    let req = ifreq(name, TAP_FLAGS | IFF_TUN_EXCL).map_err(|e| ("TUNSETIFF", e))?;
    // SAFETY: `tun` is an open tun descriptor and `req` a valid ifreq that outlives the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &req) }.map_err(|e| ("TUNSETIFF", e))?;
    // SAFETY: TUNSETOWNER takes the uid by value.
    unsafe { tun_set_owner(tun.as_raw_fd(), owner as _) }.map_err(|e| ("TUNSETOWNER", e))?;
    // SAFETY: TUNSETPERSIST takes a flag by value.
    unsafe { tun_set_persist(tun.as_raw_fd(), 1) }.map_err(|e| ("TUNSETPERSIST", e))?;
    Ok(())
}

/// Hands the existing persistent TAP `name` (in the calling thread's network namespace) to
/// `owner`: attaches to it with the flags it was made with, sets its owner, detaches. Fails with
/// `ENODEV` when there is no such link and `EBUSY` while a process has it open.
pub fn set_tap_owner(name: &str, owner: u32) -> KResult<()> {
    // Without the link, TUNSETIFF would make a fresh, short-lived TAP instead of attaching.
    nix::net::if_::if_nametoindex(name).map_err(|e| KernelError::errno("if_nametoindex", name, e))?;
    hand_tap(name, owner)
}

/// The ioctls of [`set_tap_owner`], for a link known to exist.
fn hand_tap(name: &str, owner: u32) -> KResult<()> {
    let err = |op: &'static str, e: Errno| KernelError::errno(op, name, e);
    let tun = open("/dev/net/tun", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| err("open /dev/net/tun", e))?;
    let req = ifreq(name, TAP_FLAGS).map_err(|e| err("TUNSETIFF", e))?;
    // SAFETY: `tun` is an open tun descriptor and `req` a valid ifreq that outlives the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &req) }.map_err(|e| err("TUNSETIFF", e))?;
    // SAFETY: TUNSETOWNER takes the uid by value.
    unsafe { tun_set_owner(tun.as_raw_fd(), owner as _) }.map_err(|e| err("TUNSETOWNER", e))?;
    Ok(())
}

/// Where the links of the helper's network namespace appear in sysfs.
const SYS_CLASS_NET: &str = "/sys/class/net";

/// Reads `<class_net>/<name>/owner`: the uid a TUN/TAP belongs to (`-1`: nobody).
pub fn tap_owner(class_net: &Path, name: &str) -> KResult<LinkOwner> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(KernelError::errno("read owner", name, Errno::EINVAL));
    }
    let dir = class_net.join(name);
    let read_err = |e| KernelError::io("read owner", name, e);
    match std::fs::read_to_string(dir.join("owner")) {
        Ok(text) => match text.trim() {
            "-1" => Ok(LinkOwner::Unowned),
            t => t
                .parse()
                .map(LinkOwner::Uid)
                .map_err(|_| KernelError::other("read owner", name, format!("unexpected owner {t:?}"))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::symlink_metadata(&dir) {
            Ok(_) => Ok(LinkOwner::Unowned),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LinkOwner::Absent),
            Err(e) => Err(read_err(e)),
        },
        Err(e) => Err(read_err(e)),
    }
}

impl NetlinkLinks {
    /// Opens an rtnetlink connection in the calling thread's network namespace and runs it on
    /// the current tokio runtime.
    pub fn new() -> std::io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(NetlinkLinks { handle })
    }

    async fn index(&self, name: &str, op: &'static str) -> KResult<u32> {
        let mut s = self.handle.link().get().match_name(name).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(m.header.index),
            Ok(None) => Err(KernelError::errno(op, name, Errno::ENODEV)),
            Err(e) => Err(nl_err(op, name, e)),
        }
    }

    async fn dump(&self) -> KResult<Vec<LinkMessage>> {
        self.handle.link().get().execute().try_collect().await.map_err(|e| nl_err("RTM_GETLINK", "links", e))
    }

    async fn delete_one(&self, index: u32, name: &str) -> KResult<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, Errno::ENODEV) => Ok(()),
            Err(e) => Err(nl_err("RTM_DELLINK", name, e)),
        }
    }

    /// Deletes several links with one RTM_DELLINK: they are moved into a link group nothing else
    /// uses, and the group is deleted, so the kernel unregisters them together.
    async fn delete_group(&self, links: &[(u32, String)], used_groups: &BTreeSet<u32>) -> KResult<()> {
        let group = loop {
            let mut h = RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            let g = (h.finish() as u32) | 0x8000_0000;
            if !used_groups.contains(&g) {
                break g;
            }
        };
        for (index, name) in links {
            let msg = LinkUnspec::new_with_index(*index).link_group(group).build();
            self.handle
                .link()
                .change(msg)
                .execute()
                .await
                .map_err(|e| nl_err("RTM_NEWLINK group", name, e))?;
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::Group(group));
        self.handle
            .link()
            .del_with_message(msg)
            .execute()
            .await
            .map_err(|e| nl_err("RTM_DELLINK group", "taps", e))
    }
}

impl Links for NetlinkLinks {
    async fn create_tap(&self, name: &str, owner: u32) -> KResult<()> {
        create_tap_ioctls(name, owner).map_err(|(op, e)| KernelError::errno(op, name, e))
    }

    async fn add_address(&self, name: &str, addr: Ipv4Addr, prefix: u8) -> KResult<()> {
        let index = self.index(name, "RTM_NEWADDR").await?;
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
            .map_err(|e| nl_err("RTM_NEWADDR", name, e))
    }

    async fn set_up(&self, name: &str) -> KResult<()> {
        let index = self.index(name, "RTM_NEWLINK up").await?;
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle.link().change(msg).execute().await.map_err(|e| nl_err("RTM_NEWLINK up", name, e))
    }

    async fn add_neighbour(&self, name: &str, addr: Ipv4Addr, mac: [u8; 6]) -> KResult<()> {
        let index = self.index(name, "RTM_NEWNEIGH").await?;
        // A new entry is permanent (NUD_PERMANENT) unless told otherwise.
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(addr))
            .link_layer_address(&mac)
            .execute()
            .await
            .map_err(|e| nl_err("RTM_NEWNEIGH", name, e))
    }

    async fn add_guest_route(&self, name: &str, guest: Ipv4Addr, host: Ipv4Addr) -> KResult<()> {
        let index = self.index(name, "RTM_NEWROUTE").await?;
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(guest, 32)
            .output_interface(index)
            .pref_source(host)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Static)
            .build();
        msg.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::QuickAck(1)]));
        self.handle.route().add(msg).execute().await.map_err(|e| nl_err("RTM_NEWROUTE", name, e))
    }

    async fn owner(&self, name: &str) -> KResult<LinkOwner> {
        tap_owner(Path::new(SYS_CLASS_NET), name)
    }

    async fn set_owner(&self, name: &str, owner: u32) -> KResult<()> {
        // Looked up in sysfs (as `owner` does): without the link TUNSETIFF would make one.
        match tap_owner(Path::new(SYS_CLASS_NET), name)? {
            LinkOwner::Absent => Ok(()),
            LinkOwner::Uid(uid) if uid == owner => Ok(()),
            LinkOwner::Uid(_) | LinkOwner::Unowned => hand_tap(name, owner),
        }
    }

    async fn list(&self) -> KResult<Vec<String>> {
        Ok(self.dump().await?.iter().filter_map(link_name).map(str::to_owned).collect())
    }

    async fn delete(&self, names: &[String]) -> Vec<KResult<()>> {
        if names.is_empty() {
            return Vec::new();
        }
        let all = match self.dump().await {
            Ok(all) => all,
            Err(e) => return names.iter().map(|_| Err(e.clone())).collect(),
        };
        let index_of = |n: &str| all.iter().find(|m| link_name(m) == Some(n)).map(|m| m.header.index);
        let present: Vec<(u32, String)> =
            names.iter().filter_map(|n| index_of(n).map(|i| (i, n.clone()))).collect();
        if present.len() > 1 {
            let used: BTreeSet<u32> = all.iter().map(link_group).collect();
            match self.delete_group(&present, &used).await {
                Ok(()) => return names.iter().map(|_| Ok(())).collect(),
                Err(e) => tracing::warn!(
                    "deleting {} links together failed ({e}); deleting one by one",
                    present.len()
                ),
            }
        }
        let results = join_all(present.iter().map(|(i, n)| self.delete_one(*i, n))).await;
        names
            .iter()
            .map(|n| match present.iter().position(|(_, p)| p == n) {
                Some(at) => results[at].clone(),
                None => Ok(()),
            })
            .collect()
    }

    async fn default_route_interface(&self) -> KResult<Option<String>> {
        let routes: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("RTM_GETROUTE", "default route", e))?;
        let oif = routes
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0)
            .filter(|r| {
                let table = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                });
                table.unwrap_or(u32::from(r.header.table)) == u32::from(RouteHeader::RT_TABLE_MAIN)
            })
            .find_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            });
        let Some(index) = oif else { return Ok(None) };
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(link_name(&m).map(str::to_owned)),
            Ok(None) => Ok(None),
            Err(e) => Err(nl_err("RTM_GETLINK", "default route interface", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_taps_owner_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        for (name, owner) in [("bgmine", Some("1000\n")), ("bgnobody", Some("-1\n")), ("eth0", None)] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            if let Some(o) = owner {
                std::fs::write(dir.path().join(name).join("owner"), o).unwrap();
            }
        }
        assert_eq!(tap_owner(dir.path(), "bgmine"), Ok(LinkOwner::Uid(1000)));
        assert_eq!(tap_owner(dir.path(), "bgnobody"), Ok(LinkOwner::Unowned));
        assert_eq!(tap_owner(dir.path(), "eth0"), Ok(LinkOwner::Unowned));
        assert_eq!(tap_owner(dir.path(), "gone"), Ok(LinkOwner::Absent));
        assert!(tap_owner(dir.path(), "../x").is_err());
    }
}
