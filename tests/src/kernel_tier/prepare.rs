//! The tier's cache: Debian's kernel, qemu and busybox, fetched with the machine's own apt setup
//! and unpacked, never installed (installing `qemu-system-x86` can remove a newer `qemu-utils`;
//! the kernel package would pull in udev and initramfs-tools).
//!
//! Layout of the cache directory:
//!
//! - `lock`: `flock`ed shared while a run boots, exclusively while preparing;
//! - `debs/`: the downloaded packages;
//! - `tree-RELEASE/`: `root/` (every package unpacked with `dpkg -x`, modules indexed with
//!   `depmod -b`), `vmlinux` (the ELF kernel), `ready` (what it holds; written last);
//! - `current`: the name of the tree in use;
//! - `runs/`: one directory per run (see [`super::run`]).
//!
//! Steps, when no ready tree is named by `current` (or on `--refresh`):
//!
//! 1. check the host: x86_64, apt, dpkg, kmod;
//! 2. resolve the versioned package of the generic kernel flavour (`apt-cache depends
//!    linux-image-amd64`), and what `qemu-system-x86` and `busybox-static` would install here
//!    (`apt-get install -s --no-install-recommends`: qemu, its data and firmware, and only the
//!    libraries this machine lacks), each at an exact version;
//! 3. `apt-get download` what `debs/` does not have yet;
//! 4. unpack, extract `vmlinux`, `depmod -b`, check that qemu runs, write `ready`, rename the
//!    tree into place, name it in `current`, and remove older trees and packages.
//!
//! A step that cannot reach or use apt is [`Unavailable`]: the tier is then skipped with that
//! reason (or fails under `CI=true`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};

use super::Unavailable;
use super::qemu::QemuInstall;
use super::vmlinux::{self, VmlinuxError};

/// Bumped when a tree's contents change meaning, so older trees are rebuilt.
const FORMAT: &str = "1";

/// The metapackage of Debian's generic kernel flavour (the `cloud` flavour has no 9p).
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// Fetched whatever this machine has installed: qemu, its data, its firmware, busybox.
const ALWAYS: &[&str] =
    &["qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios", "busybox-static"];

/// A prepared tree, ready to boot.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The tree's directory.
    pub tree: PathBuf,
    /// The kernel's release (`uname -r` in the guest).
    pub kernel_release: String,
    /// The kernel package and its version.
    pub kernel_package: String,
    /// What `qemu-system-x86_64 --version` says.
    pub qemu_version: String,
}

impl Prepared {
    /// Where the packages are unpacked.
    pub fn root(&self) -> PathBuf {
        self.tree.join("root")
    }

    /// The ELF kernel.
    pub fn vmlinux(&self) -> PathBuf {
        self.tree.join("vmlinux")
    }

    /// The kernel's modules, indexed.
    pub fn modules_dir(&self) -> PathBuf {
        self.root().join("lib/modules").join(&self.kernel_release)
    }

    /// Static busybox.
    pub fn busybox(&self) -> PathBuf {
        self.root().join("bin/busybox")
    }

    /// qemu with its libraries and firmware.
    pub fn qemu(&self) -> QemuInstall {
        qemu_install(&self.root())
    }

    fn stamp(&self) -> String {
        format!(
            "format={FORMAT}\nkernel_release={}\nkernel_package={}\nqemu_version={}\n",
            self.kernel_release, self.kernel_package, self.qemu_version
        )
    }

    fn from_stamp(tree: &Path, text: &str) -> Option<Prepared> {
        let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        if fields.get("format") != Some(&FORMAT) {
            return None;
        }
        Some(Prepared {
            tree: tree.to_path_buf(),
            kernel_release: fields.get("kernel_release")?.to_string(),
            kernel_package: fields.get("kernel_package")?.to_string(),
            qemu_version: fields.get("qemu_version")?.to_string(),
        })
    }
}

fn qemu_install(root: &Path) -> QemuInstall {
    let existing =
        |dirs: &[&str]| dirs.iter().map(|d| root.join(d)).filter(|d| d.is_dir()).collect::<Vec<_>>();
    QemuInstall {
        binary: root.join("usr/bin/qemu-system-x86_64"),
        lib_dirs: existing(&["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]),
        data_dirs: existing(&["usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"]),
    }
}

/// Why the cache could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The tier cannot run here (no apt, no network to the mirror, ...).
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// A file in the cache could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The cache's lock could not be taken.
    #[error("locking {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// A command of the preparation failed.
    #[error("`{command}` failed: {detail}")]
    Step {
        /// The command.
        command: String,
        /// Its status and the end of its output.
        detail: String,
    },
    /// The kernel could not be extracted from the package's bzImage.
    #[error("extracting the kernel")]
    Vmlinux(#[source] VmlinuxError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PrepareError + '_ {
    move |source| PrepareError::Io { path: path.to_path_buf(), source }
}

/// A shared lock on the cache: held while a run boots, so that no preparation replaces the tree
/// under it (runs share it; preparing takes it exclusively).
#[derive(Debug)]
pub struct CacheLock {
    _held: Flock<File>,
}

/// Makes the cache at `cache` ready (idempotent: a ready tree is used as it is unless `refresh`),
/// returning it with a shared lock on the cache.
pub fn prepare(cache: &Path, refresh: bool) -> Result<(Prepared, CacheLock), PrepareError> {
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let lock_path = cache.join("lock");
    let lock_error = |source| PrepareError::Lock { path: lock_path.clone(), source };
    let file = File::options().create(true).append(true).open(&lock_path).map_err(io(&lock_path))?;
    let lock = Flock::lock(file, FlockArg::LockShared).map_err(|(_, source)| lock_error(source))?;
    if !refresh && let Some(prepared) = current(cache) {
        return Ok((prepared, CacheLock { _held: lock }));
    }
    // Exclusive (waiting for runs that boot from the cache), then look again: another process
    // may have prepared it meanwhile.
    lock.relock(FlockArg::LockExclusive).map_err(lock_error)?;
    if !refresh && let Some(prepared) = current(cache) {
        lock.relock(FlockArg::LockShared).map_err(lock_error)?;
        return Ok((prepared, CacheLock { _held: lock }));
    }
    let started = Instant::now();
    check_host()?;
    say("resolving packages with apt");
    let packages = resolve()?;
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(io(&debs))?;
    download(&debs, &packages)?;
    let prepared = build_tree(cache, &debs, &packages)?;
    remove_stale(cache, &debs, &prepared, &packages);
    say(&format!("cache ready in {:.1} s: {}", started.elapsed().as_secs_f64(), prepared.tree.display()));
    lock.relock(FlockArg::LockShared).map_err(lock_error)?;
    Ok((prepared, CacheLock { _held: lock }))
}

/// The ready tree `current` names, if any.
pub fn current(cache: &Path) -> Option<Prepared> {
    let name = std::fs::read_to_string(cache.join("current")).ok()?;
    let tree = cache.join(name.trim());
    let stamp = std::fs::read_to_string(tree.join("ready")).ok()?;
    Prepared::from_stamp(&tree, &stamp)
}

fn say(what: &str) {
    eprintln!("kernel-tier: {what}");
}

/// A program by name in `PATH` or the sbin directories (not in a non-root `PATH`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn check_host() -> Result<(), Unavailable> {
    if std::env::consts::ARCH != "x86_64" {
        return Err(Unavailable::new(format!(
            "the tier boots Debian's x86_64 kernel under qemu-system-x86_64; this machine is {}",
            std::env::consts::ARCH
        )));
    }
    for (program, package) in
        [("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg", "dpkg"), ("depmod", "kmod"), ("modprobe", "kmod")]
    {
        if find_program(program).is_none() {
            return Err(Unavailable::new(format!(
                "{program} is missing (Debian package {package}); the tier fetches Debian's kernel and \
                 qemu with apt and dpkg and loads modules with the machine's kmod"
            )));
        }
    }
    Ok(())
}

/// A package at an exact version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    /// Its name (maybe with `:arch`).
    pub name: String,
    /// Its version.
    pub version: String,
}

impl Package {
    fn apt_arg(&self) -> String {
        format!("{}={}", self.name, self.version)
    }

    /// The start of the file name `apt-get download` gives it (`NAME_VERSION_`, `:` as `%3a`).
    fn file_prefix(&self) -> String {
        let name = self.name.split(':').next().unwrap_or(&self.name);
        format!("{name}_{}_", self.version.replace(':', "%3a"))
    }
}

/// What to fetch: the kernel package first, then qemu, busybox and the libraries.
#[derive(Debug)]
struct Packages {
    kernel: Package,
    rest: Vec<Package>,
}

impl Packages {
    fn all(&self) -> impl Iterator<Item = &Package> {
        std::iter::once(&self.kernel).chain(&self.rest)
    }
}

/// Runs an apt command in the C locale; its stdout, or why it failed.
fn apt(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.args(args).env("LC_ALL", "C");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = cmd.output().map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{}: {}", out.status, tail(&String::from_utf8_lossy(&out.stderr))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(2)..].join(" | ")
}

fn resolve() -> Result<Packages, Unavailable> {
    let unavailable = |what: &str, why: String| {
        Unavailable::new(format!("{what}: {why} (is the apt index current? run apt-get update)"))
    };
    let depends = apt("apt-cache", &["depends", KERNEL_METAPACKAGE], None)
        .map_err(|e| unavailable(&format!("apt-cache depends {KERNEL_METAPACKAGE}"), e))?;
    let kernel_name = parse_kernel_depends(&depends).ok_or_else(|| {
        unavailable(&format!("apt-cache depends {KERNEL_METAPACKAGE}"), "no linux-image-* dependency".into())
    })?;
    let mut sim_args = vec!["install", "-s", "--no-install-recommends"];
    sim_args.extend(["qemu-system-x86", "busybox-static"]);
    let simulated =
        apt("apt-get", &sim_args, None).map_err(|e| unavailable("apt-get install -s qemu-system-x86", e))?;
    let mut rest = parse_simulated_installs(&simulated);
    let mut names: Vec<&str> = vec![&kernel_name];
    names.extend(ALWAYS.iter().filter(|n| !rest.iter().any(|p| p.name == **n)));
    let mut policy_args = vec!["policy"];
    policy_args.extend(&names);
    let policy = apt("apt-cache", &policy_args, None).map_err(|e| unavailable("apt-cache policy", e))?;
    let candidates = parse_policy_candidates(&policy);
    let mut kernel = None;
    for name in names {
        let version = candidates
            .get(name)
            .ok_or_else(|| unavailable(&format!("apt-cache policy {name}"), "no candidate version".into()))?;
        let package = Package { name: name.to_string(), version: version.clone() };
        if name == kernel_name { kernel = Some(package) } else { rest.push(package) }
    }
    rest.sort();
    rest.dedup();
    Ok(Packages { kernel: kernel.expect("the kernel was among the names"), rest })
}

/// The versioned kernel package in `apt-cache depends linux-image-amd64`'s output.
fn parse_kernel_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && !name.starts_with('<'))
        .map(String::from)
}

/// The packages (`Inst NAME [OLD] (VERSION ...)`) in `apt-get install -s`'s output.
fn parse_simulated_installs(text: &str) -> Vec<Package> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|rest| {
            let name = rest.split_whitespace().next()?;
            let version = rest.split_once('(')?.1.split_whitespace().next()?;
            Some(Package { name: name.to_string(), version: version.to_string() })
        })
        .collect()
}

/// Each package's `Candidate:` in `apt-cache policy`'s output (none when `(none)`).
fn parse_policy_candidates(text: &str) -> BTreeMap<String, String> {
    let mut candidates = BTreeMap::new();
    let mut package = None;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            package = Some(line.trim_end_matches(':').to_string());
        } else if let (Some(name), Some(version)) = (&package, line.trim().strip_prefix("Candidate:")) {
            let version = version.trim();
            if version != "(none)" {
                candidates.insert(name.clone(), version.to_string());
            }
        }
    }
    candidates
}

fn deb_file(debs: &Path, package: &Package) -> Option<PathBuf> {
    let prefix = package.file_prefix();
    std::fs::read_dir(debs).ok()?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
    })
}

fn download(debs: &Path, packages: &Packages) -> Result<(), PrepareError> {
    let missing: Vec<String> =
        packages.all().filter(|p| deb_file(debs, p).is_none()).map(Package::apt_arg).collect();
    if !missing.is_empty() {
        say(&format!("downloading {} packages with apt-get download", missing.len()));
        let mut args = vec!["download", "-q"];
        args.extend(missing.iter().map(String::as_str));
        apt("apt-get", &args, Some(debs)).map_err(|e| {
            Unavailable::new(format!("apt-get download of {} ({} packages): {e}", missing[0], missing.len()))
        })?;
    }
    match packages.all().find(|p| deb_file(debs, p).is_none()) {
        Some(p) => Err(PrepareError::Step {
            command: format!("apt-get download {}", p.apt_arg()),
            detail: format!("no {}*.deb in {}", p.file_prefix(), debs.display()),
        }),
        None => Ok(()),
    }
}

fn run_step(cmd: &mut Command) -> Result<String, PrepareError> {
    let command = format!("{cmd:?}");
    let out =
        cmd.output().map_err(|e| PrepareError::Step { command: command.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        let detail = format!("{}: {}", out.status, tail(&String::from_utf8_lossy(&out.stderr)));
        return Err(PrepareError::Step { command, detail });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn build_tree(cache: &Path, debs: &Path, packages: &Packages) -> Result<Prepared, PrepareError> {
    let release = packages.kernel.name.trim_start_matches("linux-image-").to_string();
    let name = format!("tree-{release}");
    let (tree, partial) = (cache.join(&name), cache.join(format!("{name}.partial")));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    let root = partial.join("root");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    say(&format!("unpacking {} packages with dpkg -x", packages.all().count()));
    for package in packages.all() {
        let deb = deb_file(debs, package).expect("downloaded");
        run_step(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    }
    say("extracting vmlinux from the bzImage");
    let bzimage = root.join("boot").join(format!("vmlinuz-{release}"));
    vmlinux::extract(&bzimage, &partial.join("vmlinux")).map_err(PrepareError::Vmlinux)?;
    let depmod = find_program("depmod").expect("checked");
    run_step(Command::new(depmod).arg("-b").arg(&root).arg(&release))?;
    let qemu = qemu_install(&root);
    let version = run_step(qemu.command().arg("--version"))?;
    let prepared = Prepared {
        tree: tree.clone(),
        kernel_release: release,
        kernel_package: format!("{} {}", packages.kernel.name, packages.kernel.version),
        qemu_version: version.lines().next().unwrap_or_default().to_string(),
    };
    let ready = partial.join("ready");
    std::fs::write(&ready, prepared.stamp()).map_err(io(&ready))?;
    if tree.exists() {
        std::fs::remove_dir_all(&tree).map_err(io(&tree))?;
    }
    std::fs::rename(&partial, &tree).map_err(io(&tree))?;
    let current = cache.join("current");
    let tmp = cache.join("current.tmp");
    std::fs::write(&tmp, format!("{name}\n")).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &current).map_err(io(&current))?;
    Ok(prepared)
}

/// Removes trees and packages that the new tree replaced (best effort).
fn remove_stale(cache: &Path, debs: &Path, prepared: &Prepared, packages: &Packages) {
    let entries = |dir: &Path| std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok);
    for entry in entries(cache) {
        let stale_tree = entry.file_name().to_str().is_some_and(|n| n.starts_with("tree-"));
        if stale_tree && entry.path() != prepared.tree {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let keep: Vec<String> = packages.all().map(Package::file_prefix).collect();
    for entry in entries(debs) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !keep.iter().any(|k| name.starts_with(k)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_metapackage_names_its_versioned_package() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(parse_kernel_depends(text).as_deref(), Some("linux-image-6.1.0-57-amd64"));
        let alternatives =
            "linux-image-amd64\n |Depends: <linux-image-virtual>\n  Depends: linux-image-6.12.9-amd64\n";
        assert_eq!(parse_kernel_depends(alternatives).as_deref(), Some("linux-image-6.12.9-amd64"));
        assert_eq!(parse_kernel_depends("W: Unable to locate package linux-image-amd64\n"), None);
    }

    #[test]
    fn simulated_installs_give_names_and_versions() {
        let text = "\
NOTE: This is only a simulation!
Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]
Inst libfdt1 (1.6.1-4+b1 Debian:12.15/oldstable [amd64])
Inst libslirp0 [4.6.0-1] (4.7.0-1 Debian:12.15/oldstable [amd64])
Inst qemu-system-x86 (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
Conf libfdt1 (1.6.1-4+b1 Debian:12.15/oldstable [amd64])
";
        let packages = parse_simulated_installs(text);
        let pairs: Vec<(&str, &str)> =
            packages.iter().map(|p| (p.name.as_str(), p.version.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("libfdt1", "1.6.1-4+b1"),
                ("libslirp0", "4.7.0-1"),
                ("qemu-system-x86", "1:7.2+dfsg-7+deb12u18+b3")
            ]
        );
    }

    #[test]
    fn policy_gives_each_candidate() {
        let text = "\
seabios:
  Installed: (none)
  Candidate: 1.16.2-1
  Version table:
     1.16.2-1 500
linux-image-6.1.0-57-amd64:
  Installed: (none)
  Candidate: 6.1.192-3
busybox-static:
  Installed: (none)
  Candidate: (none)
";
        let candidates = parse_policy_candidates(text);
        assert_eq!(candidates.get("seabios").map(String::as_str), Some("1.16.2-1"));
        assert_eq!(candidates.get("linux-image-6.1.0-57-amd64").map(String::as_str), Some("6.1.192-3"));
        assert_eq!(candidates.get("busybox-static"), None);
    }

    #[test]
    fn downloaded_files_are_found_by_name_and_version() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["qemu-system-x86_1%3a7.2+dfsg-7+deb12u18+b3_amd64.deb", "seabios_1.16.2-1_all.deb"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let qemu = Package { name: "qemu-system-x86".into(), version: "1:7.2+dfsg-7+deb12u18+b3".into() };
        assert!(deb_file(dir.path(), &qemu).is_some());
        let arch = Package { name: "seabios:all".into(), version: "1.16.2-1".into() };
        assert!(deb_file(dir.path(), &arch).is_some());
        let other = Package { name: "seabios".into(), version: "1.16.3-1".into() };
        assert!(deb_file(dir.path(), &other).is_none());
    }

    #[test]
    fn a_stamp_reads_back_and_another_format_does_not() {
        let prepared = Prepared {
            tree: "/c/tree-6.1.0-57-amd64".into(),
            kernel_release: "6.1.0-57-amd64".into(),
            kernel_package: "linux-image-6.1.0-57-amd64 6.1.192-3".into(),
            qemu_version: "QEMU emulator version 7.2.22".into(),
        };
        let back = Prepared::from_stamp(&prepared.tree, &prepared.stamp()).unwrap();
        assert_eq!(back.stamp(), prepared.stamp());
        assert_eq!(back.modules_dir(), Path::new("/c/tree-6.1.0-57-amd64/root/lib/modules/6.1.0-57-amd64"));
        assert!(
            Prepared::from_stamp(&prepared.tree, &prepared.stamp().replace("format=1", "format=0")).is_none()
        );
    }
}
