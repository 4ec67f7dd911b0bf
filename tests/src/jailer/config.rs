//! Checking the arguments into a [`Config`], in the order the jailer checks them (the first
//! wrong one is the one reported): id, exec file, chroot base, uid, gid, parent cgroup, cgroup
//! version, the v2 parent move, each `--cgroup`, each `--resource-limit`; then the userfaultfd
//! minor (never an error).

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use super::args::Arguments;
use super::cgroup::{self, CgroupPlan, PlanBuilder};
use super::process::ResourceLimits;
use super::{JailerError, unquoted};

/// Id errors, worded and named as Firecracker's `ValidatorError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A character other than an alphanumeric or `-`, at a character position.
    #[error("Invalid char ({0}) at position {1}")]
    InvalidChar(char, usize),
    /// A length (in bytes) outside the bounds.
    #[error("Invalid len ({0});  the length must be between {1} and {2}")]
    InvalidLen(usize, usize, usize),
}

/// Checks an instance id as Firecracker does (Unicode alphanumerics count).
pub fn validate_id(id: &str) -> Result<(), IdError> {
    if !(1..=64).contains(&id.len()) {
        return Err(IdError::InvalidLen(id.len(), 1, 64));
    }
    match id.chars().enumerate().find(|(_, c)| !(*c == '-' || c.is_alphanumeric())) {
        Some((i, c)) => Err(IdError::InvalidChar(c, i)),
        None => Ok(()),
    }
}

/// Argument errors, worded and named as the jailer's.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A bad `--id`.
    #[error("Invalid instance ID: {0}")]
    InvalidInstanceId(#[source] IdError),
    /// A path that cannot be resolved.
    #[error("Failed to canonicalize path {}: {}", unquoted(.0), .1)]
    Canonicalize(PathBuf, io::Error),
    /// An exec file that is not a regular file.
    #[error("{} is not a file", unquoted(.0))]
    NotAFile(PathBuf),
    /// A chroot base that is not a directory.
    #[error("{} is not a directory", unquoted(.0))]
    NotADirectory(PathBuf),
    /// An exec file path without a file name.
    #[error("Failed to extract filename from path {}", unquoted(.0))]
    ExtractFileName(PathBuf),
    /// A uid that is not a number.
    #[error("Invalid uid: {0}")]
    Uid(String),
    /// A gid that is not a number.
    #[error("Invalid gid: {0}")]
    Gid(String),
    /// A parent cgroup that is absolute or has `.` or `..`.
    #[error("Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'")]
    CgroupInvalidParentPath,
    /// A cgroup version that is not a small number.
    #[error("{0} is an invalid cgroup version specifier")]
    CgroupInvalidVersion(String),
    /// A `--cgroup` that is not `FILE=VALUE`.
    #[error("Invalid format for cgroups: {0}")]
    CgroupFormat(String),
    /// A `--cgroup` file that is absolute or has `.` or `..`.
    #[error("Cgroup invalid file: {0}")]
    CgroupInvalidFile(String),
    /// A `--resource-limit` without `=`.
    #[error("Invalid format for resources limits: {0}")]
    ResLimitFormat(String),
    /// A `--resource-limit` value that is not a number.
    #[error("Invalid limit value for resource: {0}: {1}")]
    ResLimitValue(String, String),
    /// A `--resource-limit` resource other than `fsize` and `no-file`.
    #[error("Invalid resource argument: {0}")]
    ResLimitArgument(String),
}

/// Where the jailer reads the host's state (the real `/proc` files, or a test's fakes).
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    /// The mounts file (`/proc/mounts`).
    pub proc_mounts: &'a Path,
    /// The misc devices file (`/proc/misc`).
    pub proc_misc: &'a Path,
}

/// A checked jail request.
#[derive(Debug)]
pub struct Config {
    /// The instance id.
    pub id: String,
    /// The exec file, canonical.
    pub exec_file: PathBuf,
    /// `<base>/<exec file name>/<id>/root`.
    pub chroot_dir: PathBuf,
    /// The VMM's uid.
    pub uid: u32,
    /// The VMM's gid.
    pub gid: u32,
    /// The network namespace to join.
    pub netns: Option<PathBuf>,
    /// `--daemonize`.
    pub daemonize: bool,
    /// `--new-pid-ns`.
    pub new_pid_ns: bool,
    /// The cgroups to set up (only when a `--cgroup` is given).
    pub cgroups: Option<CgroupPlan>,
    /// The resource limits.
    pub limits: ResourceLimits,
    /// The userfaultfd device's minor, when the host has the device.
    pub uffd_minor: Option<u32>,
    /// The words for the jailed binary.
    pub extra: Vec<String>,
}

fn is_plain_relative(path: &Path) -> bool {
    !path.components().any(|c| matches!(c, Component::CurDir | Component::ParentDir | Component::RootDir))
}

impl Config {
    /// Checks `args` (see the module documentation). With cgroup version 2 and no `--cgroup`,
    /// this already moves the calling process into the parent cgroup when it exists.
    pub fn from_args(args: &Arguments, host: &Host<'_>) -> Result<Config, JailerError> {
        let single = |name: &str| args.single(name).unwrap_or_default();
        let id = single("id");
        validate_id(id).map_err(ConfigError::InvalidInstanceId)?;

        let exec_arg = single("exec-file");
        let exec_file =
            fs::canonicalize(exec_arg).map_err(|e| ConfigError::Canonicalize(PathBuf::from(exec_arg), e))?;
        if !exec_file.is_file() {
            return Err(ConfigError::NotAFile(exec_file).into());
        }
        let exec_name = exec_file
            .file_name()
            .ok_or_else(|| ConfigError::ExtractFileName(exec_file.clone()))?
            .to_string_lossy()
            .into_owned();

        let base_arg = single("chroot-base-dir");
        let base =
            fs::canonicalize(base_arg).map_err(|e| ConfigError::Canonicalize(PathBuf::from(base_arg), e))?;
        if !base.is_dir() {
            return Err(ConfigError::NotADirectory(base).into());
        }
        let chroot_dir = base.join(&exec_name).join(id).join("root");

        let uid = single("uid").parse::<u32>().map_err(|_| ConfigError::Uid(single("uid").to_string()))?;
        let gid = single("gid").parse::<u32>().map_err(|_| ConfigError::Gid(single("gid").to_string()))?;

        let parent = Path::new(args.single("parent-cgroup").unwrap_or(&exec_name));
        if !is_plain_relative(parent) {
            return Err(ConfigError::CgroupInvalidParentPath.into());
        }
        let version_arg = single("cgroup-version");
        let version = version_arg
            .parse::<u8>()
            .map_err(|_| ConfigError::CgroupInvalidVersion(version_arg.to_string()))?;

        let cgroup_args = args.multiple("cgroup");
        if cgroup_args.is_none() && version == 2 {
            cgroup::move_into_parent_v2(host.proc_mounts, parent, std::process::id())?;
        }
        let cgroups = match cgroup_args {
            None => None,
            Some(values) => {
                let mut builder = PlanBuilder::new(version, host.proc_mounts)?;
                for cg in values {
                    let parts: Vec<&str> = cg.split('=').collect();
                    let [file, value] = parts[..] else {
                        return Err(ConfigError::CgroupFormat(cg.clone()).into());
                    };
                    if value.is_empty() {
                        return Err(ConfigError::CgroupFormat(cg.clone()).into());
                    }
                    if !is_plain_relative(Path::new(file)) {
                        return Err(ConfigError::CgroupInvalidFile(cg.clone()).into());
                    }
                    builder.add(file, value, id, parent)?;
                }
                Some(builder.build())
            }
        };

        let mut limits = ResourceLimits::default();
        for arg in args.multiple("resource-limit").unwrap_or_default() {
            let (name, value) =
                arg.split_once('=').ok_or_else(|| ConfigError::ResLimitFormat(arg.clone()))?;
            let n = value
                .parse::<u64>()
                .map_err(|e| ConfigError::ResLimitValue(value.to_string(), e.to_string()))?;
            match name {
                "fsize" => limits.file_size = Some(n),
                "no-file" => limits.no_file = n,
                _ => return Err(ConfigError::ResLimitArgument(name.to_string()).into()),
            }
        }

        Ok(Config {
            id: id.to_string(),
            exec_file,
            chroot_dir,
            uid,
            gid,
            netns: args.single("netns").map(PathBuf::from),
            daemonize: args.flag("daemonize"),
            new_pid_ns: args.flag("new-pid-ns"),
            cgroups,
            limits,
            uffd_minor: userfaultfd_minor(host.proc_misc),
            extra: args.extra().to_vec(),
        })
    }
}

/// The minor number of the `userfaultfd` misc device, read as the jailer reads `/proc/misc`
/// (`MINOR NAME` lines split on single spaces).
pub fn userfaultfd_minor(proc_misc: &Path) -> Option<u32> {
    let text = fs::read_to_string(proc_misc).ok()?;
    text.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        (fields.len() >= 2 && fields[1] == "userfaultfd").then(|| fields[0].parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jailer::args::{self, Command};

    /// An exec file, a chroot base, a mounts file with only a v1 `cpu` hierarchy, a misc file.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("firecracker"), b"\x7fELF").unwrap();
            fs::create_dir(dir.path().join("base")).unwrap();
            fs::write(dir.path().join("mounts"), "cgroup /nowhere/cpu cgroup rw,cpu 0 0\n").unwrap();
            fs::write(dir.path().join("misc"), "200 tun\n 57 other\n257 userfaultfd\n").unwrap();
            Fixture { dir }
        }

        fn path(&self, rel: &str) -> String {
            self.dir.path().join(rel).display().to_string()
        }

        /// Checks a request: the fixture's id, exec file, base, uid and gid unless `set` gives
        /// them, then `extra`.
        fn check(&self, set: &[(&str, &str)], extra: &[&str]) -> Result<Config, JailerError> {
            let defaults = [
                ("--id", "vm-1".to_string()),
                ("--exec-file", self.path("firecracker")),
                ("--chroot-base-dir", self.path("base")),
                ("--uid", "10".to_string()),
                ("--gid", "20".to_string()),
            ];
            let mut words = Vec::new();
            for (flag, default) in &defaults {
                let value =
                    set.iter().find(|(f, _)| f == flag).map_or(default.clone(), |(_, v)| v.to_string());
                words.extend([flag.to_string(), value]);
            }
            words.extend(extra.iter().map(|w| w.to_string()));
            let Command::Jail(a) = args::parse(&words).unwrap() else { panic!("not a jail request") };
            let (mounts, misc) = (self.dir.path().join("mounts"), self.dir.path().join("misc"));
            Config::from_args(&a, &Host { proc_mounts: &mounts, proc_misc: &misc })
        }

        /// The message and `Debug` form of a refused request.
        fn error(&self, set: &[(&str, &str)], extra: &[&str]) -> (String, String) {
            let e = self.check(set, extra).unwrap_err();
            (e.to_string(), format!("{e:?}"))
        }
    }

    #[test]
    fn ids_as_firecracker_checks_them() {
        assert_eq!(validate_id(""), Err(IdError::InvalidLen(0, 1, 64)));
        assert_eq!(
            IdError::InvalidLen(0, 1, 64).to_string(),
            "Invalid len (0);  the length must be between 1 and 64"
        );
        assert_eq!(validate_id(&"a".repeat(65)), Err(IdError::InvalidLen(65, 1, 64)));
        assert_eq!(validate_id("a_b"), Err(IdError::InvalidChar('_', 1)));
        assert_eq!(format!("{:?}", IdError::InvalidChar('_', 1)), "InvalidChar('_', 1)");
        assert_eq!(validate_id("é-1"), Ok(()), "Unicode alphanumerics pass, as in Firecracker");
        assert_eq!(validate_id(&"a".repeat(64)), Ok(()));
    }

    #[test]
    fn a_good_request() {
        let f = Fixture::new();
        let extra = ["--netns", "/run/netns/x", "--daemonize", "--resource-limit", "fsize=10", "--", "--a"];
        let c = f.check(&[], &extra).unwrap();
        let base = fs::canonicalize(f.path("base")).unwrap();
        assert_eq!(c.chroot_dir, base.join("firecracker/vm-1/root"));
        assert_eq!((c.uid, c.gid, c.daemonize, c.new_pid_ns), (10, 20, true, false));
        assert_eq!(c.netns.as_deref(), Some(Path::new("/run/netns/x")));
        assert_eq!((c.limits.file_size, c.limits.no_file), (Some(10), 2048));
        assert_eq!(c.uffd_minor, Some(257));
        assert_eq!(c.extra, ["--a"]);
        assert!(c.cgroups.is_none(), "no --cgroup: cgroups are not touched");
    }

    #[test]
    fn paths_are_checked_after_the_id() {
        let f = Fixture::new();
        let missing = f.path("missing");
        assert_eq!(
            f.error(&[("--id", "a_b"), ("--exec-file", &missing)], &[]).1,
            "InvalidInstanceId(InvalidChar('_', 1))"
        );
        assert_eq!(
            f.error(&[("--exec-file", &missing)], &[]),
            (
                format!("Failed to canonicalize path {missing}: No such file or directory (os error 2)"),
                format!(
                    "Canonicalize({missing:?}, Os {{ code: 2, kind: NotFound, message: \"No such file or directory\" }})"
                )
            )
        );
        let base = f.path("base");
        let canonical_base = fs::canonicalize(&base).unwrap();
        assert_eq!(
            f.error(&[("--exec-file", &base)], &[]),
            (format!("{} is not a file", canonical_base.display()), format!("NotAFile({canonical_base:?})"))
        );
        assert_eq!(
            f.error(&[("--chroot-base-dir", &missing), ("--uid", "x")], &[]).0,
            format!("Failed to canonicalize path {missing}: No such file or directory (os error 2)")
        );
        let exec = f.path("firecracker");
        let canonical_exec = fs::canonicalize(&exec).unwrap();
        assert_eq!(
            f.error(&[("--chroot-base-dir", &exec)], &[]),
            (
                format!("{} is not a directory", canonical_exec.display()),
                format!("NotADirectory({canonical_exec:?})")
            )
        );
        assert_eq!(
            f.error(&[("--uid", "abc"), ("--gid", "x")], &[]),
            ("Invalid uid: abc".into(), "Uid(\"abc\")".into())
        );
        assert_eq!(f.error(&[("--gid", "-1")], &[]), ("Invalid gid: -1".into(), "Gid(\"-1\")".into()));
    }

    #[test]
    fn cgroups_and_limits() {
        let f = Fixture::new();
        let bad_parent = "Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'";
        let cases: &[(&[&str], &str, &str)] = &[
            (&["--parent-cgroup", "/abs"], bad_parent, "CgroupInvalidParentPath"),
            (&["--parent-cgroup", "a/../b"], bad_parent, "CgroupInvalidParentPath"),
            (
                &["--cgroup-version", "x"],
                "x is an invalid cgroup version specifier",
                "CgroupInvalidVersion(\"x\")",
            ),
            (
                &["--cgroup", "cpu.shares"],
                "Invalid format for cgroups: cpu.shares",
                "CgroupFormat(\"cpu.shares\")",
            ),
            (
                &["--cgroup", "cpu.shares="],
                "Invalid format for cgroups: cpu.shares=",
                "CgroupFormat(\"cpu.shares=\")",
            ),
            (&["--cgroup", "a=b=c"], "Invalid format for cgroups: a=b=c", "CgroupFormat(\"a=b=c\")"),
            (
                &["--cgroup", "../cpu.shares=1"],
                "Cgroup invalid file: ../cpu.shares=1",
                "CgroupInvalidFile(\"../cpu.shares=1\")",
            ),
            (
                &["--cgroup", "memory.max=1"],
                "Controller memory is unavailable",
                "CgroupControllerUnavailable(\"memory\")",
            ),
            (
                &["--cgroup-version", "3", "--cgroup", "cpu.max=1"],
                "Hierarchy not found: No hierarchy found for this cgroup version.",
                "CgroupHierarchyMissing(\"No hierarchy found for this cgroup version.\")",
            ),
            (
                &["--resource-limit", "fsize"],
                "Invalid format for resources limits: fsize",
                "ResLimitFormat(\"fsize\")",
            ),
            (
                &["--resource-limit", "fsize=1.5"],
                "Invalid limit value for resource: 1.5: invalid digit found in string",
                "ResLimitValue(\"1.5\", \"invalid digit found in string\")",
            ),
            (&["--resource-limit", "cpu=1"], "Invalid resource argument: cpu", "ResLimitArgument(\"cpu\")"),
        ];
        for (extra, msg, debug) in cases {
            assert_eq!(f.error(&[], extra), (msg.to_string(), debug.to_string()), "{extra:?}");
        }
        // A version above 2 without --cgroup is never looked at, as in the jailer.
        assert!(f.check(&[], &["--cgroup-version", "7"]).is_ok());
        let c = f.check(&[], &["--cgroup", "cpu.shares=2", "--parent-cgroup", "a/b"]).unwrap();
        assert_eq!(c.cgroups.unwrap().locations(), [Path::new("/nowhere/cpu/a/b/vm-1")]);
    }

    #[test]
    fn userfaultfd_minor_is_read_like_the_jailer() {
        let f = Fixture::new();
        assert_eq!(userfaultfd_minor(&f.dir.path().join("misc")), Some(257));
        fs::write(f.dir.path().join("misc"), " 57 userfaultfd\n").unwrap();
        assert_eq!(userfaultfd_minor(&f.dir.path().join("misc")), None, "a padded line does not match");
        assert_eq!(userfaultfd_minor(Path::new("/nonexistent")), None);
    }
}
