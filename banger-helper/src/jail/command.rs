//! The jailer's command line, built from the policy and the helper's own decisions alone:
//! `--id --exec-file --uid --gid --chroot-base-dir [--netns] --daemonize --new-pid-ns
//! --cgroup-version N --parent-cgroup P --cgroup FILE=VALUE... -- --api-sock /run/firecracker.socket`.

use std::path::Path;

use banger_protocol::jail_paths;

/// What one jailer run is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerLine<'a> {
    /// `--id`.
    pub id: &'a str,
    /// `--exec-file`: the policy's Firecracker.
    pub exec_file: &'a Path,
    /// `--uid` and `--gid` (the same number).
    pub uid: u32,
    /// `--chroot-base-dir`.
    pub chroot_base: &'a Path,
    /// `--netns`, when the helper runs in a namespace other than the initial one.
    pub netns: Option<&'a str>,
    /// `--cgroup-version`.
    pub cgroup_version: u8,
    /// `--parent-cgroup`: the user's parent group.
    pub parent_cgroup: &'a str,
    /// `--cgroup` values: the VM's limits.
    pub cgroups: Vec<String>,
}

/// The jailer's arguments.
pub fn jailer_args(line: &JailerLine<'_>) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--id".into(),
        line.id.into(),
        "--exec-file".into(),
        line.exec_file.display().to_string(),
        "--uid".into(),
        line.uid.to_string(),
        "--gid".into(),
        line.uid.to_string(),
        "--chroot-base-dir".into(),
        line.chroot_base.display().to_string(),
    ];
    if let Some(ns) = line.netns {
        a.extend(["--netns".into(), ns.into()]);
    }
    a.extend([
        "--daemonize".into(),
        "--new-pid-ns".into(),
        "--cgroup-version".into(),
        line.cgroup_version.to_string(),
        "--parent-cgroup".into(),
        line.parent_cgroup.into(),
    ]);
    for c in &line.cgroups {
        a.extend(["--cgroup".into(), c.clone()]);
    }
    a.extend(["--".into(), "--api-sock".into(), jail_paths::API_SOCKET.into()]);
    a
}

/// The calling thread's network namespace as a path another process can open
/// (`/proc/<pid>/task/<tid>/ns/net`: a thread may have joined a namespace its process's main
/// thread is not in).
pub fn thread_netns() -> String {
    format!("/proc/{}/task/{}/ns/net", std::process::id(), nix::unistd::gettid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_command_line() {
        let line = JailerLine {
            id: "bg-1a2b",
            exec_file: Path::new("/usr/bin/firecracker"),
            uid: 64000,
            chroot_base: Path::new("/srv/jailer"),
            netns: Some("/proc/10/task/11/ns/net"),
            cgroup_version: 1,
            parent_cgroup: "banger/u1000",
            cgroups: vec!["cpu.cfs_quota_us=100000".into(), "memory.limit_in_bytes=1".into()],
        };
        assert_eq!(
            jailer_args(&line).join(" "),
            "--id bg-1a2b --exec-file /usr/bin/firecracker --uid 64000 --gid 64000 \
             --chroot-base-dir /srv/jailer --netns /proc/10/task/11/ns/net --daemonize --new-pid-ns \
             --cgroup-version 1 --parent-cgroup banger/u1000 --cgroup cpu.cfs_quota_us=100000 \
             --cgroup memory.limit_in_bytes=1 -- --api-sock /run/firecracker.socket"
        );
    }

    #[test]
    fn no_netns_in_the_initial_namespace_and_v2_values_stay_one_word() {
        let line = JailerLine {
            id: "x",
            exec_file: Path::new("/fc"),
            uid: 1,
            chroot_base: Path::new("/b"),
            netns: None,
            cgroup_version: 2,
            parent_cgroup: "p/u1",
            cgroups: vec!["cpu.max=100000 100000".into()],
        };
        let args = jailer_args(&line);
        assert!(!args.iter().any(|a| a == "--netns"));
        assert!(args.contains(&"cpu.max=100000 100000".to_string()));
        assert_eq!(args[args.iter().position(|a| a == "--cgroup-version").unwrap() + 1], "2");
    }

    #[test]
    fn the_thread_namespace_path_names_this_thread() {
        let p = thread_netns();
        assert!(std::fs::metadata(&p).is_ok(), "{p}");
        assert_eq!(std::fs::read_link(&p).unwrap(), std::fs::read_link("/proc/thread-self/ns/net").unwrap());
    }
}
