//! Jailer mode in a world ([`World::jailed`](super::World::jailed)): the policy's binaries, chroot
//! base, jail uids and cgroup parent, what a jailed VMM looks like from the host (uids, root,
//! cgroups and their limits), and the jails' share of the leak check.
//!
//! Layout added to the world's temporary directory `T`:
//!
//! ```text
//! T/jail-bin/  jailer (the jailer double), firecracker (the static Firecracker double):
//!              root's, 0755, as the policy requires
//! T/jails/     the chroot base (root's, 0755; on the filesystem of the users' homes, so the
//!              helper can hard-link their drives into jails)
//! ```
//!
//! The policy's `cgroup_parent` is `banger-e2e-<suffix>` and its uid range two uids of the world
//! alone ([`Names::jail_uids`]); the helper makes `<parent>/u<uid>/<jail id>` groups in every
//! hierarchy it uses, which the world removes (with `<parent>`) at teardown.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::helper::JailerSpec;
use super::names::Names;
use crate::jailer::harness::static_firecracker_double;

/// `quotas.max_vcpus` of a jailed world.
pub const MAX_VCPUS: u32 = 4;
/// `quotas.max_memory_mib` of a jailed world.
pub const MAX_MEMORY_MIB: u32 = 1024;
/// The name of Firecracker in the policy (so jails are `<base>/firecracker/<id>`).
pub const EXEC_NAME: &str = "firecracker";

/// The jailer side of one world.
#[derive(Debug, Clone)]
pub struct Jailing {
    /// What the policy says.
    pub spec: JailerSpec,
}

impl Jailing {
    /// Stages the binaries and the chroot base under `temp` (see the module docs).
    pub fn stage(temp: &Path, build_dir: &Path, names: &Names) -> anyhow::Result<Jailing> {
        let bin = temp.join("jail-bin");
        make_root_dir(&bin)?;
        let fc = static_firecracker_double().map_err(|e| anyhow::anyhow!(e))?;
        let jailer = build_dir.join("jailer-double");
        anyhow::ensure!(
            jailer.is_file(),
            "no {} (build it with `cargo build --workspace --bins`; tests/run does)",
            jailer.display()
        );
        let spec = JailerSpec {
            jailer: bin.join("jailer"),
            firecracker: bin.join(EXEC_NAME),
            chroot_base: temp.join("jails"),
            uids: names.jail_uids(),
            cgroup_parent: names.cgroup_parent(),
            max_vcpus: MAX_VCPUS,
            max_memory_mib: MAX_MEMORY_MIB,
        };
        // Copies, so that owner and mode are the policy's whoever built the originals.
        for (from, to) in [(&jailer, &spec.jailer), (&fc, &spec.firecracker)] {
            fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
            chown(to, Some(0), Some(0))?;
            fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
        }
        make_root_dir(&spec.chroot_base)?;
        Ok(Jailing { spec })
    }

    /// `<base>/firecracker`: where the jails are.
    pub fn jails_dir(&self) -> PathBuf {
        self.spec.chroot_base.join(EXEC_NAME)
    }

    /// The jail directories (`<base>/firecracker/<id>`) that exist.
    pub fn jail_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = fs::read_dir(self.jails_dir())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        dirs.sort();
        dirs
    }

    /// Whether `uid` is one of the world's jail uids.
    pub fn is_jail_uid(&self, uid: u32) -> bool {
        (self.spec.uids.0..=self.spec.uids.1).contains(&uid)
    }

    /// Every directory of the policy's `cgroup_parent` in every mounted hierarchy (one path
    /// per hierarchy, however many mount points show it).
    pub fn parent_cgroups(&self) -> Vec<PathBuf> {
        let mut seen = Vec::new();
        let mut found = Vec::new();
        for mount in cgroup_mounts() {
            let dir = mount.join(&self.spec.cgroup_parent);
            let Ok(m) = fs::metadata(&dir) else { continue };
            if !seen.contains(&(m.dev(), m.ino())) {
                seen.push((m.dev(), m.ino()));
                found.push(dir);
            }
        }
        found
    }

    /// The cgroups below the policy's `cgroup_parent` (users' and VMs' groups) in every
    /// hierarchy, deepest first.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let mut all = Vec::new();
        for parent in self.parent_cgroups() {
            let mut stack = vec![parent];
            while let Some(dir) = stack.pop() {
                for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        all.push(e.path());
                        stack.push(e.path());
                    }
                }
            }
        }
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        all
    }

    /// What jails left behind: jail directories and cgroups.
    pub fn leaks(&self) -> Vec<String> {
        let mut leaks: Vec<String> =
            self.jail_dirs().iter().map(|d| format!("jail directory {}", d.display())).collect();
        leaks.extend(self.cgroups().iter().map(|c| format!("cgroup {}", c.display())));
        leaks
    }

    /// Removes every cgroup of the world, `cgroup_parent` itself last (after its processes
    /// were killed: a group is busy until its last process is reaped). Returns what failed.
    pub fn remove_cgroups(&self) -> Vec<String> {
        remove_cgroup_trees(&self.parent_cgroups())
    }
}

/// Removes the groups `roots` and everything below them, deepest first, retrying busy ones for
/// a few seconds. Returns what could not be removed.
pub fn remove_cgroup_trees(roots: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    for root in roots {
        let mut dirs = vec![root.clone()];
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                    stack.push(e.path());
                }
            }
        }
        dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for dir in dirs {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        failures.push(format!("cannot remove cgroup {}: {e}", dir.display()));
                        break;
                    }
                }
            }
        }
    }
    failures
}

/// The mount points of every cgroup (v1) and cgroup2 hierarchy.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

fn make_root_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    chown(dir, Some(0), Some(0))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The cgroups of a process, as the host sees them, and the limits in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupView {
    /// 1 when the process's `cpu` and `memory` groups are v1 ones, else 2.
    pub version: u8,
    /// The process's group (relative to the hierarchy), by controller (`cpu`, `memory`), or
    /// `""` for v2.
    pub groups: BTreeMap<String, String>,
    /// The limit files of its group: v1 `cpu.cfs_period_us`, `cpu.cfs_quota_us`,
    /// `memory.limit_in_bytes`; v2 `cpu.max`, `memory.max`.
    pub own: BTreeMap<String, String>,
    /// The same files of the group's parent.
    pub parent: BTreeMap<String, String>,
}

/// Reads the cgroups of `pid` and their limits (see [`CgroupView`]).
pub fn cgroup_view(pid: u32) -> anyhow::Result<CgroupView> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mounts = fs::read_to_string("/proc/mounts")?;
    let mut groups = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        for c in controllers.split(',') {
            if c == "cpu" || c == "memory" {
                groups.insert(c.to_owned(), path.to_owned());
            }
        }
        if controllers.is_empty() {
            groups.entry(String::new()).or_insert_with(|| path.to_owned());
        }
    }
    let v1 = groups.contains_key("cpu") && groups.contains_key("memory");
    if v1 {
        groups.remove("");
    }
    let mut own = BTreeMap::new();
    let mut parent = BTreeMap::new();
    let mut read = |dir: &Path, file: &str| -> anyhow::Result<()> {
        let value = |d: &Path| {
            fs::read_to_string(d.join(file))
                .map(|v| v.trim().to_owned())
                .with_context(|| format!("cannot read {}", d.join(file).display()))
        };
        own.insert(file.to_owned(), value(dir)?);
        let up = dir.parent().context("a group without parent")?;
        parent.insert(file.to_owned(), value(up)?);
        Ok(())
    };
    if v1 {
        let mount = |c: &str| {
            mounts
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() >= 4 && f[2] == "cgroup" && f[3].split(',').any(|o| o == c))
                        .then(|| PathBuf::from(f[1]))
                })
                .with_context(|| format!("no v1 {c} hierarchy is mounted"))
        };
        let dir =
            |c: &str| -> anyhow::Result<PathBuf> { Ok(mount(c)?.join(groups[c].trim_start_matches('/'))) };
        let (cpu, memory) = (dir("cpu")?, dir("memory")?);
        for f in ["cpu.cfs_period_us", "cpu.cfs_quota_us"] {
            read(&cpu, f)?;
        }
        read(&memory, "memory.limit_in_bytes")?;
    } else {
        let unified = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
            })
            .context("no cgroup2 hierarchy is mounted")?;
        let group = groups.get("").context("no v2 group in /proc/PID/cgroup")?;
        let dir = unified.join(group.trim_start_matches('/'));
        for f in ["cpu.max", "memory.max"] {
            read(&dir, f)?;
        }
    }
    Ok(CgroupView { version: if v1 { 1 } else { 2 }, groups, own, parent })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_cgroup_trees_of_plain_directories_goes_deepest_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("banger-e2e-x");
        fs::create_dir_all(root.join("u1/a")).unwrap();
        fs::create_dir_all(root.join("u2")).unwrap();
        assert_eq!(remove_cgroup_trees(std::slice::from_ref(&root)), Vec::<String>::new());
        assert!(!root.exists());
    }
}
