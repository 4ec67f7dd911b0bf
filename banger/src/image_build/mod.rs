//! Building the default image as the user, without root and without mounting anything: a
//! Debian root filesystem with an SSH server and its network from the kernel's `ip=` argument,
//! Debian's own kernel as an ELF `vmlinux`, and an initrd with what a Firecracker guest needs.
//!
//! How [`build`] goes:
//!
//! 1. [`check_subids`]: mmdebstrap's unshare mode maps the user's subordinate ids
//!    (`/etc/subuid`, `/etc/subgid`) as the root of a user namespace; a user without a range is
//!    told how to add one (root needs none).
//! 2. The host's apt setup ([`host_apt`]): its release, source lists and `Acquire::` options.
//! 3. `mmdebstrap --mode=unshare --variant=apt --format=null` with [`PACKAGES`] and two hooks:
//!    - `essential.sh`, before the kernel is installed: the initrd is made with `MODULES=list`,
//!      holding and loading virtio-mmio, virtio-pci, virtio-blk, virtio-net, vsock and ext4
//!      (modules in Debian's kernel);
//!    - `customize.sh`, after every package: systemd-networkd and systemd-network-generator
//!      enabled (the guest applies `ip=` itself), kernel interface names kept (`eth0`), nothing
//!      host-specific left (SSH host keys, machine-id, hostname, resolv.conf, apt lists), the
//!      packaged kernel and initrd moved out of `/boot`, and the root filesystem written with
//!      `mkfs.ext4 -d` inside mmdebstrap's namespace, where every file is owned by uid 0, so the
//!      image's files are root's;
//!    - mmdebstrap's `download` hooks hand the three files to the user's output directory.
//! 4. The ELF `vmlinux` is extracted from the packaged bzImage ([`vmlinux`]) and checked, and
//!    the root filesystem grown (sparsely) to [`ROOTFS_SIZE`] with `resize2fs`.
//!
//! mmdebstrap's output goes to a log file; [`build`] tells its caller each step ([`BuildStep`]):
//! the stages mmdebstrap reports on standard error (its `I:` lines), then the extraction, the
//! checks and the resize.
//!
//! The result ([`Built`]) is imported like any image (`image import --initrd`).

pub mod host_apt;
pub mod vmlinux;

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

pub use self::host_apt::HostApt;

/// The name `banger image build` and the first `vm run` give the default image.
pub const DEFAULT_IMAGE: &str = "debian";

/// What the image holds besides apt and Debian's essential packages: systemd as init (with
/// systemd-networkd and systemd-network-generator), udev, the SSH server, `ip`, netbase, and
/// the kernel with initramfs-tools (its modules stay in the image for the guest to load).
pub const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "openssh-server",
    "iproute2",
    "netbase",
    "linux-image-amd64",
    "initramfs-tools",
];

/// The modules the initrd holds and loads at boot (see `essential.sh`).
pub const INITRD_MODULES: &[&str] =
    &["virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "vsock", "vmw_vsock_virtio_transport", "ext4"];

/// The size the root filesystem is grown to (sparse: it takes only what is written).
pub const ROOTFS_SIZE: &str = "2G";

/// Runs in mmdebstrap's essential hook (before the kernel is installed).
pub const ESSENTIAL_HOOK: &str = include_str!("essential.sh");
/// Runs in mmdebstrap's customize hook (after every package is installed).
pub const CUSTOMIZE_HOOK: &str = include_str!("customize.sh");

/// The built kernel's file name in the output directory.
pub const VMLINUX_FILE: &str = "vmlinux";
/// The built initrd's file name.
pub const INITRD_FILE: &str = "initrd.img";
/// The built root filesystem's file name.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// The packaged compressed kernel, removed once `vmlinux` is extracted.
const VMLINUZ_FILE: &str = "vmlinuz";

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The user has no subordinate id range.
    #[error(
        "user {user} has no subordinate {kind} range in {file}: building an image without root needs one \
         (mmdebstrap's unshare mode); add one with `sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}` \
         (install.sh does this)"
    )]
    NoSubids {
        /// The user.
        user: String,
        /// `uid` or `gid`.
        kind: &'static str,
        /// `/etc/subuid` or `/etc/subgid`.
        file: &'static str,
    },
    /// A program is missing or could not be started.
    #[error(
        "cannot run {program} (install it: mmdebstrap and uidmap for mmdebstrap, e2fsprogs for the rest)"
    )]
    Spawn {
        /// The program.
        program: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host's apt setup cannot be used.
    #[error("cannot use this host's apt setup: {problem}")]
    HostApt {
        /// What is wrong.
        problem: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The output directory is not usable.
    #[error("output directory {path} {problem}")]
    OutDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The build log could not be written.
    #[error("cannot write the build log {path}")]
    Log {
        /// The log.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mmdebstrap failed.
    #[error("mmdebstrap failed ({status}): its output is in {}", .log.display())]
    Mmdebstrap {
        /// Its exit status.
        status: ExitStatus,
        /// Where its output went.
        log: PathBuf,
    },
    /// A tool after mmdebstrap failed.
    #[error("{program} failed on {path} ({status}): {stderr}")]
    Tool {
        /// The program.
        program: &'static str,
        /// The file.
        path: PathBuf,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// The packaged kernel could not be turned into an ELF `vmlinux`.
    #[error("cannot extract the kernel")]
    Vmlinux(#[source] vmlinux::VmlinuxError),
    /// An output is missing or not what it must be.
    #[error("the build produced no usable {what}: {problem}")]
    Output {
        /// Which output.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// A step of a build, as [`build`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildStep {
    /// mmdebstrap reports a stage (one of its `I:` lines, without the prefix, a hook's script
    /// left out).
    Mmdebstrap(String),
    /// The ELF `vmlinux` is extracted from the packaged kernel.
    Vmlinux,
    /// The outputs are checked.
    Check,
    /// The root filesystem is grown to [`ROOTFS_SIZE`].
    Resize,
}

impl std::fmt::Display for BuildStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildStep::Mmdebstrap(stage) => write!(f, "mmdebstrap: {stage}"),
            BuildStep::Vmlinux => f.write_str("extracting the vmlinux from the packaged kernel"),
            BuildStep::Check => f.write_str("checking the kernel, the initrd and the root filesystem"),
            BuildStep::Resize => write!(f, "growing the root filesystem to {ROOTFS_SIZE}"),
        }
    }
}

/// The longest an mmdebstrap stage is shown (its lines can hold whole commands).
const STAGE_WIDTH: usize = 72;

/// The stage an mmdebstrap standard error line reports, if it is one of its `I:` lines.
pub fn mmdebstrap_stage(line: &str) -> Option<String> {
    let stage = line.strip_prefix("I: ")?.trim_end();
    // `running --customize-hook in shell: sh -c '<the whole script>`: the hook, not its script.
    let stage = stage.split_once(" in shell: ").map_or(stage, |(hook, _)| hook);
    if stage.is_empty() {
        return None;
    }
    if stage.chars().count() <= STAGE_WIDTH {
        return Some(stage.to_owned());
    }
    let mut cut: String = stage.chars().take(STAGE_WIDTH - 1).collect();
    cut.push('…');
    Some(cut)
}

/// Copies mmdebstrap's standard error `from` into `log` line by line, telling `progress` each
/// stage it reports. Reads to the end even when the log cannot be written (mmdebstrap would
/// otherwise block on a full pipe); the first write error is returned then.
pub fn relay_stderr(
    mut from: impl BufRead,
    log: &mut impl Write,
    progress: &mut dyn FnMut(BuildStep),
) -> std::io::Result<()> {
    let mut failed = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        if from.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if failed.is_none()
            && let Err(e) = log.write_all(&line)
        {
            failed = Some(e);
        }
        if let Some(stage) = mmdebstrap_stage(&String::from_utf8_lossy(&line)) {
            progress(BuildStep::Mmdebstrap(stage));
        }
    }
    match failed {
        Some(e) => Err(e),
        None => log.flush(),
    }
}

/// What a build made, in its output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The ELF kernel.
    pub vmlinux: PathBuf,
    /// The initrd (gzip-compressed cpio).
    pub initrd: PathBuf,
    /// The ext4 root filesystem.
    pub rootfs: PathBuf,
}

impl Built {
    /// The outputs' paths in `dir`.
    pub fn in_dir(dir: &Path) -> Built {
        Built {
            vmlinux: dir.join(VMLINUX_FILE),
            initrd: dir.join(INITRD_FILE),
            rootfs: dir.join(ROOTFS_FILE),
        }
    }
}

/// Checks that `user` (not root) has subordinate uid and gid ranges, reading `subuid` and
/// `subgid` files.
pub fn check_subids(user: &str, uid: u32, subuid: &Path, subgid: &Path) -> Result<(), BuildError> {
    if uid == 0 {
        return Ok(());
    }
    for (path, kind, file) in [(subuid, "uid", "/etc/subuid"), (subgid, "gid", "/etc/subgid")] {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found = text.lines().any(|line| {
            let mut fields = line.trim().split(':');
            let owner = fields.next().unwrap_or_default();
            let count = fields.nth(1).and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
            (owner == user || owner == uid.to_string()) && count >= 65536
        });
        if !found {
            return Err(BuildError::NoSubids { user: user.to_owned(), kind, file });
        }
    }
    Ok(())
}

/// mmdebstrap's arguments for a build from `apt` into `out` (a directory without whitespace in
/// its path: mmdebstrap's `download` hooks split on it).
pub fn mmdebstrap_args(apt: &HostApt, out: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--mode=unshare".into(),
        "--variant=apt".into(),
        "--format=null".into(),
        format!("--include={}", PACKAGES.join(",")).into(),
    ];
    args.extend(apt.options.iter().map(|o| OsString::from(format!("--aptopt={o}"))));
    args.push(format!("--essential-hook={ESSENTIAL_HOOK}").into());
    args.push(format!("--customize-hook={CUSTOMIZE_HOOK}").into());
    for file in [VMLINUZ_FILE, INITRD_FILE, ROOTFS_FILE] {
        args.push(
            format!("--customize-hook=download /.banger-out/{file} {}", out.join(file).display()).into(),
        );
    }
    args.push(apt.suite.clone().into());
    args.push("/dev/null".into());
    args.extend(apt.sources.iter().map(|s| s.clone().into_os_string()));
    args
}

/// Builds the default image into `out` (an existing, empty directory of the user's), writing
/// mmdebstrap's output to `log` and telling `progress` each step.
pub fn build(
    apt: &HostApt,
    out: &Path,
    log: &Path,
    progress: &mut dyn FnMut(BuildStep),
) -> Result<Built, BuildError> {
    build_with(Command::new("mmdebstrap"), apt, out, log, progress)
}

/// [`build`] with `cmd` (the program and any arguments before mmdebstrap's) making the root
/// filesystem.
fn build_with(
    mut cmd: Command,
    apt: &HostApt,
    out: &Path,
    log: &Path,
    progress: &mut dyn FnMut(BuildStep),
) -> Result<Built, BuildError> {
    let out_problem =
        |problem: &str| BuildError::OutDir { path: out.to_owned(), problem: problem.to_owned() };
    if out.to_string_lossy().chars().any(char::is_whitespace) {
        return Err(out_problem("has whitespace in its path (mmdebstrap's hooks cannot name it)"));
    }
    if !out.is_dir() {
        return Err(out_problem("is not a directory"));
    }
    let log_err = |source| BuildError::Log { path: log.to_owned(), source };
    let mut log_file = File::create(log).map_err(log_err)?;
    cmd.args(mmdebstrap_args(apt, out))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(log_err)?)
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| BuildError::Spawn { program: "mmdebstrap", source })?;
    let stderr = child.stderr.take().expect("standard error is piped");
    let relayed = relay_stderr(BufReader::new(stderr), &mut log_file, progress);
    let status = child.wait().map_err(|source| BuildError::Spawn { program: "mmdebstrap", source })?;
    relayed.map_err(log_err)?;
    if !status.success() {
        return Err(BuildError::Mmdebstrap { status, log: log.to_owned() });
    }
    let built = Built::in_dir(out);
    let vmlinuz = out.join(VMLINUZ_FILE);
    progress(BuildStep::Vmlinux);
    vmlinux::extract(&vmlinuz, &built.vmlinux).map_err(BuildError::Vmlinux)?;
    let _ = std::fs::remove_file(&vmlinuz);
    progress(BuildStep::Check);
    check_outputs(&built)?;
    progress(BuildStep::Resize);
    run_tool("resize2fs", &built.rootfs, &[ROOTFS_SIZE])?;
    Ok(built)
}

/// Checks what [`build`] made: an x86_64 ELF kernel, a gzip initrd, an ext4 root filesystem.
pub fn check_outputs(built: &Built) -> Result<(), BuildError> {
    crate::daemon::images::check_kernel(&built.vmlinux)
        .map_err(|e| BuildError::Output { what: "kernel", problem: e.to_string() })?;
    let head = |path: &Path| -> Result<Vec<u8>, BuildError> {
        use std::io::Read as _;
        let mut buf = Vec::new();
        File::open(path)
            .and_then(|f| f.take(2).read_to_end(&mut buf))
            .map_err(|source| BuildError::Read { path: path.to_owned(), source })?;
        Ok(buf)
    };
    if head(&built.initrd)? != [0x1f, 0x8b] {
        return Err(BuildError::Output {
            what: "initrd",
            problem: "not a gzip-compressed cpio archive".into(),
        });
    }
    let ext = crate::daemon::personalize::is_ext_filesystem(&built.rootfs)
        .map_err(|source| BuildError::Read { path: built.rootfs.clone(), source })?;
    if !ext {
        return Err(BuildError::Output { what: "root filesystem", problem: "not an ext4 filesystem".into() });
    }
    Ok(())
}

fn run_tool(program: &'static str, path: &Path, args: &[&str]) -> Result<(), BuildError> {
    let tool = crate::daemon::personalize::find_tool(program)
        .map_err(|e| BuildError::Spawn { program, source: std::io::Error::other(e.to_string()) })?;
    let out = Command::new(tool)
        .arg(path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BuildError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(BuildError::Tool {
            program,
            path: path.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_needs_both_subordinate_ranges_and_root_none() {
        let dir = tempfile::tempdir().unwrap();
        let (uid_file, gid_file) = (dir.path().join("subuid"), dir.path().join("subgid"));
        std::fs::write(&uid_file, "alice:100000:65536\n1001:200000:65536\n").unwrap();
        std::fs::write(&gid_file, "alice:100000:65536\n").unwrap();
        check_subids("alice", 1000, &uid_file, &gid_file).unwrap();
        check_subids("root", 0, Path::new("/nonexistent"), Path::new("/nonexistent")).unwrap();
        let err = check_subids("bob", 1001, &uid_file, &gid_file).unwrap_err().to_string();
        assert!(err.contains("no subordinate gid range in /etc/subgid"), "{err}");
        assert!(err.contains("usermod --add-subuids"), "{err}");
        let err = check_subids("carol", 1002, &uid_file, &gid_file).unwrap_err().to_string();
        assert!(err.contains("subordinate uid range"), "{err}");
        std::fs::write(&uid_file, "dave:100000:10\n").unwrap();
        assert!(check_subids("dave", 1003, &uid_file, &gid_file).is_err(), "too small a range");
    }

    #[test]
    fn mmdebstrap_stages_are_told_and_everything_it_prints_is_logged() {
        let stderr = "I: automatically chosen format: null\n\
                      Get:1 http://deb.debian.org/debian bookworm InRelease [151 kB]\n\
                      I: running --essential-hook in shell: sh -c '#!/bin/sh\n\
                      set -eu\n\
                      '\n\
                      W: a warning\n\
                      I: downloading packages with apt...\n\
                      I: \n\
                      I: cleaning package lists and apt cache... and a line far longer than anyone wants to see on one terminal line";
        let mut log = Vec::new();
        let mut steps = Vec::new();
        relay_stderr(stderr.as_bytes(), &mut log, &mut |s| steps.push(s.to_string())).unwrap();
        assert_eq!(log, stderr.as_bytes(), "the log has every byte");
        assert_eq!(
            steps[..3],
            [
                "mmdebstrap: automatically chosen format: null",
                "mmdebstrap: running --essential-hook",
                "mmdebstrap: downloading packages with apt...",
            ]
        );
        assert_eq!(steps.len(), 4, "{steps:?}");
        assert!(steps[3].starts_with("mmdebstrap: cleaning package lists") && steps[3].ends_with('…'));
        assert_eq!(steps[3].chars().count(), "mmdebstrap: ".len() + STAGE_WIDTH);
        assert_eq!(BuildStep::Resize.to_string(), "growing the root filesystem to 2G");

        // A log that cannot be written: the output is still read to its end, then the error.
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::StorageFull.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut steps = 0;
        let err = relay_stderr(stderr.as_bytes(), &mut Full, &mut |_| steps += 1).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
        assert_eq!(steps, 4);
    }

    /// An mmdebstrap stand-in (a shell script): reports two stages and some noise, then puts small outputs
    /// (a bzImage around an ELF header, a gzip magic, a 16 MiB ext4) where its download hooks
    /// would, and exits with `exit`.
    fn fake_mmdebstrap(dir: &Path, out: &Path, exit: u8) -> PathBuf {
        let fixtures = dir.join("fixtures");
        std::fs::create_dir_all(&fixtures).unwrap();
        let mut elf = vec![0u8; 4096];
        elf[..4].copy_from_slice(b"\x7fELF");
        (elf[4], elf[5]) = (2, 1);
        elf[18..20].copy_from_slice(&62u16.to_le_bytes());
        let mut bz = vec![0u8; 5 * 512];
        bz[0x1f1] = 4;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&(elf.len() as u32).to_le_bytes());
        bz.extend_from_slice(&elf);
        std::fs::write(fixtures.join(VMLINUZ_FILE), bz).unwrap();
        std::fs::write(fixtures.join(INITRD_FILE), [0x1f, 0x8b, 8, 0]).unwrap();
        let mkfs = crate::daemon::personalize::find_tool("mkfs.ext4").unwrap();
        let made = Command::new(mkfs)
            .args(["-q", "-F"])
            .arg(fixtures.join(ROOTFS_FILE))
            .arg("16M")
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let script = dir.join("mmdebstrap");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n\
                 echo 'I: downloading packages with apt...' >&2\n\
                 echo 'Get:1 http://deb.debian.org/debian bookworm InRelease' >&2\n\
                 echo 'Setting up openssh-server'\n\
                 echo \"I: running --customize-hook in shell: sh -c '$1'\" >&2\n\
                 cp {fix}/* {out}/\n\
                 [ {exit} = 0 ] || echo 'E: the fake failed' >&2\n\
                 exit {exit}\n",
                fix = fixtures.display(),
                out = out.display(),
            ),
        )
        .unwrap();
        script
    }

    /// The stand-in run by `sh` (a script written and executed at once can fail with "text
    /// file busy" while another test thread forks).
    fn sh(script: &Path) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg(script);
        cmd
    }

    fn apt() -> HostApt {
        HostApt { suite: "bookworm".into(), sources: vec![], options: vec![] }
    }

    #[test]
    fn a_build_tells_mmdebstrap_stages_then_its_own_steps_and_logs_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let log = dir.path().join("build.log");
        let mmdebstrap = fake_mmdebstrap(dir.path(), &out, 0);
        let mut steps = Vec::new();
        let built =
            build_with(sh(&mmdebstrap), &apt(), &out, &log, &mut |s| steps.push(s.to_string())).unwrap();
        assert_eq!(
            steps,
            [
                "mmdebstrap: downloading packages with apt...",
                "mmdebstrap: running --customize-hook",
                "extracting the vmlinux from the packaged kernel",
                "checking the kernel, the initrd and the root filesystem",
                "growing the root filesystem to 2G",
            ]
        );
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("Get:1 http://") && logged.contains("Setting up openssh-server"), "{logged}");
        assert_eq!(built, Built::in_dir(&out));
        assert_eq!(std::fs::metadata(&built.rootfs).unwrap().len(), 2 << 30);
        assert!(!out.join(VMLINUZ_FILE).exists(), "the packaged kernel is removed");

        // A failed mmdebstrap: its stages were told, and the error names the log holding why.
        let out = dir.path().join("out2");
        std::fs::create_dir(&out).unwrap();
        let mmdebstrap = fake_mmdebstrap(dir.path(), &out, 3);
        let mut steps = Vec::new();
        let err =
            build_with(sh(&mmdebstrap), &apt(), &out, &log, &mut |s| steps.push(s.to_string())).unwrap_err();
        assert!(matches!(err, BuildError::Mmdebstrap { .. }), "{err:?}");
        assert!(err.to_string().ends_with(&format!("its output is in {}", log.display())), "{err}");
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert!(std::fs::read_to_string(&log).unwrap().contains("E: the fake failed"));
    }

    #[test]
    fn mmdebstrap_gets_the_host_apt_setup_and_downloads_into_the_output() {
        let apt = HostApt {
            suite: "bookworm".into(),
            sources: vec!["/etc/apt/sources.list.d/debian.sources".into()],
            options: vec!["Acquire::Check-Valid-Until \"false\"".into()],
        };
        let args: Vec<String> =
            mmdebstrap_args(&apt, Path::new("/o")).into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(args[..3], ["--mode=unshare", "--variant=apt", "--format=null"]);
        assert!(args[3].starts_with("--include=systemd-sysv,") && args[3].contains("openssh-server"));
        assert!(args.contains(&"--aptopt=Acquire::Check-Valid-Until \"false\"".to_owned()));
        assert!(
            args.contains(&"--customize-hook=download /.banger-out/rootfs.ext4 /o/rootfs.ext4".to_owned())
        );
        assert_eq!(
            args[args.len() - 3..],
            ["bookworm", "/dev/null", "/etc/apt/sources.list.d/debian.sources"]
        );
        assert!(!args.iter().any(|a| a.contains("deb.debian.org")), "no mirror of banger's own");
        // The initrd's module list is the one documented here.
        for module in INITRD_MODULES {
            assert!(ESSENTIAL_HOOK.contains(module), "{module}");
        }
    }
}
