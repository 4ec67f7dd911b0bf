//! Landlock: what the helper (and the tools it runs) may still reach in the filesystem.
//!
//! | path | access | who needs it |
//! | --- | --- | --- |
//! | `/usr`, `/lib*`, `/bin`, `/sbin` | read, execute | the iptables tools and their libraries |
//! | `/etc` | read | account names (NSS), `ld.so.cache`, the iptables tools' tables |
//! | `/proc`, `/sys` | read | the runtime and libc; `/proc/self/fd` for a two-step loop attach |
//! | `/proc/sys/net` | read, write | `ip_forward` (NAT), per-TAP `disable_ipv6`: the only sysctls |
//! | `/dev` | read, write, device ioctls | `/dev/net/tun`, `/dev/loop-control`, `/dev/loopN`, `/dev/null` |
//! | the dm node directory (with device-mapper only) | making block device nodes, removing files | dm-snapshot nodes |
//! | the state directory | everything | the ledger's temporary file and rename |
//! | `/run/xtables.lock` (legacy iptables only) | read, write | the legacy tools' lock |
//!
//! The socket, the policy, the audit log, the state lock, `/dev/mapper/control` and the node
//! directory are opened before, and stay open.
//! TCP bind and connect are denied outright (the helper has no use for TCP), and on kernels that
//! support scoping, signals and abstract unix sockets outside the sandbox are too. The ruleset is
//! best effort: on a kernel without landlock the helper runs unconfined by it and says so.

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, path_beneath_rules,
};

use super::{HardeningError, Sandbox};

/// The newest landlock ABI the rules are written for.
const ABI_TARGET: ABI = ABI::V6;

/// The helper reads the account databases (`/etc/passwd`, `/etc/group`) for every new peer and
/// its tools read a few more files of `/etc`. The rule is on the directory, not on those files:
/// landlock ties a rule to an inode, and `useradd`, `groupadd` or `usermod` replace the databases
/// with new files, so a rule on the files would lock everyone who is allowed by a group out after
/// the first account change.
const ETC: &str = "/etc";
/// Applies the ruleset to this thread and every thread and child created after. Returns how far
/// it is enforced on this kernel.
pub fn restrict(sandbox: &Sandbox) -> Result<String, HardeningError> {
    let abi = ABI_TARGET;
    let read = AccessFs::from_read(abi);
    let read_exec = read | AccessFs::Execute;
    let read_write = read | AccessFs::WriteFile;
    let dev = read | AccessFs::WriteFile | AccessFs::IoctlDev;
    let err = HardeningError::Landlock;
    let mut ruleset = landlock::Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"], read_exec))
        .map_err(err)?
        .add_rules(path_beneath_rules([ETC], read))
        .map_err(err)?
        .add_rules(path_beneath_rules(["/proc", "/sys"], read))
        .map_err(err)?
        .add_rules(path_beneath_rules(["/proc/sys/net"], read_write))
        .map_err(err)?
        .add_rules(path_beneath_rules(["/dev"], dev))
        .map_err(err)?
        .add_rules(path_beneath_rules([&sandbox.state_dir], AccessFs::from_all(abi)))
        .map_err(err)?;
    if let Some(lock) = &sandbox.xtables_lock {
        ruleset = ruleset.add_rules(path_beneath_rules([lock], read_write)).map_err(err)?;
    }
    if let Some(nodes) = &sandbox.node_dir {
        let make = dev | AccessFs::MakeBlock | AccessFs::RemoveFile;
        ruleset = ruleset.add_rules(path_beneath_rules([nodes], make)).map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    Ok(describe(status.ruleset).to_owned())
}

/// What a landlock ruleset's status means, for the log.
pub fn describe(status: RulesetStatus) -> &'static str {
    match status {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced (older kernel)",
        RulesetStatus::NotEnforced => "not enforced (kernel without landlock)",
    }
}
