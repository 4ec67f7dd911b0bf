//! What `banger doctor` asks of the machine, behind one trait ([`Host`]) so that every check can
//! be made to fail in a test without touching the real devices; [`SystemHost`] is the machine.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_protocol::{Capabilities, InstallId, OwnedObjects, PROTOCOL_VERSION};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::daemon::helper_client::{HelperApi, HelperClientError, SocketHelper};

/// What the helper said to this user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperFacts {
    /// The protocol version both sides speak.
    pub protocol: u32,
    /// What it offers on this host.
    pub capabilities: Capabilities,
    /// What this user holds now, across its installs.
    pub owned: OwnedObjects,
}

/// The limits the policy sets this user (as read from the policy file), if it could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// VMs holding any device at once.
    pub max_vms: u32,
    /// TAP devices.
    pub max_taps: u32,
    /// Loop devices.
    pub max_loops: u32,
}

/// The machine, as the checks see it.
pub trait Host {
    /// This user's name (or uid).
    fn user(&self) -> String;
    /// Opens `path` read-write and closes it again.
    fn open_rw(&self, path: &Path) -> io::Result<()>;
    /// The group owning `path`, by name when it has one.
    fn group_of(&self, path: &Path) -> Option<String>;
    /// A small text file (under `/proc`, `/sys`, `/etc`, `/lib/modules`).
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// Bytes free for this user on the filesystem holding `dir`.
    fn free_bytes(&self, dir: &Path) -> io::Result<u64>;
    /// What `program --version` prints.
    fn version_of(&self, program: &Path) -> io::Result<String>;
    /// The names of the images in `dir` (one directory each).
    fn images(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Says `Hello` to the helper at `socket` and asks what this user owns.
    fn helper<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<HelperFacts, HelperClientError>>;
    /// This user's limits in the helper's policy file, if it can be read.
    fn limits(&self) -> Option<Limits>;
    /// The landlock ABI version the kernel offers (`ENOSYS`: not built in; `EOPNOTSUPP`: built in
    /// but not enabled at boot).
    fn landlock_abi(&self) -> io::Result<u32>;
}

/// The real machine.
#[derive(Debug, Clone)]
pub struct SystemHost {
    /// The helper's policy file (read for the user's limits only).
    pub policy: PathBuf,
}

impl Default for SystemHost {
    fn default() -> Self {
        SystemHost { policy: PathBuf::from("/etc/banger/policy.toml") }
    }
}

impl Host for SystemHost {
    fn user(&self) -> String {
        let uid = nix::unistd::getuid();
        nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name)
    }

    fn open_rw(&self, path: &Path) -> io::Result<()> {
        std::fs::OpenOptions::new().read(true).write(true).open(path).map(drop)
    }

    fn group_of(&self, path: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let gid = std::fs::metadata(path).ok()?.gid();
        let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)).ok().flatten();
        Some(group.map_or_else(|| gid.to_string(), |g| g.name))
    }

    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        let s = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
        Ok(s.blocks_available().saturating_mul(s.fragment_size()))
    }

    fn version_of(&self, program: &Path) -> io::Result<String> {
        let out = std::process::Command::new(program)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn images(&self, dir: &Path) -> io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && entry.file_type()?.is_dir() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn helper<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<HelperFacts, HelperClientError>> {
        async move {
            // Objects are tagged with an install id; asking what one owns tags nothing, so any
            // valid id does.
            let install = InstallId::new("doctor").expect("\"doctor\" is a valid install id");
            let helper = SocketHelper::new(socket, install).with_timeout(Duration::from_secs(5));
            let capabilities = helper.capabilities().await?;
            let owned = helper.list_owned().await?;
            Ok(HelperFacts { protocol: PROTOCOL_VERSION, capabilities, owned })
        }
        .boxed()
    }

    fn limits(&self) -> Option<Limits> {
        let text = std::fs::read_to_string(&self.policy).ok()?;
        let policy = banger_policy::Policy::from_toml(&self.policy.display().to_string(), &text).ok()?;
        let uid = nix::unistd::getuid();
        let name = nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name);
        let q = policy.quotas_for_uid(name.as_deref(), uid.as_raw());
        Some(Limits { max_vms: q.max_vms, max_taps: q.max_taps, max_loops: q.max_loops })
    }

    fn landlock_abi(&self) -> io::Result<u32> {
        const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
        // SAFETY: with this flag the call takes no attribute (NULL, size 0), creates nothing and
        // only returns the ABI version or an error.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                LANDLOCK_CREATE_RULESET_VERSION,
            )
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(u32::try_from(rc).unwrap_or(u32::MAX)) }
    }
}
