//! The user's settings: `config.toml` (see [`crate::paths::Paths::config_file`]) overridden by
//! environment variables, over built-in defaults.
//!
//! ```toml
//! helper_socket = "/run/banger/helper.sock"   # or BANGER_HELPER_SOCKET
//! firecracker = "/usr/local/bin/firecracker"  # or BANGER_FIRECRACKER; a bare name is looked up on PATH
//! default_image = "debian"                    # used when `vm create` names no image
//! default_vcpus = 2
//! default_memory_mib = 1024
//! storage = "auto"                            # or BANGER_STORAGE: auto, dm-snapshot, reflink, copy
//! launch = "direct"                           # or "jailer"
//! ```
//!
//! `storage` says how a VM's root disk is made the first time it starts ([`StorageMode`]); a VM
//! keeps the kind it got. `launch` says how a VM's VMM is started the first time it starts
//! ([`LaunchMode`]): as the user (`direct`) or by banger-helper through Firecracker's jailer, as
//! a uid of its own in a chroot with cgroup limits (`jailer`); a VM keeps the mode it got, and a
//! helper whose policy forces the jailer makes every VM a jailed one.
//!
//! Precedence, lowest first: defaults, the file, the environment. A missing file means
//! defaults; an unreadable or malformed file, or an unknown key, is an error naming the file
//! (a typo must not silently fall back to a default). Relative paths are made absolute against
//! the current directory when loading, so a daemon started elsewhere sees the same files. The
//! VMM binary is only resolved (searched on `PATH`, checked to be an executable file) when it
//! is about to be used, by [`Config::resolve_firecracker`].

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::model::LaunchMode;
use crate::paths::check_socket_path_len;

/// The environment variable naming the helper socket.
pub const ENV_HELPER_SOCKET: &str = "BANGER_HELPER_SOCKET";
/// The environment variable naming the VMM binary.
pub const ENV_FIRECRACKER: &str = "BANGER_FIRECRACKER";
/// The environment variable choosing how VM roots are made.
pub const ENV_STORAGE: &str = "BANGER_STORAGE";

/// The VMM binary when nothing else is configured (looked up on `PATH`).
pub const DEFAULT_FIRECRACKER: &str = "firecracker";
/// vCPUs of a new VM when neither the command nor the config says.
pub const DEFAULT_VCPUS: u32 = 2;
/// Memory (MiB) of a new VM when neither the command nor the config says.
pub const DEFAULT_MEMORY_MIB: u32 = 1024;
/// Firecracker's vCPU limit.
pub const MAX_VCPUS: u32 = 32;
/// The least memory a VM may be given, in MiB.
pub const MIN_MEMORY_MIB: u32 = 16;

/// Why the settings could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file exists but cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The config file is not valid TOML for banger.
    #[error("invalid config file {path}: fix or remove it")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid {key} = {value} in {origin}: {expected}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// The value given.
        value: String,
        /// Where it came from.
        origin: Origin,
        /// What is accepted.
        expected: String,
    },
    /// A path could not be made absolute.
    #[error("cannot use {key} {path} from {origin}: give an absolute path")]
    BadPath {
        /// The setting.
        key: &'static str,
        /// The value given.
        path: PathBuf,
        /// Where it came from.
        origin: Origin,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The helper socket path is too long for a unix socket.
    #[error("helper socket from {origin} is unusable")]
    HelperSocket {
        /// Where it came from.
        origin: Origin,
        /// Why.
        #[source]
        source: crate::paths::PathsError,
    },
    /// The VMM binary is not there or not executable.
    #[error(
        "vmm binary {path} (from {origin}) {problem}: install firecracker or point BANGER_FIRECRACKER (or `firecracker` in config.toml) at it"
    )]
    Firecracker {
        /// The configured value.
        path: PathBuf,
        /// Where it came from.
        origin: Origin,
        /// What is wrong.
        problem: &'static str,
    },
}

/// How the root disks of new VMs are made (the `storage` setting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StorageMode {
    /// The best this host offers: a dm-snapshot when banger-helper can make one, else a reflink
    /// clone where the filesystem has them, else a sparse copy.
    #[default]
    Auto,
    /// Always a dm-snapshot of the image (a VM cannot start where the helper cannot make one).
    DmSnapshot,
    /// Always a reflink clone of the image (a VM cannot start where the filesystem has none).
    Reflink,
    /// Always a sparse copy of the image.
    Copy,
}

impl StorageMode {
    /// Every mode, in the order they are listed to users.
    pub const ALL: [StorageMode; 4] =
        [StorageMode::Auto, StorageMode::DmSnapshot, StorageMode::Reflink, StorageMode::Copy];

    /// The setting's value.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageMode::Auto => "auto",
            StorageMode::DmSnapshot => "dm-snapshot",
            StorageMode::Reflink => "reflink",
            StorageMode::Copy => "copy",
        }
    }
}

impl std::fmt::Display for StorageMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StorageMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        StorageMode::ALL.into_iter().find(|m| m.as_str() == s).ok_or_else(|| {
            let all: Vec<&str> = StorageMode::ALL.iter().map(|m| m.as_str()).collect();
            format!("one of {}", all.join(", "))
        })
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The config file.
    File(PathBuf),
    /// An environment variable.
    Env(&'static str),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => f.write_str("the default"),
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Env(var) => write!(f, "${var}"),
        }
    }
}

/// The keys `config.toml` may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    helper_socket: Option<PathBuf>,
    firecracker: Option<PathBuf>,
    default_image: Option<String>,
    default_vcpus: Option<u32>,
    default_memory_mib: Option<u32>,
    storage: Option<String>,
    launch: Option<String>,
}

/// The settings in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The helper's socket (absolute).
    pub helper_socket: PathBuf,
    /// Where [`Config::helper_socket`] came from.
    pub helper_socket_origin: Origin,
    /// The VMM binary as configured: an absolute path, or a bare name to look up on `PATH`.
    pub firecracker: PathBuf,
    /// Where [`Config::firecracker`] came from.
    pub firecracker_origin: Origin,
    /// The image `vm create` uses when it names none.
    pub default_image: Option<String>,
    /// vCPUs of a new VM (1 to [`MAX_VCPUS`]).
    pub default_vcpus: u32,
    /// Memory of a new VM in MiB (at least [`MIN_MEMORY_MIB`]).
    pub default_memory_mib: u32,
    /// How the roots of VMs are made when they first start.
    pub storage: StorageMode,
    /// Where [`Config::storage`] came from.
    pub storage_origin: Origin,
    /// How the VMMs of VMs are launched when they first start.
    pub launch: LaunchMode,
    /// Where [`Config::launch`] came from.
    pub launch_origin: Origin,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            helper_socket: PathBuf::from(banger_protocol::DEFAULT_SOCKET),
            helper_socket_origin: Origin::Default,
            firecracker: PathBuf::from(DEFAULT_FIRECRACKER),
            firecracker_origin: Origin::Default,
            default_image: None,
            default_vcpus: DEFAULT_VCPUS,
            default_memory_mib: DEFAULT_MEMORY_MIB,
            storage: StorageMode::Auto,
            storage_origin: Origin::Default,
            launch: LaunchMode::Direct,
            launch_origin: Origin::Default,
        }
    }
}

/// Makes a configured path absolute; a bare program name (no `/`) is kept when `bare_ok`.
fn absolute(
    key: &'static str,
    path: PathBuf,
    origin: &Origin,
    bare_ok: bool,
) -> Result<PathBuf, ConfigError> {
    if path.is_absolute() || (bare_ok && !path.as_os_str().as_encoded_bytes().contains(&b'/')) {
        return Ok(path);
    }
    std::path::absolute(&path).map_err(|source| ConfigError::BadPath {
        key,
        path,
        origin: origin.clone(),
        source,
    })
}

impl Config {
    /// Loads `config_file` (absent means defaults) and applies the process environment.
    pub fn load(config_file: &Path) -> Result<Config, ConfigError> {
        Config::load_with(config_file, |key| std::env::var_os(key))
    }

    /// Loads `config_file` and applies environment variables read through `lookup`. Empty values
    /// count as unset.
    pub fn load_with(
        config_file: &Path,
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Config, ConfigError> {
        let file = match fs::read_to_string(config_file) {
            Ok(text) => toml::from_str::<ConfigFile>(&text)
                .map_err(|e| ConfigError::Parse { path: config_file.to_owned(), source: Box::new(e) })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => ConfigFile::default(),
            Err(source) => return Err(ConfigError::Read { path: config_file.to_owned(), source }),
        };
        let from_file = Origin::File(config_file.to_owned());
        let mut config = Config::default();

        if let Some(v) = file.helper_socket {
            (config.helper_socket, config.helper_socket_origin) = (v, from_file.clone());
        }
        if let Some(v) = file.firecracker {
            (config.firecracker, config.firecracker_origin) = (v, from_file.clone());
        }
        let env = |key| lookup(key).filter(|v: &OsString| !v.is_empty()).map(PathBuf::from);
        if let Some(v) = env(ENV_HELPER_SOCKET) {
            (config.helper_socket, config.helper_socket_origin) = (v, Origin::Env(ENV_HELPER_SOCKET));
        }
        if let Some(v) = env(ENV_FIRECRACKER) {
            (config.firecracker, config.firecracker_origin) = (v, Origin::Env(ENV_FIRECRACKER));
        }
        let storage = lookup(ENV_STORAGE)
            .filter(|v| !v.is_empty())
            .map(|v| (v.to_string_lossy().into_owned(), Origin::Env(ENV_STORAGE)))
            .or(file.storage.map(|v| (v, from_file.clone())));
        if let Some((value, origin)) = storage {
            config.storage = value.parse().map_err(|expected| ConfigError::Invalid {
                key: "storage",
                value: format!("{value:?}"),
                origin: origin.clone(),
                expected,
            })?;
            config.storage_origin = origin;
        }
        if let Some(value) = file.launch {
            config.launch = value.parse().map_err(|expected| ConfigError::Invalid {
                key: "launch",
                value: format!("{value:?}"),
                origin: from_file.clone(),
                expected,
            })?;
            config.launch_origin = from_file.clone();
        }

        config.helper_socket =
            absolute("helper_socket", config.helper_socket, &config.helper_socket_origin, false)?;
        check_socket_path_len(&config.helper_socket, 0).map_err(|source| ConfigError::HelperSocket {
            origin: config.helper_socket_origin.clone(),
            source,
        })?;
        config.firecracker = absolute("firecracker", config.firecracker, &config.firecracker_origin, true)?;

        if let Some(image) = file.default_image {
            crate::ids::validate_name(&image).map_err(|_| ConfigError::Invalid {
                key: "default_image",
                value: format!("{image:?}"),
                origin: from_file.clone(),
                expected: "an image name: lowercase letters, digits and '-'".into(),
            })?;
            config.default_image = Some(image);
        }
        if let Some(vcpus) = file.default_vcpus {
            if !(1..=MAX_VCPUS).contains(&vcpus) {
                return Err(ConfigError::Invalid {
                    key: "default_vcpus",
                    value: vcpus.to_string(),
                    origin: from_file,
                    expected: format!("1 to {MAX_VCPUS}"),
                });
            }
            config.default_vcpus = vcpus;
        }
        if let Some(mib) = file.default_memory_mib {
            if mib < MIN_MEMORY_MIB {
                return Err(ConfigError::Invalid {
                    key: "default_memory_mib",
                    value: mib.to_string(),
                    origin: from_file,
                    expected: format!("at least {MIN_MEMORY_MIB}"),
                });
            }
            config.default_memory_mib = mib;
        }
        Ok(config)
    }

    /// The environment a daemon started by the CLI should get so it uses these settings: the
    /// variables among `BANGER_HELPER_SOCKET`, `BANGER_FIRECRACKER` and `BANGER_STORAGE` that
    /// set them here, and only those. The daemon reads the same config file itself (from the
    /// same directory, so relative paths agree), so its messages name where each setting
    /// really came from: a value passed as a variable would be said to come from it.
    pub fn daemon_env(&self) -> Vec<(&'static str, OsString)> {
        let mut env = Vec::new();
        if self.helper_socket_origin == Origin::Env(ENV_HELPER_SOCKET) {
            env.push((ENV_HELPER_SOCKET, self.helper_socket.clone().into_os_string()));
        }
        if self.firecracker_origin == Origin::Env(ENV_FIRECRACKER) {
            env.push((ENV_FIRECRACKER, self.firecracker.clone().into_os_string()));
        }
        if self.storage_origin == Origin::Env(ENV_STORAGE) {
            env.push((ENV_STORAGE, self.storage.as_str().into()));
        }
        env
    }

    /// The VMM binary as an absolute path: a bare name is searched on the process `PATH`.
    pub fn resolve_firecracker(&self) -> Result<PathBuf, ConfigError> {
        self.resolve_firecracker_with(std::env::var_os("PATH").as_deref())
    }

    /// [`Config::resolve_firecracker`] with the search path given.
    pub fn resolve_firecracker_with(&self, search_path: Option<&OsStr>) -> Result<PathBuf, ConfigError> {
        let err = |problem| ConfigError::Firecracker {
            path: self.firecracker.clone(),
            origin: self.firecracker_origin.clone(),
            problem,
        };
        if self.firecracker.is_absolute() {
            return match fs::metadata(&self.firecracker) {
                Ok(m) if !m.is_file() => Err(err("is not a regular file")),
                Ok(m) if m.permissions().mode() & 0o111 == 0 => Err(err("is not executable")),
                Ok(_) => Ok(self.firecracker.clone()),
                Err(_) => Err(err("does not exist")),
            };
        }
        std::env::split_paths(search_path.unwrap_or_default())
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(&self.firecracker))
            .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
            .ok_or_else(|| err("is not on PATH"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> =
            pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |key| map.get(key).cloned()
    }

    fn write_config(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("config.toml");
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn launch_is_direct_by_default_jailer_when_asked_and_anything_else_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Config::load_with(&tmp.path().join("absent.toml"), env(&[])).unwrap();
        assert_eq!((c.launch, &c.launch_origin), (LaunchMode::Direct, &Origin::Default));
        let path = write_config(tmp.path(), "launch = \"jailer\"\n");
        let c = Config::load_with(&path, env(&[])).unwrap();
        assert_eq!((c.launch, &c.launch_origin), (LaunchMode::Jailer, &Origin::File(path.clone())));
        let path = write_config(tmp.path(), "launch = \"direct\"\n");
        assert_eq!(Config::load_with(&path, env(&[])).unwrap().launch, LaunchMode::Direct);
        for bad in ["\"jail\"", "\"\"", "\"Jailer\""] {
            let path = write_config(tmp.path(), &format!("launch = {bad}\n"));
            let err = Config::load_with(&path, env(&[])).unwrap_err().to_string();
            assert!(err.contains(&format!("launch = {bad}")) && err.contains("direct, jailer"), "{err}");
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
        let path = write_config(tmp.path(), "launch = 1\n");
        assert!(Config::load_with(&path, env(&[])).is_err());
    }

    #[test]
    fn missing_file_gives_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Config::load_with(&tmp.path().join("absent.toml"), env(&[])).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.helper_socket, Path::new("/run/banger/helper.sock"));
        assert_eq!(c.firecracker, Path::new("firecracker"));
        assert_eq!((c.default_vcpus, c.default_memory_mib), (2, 1024));
        assert_eq!((c.storage, c.storage_origin), (StorageMode::Auto, Origin::Default));
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = write_config(
            tmp.path(),
            r#"
helper_socket = "/file/helper.sock"
firecracker = "/file/firecracker"
default_image = "debian"
default_vcpus = 4
default_memory_mib = 256
storage = "copy"
"#,
        );
        let c = Config::load_with(&path, env(&[])).unwrap();
        assert_eq!(c.helper_socket, Path::new("/file/helper.sock"));
        assert_eq!(c.helper_socket_origin, Origin::File(path.clone()));
        assert_eq!(c.firecracker, Path::new("/file/firecracker"));
        assert_eq!(c.default_image.as_deref(), Some("debian"));
        assert_eq!((c.default_vcpus, c.default_memory_mib), (4, 256));
        assert_eq!((c.storage, &c.storage_origin), (StorageMode::Copy, &Origin::File(path.clone())));

        let c = Config::load_with(
            &path,
            env(&[
                ("BANGER_HELPER_SOCKET", "/env/helper.sock"),
                ("BANGER_FIRECRACKER", "/env/fc"),
                ("BANGER_STORAGE", "dm-snapshot"),
            ]),
        )
        .unwrap();
        assert_eq!((c.storage, &c.storage_origin), (StorageMode::DmSnapshot, &Origin::Env("BANGER_STORAGE")));
        assert_eq!(c.helper_socket, Path::new("/env/helper.sock"));
        assert_eq!(c.helper_socket_origin, Origin::Env("BANGER_HELPER_SOCKET"));
        assert_eq!(c.firecracker, Path::new("/env/fc"));
        assert_eq!(c.firecracker_origin, Origin::Env("BANGER_FIRECRACKER"));
        // Settings without an environment variable keep the file's value.
        assert_eq!(c.default_vcpus, 4);
        let from_file = Config::load_with(&path, env(&[])).unwrap();
        assert_eq!(from_file.daemon_env(), vec![], "the daemon reads the file itself");
        assert_eq!(Config::default().daemon_env(), vec![], "nor are defaults said to come from variables");
        assert_eq!(
            c.daemon_env(),
            vec![
                ("BANGER_HELPER_SOCKET", "/env/helper.sock".into()),
                ("BANGER_FIRECRACKER", "/env/fc".into()),
                ("BANGER_STORAGE", "dm-snapshot".into())
            ]
        );

        // An empty variable counts as unset.
        let c = Config::load_with(&path, env(&[("BANGER_FIRECRACKER", "")])).unwrap();
        assert_eq!(c.firecracker, Path::new("/file/firecracker"));
    }

    #[test]
    fn relative_paths_become_absolute_and_bare_names_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let path = write_config(tmp.path(), "helper_socket = \"rel/h.sock\"\nfirecracker = \"bin/fc\"\n");
        let c = Config::load_with(&path, env(&[])).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(c.helper_socket, cwd.join("rel/h.sock"));
        assert_eq!(c.firecracker, cwd.join("bin/fc"));
        let c = Config::load_with(&path, env(&[("BANGER_FIRECRACKER", "fc-double")])).unwrap();
        assert_eq!(c.firecracker, Path::new("fc-double"));
    }

    #[test]
    fn bad_files_and_values_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = write_config(tmp.path(), "firecraker = \"/x\"\n");
        let err = Config::load_with(&path, env(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("firecraker"), "{source}");

        let path = write_config(tmp.path(), "default_vcpus = 0\n");
        let err = Config::load_with(&path, env(&[])).unwrap_err().to_string();
        assert!(err.contains("default_vcpus = 0") && err.contains("1 to 32"), "{err}");

        let path = write_config(tmp.path(), "default_memory_mib = 8\n");
        let err = Config::load_with(&path, env(&[])).unwrap_err().to_string();
        assert!(err.contains("at least 16"), "{err}");

        let path = write_config(tmp.path(), "storage = \"snapshot\"\n");
        let err = Config::load_with(&path, env(&[])).unwrap_err().to_string();
        assert!(
            err.contains("storage = \"snapshot\"") && err.contains("auto, dm-snapshot, reflink, copy"),
            "{err}"
        );
        let err = Config::load_with(&tmp.path().join("none"), env(&[("BANGER_STORAGE", "fast")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"fast\" in $BANGER_STORAGE"), "{err}");

        let path = write_config(tmp.path(), "default_image = \"Bad Name\"\n");
        assert!(Config::load_with(&path, env(&[])).unwrap_err().to_string().contains("default_image"));

        let long = format!("/{}", "s".repeat(120));
        let err =
            Config::load_with(&tmp.path().join("none"), env(&[("BANGER_HELPER_SOCKET", &long)])).unwrap_err();
        assert!(matches!(err, ConfigError::HelperSocket { origin: Origin::Env(_), .. }), "{err}");
    }

    #[test]
    fn firecracker_resolution() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let exe = bin.join("firecracker");
        fs::write(&exe, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        let plain = bin.join("plain");
        fs::write(&plain, "").unwrap();
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();

        let search = std::env::join_paths([Path::new("/nonexistent"), &bin]).unwrap();
        let c = Config::default();
        assert_eq!(c.resolve_firecracker_with(Some(&search)).unwrap(), exe);
        let err = c.resolve_firecracker_with(Some(OsStr::new("/nonexistent"))).unwrap_err().to_string();
        assert!(err.contains("not on PATH") && err.contains("BANGER_FIRECRACKER"), "{err}");
        assert!(err.contains("(from the default)") && !err.contains("$BANGER_FIRECRACKER"), "{err}");

        let c = Config { firecracker: plain, firecracker_origin: Origin::Env(ENV_FIRECRACKER), ..c };
        let err = c.resolve_firecracker_with(None).unwrap_err().to_string();
        assert!(err.contains("not executable") && err.contains("$BANGER_FIRECRACKER"), "{err}");
        let c = Config { firecracker: tmp.path().join("missing"), ..c };
        assert!(c.resolve_firecracker_with(None).unwrap_err().to_string().contains("does not exist"));
        let c = Config { firecracker: bin, ..c };
        assert!(c.resolve_firecracker_with(None).unwrap_err().to_string().contains("not a regular file"));
    }
}
