//! Capabilities: everything is dropped (bounding, inheritable and ambient sets included) except
//! what the operations need, and the programs the helper runs (the iptables tools) can gain only
//! what they need themselves:
//!
//! - `CAP_NET_ADMIN`: creating TAPs (TUNSETIFF, TUNSETOWNER, TUNSETPERSIST), rtnetlink changes
//!   (addresses, neighbours, a guest's route, link up, delete), the firewall (iptables-restore), network sysctls;
//! - `CAP_NET_RAW`: the iptables tools on the legacy backend talk to the kernel through a raw
//!   socket;
//! - `CAP_CHOWN`: giving a new loop device node to root, and a dm node to its user and back;
//! - only where device-mapper was found at start (before anything was dropped):
//!   `CAP_SYS_ADMIN`, which every device-mapper ioctl needs, and `CAP_MKNOD`, for the block
//!   device node of each dm-snapshot target.
//!
//! The bounding set keeps [`TOOLS`] alone: a program the helper runs as root gains at most its
//! bounding set, so the iptables tools never hold `CAP_CHOWN`, `CAP_SYS_ADMIN` or `CAP_MKNOD`;
//! the helper keeps them in its own permitted and effective sets, which dropping from the
//! bounding set does not touch.
//!
//! Nothing else is needed because everything else the helper touches is root's own: device nodes
//! it opens are root-owned 0600 when it opens them (it never opens a node while a user owns it),
//! `/proc/sys` files, the state directory and the audit log are root's.

use caps::{CapSet, Capability, CapsHashSet};

/// What the programs the helper runs may gain: the bounding set.
pub const TOOLS: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW];

/// The capabilities the helper always keeps.
pub const KEPT: [Capability; 3] = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW, Capability::CAP_CHOWN];

/// The capabilities the helper keeps besides [`KEPT`] where it found device-mapper.
pub const DEVICE_MAPPER: [Capability; 2] = [Capability::CAP_SYS_ADMIN, Capability::CAP_MKNOD];

/// Every capability the helper keeps, with or without device-mapper.
pub fn kept(device_mapper: bool) -> CapsHashSet {
    let extra: &[Capability] = if device_mapper { &DEVICE_MAPPER } else { &[] };
    KEPT.iter().chain(extra).copied().collect()
}

/// Drops every capability the helper does not keep ([`kept`]) from every set, and every one but
/// [`TOOLS`] from the bounding set; returns the names kept.
pub fn drop_unneeded(device_mapper: bool) -> Result<Vec<String>, caps::errors::CapsError> {
    let keep = drop_to(&TOOLS.into_iter().collect(), &kept(device_mapper))?;
    let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
    names.sort();
    Ok(names)
}

/// Drops from the bounding set every capability not in `bounding`, clears the ambient and
/// inheritable sets, and leaves in the effective and permitted sets only what of `keep` this
/// process has; returns that.
pub fn drop_to(bounding: &CapsHashSet, keep: &CapsHashSet) -> Result<CapsHashSet, caps::errors::CapsError> {
    for cap in caps::all() {
        if !bounding.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap)? {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let have = caps::read(None, CapSet::Permitted)?;
    let keep: CapsHashSet = keep.intersection(&have).copied().collect();
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_mapper_adds_exactly_what_its_ioctls_and_nodes_need() {
        assert_eq!(kept(false), KEPT.into_iter().collect());
        let with: CapsHashSet = kept(true);
        assert_eq!(with.len(), 5);
        assert!(with.contains(&Capability::CAP_SYS_ADMIN) && with.contains(&Capability::CAP_MKNOD));
        assert!(TOOLS.iter().all(|c| KEPT.contains(c)), "the tools get a part of what the helper keeps");
        for never in [Capability::CAP_DAC_OVERRIDE, Capability::CAP_FOWNER, Capability::CAP_SYS_MODULE] {
            assert!(!with.contains(&never));
        }
    }

    /// In a forked child (as root): what the helper keeps, and what a program it runs gets.
    #[test]
    fn a_program_the_helper_runs_gets_the_tools_capabilities_only() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: dropping capabilities needs root");
            return;
        }
        crate::hardening::testing::in_forked_child(|| {
            let names = drop_unneeded(true).map_err(|_| 10)?;
            if names.len() != 5 {
                return Err(11);
            }
            let out = std::process::Command::new("grep")
                .args(["^CapEff", "/proc/self/status"])
                .output()
                .map_err(|_| 12)?;
            let line = String::from_utf8_lossy(&out.stdout);
            let bits = u64::from_str_radix(line.split_whitespace().nth(1).ok_or(13)?, 16).map_err(|_| 14)?;
            let expected = TOOLS.iter().fold(0u64, |b, c| b | (1 << c.index()));
            if bits != expected {
                return Err(15);
            }
            Ok(())
        });
    }
}
