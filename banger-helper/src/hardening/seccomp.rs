//! The seccomp allowlist. It is inherited by the iptables tools the helper runs, so it allows
//! what they need too; each group below says who needs it. Anything else fails with `EPERM`
//! (rather than killing the helper), so a missed system call shows up as an operation error in
//! the audit log instead of an outage.
//!
//! Not allowed, among others: ptrace, mount and namespaces (mount, umount2, pivot_root, chroot,
//! setns, unshare, and `clone` with any `CLONE_NEW*` flag), module loading, kexec, bpf,
//! perf_event_open, keyrings, userfaultfd, process_vm_*, open_by_handle_at, io_uring, changing uids
//! or gids, reboot, swapon, quotactl, sethostname: most of what `CAP_SYS_ADMIN`, which the helper
//! keeps where it found device-mapper, would otherwise allow.
//!
//! `mknodat` is allowed only where the helper found device-mapper (it makes the block device
//! node of each dm-snapshot target). The SysV semaphore calls are not allowed, on purpose: with
//! them the `devicemapper` crate would wait for udev to process each target's events, with the
//! operations lock held, on a udev that may not answer; without them it does not wait, and the
//! helper makes its own nodes.
//!
//! `clone` is allowed only without namespace flags. `clone3` takes its flags in a structure in
//! memory, which a filter cannot read, so a second filter makes it fail with `ENOSYS`: glibc (thread
//! creation, `posix_spawn`) then falls back to `clone`, whose flags the first filter checks.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// The namespace flags `clone` may not carry.
pub const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// The allowed system calls, grouped by who needs them.
fn allowed() -> Vec<(i64, &'static str)> {
    let mut v: Vec<(i64, &'static str)> = vec![
        // Memory (everyone).
        (libc::SYS_brk, "malloc"),
        (libc::SYS_mmap, "malloc, loader"),
        (libc::SYS_munmap, "malloc, loader"),
        (libc::SYS_mprotect, "loader, thread stacks"),
        (libc::SYS_mremap, "realloc"),
        (libc::SYS_madvise, "malloc, thread exit"),
        // Threads and synchronisation (tokio runtime, glibc).
        (libc::SYS_clone, "tokio worker threads; posix_spawn of the iptables tools (no namespace flags)"),
        (libc::SYS_clone3, "reaches the second filter, which answers ENOSYS (glibc then uses clone)"),
        (libc::SYS_futex, "locks, thread parking"),
        (libc::SYS_set_robust_list, "glibc thread start"),
        (libc::SYS_get_robust_list, "glibc"),
        (libc::SYS_rseq, "glibc thread start"),
        (libc::SYS_set_tid_address, "glibc start"),
        (libc::SYS_sched_yield, "tokio"),
        (libc::SYS_sched_getaffinity, "tokio, std available_parallelism"),
        (libc::SYS_gettid, "tracing, glibc"),
        (libc::SYS_getpid, "glibc, iptables (netlink port ids)"),
        (libc::SYS_getppid, "glibc"),
        (libc::SYS_exit, "thread exit"),
        (libc::SYS_exit_group, "process exit"),
        (libc::SYS_prctl, "thread names"),
        (libc::SYS_arch_prctl, "loader of the iptables tools"),
        (libc::SYS_getrandom, "hash seeds"),
        (libc::SYS_prlimit64, "glibc, iptables"),
        (libc::SYS_uname, "loader, loop attach (kernel version)"),
        (libc::SYS_capget, "capability checks"),
        (libc::SYS_getuid, "NSS, iptables"),
        (libc::SYS_geteuid, "NSS, iptables"),
        (libc::SYS_getgid, "NSS"),
        (libc::SYS_getegid, "NSS"),
        (libc::SYS_getgroups, "NSS"),
        (libc::SYS_getcwd, "iptables"),
        (libc::SYS_sysinfo, "glibc"),
        // Signals (std, tokio process driver, posix_spawn).
        (libc::SYS_rt_sigaction, "tokio SIGCHLD handling, posix_spawn"),
        (libc::SYS_rt_sigprocmask, "posix_spawn, threads"),
        (libc::SYS_rt_sigreturn, "signal delivery"),
        (libc::SYS_sigaltstack, "std stack overflow handler"),
        (libc::SYS_kill, "kill_on_drop of a stuck iptables tool"),
        (libc::SYS_tgkill, "abort"),
        // Time.
        (libc::SYS_clock_gettime, "timers (when the vDSO is not used)"),
        (libc::SYS_clock_nanosleep, "sleeps"),
        (libc::SYS_nanosleep, "sleeps"),
        (libc::SYS_gettimeofday, "glibc"),
        // Event loop (tokio).
        (libc::SYS_epoll_create1, "tokio"),
        (libc::SYS_epoll_ctl, "tokio"),
        (libc::SYS_epoll_pwait, "tokio"),
        (libc::SYS_epoll_pwait2, "tokio"),
        (libc::SYS_eventfd2, "tokio waker"),
        (libc::SYS_ppoll, "iptables, glibc"),
        (libc::SYS_pselect6, "iptables"),
        // Files.
        (libc::SYS_openat, "ledger, /dev nodes, /proc/sys, libraries"),
        (libc::SYS_openat2, "std"),
        (libc::SYS_close, "everyone"),
        (libc::SYS_close_range, "posix_spawn"),
        (libc::SYS_read, "everyone"),
        (libc::SYS_pread64, "loader"),
        (libc::SYS_readv, "std"),
        (libc::SYS_write, "everyone"),
        (libc::SYS_pwrite64, "std"),
        (libc::SYS_writev, "std, tracing"),
        (libc::SYS_lseek, "std, loader"),
        (libc::SYS_fstat, "everyone"),
        (libc::SYS_newfstatat, "stat of device nodes, loader"),
        (libc::SYS_statx, "std metadata; the loop backing file (cached attributes, mount ID)"),
        (libc::SYS_statfs, "glibc"),
        (libc::SYS_fstatfs, "glibc (fstatvfs)"),
        (libc::SYS_faccessat, "loader, iptables"),
        (libc::SYS_faccessat2, "loader, iptables"),
        (libc::SYS_readlinkat, "std, iptables"),
        (libc::SYS_getdents64, "iptables extension lookup; listing the dm node directory"),
        (libc::SYS_fcntl, "descriptor flags, F_GETFL of the backing file"),
        (libc::SYS_flock, "state directory lock; legacy iptables lock"),
        (libc::SYS_fsync, "ledger"),
        (libc::SYS_fdatasync, "ledger"),
        (libc::SYS_ftruncate, "std"),
        (libc::SYS_renameat, "ledger"),
        (libc::SYS_renameat2, "ledger"),
        (libc::SYS_unlinkat, "ledger temporary file; forwarding record; dm nodes"),
        (libc::SYS_mkdirat, "state directory"),
        (libc::SYS_fchownat, "loop and dm device node owner"),
        (libc::SYS_fchown, "loop and dm device node owner"),
        (libc::SYS_fchmodat, "loop and dm device node mode, node directory mode"),
        (libc::SYS_fchmod, "loop and dm device node mode"),
        (libc::SYS_umask, "start-up"),
        (libc::SYS_ioctl, "tun, loop and device-mapper ioctls; terminal checks"),
        (libc::SYS_pipe2, "posix_spawn, child stdio"),
        (libc::SYS_dup, "std"),
        (libc::SYS_dup3, "posix_spawn"),
        // Processes (the iptables tools).
        (libc::SYS_execve, "running iptables-save and iptables-restore"),
        (libc::SYS_execveat, "posix_spawn"),
        (libc::SYS_wait4, "reaping the iptables tools"),
        (libc::SYS_waitid, "reaping the iptables tools"),
        (libc::SYS_pidfd_open, "tokio child reaping"),
        (libc::SYS_pidfd_send_signal, "tokio kill_on_drop"),
        // Sockets: the helper socket, rtnetlink, nf_tables (netfilter netlink), NSS, the iptables
        // tools (netlink, raw for legacy).
        (libc::SYS_socket, "rtnetlink, nf_tables, NSS, iptables"),
        (libc::SYS_socketpair, "tokio signal pipe"),
        (libc::SYS_bind, "netlink"),
        (libc::SYS_connect, "NSS daemons"),
        (libc::SYS_accept4, "the helper socket"),
        (libc::SYS_listen, "the helper socket"),
        (libc::SYS_getsockname, "netlink"),
        (libc::SYS_getpeername, "std"),
        (libc::SYS_getsockopt, "SO_PEERCRED, SO_PEERGROUPS, legacy iptables"),
        (libc::SYS_setsockopt, "netlink, legacy iptables"),
        (libc::SYS_sendmsg, "frames with descriptors, netlink"),
        (libc::SYS_recvmsg, "frames with descriptors, netlink"),
        (libc::SYS_sendto, "netlink"),
        (libc::SYS_recvfrom, "netlink"),
        (libc::SYS_shutdown, "std"),
        (libc::SYS_restart_syscall, "interrupted sleeps"),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        (libc::SYS_open, "older libraries"),
        (libc::SYS_stat, "older libraries"),
        (libc::SYS_lstat, "older libraries"),
        (libc::SYS_access, "loader"),
        (libc::SYS_readlink, "older libraries"),
        (libc::SYS_poll, "glibc, iptables"),
        (libc::SYS_select, "iptables"),
        (libc::SYS_epoll_wait, "older tokio paths"),
        (libc::SYS_pipe, "older libraries"),
        (libc::SYS_dup2, "posix_spawn"),
        (libc::SYS_vfork, "posix_spawn"),
        (libc::SYS_fork, "fallback spawn"),
        (libc::SYS_rename, "older libraries"),
        (libc::SYS_unlink, "older libraries"),
        (libc::SYS_getdents, "older libraries"),
        (libc::SYS_time, "glibc"),
    ]);
    v
}

/// What only a helper that found device-mapper may call.
fn device_mapper() -> Vec<(i64, &'static str)> {
    vec![(libc::SYS_mknodat, "the block device node of a dm-snapshot target")]
}

/// The compiled allowlist for this architecture (with the device-mapper calls when
/// `device_mapper`), and how many system calls it allows.
pub fn program(device_mapper: bool) -> Result<(BpfProgram, usize), seccompiler::Error> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let dm = if device_mapper { self::device_mapper() } else { Vec::new() };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed().into_iter().chain(dm).map(|(nr, _)| (nr, vec![])).collect();
    let no_namespaces =
        SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(CLONE_NAMESPACES), 0)?;
    rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![no_namespaces])?]);
    let count = rules.len();
    let filter =
        SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, arch)?;
    Ok((filter.try_into()?, count))
}

/// The second filter: `clone3` fails with `ENOSYS`, everything else is left to the allowlist.
pub fn clone3_program() -> Result<BpfProgram, seccompiler::Error> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)?;
    Ok(filter.try_into()?)
}

/// Installs both filters on every thread of the process (TSYNC). Returns how many system calls
/// the allowlist allows.
pub fn install(device_mapper: bool) -> Result<usize, seccompiler::Error> {
    let (prog, count) = program(device_mapper)?;
    let clone3 = clone3_program()?;
    // The clone3 filter first: the allowlist does not allow installing another filter.
    seccompiler::apply_filter_all_threads(&clone3)?;
    seccompiler::apply_filter_all_threads(&prog)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_excludes_the_dangerous_calls() {
        let (prog, count) = program(false).unwrap();
        assert!(!prog.is_empty());
        assert!(count > 50);
        let (_, with_dm) = program(true).unwrap();
        assert_eq!(with_dm, count + 1, "device-mapper adds mknodat alone");
        let allowed: Vec<i64> = allowed().into_iter().map(|(n, _)| n).collect();
        assert!(!allowed.contains(&libc::SYS_mknodat) && !allowed.contains(&libc::SYS_mknod));
        for sysv in [libc::SYS_semget, libc::SYS_semctl, libc::SYS_semop, libc::SYS_semtimedop] {
            assert!(!allowed.contains(&sysv), "udev is never waited for");
        }
        for bad in [
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_swapon,
            libc::SYS_quotactl,
            libc::SYS_sethostname,
            libc::SYS_kexec_load,
            libc::SYS_keyctl,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_bpf,
            libc::SYS_setuid,
            libc::SYS_setresuid,
            libc::SYS_process_vm_writev,
            libc::SYS_open_by_handle_at,
            libc::SYS_io_uring_setup,
        ] {
            assert!(!allowed.contains(&bad), "{bad} is allowed");
        }
    }

    /// In a forked child under both filters: threads and plain child processes still work,
    /// `clone` with a namespace flag is refused, `clone3` answers `ENOSYS`.
    #[test]
    fn no_namespaces_under_the_filter_but_threads_and_children_work() {
        let (prog, _) = program(false).unwrap();
        let clone3 = clone3_program().unwrap();
        crate::hardening::testing::in_forked_child(|| {
            nix::sys::prctl::set_no_new_privs().map_err(|_| 10)?;
            seccompiler::apply_filter(&clone3).map_err(|_| 11)?;
            seccompiler::apply_filter(&prog).map_err(|_| 12)?;
            let clone = |flags: u64| {
                // SAFETY: clone without CLONE_VM and without a new stack behaves like
                // fork; the child leaves at once with _exit.
                let rc = unsafe { libc::syscall(libc::SYS_clone, flags | libc::SIGCHLD as u64, 0, 0, 0, 0) };
                if rc == 0 {
                    // SAFETY: leaving the grandchild.
                    unsafe { libc::_exit(0) }
                }
                if rc > 0 {
                    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(rc as i32), None);
                    Ok(())
                } else {
                    Err(nix::errno::Errno::last())
                }
            };
            for ns in [libc::CLONE_NEWUSER, libc::CLONE_NEWNET, libc::CLONE_NEWNS, libc::CLONE_NEWPID] {
                if clone(ns as u64) != Err(nix::errno::Errno::EPERM) {
                    return Err(20);
                }
            }
            clone(0).map_err(|_| 21)?;
            // SAFETY: clone3 with a null argument; the filter answers before the kernel reads it.
            let rc = unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
            if rc != -1 || nix::errno::Errno::last() != nix::errno::Errno::ENOSYS {
                return Err(22);
            }
            std::thread::spawn(|| 7)
                .join()
                .map_err(|_| 23)
                .and_then(|v| if v == 7 { Ok(()) } else { Err(24) })?;
            Ok(())
        });
    }
}
