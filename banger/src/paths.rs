//! Where banger keeps one user's files.
//!
//! Two layouts:
//!
//! - `BANGER_HOME=DIR` puts everything of one install under `DIR` (tests, several installs side
//!   by side): state in `DIR/state`, the config file `DIR/config.toml`, keys in `DIR/keys`, and
//!   sockets in `DIR/run` (the daemon's at `DIR/run/bangerd.sock`). A relative `DIR` is made
//!   absolute against the current directory.
//! - Otherwise the XDG base directories: state in `$XDG_STATE_HOME/banger` (default
//!   `~/.local/state/banger`), config in `$XDG_CONFIG_HOME/banger/config.toml` (default
//!   `~/.config/banger/config.toml`), keys in `<state>/keys`, sockets in
//!   `$XDG_RUNTIME_DIR/banger`. Relative XDG values are ignored, as the XDG spec asks. When
//!   `XDG_RUNTIME_DIR` is unset, or names a directory this user does not own (as after `su`
//!   without `-`), sockets go to the private fallback `/tmp/banger-<uid>`, which
//!   [`Paths::ensure_dirs`] creates with mode 0700 and refuses to use unless it is a real
//!   directory (not a symlink) owned by this user and closed to others.
//!
//! Unix socket paths are limited to 107 bytes. Every socket banger binds or asks Firecracker to
//! bind lives in the run directory with a short name (`fc-<id>.sock`, `vs-<id>.sock`), and
//! [`Paths`] checks when it is built that the daemon socket and the longest possible VM socket
//! fit (a VM id may have up to [`VmId::MAX_LEN`] characters; Firecracker's vsock appends
//! `_<port>` to its socket path for guest-initiated connections, so that suffix is counted
//! too). The accessors are therefore infallible.
//!
//! Sockets in `$XDG_RUNTIME_DIR` disappear when the system removes that directory at the user's
//! last logout; VMs meant to outlive a login should use lingering (`loginctl enable-linger`) or
//! `BANGER_HOME`.

use std::ffi::OsString;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use banger_protocol::VmId;

/// The environment variable that puts one install under one directory.
pub const ENV_HOME: &str = "BANGER_HOME";

/// The longest unix socket path the kernel accepts (`sun_path` is 108 bytes with its NUL).
pub const SOCKET_PATH_MAX: usize = 107;

/// The longest suffix Firecracker appends to a vsock socket path: `_` and a u32 port.
const VSOCK_PORT_SUFFIX_MAX: usize = "_4294967295".len();

/// Why banger's paths could not be worked out or created.
#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    /// Neither `BANGER_HOME` nor a home directory is known.
    #[error("cannot find the home directory: set HOME or BANGER_HOME")]
    NoHome,
    /// `BANGER_HOME` could not be made absolute.
    #[error("cannot use BANGER_HOME {path}: set it to an absolute directory")]
    BadHome {
        /// The value given.
        path: PathBuf,
        /// Why it was refused.
        #[source]
        source: io::Error,
    },
    /// A unix socket path would be longer than the kernel allows.
    #[error(
        "unix socket path {path} is {len} bytes, over the {max}-byte limit: use a shorter directory (set BANGER_HOME to a short path)"
    )]
    SocketPathTooLong {
        /// The offending path (for VM sockets: the longest one possible).
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A directory could not be created or inspected.
    #[error("cannot create directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket directory is not private to this user.
    #[error(
        "socket directory {path} is not safe to use: {reason}; remove it, or set XDG_RUNTIME_DIR or BANGER_HOME"
    )]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Which layout a [`Paths`] follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Everything under one directory (`BANGER_HOME`).
    Home(PathBuf),
    /// The XDG base directories.
    Xdg,
}

/// Every file and directory one banger install uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    layout: Layout,
    state_dir: PathBuf,
    config_file: PathBuf,
    keys_dir: PathBuf,
    run_dir: PathBuf,
    uid: u32,
}

/// A lookup that treats empty values as unset.
fn non_empty(lookup: &dyn Fn(&str) -> Option<OsString>, key: &str) -> Option<OsString> {
    lookup(key).filter(|v| !v.is_empty())
}

/// An XDG variable's value when it is set and absolute.
fn xdg_dir(lookup: &dyn Fn(&str) -> Option<OsString>, key: &str) -> Option<PathBuf> {
    non_empty(lookup, key).map(PathBuf::from).filter(|p| p.is_absolute())
}

/// Whether `dir` is a directory owned by `uid` (the runtime directory test).
fn owned_dir(dir: &Path, uid: u32) -> bool {
    fs::metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() == uid)
}

impl Paths {
    /// The paths of the current user, from the process environment. `HOME` falls back to the
    /// user's passwd entry (as under cron).
    pub fn from_env() -> Result<Paths, PathsError> {
        let uid = nix::unistd::getuid();
        let lookup = |key: &str| {
            std::env::var_os(key).filter(|v| !v.is_empty()).or_else(|| {
                if key != "HOME" {
                    return None;
                }
                let user = nix::unistd::User::from_uid(uid).ok().flatten()?;
                Some(user.dir.into_os_string())
            })
        };
        Paths::from_lookup(lookup, uid.as_raw())
    }

    /// The paths for user `uid`, reading environment variables through `lookup` (so tests need
    /// not change the process environment). Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>, uid: u32) -> Result<Paths, PathsError> {
        let lookup: &dyn Fn(&str) -> Option<OsString> = &lookup;
        if let Some(home) = non_empty(lookup, ENV_HOME) {
            let home = PathBuf::from(home);
            let dir =
                std::path::absolute(&home).map_err(|source| PathsError::BadHome { path: home, source })?;
            return Paths::under(&dir, uid);
        }
        let home = non_empty(lookup, "HOME").map(PathBuf::from).filter(|p| p.is_absolute());
        let state_base = match xdg_dir(lookup, "XDG_STATE_HOME") {
            Some(dir) => dir,
            None => home.as_ref().ok_or(PathsError::NoHome)?.join(".local/state"),
        };
        let config_base = match xdg_dir(lookup, "XDG_CONFIG_HOME") {
            Some(dir) => dir,
            None => home.as_ref().ok_or(PathsError::NoHome)?.join(".config"),
        };
        let run_dir = match xdg_dir(lookup, "XDG_RUNTIME_DIR") {
            Some(dir) if owned_dir(&dir, uid) => dir.join("banger"),
            _ => PathBuf::from(format!("/tmp/banger-{uid}")),
        };
        let state_dir = state_base.join("banger");
        let paths = Paths {
            layout: Layout::Xdg,
            keys_dir: state_dir.join("keys"),
            state_dir,
            config_file: config_base.join("banger/config.toml"),
            run_dir,
            uid,
        };
        paths.check_socket_lengths()?;
        Ok(paths)
    }

    /// The `BANGER_HOME` layout under `dir` for user `uid`.
    pub fn under(dir: &Path, uid: u32) -> Result<Paths, PathsError> {
        let paths = Paths {
            layout: Layout::Home(dir.to_owned()),
            state_dir: dir.join("state"),
            config_file: dir.join("config.toml"),
            keys_dir: dir.join("keys"),
            run_dir: dir.join("run"),
            uid,
        };
        paths.check_socket_lengths()?;
        Ok(paths)
    }

    fn check_socket_lengths(&self) -> Result<(), PathsError> {
        let longest_id = "x".repeat(VmId::MAX_LEN);
        let candidates = [
            (self.daemon_socket(), 0),
            (self.run_dir.join(format!("fc-{longest_id}.sock")), 0),
            (self.run_dir.join(format!("vs-{longest_id}.sock")), VSOCK_PORT_SUFFIX_MAX),
        ];
        for (path, suffix) in candidates {
            check_socket_path_len(&path, suffix)?;
        }
        Ok(())
    }

    /// Which layout these paths follow.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The user these paths belong to.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The state directory (database, VMs, images, logs).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The config file (may not exist).
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// The directory of the user's banger SSH key and known_hosts.
    pub fn keys_dir(&self) -> &Path {
        &self.keys_dir
    }

    /// The directory of every socket (daemon, VM API, vsock).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The SQLite database.
    pub fn db(&self) -> PathBuf {
        self.state_dir.join("banger.db")
    }

    /// The directory holding every VM's directory.
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    /// One VM's directory (root or copy-on-write file, work disk, serial log, metrics,
    /// handles.json).
    pub fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.vms_dir().join(id.as_str())
    }

    /// A VM's root file, when its root is a file of its own (reflink clone or sparse copy).
    pub fn vm_root(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("root.ext4")
    }

    /// A VM's copy-on-write file, when its root is a dm-snapshot.
    pub fn vm_cow(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("root.cow")
    }

    /// A VM's work disk.
    pub fn vm_work_disk(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("work.ext4")
    }

    /// A VM's Firecracker API socket (short, in the run directory).
    pub fn vm_api_socket(&self, id: &VmId) -> PathBuf {
        self.run_dir.join(format!("fc-{id}.sock"))
    }

    /// A VM's hybrid vsock socket (short, in the run directory).
    pub fn vm_vsock(&self, id: &VmId) -> PathBuf {
        self.run_dir.join(format!("vs-{id}.sock"))
    }

    /// A VM's serial console log.
    pub fn vm_serial_log(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("serial.log")
    }

    /// A VM's Firecracker metrics file.
    pub fn vm_metrics(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("metrics.json")
    }

    /// The daemon's socket.
    pub fn daemon_socket(&self) -> PathBuf {
        self.run_dir.join("bangerd.sock")
    }

    /// The daemon's log.
    pub fn daemon_log(&self) -> PathBuf {
        self.state_dir.join("bangerd.log")
    }

    /// The directory holding every imported image's directory.
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    /// The user's banger SSH private key (its public half is [`Paths::ssh_public_key`]).
    pub fn ssh_key(&self) -> PathBuf {
        self.keys_dir.join("id_ed25519")
    }

    /// The user's banger SSH public key.
    pub fn ssh_public_key(&self) -> PathBuf {
        self.keys_dir.join("id_ed25519.pub")
    }

    /// The known_hosts file banger manages (host keys pinned by VM id).
    pub fn known_hosts(&self) -> PathBuf {
        self.keys_dir.join("known_hosts")
    }

    /// Creates the state, VM, image, key and run directories with mode 0700 (tightening the mode
    /// of existing ones this user owns), and checks that the run directory is private: a real
    /// directory, owned by this user, closed to group and others.
    pub fn ensure_dirs(&self) -> Result<(), PathsError> {
        for dir in [self.state_dir.clone(), self.vms_dir(), self.images_dir(), self.keys_dir.clone()] {
            create_private_dir(&dir, self.uid)?;
        }
        create_private_dir(&self.run_dir, self.uid)?;
        check_private_dir(&self.run_dir, self.uid)
    }
}

/// Fails when `path` plus a `suffix`-byte tail would not fit in a unix socket address.
pub fn check_socket_path_len(path: &Path, suffix: usize) -> Result<(), PathsError> {
    let len = path.as_os_str().len() + suffix;
    if len > SOCKET_PATH_MAX {
        return Err(PathsError::SocketPathTooLong { path: path.to_owned(), len, max: SOCKET_PATH_MAX });
    }
    Ok(())
}

/// Creates `dir` (and missing parents) with mode 0700; an existing directory owned by `uid` gets
/// its mode tightened to 0700.
fn create_private_dir(dir: &Path, uid: u32) -> Result<(), PathsError> {
    let err = |source| PathsError::CreateDir { path: dir.to_owned(), source };
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    let meta = fs::metadata(dir).map_err(err)?;
    if meta.uid() == uid && meta.mode() & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Checks that `dir` is a directory (not a symlink to one) owned by `uid` with no access for
/// group or others.
pub fn check_private_dir(dir: &Path, uid: u32) -> Result<(), PathsError> {
    let not_private = |reason: String| PathsError::NotPrivate { path: dir.to_owned(), reason };
    let meta =
        fs::symlink_metadata(dir).map_err(|source| PathsError::CreateDir { path: dir.to_owned(), source })?;
    if meta.file_type().is_symlink() {
        return Err(not_private("it is a symlink".into()));
    }
    if !meta.is_dir() {
        return Err(not_private("it is not a directory".into()));
    }
    if meta.uid() != uid {
        return Err(not_private(format!("it is owned by uid {}, not {uid}", meta.uid())));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(not_private(format!("its mode is {:04o}, not 0700", meta.mode() & 0o7777)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::symlink;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> =
            pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |key| map.get(key).cloned()
    }

    fn id(s: &str) -> VmId {
        VmId::new(s).unwrap()
    }

    fn me() -> u32 {
        nix::unistd::getuid().as_raw()
    }

    #[test]
    fn banger_home_puts_everything_under_one_dir() {
        let p = Paths::from_lookup(env(&[("BANGER_HOME", "/b"), ("HOME", "/home/u")]), 1000).unwrap();
        assert_eq!(p.layout(), &Layout::Home("/b".into()));
        assert_eq!(p.db(), Path::new("/b/state/banger.db"));
        assert_eq!(p.config_file(), Path::new("/b/config.toml"));
        assert_eq!(p.ssh_key(), Path::new("/b/keys/id_ed25519"));
        assert_eq!(p.known_hosts(), Path::new("/b/keys/known_hosts"));
        assert_eq!(p.daemon_socket(), Path::new("/b/run/bangerd.sock"));
        assert_eq!(p.daemon_log(), Path::new("/b/state/bangerd.log"));
        assert_eq!(p.images_dir(), Path::new("/b/state/images"));
        let vm = id("0123456789abcdef");
        assert_eq!(p.vm_dir(&vm), Path::new("/b/state/vms/0123456789abcdef"));
        assert_eq!(p.vm_root(&vm), Path::new("/b/state/vms/0123456789abcdef/root.ext4"));
        assert_eq!(p.vm_serial_log(&vm), Path::new("/b/state/vms/0123456789abcdef/serial.log"));
        assert_eq!(p.vm_metrics(&vm), Path::new("/b/state/vms/0123456789abcdef/metrics.json"));
        assert_eq!(p.vm_api_socket(&vm), Path::new("/b/run/fc-0123456789abcdef.sock"));
        assert_eq!(p.vm_vsock(&vm), Path::new("/b/run/vs-0123456789abcdef.sock"));
    }

    #[test]
    fn relative_banger_home_is_made_absolute() {
        let p = Paths::from_lookup(env(&[("BANGER_HOME", "rel/dir")]), 1000).unwrap();
        let expected = std::env::current_dir().unwrap().join("rel/dir");
        assert_eq!(p.layout(), &Layout::Home(expected.clone()));
        assert_eq!(p.db(), expected.join("state/banger.db"));
    }

    #[test]
    fn xdg_defaults_from_home() {
        // No XDG_RUNTIME_DIR: the private fallback under /tmp.
        let p = Paths::from_lookup(env(&[("HOME", "/home/u"), ("BANGER_HOME", "")]), 1000).unwrap();
        assert_eq!(p.layout(), &Layout::Xdg);
        assert_eq!(p.db(), Path::new("/home/u/.local/state/banger/banger.db"));
        assert_eq!(p.vm_dir(&id("ab")), Path::new("/home/u/.local/state/banger/vms/ab"));
        assert_eq!(p.images_dir(), Path::new("/home/u/.local/state/banger/images"));
        assert_eq!(p.ssh_key(), Path::new("/home/u/.local/state/banger/keys/id_ed25519"));
        assert_eq!(p.config_file(), Path::new("/home/u/.config/banger/config.toml"));
        assert_eq!(p.daemon_socket(), Path::new("/tmp/banger-1000/bangerd.sock"));
    }

    #[test]
    fn xdg_variables_override_home_and_relative_ones_are_ignored() {
        let runtime = tempfile::tempdir().unwrap();
        let rt = runtime.path().to_str().unwrap();
        let p = Paths::from_lookup(
            env(&[
                ("HOME", "/home/u"),
                ("XDG_STATE_HOME", "/xs"),
                ("XDG_CONFIG_HOME", "relative/cfg"),
                ("XDG_RUNTIME_DIR", rt),
            ]),
            me(),
        )
        .unwrap();
        assert_eq!(p.db(), Path::new("/xs/banger/banger.db"));
        assert_eq!(p.config_file(), Path::new("/home/u/.config/banger/config.toml"));
        assert_eq!(p.daemon_socket(), runtime.path().join("banger/bangerd.sock"));
    }

    #[test]
    fn runtime_dir_of_another_user_falls_back_to_private_dir() {
        let runtime = tempfile::tempdir().unwrap();
        let other = me() + 1;
        let p = Paths::from_lookup(
            env(&[("HOME", "/home/u"), ("XDG_RUNTIME_DIR", runtime.path().to_str().unwrap())]),
            other,
        )
        .unwrap();
        assert_eq!(p.run_dir(), Path::new(&format!("/tmp/banger-{other}")));
    }

    #[test]
    fn no_home_is_a_clear_error() {
        let err = Paths::from_lookup(env(&[]), 1000).unwrap_err();
        assert!(matches!(err, PathsError::NoHome));
        assert!(err.to_string().contains("BANGER_HOME"));
        // XDG variables alone are enough.
        Paths::from_lookup(env(&[("XDG_STATE_HOME", "/s"), ("XDG_CONFIG_HOME", "/c")]), 1000).unwrap();
    }

    #[test]
    fn long_socket_paths_are_refused_with_the_path() {
        // 51 bytes of BANGER_HOME fit: /run/vs-<32>.sock_<10 digits> is exactly 107 bytes.
        let fits = format!("/{}", "d".repeat(50));
        Paths::from_lookup(env(&[("BANGER_HOME", &fits)]), 1000).unwrap();
        let long = format!("/{}", "d".repeat(51));
        let err = Paths::from_lookup(env(&[("BANGER_HOME", &long)]), 1000).unwrap_err();
        let PathsError::SocketPathTooLong { path, len, max } = &err else { panic!("{err}") };
        assert_eq!((*len, *max), (108, 107));
        assert!(path.starts_with(&long));
        let msg = err.to_string();
        assert!(msg.contains(&long) && msg.contains("BANGER_HOME"), "{msg}");
    }

    #[test]
    fn ensure_dirs_creates_private_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Paths::under(tmp.path(), me()).unwrap();
        // A pre-existing state dir with a loose mode gets tightened.
        fs::create_dir(tmp.path().join("state")).unwrap();
        fs::set_permissions(tmp.path().join("state"), fs::Permissions::from_mode(0o755)).unwrap();
        p.ensure_dirs().unwrap();
        for dir in
            [p.state_dir().to_owned(), p.vms_dir(), p.images_dir(), p.keys_dir().into(), p.run_dir().into()]
        {
            let m = fs::symlink_metadata(&dir).unwrap();
            assert!(m.is_dir(), "{dir:?}");
            assert_eq!(m.mode() & 0o777, 0o700, "{dir:?}");
        }
        p.ensure_dirs().unwrap();
    }

    #[test]
    fn private_dir_check_refuses_symlinks_foreign_owners_and_open_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        DirBuilder::new().mode(0o700).create(&real).unwrap();
        check_private_dir(&real, me()).unwrap();

        let err = check_private_dir(&real, me() + 1).unwrap_err();
        assert!(err.to_string().contains("owned by uid"), "{err}");

        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        assert!(check_private_dir(&link, me()).unwrap_err().to_string().contains("symlink"));

        fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
        let err = check_private_dir(&real, me()).unwrap_err();
        assert!(err.to_string().contains("0755"), "{err}");

        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(check_private_dir(&file, me()).unwrap_err().to_string().contains("not a directory"));
    }

    #[test]
    fn ensure_dirs_refuses_a_symlinked_run_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        DirBuilder::new().mode(0o700).create(&elsewhere).unwrap();
        let home = tmp.path().join("home");
        fs::create_dir(&home).unwrap();
        symlink(&elsewhere, home.join("run")).unwrap();
        let p = Paths::under(&home, me()).unwrap();
        let err = p.ensure_dirs().unwrap_err();
        assert!(matches!(err, PathsError::NotPrivate { .. }), "{err}");
    }
}
