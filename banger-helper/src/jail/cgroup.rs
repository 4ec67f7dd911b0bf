//! The cgroups of jailed VMMs: which hierarchy (v1 `cpu` + `memory`, or the v2 unified one),
//! found in `/proc/mounts` the way Firecracker's jailer 1.16.1 finds it (the first `cgroup`
//! mount whose options name the controller; the first `cgroup2` mount), the per-user parent
//! `<cgroup_parent>/u<uid>` with the user's totals, the values of a VM's own group (passed to the
//! jailer as `--cgroup FILE=VALUE`, which makes `<parent>/u<uid>/<id>` itself), and removing them.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use banger_protocol::VmShape;

use crate::kernel::UserLimits;

/// The CFS period every banger cgroup uses (the kernel's default), in microseconds: a quota of
/// `n × period` is `n` CPUs.
pub const CFS_PERIOD_US: u64 = 100_000;

/// Memory a VMM uses besides its guest's (Firecracker publishes ≤ 5 MiB for 1 vCPU and 128 MiB;
/// the rest is headroom for its buffers), added to each VM's limit so a guest that touches all
/// of its memory is not killed; a user's total adds it once per vCPU (a bound on the number of
/// their VMs, each having at least one).
pub const VMM_OVERHEAD_MIB: u64 = 32;

const MIB: u64 = 1 << 20;

/// How long a cgroup that is still busy (its killed VMM not yet reaped) is retried.
pub const RMDIR_PATIENCE: Duration = Duration::from_secs(5);

/// The hierarchies jails' groups are made in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchies {
    /// cgroup v1: the `cpu` and `memory` controllers' mount points.
    V1 {
        /// Where the `cpu` controller is mounted.
        cpu: PathBuf,
        /// Where the `memory` controller is mounted.
        memory: PathBuf,
    },
    /// cgroup v2: the unified hierarchy's mount point (with `cpu` and `memory` available).
    V2 {
        /// Where cgroup2 is mounted.
        unified: PathBuf,
    },
}

/// Why no hierarchy fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupSetupError {
    /// Version 1 was asked for (or is the only candidate) but a controller is not mounted.
    #[error(
        "cgroup v1 has no {0} controller mounted; mount it or set cgroup = \"v2\" in the policy's [jailer]"
    )]
    V1Missing(&'static str),
    /// Version 2 was asked for but the unified hierarchy lacks a controller.
    #[error(
        "the cgroup v2 hierarchy {} does not offer the {controller} controller; enable it or set cgroup = \"v1\" in the policy's [jailer]",
        unified.display()
    )]
    V2Missing {
        /// The mount point.
        unified: PathBuf,
        /// The missing controller.
        controller: &'static str,
    },
    /// Version 2 was asked for but nothing is mounted.
    #[error("no cgroup2 hierarchy is mounted; mount one or set cgroup = \"v1\" in the policy's [jailer]")]
    NoUnified,
}

/// The first `cgroup` (v1) mount point whose options name `controller`.
pub fn v1_mount(mounts: &str, controller: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 4 && f[2] == "cgroup" && f[3].split(',').any(|o| o == controller))
            .then(|| PathBuf::from(f[1]))
    })
}

/// The first `cgroup2` mount point.
pub fn v2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 4 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// Picks the hierarchies for the policy's `version` from `/proc/mounts`'s text and the unified
/// hierarchy's `cgroup.controllers` (`controllers` reads it).
pub fn detect(
    version: banger_policy::CgroupVersion,
    mounts: &str,
    controllers: impl Fn(&Path) -> String,
) -> Result<Hierarchies, CgroupSetupError> {
    use banger_policy::CgroupVersion as V;
    let v2 = || -> Result<Hierarchies, CgroupSetupError> {
        let unified = v2_mount(mounts).ok_or(CgroupSetupError::NoUnified)?;
        let offered = controllers(&unified);
        for controller in ["cpu", "memory"] {
            if !offered.split_whitespace().any(|c| c == controller) {
                return Err(CgroupSetupError::V2Missing { unified, controller });
            }
        }
        Ok(Hierarchies::V2 { unified })
    };
    let v1 = || -> Result<Hierarchies, CgroupSetupError> {
        Ok(Hierarchies::V1 {
            cpu: v1_mount(mounts, "cpu").ok_or(CgroupSetupError::V1Missing("cpu"))?,
            memory: v1_mount(mounts, "memory").ok_or(CgroupSetupError::V1Missing("memory"))?,
        })
    };
    match version {
        V::V1 => v1(),
        V::V2 => v2(),
        V::Auto => v2().or_else(|_| v1()),
    }
}

impl Hierarchies {
    /// The jailer's `--cgroup-version`.
    pub fn version(&self) -> u8 {
        match self {
            Hierarchies::V1 { .. } => 1,
            Hierarchies::V2 { .. } => 2,
        }
    }

    /// Every mount point a jail's groups are in.
    pub fn roots(&self) -> Vec<&Path> {
        match self {
            Hierarchies::V1 { cpu, memory } => vec![cpu.as_path(), memory.as_path()],
            Hierarchies::V2 { unified } => vec![unified.as_path()],
        }
    }

    /// A VM's own limits, as the jailer's `--cgroup FILE=VALUE` words (in the order the jailer
    /// writes them).
    pub fn vm_settings(&self, shape: VmShape) -> Vec<String> {
        let quota = u64::from(shape.vcpus) * CFS_PERIOD_US;
        let memory = (u64::from(shape.mem_mib) + VMM_OVERHEAD_MIB) * MIB;
        match self {
            Hierarchies::V1 { .. } => vec![
                format!("cpu.cfs_period_us={CFS_PERIOD_US}"),
                format!("cpu.cfs_quota_us={quota}"),
                format!("memory.limit_in_bytes={memory}"),
            ],
            Hierarchies::V2 { .. } => {
                vec![format!("cpu.max={quota} {CFS_PERIOD_US}"), format!("memory.max={memory}")]
            }
        }
    }

    /// A user's totals: `(hierarchy root, file, value)` for their parent group.
    pub fn user_settings(&self, limits: UserLimits) -> Vec<(&Path, &'static str, String)> {
        let quota = u64::from(limits.vcpus) * CFS_PERIOD_US;
        let memory = (limits.mem_mib + VMM_OVERHEAD_MIB * u64::from(limits.vcpus)) * MIB;
        match self {
            Hierarchies::V1 { cpu, memory: mem } => vec![
                (cpu.as_path(), "cpu.cfs_period_us", CFS_PERIOD_US.to_string()),
                (cpu.as_path(), "cpu.cfs_quota_us", quota.to_string()),
                (mem.as_path(), "memory.limit_in_bytes", memory.to_string()),
            ],
            Hierarchies::V2 { unified } => vec![
                (unified.as_path(), "cpu.max", format!("{quota} {CFS_PERIOD_US}")),
                (unified.as_path(), "memory.max", memory.to_string()),
            ],
        }
    }

    /// Makes the user's parent group `user_cgroup` (relative, e.g. `banger/u1000`) in every
    /// hierarchy, enables `cpu` and `memory` down to it (v2), and writes the user's totals.
    pub fn ensure_user(&self, user_cgroup: &str, limits: UserLimits) -> io::Result<()> {
        let rel = checked_relative(user_cgroup)?;
        for root in self.roots() {
            let mut dir = root.to_path_buf();
            for part in rel.components() {
                if let Hierarchies::V2 { .. } = self {
                    enable_controllers(&dir)?;
                }
                dir.push(part);
                match fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
        }
        for (root, file, value) in self.user_settings(limits) {
            let path = root.join(rel).join(file);
            fs::write(&path, &value)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        }
        Ok(())
    }

    /// Every VM group named `id` under a user's parent within `parent` (the policy's
    /// `cgroup_parent`), with that user's parent, in every hierarchy.
    pub fn vm_groups(&self, parent: &str, id: &str) -> Vec<(PathBuf, PathBuf)> {
        let Ok(parent) = checked_relative(parent) else { return Vec::new() };
        let mut out = Vec::new();
        for root in self.roots() {
            let Ok(users) = fs::read_dir(root.join(parent)) else { continue };
            for user in users.flatten() {
                let user = user.path();
                let group = user.join(id);
                if group.is_dir() {
                    out.push((group, user));
                }
            }
        }
        out
    }
}

/// `rel` when it is a relative path of plain components.
pub fn checked_relative(rel: &str) -> io::Result<&Path> {
    let p = Path::new(rel);
    let plain = rel.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if !plain || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid cgroup path {rel:?}")));
    }
    Ok(p)
}

/// Enables `cpu` and `memory` for the children of the v2 group `dir`.
fn enable_controllers(dir: &Path) -> io::Result<()> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control)?;
    for c in ["cpu", "memory"] {
        if !enabled.split_whitespace().any(|e| e == c) {
            fs::write(&control, format!("+{c}"))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: +{c}: {e}", control.display())))?;
        }
    }
    Ok(())
}

/// The PIDs in a group (`cgroup.procs`); none when it is gone.
pub fn procs(group: &Path) -> Vec<i32> {
    fs::read_to_string(group.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Removes an empty group, retrying while it is busy (a killed process not yet reaped) for at
/// most [`RMDIR_PATIENCE`]; a group that is not there counts as removed.
pub fn remove_group(group: &Path) -> io::Result<()> {
    let deadline = Instant::now() + RMDIR_PATIENCE;
    loop {
        match fs::remove_dir(group) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Removes a user's parent group when no VM group is left in it (a busy or non-empty one stays).
pub fn remove_user_if_empty(user: &Path) -> io::Result<()> {
    let has_children = fs::read_dir(user)
        .map(|d| d.flatten().any(|e| e.file_type().is_ok_and(|t| t.is_dir())))
        .unwrap_or(false);
    if has_children {
        return Ok(());
    }
    match fs::remove_dir(user) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EBUSY | libc::ENOTEMPTY)) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use banger_policy::CgroupVersion;

    use super::*;

    /// This machine's `/proc/mounts` (v1 controllers, a cgroup2 mount with none of ours).
    const HYBRID: &str = "\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    const UNIFIED: &str = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n";

    #[test]
    fn auto_picks_v1_where_the_unified_hierarchy_lacks_cpu_and_memory() {
        let h = detect(CgroupVersion::Auto, HYBRID, |_| "hugetlb".into()).unwrap();
        assert_eq!(
            h,
            Hierarchies::V1 { cpu: "/sys/fs/cgroup/cpu".into(), memory: "/sys/fs/cgroup/memory".into() }
        );
        assert_eq!(h.version(), 1);
        assert_eq!(
            detect(CgroupVersion::V2, HYBRID, |_| "hugetlb".into()),
            Err(CgroupSetupError::V2Missing { unified: "/sys/fs/cgroup/unified".into(), controller: "cpu" })
        );
    }

    #[test]
    fn auto_picks_v2_where_it_has_cpu_and_memory() {
        let h = detect(CgroupVersion::Auto, UNIFIED, |p| {
            assert_eq!(p, Path::new("/sys/fs/cgroup"));
            "cpuset cpu io memory pids".into()
        })
        .unwrap();
        assert_eq!(h, Hierarchies::V2 { unified: "/sys/fs/cgroup".into() });
        assert_eq!(
            detect(CgroupVersion::V1, UNIFIED, |_| String::new()),
            Err(CgroupSetupError::V1Missing("cpu"))
        );
        assert_eq!(detect(CgroupVersion::V2, "", |_| String::new()), Err(CgroupSetupError::NoUnified));
    }

    #[test]
    fn the_first_mount_naming_a_controller_wins_like_the_jailers() {
        let mounts = "cgroup /a cgroup rw,cpuacct 0 0\ncgroup /b cgroup rw,cpu,cpuacct 0 0\ncgroup /c cgroup rw,cpu 0 0\n";
        assert_eq!(v1_mount(mounts, "cpu"), Some(PathBuf::from("/b")), "an option, not a prefix");
        assert_eq!(v1_mount(mounts, "memory"), None);
    }

    #[test]
    fn vm_and_user_values() {
        let v1 = Hierarchies::V1 { cpu: "/cg/cpu".into(), memory: "/cg/memory".into() };
        let shape = VmShape { vcpus: 2, mem_mib: 256 };
        assert_eq!(
            v1.vm_settings(shape),
            [
                "cpu.cfs_period_us=100000",
                "cpu.cfs_quota_us=200000",
                &format!("memory.limit_in_bytes={}", (256 + 32) << 20)
            ]
        );
        let v2 = Hierarchies::V2 { unified: "/cg".into() };
        assert_eq!(v2.vm_settings(shape), ["cpu.max=200000 100000", &format!("memory.max={}", 288u64 << 20)]);
        let limits = UserLimits { vcpus: 4, mem_mib: 1024 };
        let user: Vec<_> =
            v1.user_settings(limits).into_iter().map(|(r, f, v)| (r.to_owned(), f, v)).collect();
        assert_eq!(
            user,
            [
                (PathBuf::from("/cg/cpu"), "cpu.cfs_period_us", "100000".to_string()),
                (PathBuf::from("/cg/cpu"), "cpu.cfs_quota_us", "400000".to_string()),
                (
                    PathBuf::from("/cg/memory"),
                    "memory.limit_in_bytes",
                    ((1024u64 + 4 * 32) << 20).to_string()
                ),
            ]
        );
        let user: Vec<_> = v2.user_settings(limits).into_iter().map(|(_, f, v)| (f, v)).collect();
        assert_eq!(
            user,
            [("cpu.max", "400000 100000".to_string()), ("memory.max", (1152u64 << 20).to_string())]
        );
    }

    #[test]
    fn a_vm_fits_in_its_users_totals() {
        // The kernel refuses a v1 child quota above its parent's: one VM of every vCPU the user
        // may have, and all their memory, must fit.
        let h = Hierarchies::V2 { unified: "/cg".into() };
        for vcpus in 1..=banger_protocol::MAX_VCPUS {
            let shape = VmShape { vcpus, mem_mib: 4096 };
            let limits = UserLimits { vcpus: u32::from(vcpus), mem_mib: 4096 };
            let vm = (u64::from(vcpus) * CFS_PERIOD_US, (4096 + VMM_OVERHEAD_MIB) * MIB);
            let user =
                (u64::from(limits.vcpus) * CFS_PERIOD_US, (4096 + VMM_OVERHEAD_MIB * u64::from(vcpus)) * MIB);
            assert!(vm.0 <= user.0 && vm.1 <= user.1, "{shape:?}");
            assert_eq!(h.vm_settings(shape).len(), 2);
        }
    }

    #[test]
    fn cgroup_paths_must_be_plain_and_relative() {
        assert!(checked_relative("banger/u1000").is_ok());
        for bad in ["", "/banger", "banger/../x", "./banger", "banger/.", "banger//u1", "banger/"] {
            assert!(checked_relative(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ensure_user_enables_the_controllers_down_to_the_parent_in_a_v2_tree() {
        // Plain files stand in for the unified hierarchy's: each write replaces the last.
        let dir = tempfile::tempdir().unwrap();
        let unified = dir.path().join("unified");
        fs::create_dir_all(unified.join("banger")).unwrap();
        fs::write(unified.join("cgroup.subtree_control"), "cpu\n").unwrap();
        fs::write(unified.join("banger/cgroup.subtree_control"), "").unwrap();
        let h = Hierarchies::V2 { unified: unified.clone() };
        // The user's group has no control file of its own yet (the kernel makes it).
        let user = unified.join("banger/u1000");
        fs::create_dir(&user).unwrap();
        fs::write(user.join("cgroup.subtree_control"), "").unwrap();
        h.ensure_user("banger/u1000", UserLimits { vcpus: 3, mem_mib: 256 }).unwrap();
        assert_eq!(
            fs::read_to_string(unified.join("cgroup.subtree_control")).unwrap(),
            "+memory",
            "cpu was on"
        );
        assert_eq!(fs::read_to_string(unified.join("banger/cgroup.subtree_control")).unwrap(), "+memory");
        assert_eq!(
            fs::read_to_string(user.join("cgroup.subtree_control")).unwrap(),
            "",
            "the jailer's to enable"
        );
        assert_eq!(fs::read_to_string(user.join("cpu.max")).unwrap(), "300000 100000");
        assert_eq!(fs::read_to_string(user.join("memory.max")).unwrap(), ((256u64 + 96) << 20).to_string());
        assert!(h.ensure_user("banger/../etc", UserLimits { vcpus: 1, mem_mib: 1 }).is_err());
    }

    #[test]
    fn ensure_user_makes_the_parent_and_writes_totals_in_a_v1_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (cpu, memory) = (dir.path().join("cpu"), dir.path().join("memory"));
        fs::create_dir_all(&cpu).unwrap();
        fs::create_dir_all(&memory).unwrap();
        let h = Hierarchies::V1 { cpu: cpu.clone(), memory: memory.clone() };
        h.ensure_user("banger/u1000", UserLimits { vcpus: 2, mem_mib: 512 }).unwrap();
        h.ensure_user("banger/u1000", UserLimits { vcpus: 2, mem_mib: 512 }).unwrap();
        assert_eq!(fs::read_to_string(cpu.join("banger/u1000/cpu.cfs_quota_us")).unwrap(), "200000");
        assert_eq!(
            fs::read_to_string(memory.join("banger/u1000/memory.limit_in_bytes")).unwrap(),
            ((512u64 + 64) << 20).to_string()
        );
        fs::create_dir(cpu.join("banger/u1000/bg-1")).unwrap();
        let groups = h.vm_groups("banger", "bg-1");
        assert_eq!(groups, [(cpu.join("banger/u1000/bg-1"), cpu.join("banger/u1000"))]);
        assert!(h.vm_groups("banger", "bg-2").is_empty());
    }
}
