//! The kernel-visible names the helper derives: TAP names, the tag carried by every firewall
//! rule, and the name and uuid of each dm-snapshot target (whose node is named like it). (The
//! guest MAC follows from the guest address: [`banger_policy::addr::guest_mac`].)
//!
//! All of them come from one digest of `(uid, install, vm)`, so a name can never be chosen by a
//! client and two owners never share one. The digest input is unambiguous because install and VM
//! ids cannot contain the NUL separator. A TAP name holds 52 bits of it (the kernel allows 15
//! bytes); a dm name holds 128, and a dm uuid all 256, so the uuid recognises a target as the one
//! the helper made for that very key. Neither shows the uid or the ids: both are world-readable
//! (`/sys/block/dm-N/dm/`).

use std::fmt::Write as _;

use banger_protocol::{InstallId, VmId};
use sha2::{Digest, Sha256};

/// The prefix of every TAP the helper creates.
pub const TAP_PREFIX: &str = "bg";

/// How many hex digits of the digest follow [`TAP_PREFIX`]: `bg` + 13 = 15 bytes, the kernel's
/// longest interface name (IFNAMSIZ - 1).
pub const TAP_HASH_DIGITS: usize = 13;

/// The words every firewall rule tag starts with.
pub const TAG_PREFIX: &str = "banger ";

/// The prefix of every dm-snapshot target the helper makes.
pub const DM_PREFIX: &str = "banger-";

/// How many hex digits of the digest follow [`DM_PREFIX`] (128 bits).
pub const DM_HASH_DIGITS: usize = 32;

/// The prefix of every dm uuid the helper gives a target (device-mapper's convention: the
/// subsystem that owns the target, in capitals).
pub const DM_UUID_PREFIX: &str = "BANGER-";

/// The prefix of every jail id (the jailer's `--id`, the name of the jail's directory).
pub const JAIL_PREFIX: &str = "bg-";

/// How many hex digits of the digest follow [`JAIL_PREFIX`] (128 bits): 35 bytes, within the
/// jailer's 1–64 of `[a-zA-Z0-9-]`.
pub const JAIL_HASH_DIGITS: usize = 32;

/// The owner of a VM's objects: who, which install, which VM.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmKey {
    /// The owner's uid.
    pub uid: u32,
    /// The owner's install.
    pub install: InstallId,
    /// The VM.
    pub vm: VmId,
}

impl VmKey {
    /// Bundles the three parts.
    pub fn new(uid: u32, install: &InstallId, vm: &VmId) -> Self {
        VmKey { uid, install: install.clone(), vm: vm.clone() }
    }

    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"banger-v1\0");
        h.update(self.uid.to_string().as_bytes());
        h.update(b"\0");
        h.update(self.install.as_str().as_bytes());
        h.update(b"\0");
        h.update(self.vm.as_str().as_bytes());
        h.finalize().into()
    }

    /// The VM's TAP name: `bg` and 13 hex digits of the digest (15 bytes).
    pub fn tap_name(&self) -> String {
        format!("{TAP_PREFIX}{}", &hex(&self.digest())[..TAP_HASH_DIGITS])
    }

    /// The VM's dm-snapshot target: `banger-` and 32 hex digits of the digest.
    pub fn dm_name(&self) -> String {
        format!("{DM_PREFIX}{}", &hex(&self.digest())[..DM_HASH_DIGITS])
    }

    /// The uuid of the VM's dm-snapshot target: `BANGER-` and the whole digest in hex.
    pub fn dm_uuid(&self) -> String {
        format!("{DM_UUID_PREFIX}{}", hex(&self.digest()))
    }

    /// The VM's jail id: `bg-` and 32 hex digits of the digest (lowercase, so the same id is
    /// valid for the jailer and as a directory name everywhere).
    pub fn jail_id(&self) -> String {
        format!("{JAIL_PREFIX}{}", &hex(&self.digest())[..JAIL_HASH_DIGITS])
    }

    /// The comment every firewall rule of this VM carries: `banger uid=U inst=I vm=V`.
    pub fn rule_tag(&self) -> String {
        format!("{TAG_PREFIX}uid={} inst={} vm={}", self.uid, self.install, self.vm)
    }

    /// Reads a tag written by [`VmKey::rule_tag`]; anything else is `None`.
    pub fn parse_rule_tag(tag: &str) -> Option<VmKey> {
        let rest = tag.strip_prefix(TAG_PREFIX)?;
        let mut parts = rest.split(' ');
        let uid = parts.next()?.strip_prefix("uid=")?.parse().ok()?;
        let install = InstallId::new(parts.next()?.strip_prefix("inst=")?).ok()?;
        let vm = VmId::new(parts.next()?.strip_prefix("vm=")?).ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(VmKey { uid, install, vm })
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `name` has the shape of a dm target the helper would create (`banger-` + 32 lowercase
/// hex).
pub fn is_banger_dm_name(name: &str) -> bool {
    name.strip_prefix(DM_PREFIX).is_some_and(|h| h.len() == DM_HASH_DIGITS && lower_hex(h))
}

/// Whether `name` has the shape of a TAP the helper would create (`bg` + 13 lowercase hex).
pub fn is_banger_tap_name(name: &str) -> bool {
    name.len() == TAP_PREFIX.len() + TAP_HASH_DIGITS
        && name.starts_with(TAP_PREFIX)
        && lower_hex(&name[TAP_PREFIX.len()..])
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Whether `id` has the shape of a jail id the helper derives (`bg-` + 32 lowercase hex).
    fn is_banger_jail_id(id: &str) -> bool {
        id.strip_prefix(JAIL_PREFIX).is_some_and(|h| h.len() == JAIL_HASH_DIGITS && lower_hex(h))
    }

    fn key(uid: u32, install: &str, vm: &str) -> VmKey {
        VmKey::new(uid, &InstallId::new(install).unwrap(), &VmId::new(vm).unwrap())
    }

    #[test]
    fn tap_names_are_fifteen_bytes_and_recognised() {
        let name = key(1000, "home", "dev").tap_name();
        assert_eq!(name.len(), 15, "{name}");
        assert!(is_banger_tap_name(&name), "{name}");
        let uuid = key(1000, "home", "dev").dm_uuid();
        assert_eq!(
            name[TAP_PREFIX.len()..],
            uuid[DM_UUID_PREFIX.len()..][..TAP_HASH_DIGITS],
            "the digest's first digits"
        );
        assert!(!is_banger_tap_name("eth0"));
        assert!(!is_banger_tap_name("bgXXXXXXXXXXXXX"));
        assert!(!is_banger_tap_name("bg0123456789ab"));
    }

    #[test]
    fn dm_names_and_uuids_are_recognised_and_hide_the_key() {
        let k = key(61001, "inst-1", "vm-a");
        let (name, uuid) = (k.dm_name(), k.dm_uuid());
        assert_eq!(name.len(), DM_PREFIX.len() + DM_HASH_DIGITS);
        assert!(is_banger_dm_name(&name), "{name}");
        assert!(uuid.starts_with(DM_UUID_PREFIX) && uuid.len() == DM_UUID_PREFIX.len() + 64, "{uuid}");
        assert!(uuid[DM_UUID_PREFIX.len()..].starts_with(&name[DM_PREFIX.len()..]), "one digest");
        for part in ["61001", "inst-1", "vm-a"] {
            assert!(!name.contains(part) && !uuid.contains(part), "{part} shows in {name} / {uuid}");
        }
        // Within the kernel's limits (127 bytes for names, 128 with the NUL for uuids).
        assert!(name.len() < 128 && uuid.len() < 129);
        for bad in ["banger-probe", "banger-0123", &name.to_uppercase(), &format!("{name}0"), "dm-0"] {
            assert!(!is_banger_dm_name(bad), "{bad}");
        }
    }

    #[test]
    fn jail_ids_fit_the_jailer_and_hide_the_key() {
        let k = key(61001, "inst-1", "vm-a");
        let id = k.jail_id();
        assert!((1..=64).contains(&id.len()), "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'), "{id}");
        assert!(is_banger_jail_id(&id));
        assert_eq!(id[JAIL_PREFIX.len()..], k.dm_name()[DM_PREFIX.len()..], "one digest");
        for part in ["61001", "inst-1", "vm-a"] {
            assert!(!id.contains(part), "{part} shows in {id}");
        }
        assert_ne!(id, key(61002, "inst-1", "vm-a").jail_id());
        for bad in ["bg-", "bg-0123", &id.to_uppercase(), &format!("{id}0"), "firecracker"] {
            assert!(!is_banger_jail_id(bad), "{bad}");
        }
    }

    #[test]
    fn names_are_stable_and_depend_on_every_part() {
        let a = key(1000, "home", "dev");
        assert_eq!(a.tap_name(), key(1000, "home", "dev").tap_name());
        assert_eq!(
            (a.dm_name(), a.dm_uuid()),
            (key(1000, "home", "dev").dm_name(), key(1000, "home", "dev").dm_uuid())
        );
        let others = [key(1001, "home", "dev"), key(1000, "work", "dev"), key(1000, "home", "dev2")];
        for o in &others {
            assert_ne!(a.tap_name(), o.tap_name());
            assert_ne!(a.dm_name(), o.dm_name());
            assert_ne!(a.dm_uuid(), o.dm_uuid());
        }
        // The separator keeps ("1", "23") and ("12", "3") apart.
        assert_ne!(key(1, "a-b", "c").tap_name(), key(1, "a", "b-c").tap_name());
    }

    #[test]
    fn many_vms_never_collide() {
        let names: HashSet<String> =
            (0..5000).map(|i| key(1000, "home", &format!("vm-{i}")).tap_name()).collect();
        assert_eq!(names.len(), 5000);
    }

    #[test]
    fn tags_round_trip_and_refuse_anything_else() {
        let k = key(61001, "inst-1", "vm-a");
        assert_eq!(k.rule_tag(), "banger uid=61001 inst=inst-1 vm=vm-a");
        assert_eq!(VmKey::parse_rule_tag(&k.rule_tag()), Some(k));
        for bad in [
            "banger uid=x inst=a vm=b",
            "banger uid=1 inst=a",
            "banger uid=1 inst=a vm=b extra",
            "other uid=1 inst=a vm=b",
            "banger uid=1 inst=A vm=b",
        ] {
            assert_eq!(VmKey::parse_rule_tag(bad), None, "{bad}");
        }
    }
}
