//! Capabilities: everything is dropped (bounding, inheritable and ambient sets included, so the
//! tools the helper runs cannot regain more) except what the operations need:
//!
//! - `CAP_NET_ADMIN`: creating TAPs (TUNSETIFF, TUNSETOWNER, TUNSETPERSIST), rtnetlink changes
//!   (addresses, link up, delete), the firewall (iptables-restore), network sysctls;
//! - `CAP_NET_RAW`: the iptables tools on the legacy backend talk to the kernel through a raw
//!   socket;
//! - `CAP_CHOWN`: handing a loop device node to its user and taking it back.
//!
//! Nothing else is needed because everything else the helper touches is root's own: device nodes
//! it opens are root-owned 0600 when it opens them (it never opens a node while a user owns it),
//! `/proc/sys` files, the state directory and the audit log are root's.

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities the helper keeps.
pub const KEPT: [Capability; 3] = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW, Capability::CAP_CHOWN];

/// Drops every capability not in [`KEPT`] from every set; returns the names kept.
pub fn drop_unneeded() -> Result<Vec<String>, caps::errors::CapsError> {
    let keep: CapsHashSet = KEPT.into_iter().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap)? {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let have = caps::read(None, CapSet::Permitted)?;
    let keep: CapsHashSet = keep.intersection(&have).copied().collect();
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
    names.sort();
    Ok(names)
}
