//! The launcher's own confinement. Everything it sets is inherited by the jailer it runs and by
//! the Firecracker the jailer execs, so each part allows what a launch needs down that whole
//! chain, and the jail's own confinement (its uid, chroot, namespaces, cgroups, and Firecracker's
//! seccomp filters) does the rest.
//!
//! - It dies with the helper: `PR_SET_PDEATHSIG` (`SIGKILL`), checked against the helper's PID
//!   right after the fork, and it ends when the socketpair closes.
//! - No new privileges: the jailer runs as root and drops to the jail's uid with `setuid`, which
//!   gains nothing, and Firecracker installs its seccomp filters with the same flag; so no
//!   program the launcher runs (nor anything they exec) gains privileges through a set-uid bit or
//!   file capabilities.
//! - Capabilities ([`KEPT`], bounding set included, so the jailer started as root gets no more):
//!   those the jailer needs (`CAP_SYS_ADMIN` to unshare its mount namespace, bind-mount and
//!   `pivot_root` into the jail, join `--netns` and make the new PID namespace; `CAP_MKNOD` for
//!   the jail's `/dev` nodes; `CAP_CHOWN`, `CAP_FOWNER` and `CAP_DAC_OVERRIDE` to give the jail's
//!   files to the jail uid and keep working in the 0700 directories it already gave away;
//!   `CAP_SETUID` and `CAP_SETGID` to become the jail uid) and those the jail functions need
//!   around it (`CAP_DAC_READ_SEARCH` for `linkat` of a received descriptor, `CAP_FOWNER` for
//!   the ACL on a caller's drive, `CAP_NET_ADMIN` for handing the TAP to the jail uid, `CAP_KILL`
//!   to signal a VMM that runs as a jail uid). Not kept, among others: `CAP_SYS_MODULE`,
//!   `CAP_SYS_RAWIO`, `CAP_SYS_PTRACE`, `CAP_SYS_BOOT`, `CAP_SYS_TIME`, `CAP_SYS_CHROOT` (the
//!   jailer uses `pivot_root`), `CAP_SYS_RESOURCE` (the jailer only lowers its open-file limit to
//!   2048, below the hard limit it inherits), `CAP_SETPCAP`, `CAP_NET_RAW`, `CAP_BPF`.
//! - Landlock, for the network and abstract unix sockets only: no TCP bind or connect, no
//!   connecting to an abstract unix socket made outside the sandbox (Firecracker uses neither;
//!   its API and vsock are path sockets, MMDS is emulated on the TAP). A process whose domain
//!   handles any filesystem right may not `mount` or `pivot_root` at all, and the jailer does
//!   both to enter its jail, so no filesystem right is handled; the launcher's reach into the
//!   filesystem is bounded by its capabilities and by the orders it accepts, and each jail's by
//!   its uid, chroot and Firecracker's own filters. Signals are not scoped either: a launcher
//!   started by a restarted helper must still kill VMMs its predecessor started.
//! - Seccomp: a denylist, not an allowlist. The filter is inherited by the jailer and Firecracker,
//!   whose system calls (mount, pivot_root, setns, the KVM and virtio paths) are not the
//!   launcher's to enumerate, and Firecracker installs its own allowlist before it runs a guest.
//!   Denied ([`denied`], with `EPERM`): what no launch uses and a root process with the kept
//!   capabilities could misuse — module loading, kexec, bpf, ptrace and `process_vm_*`,
//!   `open_by_handle_at` (with `CAP_DAC_READ_SEARCH` it opens any inode by handle), the new mount
//!   API, keyrings, perf, swap, reboot, the clock, quotas, acct, `iopl`/`ioperm`; and user
//!   namespaces (`clone` or `unshare` with `CLONE_NEWUSER`; `clone3`, whose flags a filter cannot
//!   read, fails with `ENOSYS`, so glibc falls back to `clone`).

use std::collections::BTreeMap;

use caps::{Capability, CapsHashSet};
use landlock::{AccessNet, CompatLevel, Compatible, RulesetAttr, Scope};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// Why the launcher could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The parent-death signal could not be set.
    #[error("cannot set the parent-death signal")]
    DeathSignal(#[source] nix::errno::Errno),
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] nix::errno::Errno),
    /// Capabilities could not be dropped.
    #[error("cannot drop capabilities")]
    Caps(#[source] caps::errors::CapsError),
    /// Landlock failed (not merely unsupported).
    #[error("cannot apply the landlock ruleset")]
    Landlock(#[source] landlock::RulesetError),
    /// Seccomp failed.
    #[error("cannot install the seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
}

/// The capabilities the launcher keeps, in every set including the bounding set.
pub const KEPT: [Capability; 10] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_MKNOD,
];

/// The capability bits of [`KEPT`], as `/proc/<pid>/status` shows them.
pub fn kept_bits() -> u64 {
    KEPT.iter().fold(0, |b, c| b | (1 << c.index()))
}

/// How far the confinement went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confined {
    /// Landlock's status.
    pub landlock: &'static str,
    /// How many system calls the seccomp filter denies.
    pub denied: usize,
}

/// Dies with the process `helper` (which forked this one): `SIGKILL` when it exits, and at once
/// when it already has.
pub fn die_with(helper: nix::unistd::Pid) -> Result<(), ConfineError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(ConfineError::DeathSignal)?;
    if nix::unistd::getppid() != helper {
        // SAFETY: leaving the forked launcher without running anything of the helper's.
        unsafe { libc::_exit(0) }
    }
    Ok(())
}

/// Confines the calling process (single-threaded): no new privileges, capabilities, landlock,
/// seccomp, in that order.
pub fn confine() -> Result<Confined, ConfineError> {
    nix::sys::prctl::set_no_new_privs().map_err(ConfineError::NoNewPrivs)?;
    let keep: CapsHashSet = KEPT.into_iter().collect();
    crate::hardening::caps::drop_to(&keep, &keep).map_err(ConfineError::Caps)?;
    let landlock = restrict().map_err(ConfineError::Landlock)?;
    let denied = install_filters().map_err(ConfineError::Seccomp)?;
    Ok(Confined { landlock, denied })
}

fn restrict() -> Result<&'static str, landlock::RulesetError> {
    let status = landlock::Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?
        .scope(Scope::AbstractUnixSocket)?
        .create()?
        .restrict_self()?;
    Ok(crate::hardening::landlock::describe(status.ruleset))
}

/// The system calls no launch uses, denied outright.
pub fn denied() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_bpf,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_perf_event_open,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_quotactl,
        libc::SYS_acct,
        libc::SYS_syslog,
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
        libc::SYS_fanotify_init,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_iopl, libc::SYS_ioperm]);
    v
}

/// The denylist, with `clone` and `unshare` refused when they ask for a user namespace.
pub fn program() -> Result<(BpfProgram, usize), seccompiler::Error> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = denied().into_iter().map(|nr| (nr, vec![])).collect();
    let count = rules.len();
    let newuser = libc::CLONE_NEWUSER as u64;
    for nr in [libc::SYS_clone, libc::SYS_unshare] {
        let cond =
            SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(newuser), newuser)?;
        rules.insert(nr, vec![SeccompRule::new(vec![cond])?]);
    }
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)?;
    Ok((filter.try_into()?, count))
}

fn install_filters() -> Result<usize, seccompiler::Error> {
    let (prog, count) = program()?;
    let clone3 = crate::hardening::seccomp::clone3_program()?;
    seccompiler::apply_filter(&clone3)?;
    seccompiler::apply_filter(&prog)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use nix::errno::Errno;
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};

    use super::*;

    #[test]
    fn the_kept_capabilities_are_the_jailers_and_the_jails() {
        assert_eq!(kept_bits(), 0x0820_10ef);
        for never in [
            Capability::CAP_SYS_MODULE,
            Capability::CAP_SYS_RAWIO,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_SETPCAP,
            Capability::CAP_SYS_CHROOT,
            Capability::CAP_NET_RAW,
            Capability::CAP_BPF,
        ] {
            assert!(!KEPT.contains(&never), "{never}");
        }
    }

    #[test]
    fn the_denylist_keeps_what_the_jailer_needs() {
        let denied = denied();
        for needed in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_clone,
            libc::SYS_mknodat,
            libc::SYS_setuid,
            libc::SYS_setgid,
            libc::SYS_setgroups,
            libc::SYS_execve,
            libc::SYS_setrlimit,
            libc::SYS_ioctl,
        ] {
            assert!(!denied.contains(&needed), "{needed} is denied");
        }
        assert!(program().unwrap().1 > 30);
    }

    /// In a forked child, as root: once confined, no TCP and no abstract unix socket made
    /// outside, no user namespace; hard links across directories (a jail's drive), char and
    /// block nodes and mount namespaces (the jailer's) still work; the capability sets are
    /// exactly [`KEPT`].
    #[test]
    #[ignore = "needs root: confines a forked child"]
    fn confined_the_launcher_keeps_what_a_launch_needs_only() {
        if !nix::unistd::geteuid().is_root() {
            if std::env::var_os("CI").is_some_and(|v| v == "true") {
                panic!("confined_the_launcher_keeps_what_a_launch_needs_only needs root under CI=true");
            }
            eprintln!("SKIPPED: confining needs root");
            return;
        }
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
        let dir = tempfile::tempdir().unwrap();
        let (jail, outside) = (dir.path().join("base/j"), dir.path().join("outside"));
        std::fs::create_dir_all(&jail).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("drive"), b"x").unwrap();
        crate::hardening::testing::in_forked_child(|| {
            // A network namespace of the child's own: nothing here touches the machine's. The
            // abstract socket is made before the sandbox, so it is outside it.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|_| 8)?;
            let abstract_addr = SocketAddr::from_abstract_name(b"banger-launcher-test").map_err(|_| 9)?;
            let _listener = UnixListener::bind_addr(&abstract_addr).map_err(|_| 9)?;
            let c = confine().map_err(|_| 10)?;
            if c.landlock != "fully enforced" {
                return Err(11);
            }
            let rw = Mode::from_bits_truncate(0o600);
            mknod(&jail.join("blk"), SFlag::S_IFBLK, rw, makedev(7, 200)).map_err(|_| 12)?;
            mknod(&jail.join("chr"), SFlag::S_IFCHR, rw, makedev(1, 9)).map_err(|_| 13)?;
            std::fs::hard_link(outside.join("drive"), jail.join("drive")).map_err(|_| 14)?;
            let tcp = std::net::TcpStream::connect(("127.0.0.1", 9)).map_err(|e| e.raw_os_error());
            if tcp.err() != Some(Some(libc::EACCES)) {
                return Err(15);
            }
            let unix = UnixStream::connect_addr(&abstract_addr).err().and_then(|e| e.raw_os_error());
            if unix != Some(libc::EPERM) {
                return Err(16);
            }
            // SAFETY: plain syscalls on this single-threaded child.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != -1 || Errno::last() != Errno::EPERM {
                return Err(17);
            }
            // SAFETY: as above; the child's own mount namespace goes with it.
            if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
                return Err(18);
            }
            let status = std::fs::read_to_string("/proc/self/status").map_err(|_| 19)?;
            let field = |k: &str| {
                status.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or("").to_owned()
            };
            let want = format!("{:016x}", kept_bits());
            for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
                if field(set) != want {
                    return Err(20);
                }
            }
            if field("CapAmb:") != "0000000000000000"
                || field("NoNewPrivs:") != "1"
                || field("Seccomp:") != "2"
            {
                return Err(21);
            }
            Ok(())
        });
    }

    /// In a forked child, as root: the jailer's steps after the launcher confined itself —
    /// a private mount namespace, the jail bind-mounted on itself, `pivot_root` into it — then
    /// what the jailer and Firecracker do inside: directories, char nodes, a unix socket, the
    /// pid file.
    #[test]
    #[ignore = "needs root: confines a forked child, then mounts and pivots in its own mount namespace"]
    fn a_pivoted_jail_still_works_under_the_launchers_rules() {
        if !nix::unistd::geteuid().is_root() {
            if std::env::var_os("CI").is_some_and(|v| v == "true") {
                panic!("a_pivoted_jail_still_works_under_the_launchers_rules needs root under CI=true");
            }
            eprintln!("SKIPPED: confining needs root");
            return;
        }
        use nix::mount::{MntFlags, MsFlags, mount, umount2};
        let dir = tempfile::tempdir().unwrap();
        let jail = dir.path().join("base/firecracker/j/root");
        std::fs::create_dir_all(&jail).unwrap();
        crate::hardening::testing::in_forked_child(|| {
            confine().map_err(|_| 10)?;
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|_| 11)?;
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_SLAVE | MsFlags::MS_REC, None::<&str>)
                .map_err(|_| 12)?;
            mount(Some(&jail), &jail, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .map_err(|_| 13)?;
            std::env::set_current_dir(&jail).map_err(|_| 14)?;
            std::fs::create_dir("old_root").map_err(|_| 15)?;
            nix::unistd::pivot_root(".", "old_root").map_err(|_| 16)?;
            std::env::set_current_dir("/").map_err(|_| 17)?;
            umount2("old_root", MntFlags::MNT_DETACH).map_err(|_| 18)?;
            std::fs::remove_dir("old_root").map_err(|_| 19)?;
            std::fs::create_dir_all("/dev/net").map_err(|_| 20)?;
            let rw = Mode::from_bits_truncate(0o600);
            mknod("/dev/net/tun", SFlag::S_IFCHR, rw, makedev(10, 200)).map_err(|_| 21)?;
            std::os::unix::net::UnixListener::bind("/api.socket").map_err(|_| 22)?;
            std::fs::write("/firecracker.pid", b"1").map_err(|_| 23)?;
            Ok(())
        });
    }
}
