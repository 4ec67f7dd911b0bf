//! Cgroups as the jailer 1.16.1 sets them up, on whatever tree `/proc/mounts` names (tests pass a
//! fake mounts file and tree).
//!
//! Discovery ([`Hierarchies`]): the mounts file is read line by line. A line is a cgroup mount
//! when its source is made of `a`-`z` and `2`, its type is `cgroup` or `cgroup2`, and it ends in
//! `0 0` (the jailer's regular expression). Version 1 keeps every `cgroup` mount with its options
//! (the controllers); version 2 keeps the first `cgroup2` mount. None: "Hierarchy not found".
//!
//! Plan ([`PlanBuilder`]), one `--cgroup FILE=VALUE` at a time; the controller is `FILE` up to
//! its first `.`:
//! - v1: the hierarchy is the first v1 mount whose options name the controller (else "Controller
//!   X is unavailable"); the group is `<hierarchy>/<parent cgroup>/<id>`, one per controller.
//! - v2: the controller must be listed in `<unified>/cgroup.controllers` (else the same
//!   "unavailable" error); one group, `<unified>/<parent cgroup>/<id>`.
//!
//! Setup ([`CgroupPlan::apply`]): first every group's values, then the PID into every group.
//! - v1: create the directory; for each value, first copy the parent's current value of that file
//!   into the new group (climbing further up while a parent's is empty, as far as the parent
//!   cgroup path is deep), then write the value. The PID goes to `tasks`.
//! - v2: create the directory; for each controller (once), write `+controller` to
//!   `cgroup.subtree_control` of every ancestor that has one, from the top down, starting at the
//!   group's parent; then write the value. The PID goes to `cgroup.procs`.
//!
//! Every write is `VALUE\n` to a file opened for writing (created if missing, truncated).

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::unquoted;

/// Cgroup errors, worded and named as the jailer's.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The mounts file could not be opened.
    #[error("Failed to open file {}: {}", unquoted(.0), .1)]
    FileOpen(PathBuf, io::Error),
    /// The mounts file could not be read.
    #[error("Failed to read line from {}: {}", unquoted(.0), .1)]
    ReadLine(PathBuf, io::Error),
    /// No mount of the version asked for.
    #[error("Hierarchy not found: {0}")]
    CgroupHierarchyMissing(String),
    /// The controller is not mounted (v1) or not available (v2).
    #[error("Controller {0} is unavailable")]
    CgroupControllerUnavailable(String),
    /// A cgroup file without a `.`.
    #[error("Cgroup invalid file: {0}")]
    CgroupInvalidFile(String),
    /// A version other than 1 or 2.
    #[error("{0} is an invalid cgroup version specifier")]
    CgroupInvalidVersion(String),
    /// No parent had a value to inherit.
    #[error("Failed to inherit cgroups configurations from file {} in path {}", .1, unquoted(.0))]
    CgroupInheritFromParent(PathBuf, String),
    /// A path without a parent.
    #[error("File {} doesn't have a parent", unquoted(.0))]
    MissingParent(PathBuf),
    /// A cgroup file could not be read.
    #[error("Failed to read file {} into a string: {}", unquoted(.0), .1)]
    ReadToString(PathBuf, io::Error),
    /// A cgroup file could not be written.
    #[error("Failed to write to {}: {}", unquoted(.0), .1)]
    Write(PathBuf, io::Error),
    /// A cgroup directory could not be created.
    #[error("Failed to create directory {}: {}", unquoted(.0), .1)]
    CreateDir(PathBuf, io::Error),
    /// The jailer could not move itself into the parent cgroup (v2 without `--cgroup`).
    #[error(
        "Failed to move process to cgroup ({0}): {1}.\nHint: If you intended to create a child \
         cgroup under {0}, pass any --cgroup parameters."
    )]
    CgroupMove(PathBuf, io::Error),
}

/// Writes `value` and a newline, as the jailer writes every cgroup file.
fn write_line(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, format!("{value}\n")).map_err(|e| CgroupError::Write(path.to_path_buf(), e))
}

/// Reads a file and drops its last character (the jailer assumes it is a newline).
fn read_line(path: &Path) -> Result<String, CgroupError> {
    let mut s = fs::read_to_string(path).map_err(|e| CgroupError::ReadToString(path.to_path_buf(), e))?;
    s.pop();
    Ok(s)
}

/// A cgroup mount found in the mounts file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountLine {
    dir: String,
    v2: bool,
    options: String,
}

/// Reads one mounts line as the jailer's regular expression does (fields never contain spaces
/// in `/proc/mounts`, which escapes them).
fn parse_mount_line(line: &str) -> Option<MountLine> {
    let fields: Vec<&str> = line.split(' ').collect();
    let [source, dir, fstype, options, "0", "0"] = fields[..] else { return None };
    if !source.bytes().all(|b| b.is_ascii_lowercase() || b == b'2') {
        return None;
    }
    let v2 = match fstype {
        "cgroup" => false,
        "cgroup2" => true,
        _ => return None,
    };
    Some(MountLine { dir: dir.to_string(), v2, options: options.to_string() })
}

/// The controller of a cgroup file (`cpu.max` → `cpu`).
fn controller_of(file: &str) -> Result<&str, CgroupError> {
    match file.split_once('.') {
        Some((controller, _)) => Ok(controller),
        None => Err(CgroupError::CgroupInvalidFile(file.to_string())),
    }
}

/// The cgroup hierarchies of one version, as found in the mounts file.
#[derive(Debug)]
pub struct Hierarchies {
    unified: Option<PathBuf>,
    v1_mounts: Vec<MountLine>,
}

impl Hierarchies {
    /// Reads `proc_mounts` for hierarchies of `version`.
    pub fn discover(version: u8, proc_mounts: &Path) -> Result<Self, CgroupError> {
        let file =
            fs::File::open(proc_mounts).map_err(|e| CgroupError::FileOpen(proc_mounts.to_path_buf(), e))?;
        let mut found = Hierarchies { unified: None, v1_mounts: Vec::new() };
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| CgroupError::ReadLine(proc_mounts.to_path_buf(), e))?;
            let Some(m) = parse_mount_line(&line) else { continue };
            if version == 2 && m.v2 {
                found.unified = Some(PathBuf::from(m.dir));
                break;
            } else if version == 1 && !m.v2 {
                found.v1_mounts.push(m);
            }
        }
        if found.unified.is_none() && found.v1_mounts.is_empty() {
            return Err(CgroupError::CgroupHierarchyMissing(
                "No hierarchy found for this cgroup version.".to_string(),
            ));
        }
        Ok(found)
    }

    /// The v1 hierarchy that has `controller`.
    fn v1_root(&self, controller: &str) -> Result<PathBuf, CgroupError> {
        self.v1_mounts
            .iter()
            .find(|m| m.options.split(',').any(|o| o == controller))
            .map(|m| PathBuf::from(&m.dir))
            .ok_or_else(|| CgroupError::CgroupControllerUnavailable(controller.to_string()))
    }

    /// The v2 (unified) hierarchy.
    pub fn v2_root(&self) -> Result<&Path, CgroupError> {
        self.unified
            .as_deref()
            .ok_or_else(|| CgroupError::CgroupHierarchyMissing("cgroupsv2 hierarchy missing".to_string()))
    }
}

/// One value to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// The cgroup file (`cpu.max`).
    pub file: String,
    /// Its value.
    pub value: String,
}

/// One v1 group (one controller's hierarchy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Group {
    /// The controller.
    pub controller: String,
    /// `<hierarchy>/<parent cgroup>/<id>`.
    pub location: PathBuf,
    /// How many components the parent cgroup path has (how far values are inherited from).
    pub parent_depth: u16,
    /// Values, in the order given.
    pub properties: Vec<Property>,
}

/// The v2 group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Group {
    /// `<unified>/<parent cgroup>/<id>`.
    pub location: PathBuf,
    /// Values, in the order given.
    pub properties: Vec<Property>,
}

/// What the jailer will create and write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupPlan {
    /// Version 1: one group per controller, in the order the controllers were first named.
    V1(Vec<V1Group>),
    /// Version 2: one group.
    V2(Option<V2Group>),
}

/// Builds a [`CgroupPlan`] from `--cgroup` values, checking each against the hierarchies.
#[derive(Debug)]
pub struct PlanBuilder {
    hierarchies: Hierarchies,
    plan: CgroupPlan,
}

impl PlanBuilder {
    /// Discovers the hierarchies of `version`.
    pub fn new(version: u8, proc_mounts: &Path) -> Result<Self, CgroupError> {
        let hierarchies = Hierarchies::discover(version, proc_mounts)?;
        let plan = match version {
            1 => CgroupPlan::V1(Vec::new()),
            2 => CgroupPlan::V2(None),
            v => return Err(CgroupError::CgroupInvalidVersion(v.to_string())),
        };
        Ok(PlanBuilder { hierarchies, plan })
    }

    /// The hierarchies found.
    pub fn hierarchies(&self) -> &Hierarchies {
        &self.hierarchies
    }

    /// Adds `file=value` for the group `<parent>/<id>`.
    pub fn add(&mut self, file: &str, value: &str, id: &str, parent: &Path) -> Result<(), CgroupError> {
        let property = Property { file: file.to_string(), value: value.to_string() };
        match &mut self.plan {
            CgroupPlan::V1(groups) => {
                let controller = controller_of(file)?;
                let root = self.hierarchies.v1_root(controller)?;
                if let Some(g) = groups.iter_mut().find(|g| g.controller == controller) {
                    g.properties.push(property);
                } else {
                    groups.push(V1Group {
                        controller: controller.to_string(),
                        location: root.join(parent).join(id),
                        parent_depth: parent.components().count() as u16,
                        properties: vec![property],
                    });
                }
            }
            CgroupPlan::V2(group) => {
                let root = self.hierarchies.v2_root()?;
                let available = available_controllers(root);
                let controller = controller_of(file)?;
                if !available.contains(controller) {
                    return Err(CgroupError::CgroupControllerUnavailable(controller.to_string()));
                }
                group
                    .get_or_insert_with(|| V2Group {
                        location: root.join(parent).join(id),
                        properties: Vec::new(),
                    })
                    .properties
                    .push(property);
            }
        }
        Ok(())
    }

    /// The finished plan.
    pub fn build(self) -> CgroupPlan {
        self.plan
    }
}

/// The controllers listed in `<root>/cgroup.controllers` (none when it cannot be read).
fn available_controllers(root: &Path) -> HashSet<String> {
    let Ok(file) = fs::File::open(root.join("cgroup.controllers")) else { return HashSet::new() };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .flat_map(|l| l.split(' ').map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// Copies the parent's value of `file` into `location` (see the module documentation).
fn inherit_from_parent(location: &Path, file: &str, depth: u16) -> Result<(), CgroupError> {
    let parent_file = location.with_file_name(file);
    let mut line = read_line(&parent_file)?;
    if line.is_empty() {
        if depth > 0 {
            let parent =
                parent_file.parent().ok_or_else(|| CgroupError::MissingParent(parent_file.clone()))?;
            // Another jailer may fill the parent's value at the same time: only the result counts.
            let _ = inherit_from_parent(parent, file, depth - 1);
            line = read_line(&parent_file)?;
        }
        if line.is_empty() {
            return Err(CgroupError::CgroupInheritFromParent(location.to_path_buf(), file.to_string()));
        }
    }
    write_line(&location.join(file), &line)
}

/// Writes `+controller` into `cgroup.subtree_control` from the top down to `dir`.
fn enable_in_ancestors(dir: &Path, controller: &str) -> Result<(), CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    if !control.exists() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        enable_in_ancestors(parent, controller)?;
    }
    write_line(&control, &format!("+{controller}"))
}

fn create_dir(dir: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(dir).map_err(|e| CgroupError::CreateDir(dir.to_path_buf(), e))
}

impl V1Group {
    fn write_values(&self) -> Result<(), CgroupError> {
        create_dir(&self.location)?;
        for p in &self.properties {
            inherit_from_parent(&self.location, &p.file, self.parent_depth)?;
            write_line(&self.location.join(&p.file), &p.value)?;
        }
        Ok(())
    }
}

impl V2Group {
    fn write_values(&self) -> Result<(), CgroupError> {
        create_dir(&self.location)?;
        let parent = self.location.parent().unwrap_or(Path::new("/"));
        let mut enabled = HashSet::new();
        for p in &self.properties {
            let controller = controller_of(&p.file)?;
            if enabled.insert(controller) {
                enable_in_ancestors(parent, controller)?;
            }
            write_line(&self.location.join(&p.file), &p.value)?;
        }
        Ok(())
    }
}

impl CgroupPlan {
    /// Creates the groups, writes their values, then adds `pid` to each.
    pub fn apply(&self, pid: u32) -> Result<(), CgroupError> {
        match self {
            CgroupPlan::V1(groups) => {
                for g in groups {
                    g.write_values()?;
                }
                for g in groups {
                    write_line(&g.location.join("tasks"), &pid.to_string())?;
                }
            }
            CgroupPlan::V2(group) => {
                if let Some(g) = group {
                    g.write_values()?;
                    write_line(&g.location.join("cgroup.procs"), &pid.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The directories the plan creates (for tests and cleanup).
    pub fn locations(&self) -> Vec<&Path> {
        match self {
            CgroupPlan::V1(groups) => groups.iter().map(|g| g.location.as_path()).collect(),
            CgroupPlan::V2(group) => group.iter().map(|g| g.location.as_path()).collect(),
        }
    }
}

/// With `--cgroup-version 2` and no `--cgroup`: moves `pid` into `<unified>/<parent>` when that
/// exists (written without a newline, as the jailer does).
pub fn move_into_parent_v2(proc_mounts: &Path, parent: &Path, pid: u32) -> Result<(), CgroupError> {
    let builder = PlanBuilder::new(2, proc_mounts)?;
    let dir = builder.hierarchies().v2_root()?.join(parent);
    if dir.exists() {
        fs::write(dir.join("cgroup.procs"), pid.to_string()).map_err(|e| CgroupError::CgroupMove(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup tree and mounts file: v1 `cpu` and `memory` hierarchies, a v2 hierarchy with
    /// `cpu memory pids` available.
    struct FakeTree {
        _dir: tempfile::TempDir,
        root: PathBuf,
        mounts: PathBuf,
    }

    impl FakeTree {
        fn new() -> FakeTree {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            for (d, files) in [
                ("cpu", &[("cpu.cfs_quota_us", "-1\n"), ("cpu.shares", "1024\n")][..]),
                ("memory", &[("memory.limit_in_bytes", "9223372036854771712\n")][..]),
                (
                    "unified",
                    &[("cgroup.controllers", "cpu memory pids\n"), ("cgroup.subtree_control", "\n")][..],
                ),
            ] {
                fs::create_dir_all(root.join(d)).unwrap();
                for (f, v) in files {
                    fs::write(root.join(d).join(f), v).unwrap();
                }
            }
            let mounts = root.join("mounts");
            let r = root.display();
            fs::write(
                &mounts,
                format!(
                    "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
                     cgroup {r}/cpu cgroup rw,relatime,cpu 0 0\n\
                     cgroup {r}/memory cgroup rw,relatime,memory 0 0\n\
                     cgroup2 {r}/unified cgroup2 rw,relatime 0 0\n\
                     cgroup2 /elsewhere cgroup2 rw 0 0\n"
                ),
            )
            .unwrap();
            FakeTree { _dir: dir, root, mounts }
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.root.join(rel)).unwrap()
        }
    }

    #[test]
    fn mount_lines_are_read_as_the_jailer_reads_them() {
        assert_eq!(
            parse_mount_line("cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0"),
            Some(MountLine {
                dir: "/sys/fs/cgroup/cpu,cpuacct".into(),
                v2: false,
                options: "rw,cpu,cpuacct".into()
            })
        );
        assert!(parse_mount_line("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0").unwrap().v2);
        assert_eq!(parse_mount_line("tmpfs /sys/fs/cgroup tmpfs rw 0 0"), None);
        assert_eq!(parse_mount_line("/dev/vda / ext4 rw 0 0"), None);
        assert_eq!(parse_mount_line("Cgroup /x cgroup rw 0 0"), None);
        assert_eq!(parse_mount_line("cgroup /x cgroup rw 0 1"), None);
    }

    #[test]
    fn v1_values_are_inherited_then_written_and_the_pid_goes_to_tasks() {
        let t = FakeTree::new();
        fs::create_dir_all(t.root.join("cpu/firecracker")).unwrap();
        // The parent group's file is empty: the value is taken from the hierarchy's root.
        fs::write(t.root.join("cpu/firecracker/cpu.shares"), "\n").unwrap();
        let mut b = PlanBuilder::new(1, &t.mounts).unwrap();
        let parent = Path::new("firecracker");
        b.add("cpu.cfs_quota_us", "50000", "vm-1", parent).unwrap();
        b.add("memory.limit_in_bytes", "134217728", "vm-1", parent).unwrap();
        b.add("cpu.shares", "512", "vm-1", parent).unwrap();
        let plan = b.build();
        assert_eq!(
            plan.locations(),
            [t.root.join("cpu/firecracker/vm-1"), t.root.join("memory/firecracker/vm-1")]
        );
        // In a fake tree the parent group needs the files a real cgroup directory would have.
        fs::create_dir_all(t.root.join("memory/firecracker")).unwrap();
        fs::write(t.root.join("memory/firecracker/memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        fs::write(t.root.join("cpu/firecracker/cpu.cfs_quota_us"), "-1\n").unwrap();
        plan.apply(4242).unwrap();
        assert_eq!(t.read("cpu/firecracker/vm-1/cpu.cfs_quota_us"), "50000\n");
        assert_eq!(t.read("cpu/firecracker/vm-1/cpu.shares"), "512\n");
        assert_eq!(t.read("cpu/firecracker/cpu.shares"), "1024\n", "the empty parent was filled");
        assert_eq!(t.read("memory/firecracker/vm-1/memory.limit_in_bytes"), "134217728\n");
        assert_eq!(t.read("cpu/firecracker/vm-1/tasks"), "4242\n");
        assert_eq!(t.read("memory/firecracker/vm-1/tasks"), "4242\n");
    }

    #[test]
    fn v1_inheritance_fails_when_no_parent_has_a_value() {
        let t = FakeTree::new();
        fs::write(t.root.join("cpu/cpu.shares"), "\n").unwrap();
        fs::create_dir_all(t.root.join("cpu/p")).unwrap();
        fs::write(t.root.join("cpu/p/cpu.shares"), "\n").unwrap();
        let mut b = PlanBuilder::new(1, &t.mounts).unwrap();
        b.add("cpu.shares", "1", "vm", Path::new("p")).unwrap();
        let e = b.build().apply(1).unwrap_err();
        let location = t.root.join("cpu/p/vm");
        assert_eq!(
            e.to_string(),
            format!(
                "Failed to inherit cgroups configurations from file cpu.shares in path {}",
                location.display()
            )
        );
        assert_eq!(format!("{e:?}"), format!("CgroupInheritFromParent({location:?}, \"cpu.shares\")"));
    }

    #[test]
    fn v2_enables_controllers_from_the_top_then_writes_values_and_cgroup_procs() {
        let t = FakeTree::new();
        let unified = t.root.join("unified");
        fs::create_dir_all(unified.join("a/b")).unwrap();
        fs::write(unified.join("a/cgroup.subtree_control"), "").unwrap();
        fs::write(unified.join("a/b/cgroup.subtree_control"), "").unwrap();
        let mut b = PlanBuilder::new(2, &t.mounts).unwrap();
        b.add("cpu.max", "50000 100000", "vm-2", Path::new("a/b")).unwrap();
        b.add("memory.max", "134217728", "vm-2", Path::new("a/b")).unwrap();
        b.add("cpu.weight", "50", "vm-2", Path::new("a/b")).unwrap();
        let plan = b.build();
        assert_eq!(plan.locations(), [unified.join("a/b/vm-2")]);
        plan.apply(99).unwrap();
        // Each write truncates: the last controller enabled is what a plain file keeps.
        assert_eq!(t.read("unified/cgroup.subtree_control"), "+memory\n");
        assert_eq!(t.read("unified/a/cgroup.subtree_control"), "+memory\n");
        assert_eq!(t.read("unified/a/b/cgroup.subtree_control"), "+memory\n");
        assert_eq!(t.read("unified/a/b/vm-2/cpu.max"), "50000 100000\n");
        assert_eq!(t.read("unified/a/b/vm-2/cpu.weight"), "50\n");
        assert_eq!(t.read("unified/a/b/vm-2/memory.max"), "134217728\n");
        assert_eq!(t.read("unified/a/b/vm-2/cgroup.procs"), "99\n");
        assert!(!unified.join("a/b/vm-2/cgroup.subtree_control").exists());
    }

    #[test]
    fn unavailable_controllers_and_bad_files_are_refused_before_anything_is_made() {
        let t = FakeTree::new();
        fs::write(t.root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        let mut b = PlanBuilder::new(2, &t.mounts).unwrap();
        let e = b.add("cpu.max", "max", "vm", Path::new("firecracker")).unwrap_err();
        assert_eq!(e.to_string(), "Controller cpu is unavailable");
        assert_eq!(format!("{e:?}"), "CgroupControllerUnavailable(\"cpu\")");
        let mut b = PlanBuilder::new(1, &t.mounts).unwrap();
        let e = b.add("pids.max", "10", "vm", Path::new("firecracker")).unwrap_err();
        assert_eq!(format!("{e:?}"), "CgroupControllerUnavailable(\"pids\")");
        let e = b.add("cpushares", "10", "vm", Path::new("firecracker")).unwrap_err();
        assert_eq!(format!("{e:?}"), "CgroupInvalidFile(\"cpushares\")");
        assert_eq!(fs::read_dir(t.root.join("cpu")).unwrap().count(), 2, "nothing created");
    }

    #[test]
    fn missing_hierarchies_and_versions() {
        let t = FakeTree::new();
        fs::write(&t.mounts, "tmpfs /tmp tmpfs rw 0 0\n").unwrap();
        let e = PlanBuilder::new(1, &t.mounts).unwrap_err();
        assert_eq!(e.to_string(), "Hierarchy not found: No hierarchy found for this cgroup version.");
        let t = FakeTree::new();
        let e = PlanBuilder::new(3, &t.mounts).unwrap_err();
        assert_eq!(
            format!("{e:?}"),
            "CgroupHierarchyMissing(\"No hierarchy found for this cgroup version.\")"
        );
        let e = PlanBuilder::new(2, Path::new("/nonexistent/mounts")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Failed to open file /nonexistent/mounts: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn v2_without_cgroup_values_moves_into_an_existing_parent_only() {
        let t = FakeTree::new();
        move_into_parent_v2(&t.mounts, Path::new("firecracker"), 7).unwrap();
        assert!(!t.root.join("unified/firecracker").exists());
        fs::create_dir_all(t.root.join("unified/firecracker")).unwrap();
        move_into_parent_v2(&t.mounts, Path::new("firecracker"), 7).unwrap();
        assert_eq!(t.read("unified/firecracker/cgroup.procs"), "7");
    }
}
