//! Conformance of `jailer-double` with Firecracker's jailer 1.16.1 where no privilege is needed:
//! `--help`, `--version`, and every refusal that happens before the jailer touches anything
//! (exit status 1, nothing on stdout, the message then `Error: <Debug form>` on stderr, the
//! chroot base left as it was). The texts are the real jailer's.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use banger_tests::jailer::harness::{jailer_command, v2_mount};

const JAILER: &str = env!("CARGO_BIN_EXE_jailer-double");

/// An exec file and an empty chroot base in a temporary directory.
struct Setup {
    _dir: tempfile::TempDir,
    exec: PathBuf,
    base: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let exec = dir.path().join("firecracker");
        fs::write(&exec, b"\x7fELF").unwrap();
        let base = dir.path().join("base");
        fs::create_dir(&base).unwrap();
        Setup { exec, base, _dir: dir }
    }

    /// The usual arguments with `set` replacing some values, then `extra`.
    fn args(&self, set: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
        let defaults = [
            ("--id", "vm-1".to_string()),
            ("--exec-file", self.exec.display().to_string()),
            ("--uid", "123".to_string()),
            ("--gid", "456".to_string()),
            ("--chroot-base-dir", self.base.display().to_string()),
        ];
        let mut words = Vec::new();
        for (flag, default) in defaults {
            let value = set.iter().find(|(f, _)| *f == flag).map_or(default, |(_, v)| v.to_string());
            words.extend([flag.to_string(), value]);
        }
        words.extend(extra.iter().map(|w| w.to_string()));
        words
    }

    fn run(&self, args: &[String]) -> Output {
        jailer_command(Path::new(JAILER), args).output().unwrap()
    }

    /// Runs and checks the refusal's exact output; the base must stay empty.
    #[track_caller]
    fn refused(&self, args: &[String], message: &str, debug: &str) {
        let out = self.run(args);
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).as_ref(),
                String::from_utf8_lossy(&out.stderr).as_ref()
            ),
            (Some(1), "", format!("{message}\nError: {debug}\n").as_str()),
            "{args:?}"
        );
        if self.base.exists() {
            assert_eq!(fs::read_dir(&self.base).unwrap().count(), 0, "the base was touched: {args:?}");
        }
    }
}

#[test]
fn version_and_help_print_as_the_jailer_does() {
    let s = Setup::new();
    let out = s.run(&["--version".to_string()]);
    assert_eq!(
        (out.status.code(), out.stdout.as_slice(), out.stderr.as_slice()),
        (Some(0), &b"Jailer v1.16.1\n\n"[..], &b""[..])
    );
    let out = s.run(&["--id".into(), "x".into(), "-h".into()]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), HELP);
    assert!(out.stderr.is_empty());
}

const HELP: &str = "Jailer v1.16.1

required arguments:
  --exec-file <exec-file>   File path to exec into.
  --gid <gid>               The group identifier the jailer switches to after exec.
  --id <id>                 Jail ID.
  --uid <uid>               The user identifier the jailer switches to after exec.

optional arguments:
  --cgroup <cgroup>                     Cgroup and value to be set by the jailer. It must follow this format: <cgroup_file>=<value> (e.g cpu.shares=10). This argument can be used multiple times to add multiple cgroups.
  --cgroup-version <cgroup-version>     Select the cgroup version used by the jailer. [default: \"1\"]
  --chroot-base-dir <chroot-base-dir>   The base folder where chroot jails are located. [default: \"/srv/jailer\"]
  --daemonize                           Daemonize the jailer before exec, by invoking setsid(), and redirecting the standard I/O file descriptors to /dev/null.
  --help                                Show the help message.
  --netns <netns>                       Path to the network namespace this microVM should join.
  --new-pid-ns                          Exec into a new PID namespace.
  --parent-cgroup <parent-cgroup>       Parent cgroup in which the cgroup of this microvm will be placed.
  --resource-limit <resource-limit>     Resource limit values to be set by the jailer. It must follow this format: <resource>=<value> (e.g no-file=1024). This argument can be used multiple times to add multiple resource limits. Current available resource values are:
\t\tfsize: The maximum size in bytes for files created by the process.
\t\tno-file: Specifies a value one greater than the maximum file descriptor number that can be opened by this process.
  --version                             Print the binary version number.

Any arguments after the -- separator will be supplied to the jailed binary.

";

#[test]
fn command_line_refusals() {
    let s = Setup::new();
    s.refused(
        &[],
        "Failed to parse arguments: Argument 'exec-file' required, but not found.",
        "ArgumentParsing(MissingArgument(\"exec-file\"))",
    );
    let mut no_uid = s.args(&[], &[]);
    no_uid.drain(4..6);
    s.refused(
        &no_uid,
        "Failed to parse arguments: Argument 'uid' required, but not found.",
        "ArgumentParsing(MissingArgument(\"uid\"))",
    );
    s.refused(
        &s.args(&[], &["--bogus"]),
        "Failed to parse arguments: Found argument 'bogus' which wasn't expected, or isn't valid in this context.",
        "ArgumentParsing(UnexpectedArgument(\"bogus\"))",
    );
    s.refused(
        &s.args(&[], &["--netns"]),
        "Failed to parse arguments: The argument 'netns' requires a value, but none was supplied.",
        "ArgumentParsing(MissingValue(\"netns\"))",
    );
    s.refused(
        &s.args(&[], &["--id", "vm-2"]),
        "Failed to parse arguments: The argument 'id' was provided more than once.",
        "ArgumentParsing(DuplicateArgument(\"id\"))",
    );
}

#[test]
fn bad_ids() {
    let s = Setup::new();
    s.refused(
        &s.args(&[("--id", "")], &[]),
        "Invalid instance ID: Invalid len (0);  the length must be between 1 and 64",
        "InvalidInstanceId(InvalidLen(0, 1, 64))",
    );
    s.refused(
        &s.args(&[("--id", &"a".repeat(65))], &[]),
        "Invalid instance ID: Invalid len (65);  the length must be between 1 and 64",
        "InvalidInstanceId(InvalidLen(65, 1, 64))",
    );
    s.refused(
        &s.args(&[("--id", "a_b")], &[]),
        "Invalid instance ID: Invalid char (_) at position 1",
        "InvalidInstanceId(InvalidChar('_', 1))",
    );
}

#[test]
fn bad_paths_and_numbers() {
    let s = Setup::new();
    let missing = s.base.with_file_name("missing");
    let m = missing.display();
    s.refused(
        &s.args(&[("--exec-file", &m.to_string())], &[]),
        &format!("Failed to canonicalize path {m}: No such file or directory (os error 2)"),
        &format!("Canonicalize({missing:?}, Os {{ code: 2, kind: NotFound, message: \"No such file or directory\" }})"),
    );
    let dir_exec = s.base.with_file_name("a-directory");
    fs::create_dir(&dir_exec).unwrap();
    let canonical = fs::canonicalize(&dir_exec).unwrap();
    s.refused(
        &s.args(&[("--exec-file", &dir_exec.display().to_string())], &[]),
        &format!("{} is not a file", canonical.display()),
        &format!("NotAFile({canonical:?})"),
    );
    s.refused(
        &s.args(&[("--chroot-base-dir", &m.to_string())], &[]),
        &format!("Failed to canonicalize path {m}: No such file or directory (os error 2)"),
        &format!("Canonicalize({missing:?}, Os {{ code: 2, kind: NotFound, message: \"No such file or directory\" }})"),
    );
    assert!(!missing.exists(), "the chroot base is never created");
    s.refused(&s.args(&[("--uid", "abc")], &[]), "Invalid uid: abc", "Uid(\"abc\")");
    s.refused(&s.args(&[("--gid", "-1")], &[]), "Invalid gid: -1", "Gid(\"-1\")");
    s.refused(
        &s.args(&[], &["--resource-limit", "no-file=lots"]),
        "Invalid limit value for resource: lots: invalid digit found in string",
        "ResLimitValue(\"lots\", \"invalid digit found in string\")",
    );
}

/// `--cgroup-version 2` with `cpu.max` on a machine whose cgroup2 mount lacks the cpu
/// controller (this project's machines: cpu and memory are bound to v1). Where cpu is available
/// in v2, a controller no kernel has is asked for instead: the same refusal, before anything is
/// created.
#[test]
fn an_unavailable_v2_controller_is_refused_before_anything_is_made() {
    let s = Setup::new();
    let Some((unified, controllers)) = v2_mount() else {
        s.refused(
            &s.args(&[], &["--cgroup-version", "2", "--cgroup", "cpu.max=50000 100000"]),
            "Hierarchy not found: No hierarchy found for this cgroup version.",
            "CgroupHierarchyMissing(\"No hierarchy found for this cgroup version.\")",
        );
        return;
    };
    let controller = if controllers.iter().any(|c| c == "cpu") { "nosuchcontroller" } else { "cpu" };
    s.refused(
        &s.args(
            &[],
            &[
                "--cgroup-version",
                "2",
                "--cgroup",
                &format!("{controller}.max=50000 100000"),
                "--cgroup",
                "memory.max=1",
            ],
        ),
        &format!("Controller {controller} is unavailable"),
        &format!("CgroupControllerUnavailable(\"{controller}\")"),
    );
    assert!(!unified.join("firecracker/vm-1").exists(), "no cgroup was created");
}
