//! POSIX ACLs as the kernel stores them: the `system.posix_acl_access` and
//! `system.posix_acl_default` extended attributes (a little-endian version 2 header, then one
//! `(tag u16, perm u16, id u32)` entry each, ordered by tag and id), encoded and decoded here and
//! read or written through a descriptor (`fgetxattr`/`fsetxattr`), or through
//! `/proc/self/fd/N` for an `O_PATH` descriptor of a socket (which cannot be opened).
//!
//! No crate is used: the maintained ones (`posix-acl`, `exacl`) bind libacl and act on paths,
//! while every ACL the jail sets must go through a descriptor the helper opened without
//! following symlinks. The format is small and fixed (`include/uapi/linux/posix_acl_xattr.h`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// The access ACL's attribute.
pub const ACCESS: &str = "system.posix_acl_access";
/// The default ACL's attribute (directories only).
pub const DEFAULT: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const UNDEFINED_ID: u32 = u32::MAX;

/// Read.
pub const R: u16 = 4;
/// Write.
pub const W: u16 = 2;
/// Execute (search, for a directory).
pub const X: u16 = 1;

/// One ACL entry's tag; the discriminants are the kernel's `ACL_*` values, whose order is the
/// order entries must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tag {
    /// The owner.
    UserObj = 0x01,
    /// A named user.
    User = 0x02,
    /// The owning group.
    GroupObj = 0x04,
    /// A named group.
    Group = 0x08,
    /// The most any group-class entry grants.
    Mask = 0x10,
    /// Everyone else.
    Other = 0x20,
}

impl Tag {
    fn from_raw(v: u16) -> Option<Tag> {
        Some(match v {
            0x01 => Tag::UserObj,
            0x02 => Tag::User,
            0x04 => Tag::GroupObj,
            0x08 => Tag::Group,
            0x10 => Tag::Mask,
            0x20 => Tag::Other,
            _ => return None,
        })
    }
}

/// One entry: a tag, its id (for named users and groups) and `rwx` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// What it applies to.
    pub tag: Tag,
    /// The uid or gid of a named entry; `None` for the others.
    pub id: Option<u32>,
    /// `R | W | X` bits.
    pub perm: u16,
}

/// An ACL: its entries, kept in the kernel's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

/// Why bytes are not an ACL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    /// Wrong length or version, or an unknown tag.
    #[error("malformed posix acl attribute")]
    Malformed,
}

impl Acl {
    /// The ACL equivalent to a file mode: owner, group and other entries only.
    pub fn from_mode(mode: u32) -> Acl {
        let bits = |shift: u32| ((mode >> shift) & 7) as u16;
        Acl {
            entries: vec![
                Entry { tag: Tag::UserObj, id: None, perm: bits(6) },
                Entry { tag: Tag::GroupObj, id: None, perm: bits(3) },
                Entry { tag: Tag::Other, id: None, perm: bits(0) },
            ],
        }
    }

    /// The permissions a named user has in this ACL, before the mask.
    pub fn user(&self, uid: u32) -> Option<u16> {
        self.entries.iter().find(|e| e.tag == Tag::User && e.id == Some(uid)).map(|e| e.perm)
    }

    /// Gives `uid` exactly `perm` (replacing an entry it had), then recomputes the mask.
    pub fn set_user(&mut self, uid: u32, perm: u16) {
        self.entries.retain(|e| !(e.tag == Tag::User && e.id == Some(uid)));
        self.entries.push(Entry { tag: Tag::User, id: Some(uid), perm: perm & 7 });
        self.normalize();
    }

    /// Removes `uid`'s entry; returns whether it had one. The mask goes with the last named entry.
    pub fn remove_user(&mut self, uid: u32) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| !(e.tag == Tag::User && e.id == Some(uid)));
        let removed = self.entries.len() != before;
        self.normalize();
        removed
    }

    /// Sorts, and keeps a mask that is the union of the group class (what `setfacl` computes)
    /// exactly when there are named entries.
    fn normalize(&mut self) {
        self.entries.retain(|e| e.tag != Tag::Mask);
        let named = self.entries.iter().any(|e| matches!(e.tag, Tag::User | Tag::Group));
        if named {
            let perm = self
                .entries
                .iter()
                .filter(|e| matches!(e.tag, Tag::User | Tag::GroupObj | Tag::Group))
                .fold(0, |m, e| m | e.perm);
            self.entries.push(Entry { tag: Tag::Mask, id: None, perm });
        }
        self.entries.sort_by_key(|e| (e.tag, e.id));
    }

    /// The attribute's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.entries.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&(e.tag as u16).to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.unwrap_or(UNDEFINED_ID).to_le_bytes());
        }
        out
    }

    /// Parses an attribute's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Acl, AclError> {
        let (head, body) = bytes.split_at_checked(4).ok_or(AclError::Malformed)?;
        if u32::from_le_bytes(head.try_into().map_err(|_| AclError::Malformed)?) != VERSION
            || body.len() % 8 != 0
        {
            return Err(AclError::Malformed);
        }
        let entries = body
            .chunks_exact(8)
            .map(|c| {
                let tag = Tag::from_raw(u16::from_le_bytes([c[0], c[1]])).ok_or(AclError::Malformed)?;
                let perm = u16::from_le_bytes([c[2], c[3]]);
                let id = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
                let id = matches!(tag, Tag::User | Tag::Group).then_some(id);
                Ok(Entry { tag, id, perm })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Acl { entries })
    }
}

/// Builds the default ACL a directory hands to what is made in it: the owner's `rwx`, the named
/// users given, no group or other access.
pub fn default_for(users: &[(u32, u16)]) -> Acl {
    let mut acl = Acl::from_mode(0o700);
    for &(uid, perm) in users {
        acl.set_user(uid, perm);
    }
    acl
}

fn name(attr: &str) -> std::ffi::CString {
    // The attribute names are the two constants above: no interior NUL.
    std::ffi::CString::new(attr).unwrap_or_default()
}

/// Reads attribute `attr` of the file `fd` is open on; `None` when it has none.
pub fn fget(fd: BorrowedFd<'_>, attr: &str) -> Result<Option<Vec<u8>>, Errno> {
    let attr = name(attr);
    let mut buf = vec![0u8; 4 + 8 * 64];
    // SAFETY: `fd` is a valid descriptor, `attr` a NUL-terminated string and `buf` a writable
    // buffer of the length passed; the kernel writes at most that many bytes.
    let n = unsafe { libc::fgetxattr(fd.as_raw_fd(), attr.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    match Errno::result(n) {
        Ok(n) => {
            buf.truncate(n as usize);
            Ok(Some(buf))
        }
        Err(Errno::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes attribute `attr` of the file `fd` is open on.
pub fn fset(fd: BorrowedFd<'_>, attr: &str, value: &[u8]) -> Result<(), Errno> {
    let attr = name(attr);
    // SAFETY: `fd` is a valid descriptor, `attr` NUL-terminated, `value` readable for its length.
    let r = unsafe { libc::fsetxattr(fd.as_raw_fd(), attr.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    Errno::result(r).map(drop)
}

/// Writes attribute `attr` of the file an `O_PATH` descriptor names, through
/// `/proc/self/fd/N` (which names exactly the inode that was opened, whatever its path now is).
pub fn set_via_proc(fd: BorrowedFd<'_>, attr: &str, value: &[u8]) -> Result<(), Errno> {
    let path =
        std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|_| Errno::EINVAL)?;
    let attr = name(attr);
    // SAFETY: both strings are NUL-terminated, `value` is readable for its length.
    let r = unsafe { libc::setxattr(path.as_ptr(), attr.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    Errno::result(r).map(drop)
}

/// The access ACL of the file `fd` is open on, or the one its mode is equivalent to.
pub fn access_acl(fd: impl AsFd) -> Result<Acl, Errno> {
    let fd = fd.as_fd();
    match fget(fd, ACCESS)? {
        Some(bytes) => Acl::decode(&bytes).map_err(|_| Errno::EINVAL),
        None => {
            let st = nix::sys::stat::fstat(fd)?;
            Ok(Acl::from_mode(st.st_mode))
        }
    }
}

/// Gives `uid` exactly `perm` on the file `fd` is open on (other entries kept).
pub fn grant(fd: impl AsFd, uid: u32, perm: u16) -> Result<(), Errno> {
    let fd = fd.as_fd();
    let mut acl = access_acl(fd)?;
    acl.set_user(uid, perm);
    fset(fd, ACCESS, &acl.encode())
}

/// Removes `uid`'s entry from the file `fd` is open on, if it has one; with no named entry
/// left the kernel drops the attribute and the mode's group bits are the group's again.
pub fn revoke(fd: impl AsFd, uid: u32) -> Result<bool, Errno> {
    let fd = fd.as_fd();
    let Some(bytes) = fget(fd, ACCESS)? else { return Ok(false) };
    let mut acl = Acl::decode(&bytes).map_err(|_| Errno::EINVAL)?;
    if !acl.remove_user(uid) {
        return Ok(false);
    }
    fset(fd, ACCESS, &acl.encode())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether only the owner, group and other entries are left (the kernel then drops the
    /// attribute and keeps the mode).
    fn is_minimal(acl: &Acl) -> bool {
        acl.entries.iter().all(|e| matches!(e.tag, Tag::UserObj | Tag::GroupObj | Tag::Other))
    }

    /// `u:1234:rw` added to a 0644 file as `setfacl -m` does it, the bytes the kernel accepted
    /// and gave back on this machine's ext4.
    const SETFACL_RW_1234: &str =
        "0200000001000600ffffffff02000600d204000004000400ffffffff10000600ffffffff20000400ffffffff";

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn encodes_what_setfacl_writes() {
        let mut acl = Acl::from_mode(0o644);
        acl.set_user(1234, R | W);
        assert_eq!(hex(&acl.encode()), SETFACL_RW_1234);
    }

    #[test]
    fn decode_round_trips_and_orders() {
        let mut acl = Acl::from_mode(0o640);
        acl.set_user(2000, R);
        acl.set_user(1000, R | W);
        let tags: Vec<_> = acl.entries.iter().map(|e| (e.tag, e.id)).collect();
        assert_eq!(
            tags,
            [
                (Tag::UserObj, None),
                (Tag::User, Some(1000)),
                (Tag::User, Some(2000)),
                (Tag::GroupObj, None),
                (Tag::Mask, None),
                (Tag::Other, None)
            ]
        );
        assert_eq!(Acl::decode(&acl.encode()).unwrap(), acl);
        // The mask is the union of the group class: rw (1000) | r (2000) | r (group).
        assert_eq!(acl.entries[4].perm, R | W);
    }

    #[test]
    fn removing_the_last_named_entry_drops_the_mask() {
        let mut acl = Acl::from_mode(0o600);
        acl.set_user(7, R | W);
        assert!(!is_minimal(&acl));
        assert!(acl.remove_user(7));
        assert!(!acl.remove_user(7), "gone already");
        assert!(is_minimal(&acl));
        assert_eq!(acl, Acl::from_mode(0o600));
    }

    #[test]
    fn set_user_replaces_an_entry() {
        let mut acl = Acl::from_mode(0o700);
        acl.set_user(9, R | W | X);
        acl.set_user(9, X);
        assert_eq!(acl.user(9), Some(X));
        assert_eq!(acl.entries.len(), 5);
    }

    #[test]
    fn malformed_bytes_are_refused() {
        assert_eq!(Acl::decode(&[2, 0, 0]), Err(AclError::Malformed));
        assert_eq!(Acl::decode(&[1, 0, 0, 0]), Err(AclError::Malformed), "version 1");
        assert_eq!(Acl::decode(&[2, 0, 0, 0, 1, 0]), Err(AclError::Malformed), "a partial entry");
        let bad_tag = [2, 0, 0, 0, 0x40, 0, 6, 0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(Acl::decode(&bad_tag), Err(AclError::Malformed));
    }

    #[test]
    fn the_default_acl_grants_only_the_owner_and_the_named_users() {
        let acl = default_for(&[(1000, R | W)]);
        assert_eq!(acl.user(1000), Some(R | W));
        let perms: Vec<_> = acl.entries.iter().map(|e| (e.tag, e.perm)).collect();
        assert_eq!(
            perms,
            [(Tag::UserObj, 7), (Tag::User, 6), (Tag::GroupObj, 0), (Tag::Mask, 6), (Tag::Other, 0)]
        );
    }
}
