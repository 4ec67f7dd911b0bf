//! How a VM's VMM is launched: directly by bangerd, as the user, or by banger-helper through
//! Firecracker's jailer, as a uid of the VM's own, in a chroot, with cgroup limits from the VM's
//! shape ([`LaunchMode`]).
//!
//! The mode is decided at a VM's first start ([`choose`]) and recorded in its row; later starts
//! keep it. What decides: the helper's policy first (a helper that allows no direct mode,
//! `Capabilities::direct` false, makes every start a jailed one, a direct VM included), then the
//! VM's recorded mode, then the `launch` setting. A jailed start on a helper that cannot jail
//! (`Capabilities::jailer` false) is refused, naming the setting and what the admin must do.

use banger_protocol::{Capabilities, JailFiles, MAX_VCPUS, MIN_MEM_MIB, VmShape};

use crate::config::Origin;
use crate::model::LaunchMode;

/// Why a VM cannot be launched in the mode it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// The user asked for the jailer; the helper cannot launch through it.
    #[error(
        "launch = \"jailer\" (from {origin}) but banger-helper cannot launch vms through the jailer here: the admin must give the helper's policy a [jailer] section (the jailer and firecracker binaries, a chroot base, a uid range) and restart banger-helper, or set launch = \"direct\" in config.toml"
    )]
    JailerUnavailable {
        /// Where the setting came from.
        origin: Origin,
    },
    /// The VM was launched through the jailer before; the helper cannot any more.
    #[error(
        "this vm runs in jailer mode (fixed at its first start) but banger-helper cannot launch vms through the jailer here any more: the admin must restore the [jailer] section of the helper's policy and restart banger-helper"
    )]
    JailedVmUnavailable,
    /// The helper's policy forces the jailer, yet the helper cannot launch through it.
    #[error(
        "banger-helper's policy forces jailer mode but the helper cannot launch vms through the jailer: the admin must fix the [jailer] section of the helper's policy and restart banger-helper"
    )]
    ForcedUnavailable,
    /// `vm logs --vmm` of a jailed VM, whose VMM keeps no log the user can read.
    #[error(
        "vm {vm} runs through the jailer, whose firecracker keeps no log of its own (it can write nothing of yours): `banger vm logs {vm}` shows its console"
    )]
    NoVmmLog {
        /// The VM's name.
        vm: String,
    },
    /// The VM's shape is outside what a jail can be given.
    #[error(
        "a jailed vm needs 1 to {MAX_VCPUS} vcpus and at least {MIN_MEM_MIB} MiB of memory (this one has {vcpus} vcpus, {mem_mib} MiB): recreate it with `banger vm create --vcpus N --memory M`"
    )]
    Shape {
        /// Its vCPUs.
        vcpus: u32,
        /// Its memory in MiB.
        mem_mib: u32,
    },
}

/// The mode a start launches in: see the module docs. `setting` and `origin` are the `launch`
/// setting, `recorded` the VM's mode from an earlier start, `caps` what the helper offers.
pub fn choose(
    setting: LaunchMode,
    origin: &Origin,
    recorded: Option<LaunchMode>,
    caps: &Capabilities,
) -> Result<LaunchMode, LaunchError> {
    if !caps.direct {
        return if caps.jailer { Ok(LaunchMode::Jailer) } else { Err(LaunchError::ForcedUnavailable) };
    }
    match (recorded, setting) {
        (Some(LaunchMode::Direct), _) | (None, LaunchMode::Direct) => Ok(LaunchMode::Direct),
        _ if caps.jailer => Ok(LaunchMode::Jailer),
        (Some(LaunchMode::Jailer), _) => Err(LaunchError::JailedVmUnavailable),
        (None, LaunchMode::Jailer) => Err(LaunchError::JailerUnavailable { origin: origin.clone() }),
    }
}

/// The shape a jail is launched with: the VM's vCPUs and memory, checked against the
/// protocol's bounds.
pub fn shape(vcpus: u32, mem_mib: u32) -> Result<VmShape, LaunchError> {
    match u8::try_from(vcpus) {
        Ok(v) if (1..=MAX_VCPUS).contains(&v) && mem_mib >= MIN_MEM_MIB => Ok(VmShape { vcpus: v, mem_mib }),
        _ => Err(LaunchError::Shape { vcpus, mem_mib }),
    }
}

/// Which descriptors a jailed launch carries: kernel, [`initrd`], root drive, [`work`].
pub fn files(initrd: bool, work: bool) -> JailFiles {
    JailFiles { initrd, work }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn caps(jailer: bool, direct: bool) -> Capabilities {
        Capabilities { jailer, direct, ..Capabilities::default() }
    }

    #[test]
    fn the_setting_decides_a_first_start_and_the_recorded_mode_a_later_one() {
        let o = Origin::Default;
        use LaunchMode::{Direct, Jailer};
        assert_eq!(choose(Direct, &o, None, &caps(true, true)), Ok(Direct));
        assert_eq!(choose(Jailer, &o, None, &caps(true, true)), Ok(Jailer));
        assert_eq!(choose(Jailer, &o, Some(Direct), &caps(true, true)), Ok(Direct), "kept");
        assert_eq!(choose(Direct, &o, Some(Jailer), &caps(true, true)), Ok(Jailer), "kept");
        assert_eq!(choose(Direct, &o, None, &caps(false, true)), Ok(Direct));
        assert_eq!(choose(Direct, &o, Some(Direct), &caps(false, true)), Ok(Direct));
    }

    #[test]
    fn a_forcing_policy_jails_every_vm() {
        let o = Origin::Default;
        for recorded in [None, Some(LaunchMode::Direct), Some(LaunchMode::Jailer)] {
            for setting in LaunchMode::ALL {
                assert_eq!(choose(setting, &o, recorded, &caps(true, false)), Ok(LaunchMode::Jailer));
                assert_eq!(
                    choose(setting, &o, recorded, &caps(false, false)),
                    Err(LaunchError::ForcedUnavailable)
                );
            }
        }
    }

    #[test]
    fn a_helper_that_cannot_jail_is_named_with_the_setting_and_the_admins_fix() {
        let o = Origin::File(PathBuf::from("/home/u/.config/banger/config.toml"));
        let e = choose(LaunchMode::Jailer, &o, None, &caps(false, true)).unwrap_err();
        assert_eq!(e, LaunchError::JailerUnavailable { origin: o.clone() });
        let text = e.to_string();
        for part in
            ["launch = \"jailer\"", "config.toml", "[jailer]", "restart banger-helper", "launch = \"direct\""]
        {
            assert!(text.contains(part), "{part}: {text}");
        }
        let e = choose(LaunchMode::Direct, &o, Some(LaunchMode::Jailer), &caps(false, true)).unwrap_err();
        assert_eq!(e, LaunchError::JailedVmUnavailable);
        assert!(e.to_string().contains("[jailer]"), "{e}");
    }

    #[test]
    fn shapes_outside_the_protocols_bounds_are_refused() {
        assert_eq!(shape(2, 512), Ok(VmShape { vcpus: 2, mem_mib: 512 }));
        assert_eq!(shape(32, 128), Ok(VmShape { vcpus: 32, mem_mib: 128 }));
        for (v, m) in [(0, 512), (33, 512), (300, 512), (1, 127)] {
            let e = shape(v, m).unwrap_err();
            assert!(e.to_string().contains("banger vm create"), "{e}");
        }
        assert_eq!(files(true, false).count(), 3);
        let e = LaunchError::NoVmmLog { vm: "dev".into() };
        assert!(e.to_string().contains("`banger vm logs dev`"), "{e}");
    }
}
