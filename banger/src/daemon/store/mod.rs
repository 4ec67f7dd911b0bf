//! Durable intent: the per-user SQLite database (`banger.db`).
//!
//! What a VM *is* lives here and nowhere else: one row of `vms` per VM with every
//! [`VmRuntime`] field, and one row of `images` per imported image (with its files' hashes and
//! the identities they had when last hashed). What is *currently true*
//! about a VM (PID, TAP, loops) never enters the database; see [`crate::daemon::handles`].
//!
//! Opening a database ([`Store::open`]):
//! 1. the file is created mode 0600 if absent (SQLite's `-wal` and `-shm` files copy that mode);
//! 2. `journal_mode=WAL`, `busy_timeout`, `foreign_keys=ON` are set on the connection;
//! 3. `PRAGMA user_version` says which migrations ran. A database newer than this build is
//!    refused with [`StoreError::TooNew`] and left untouched. Each missing migration runs in its
//!    own `BEGIN IMMEDIATE` transaction together with the `user_version` bump, so a crash or an
//!    error leaves the database at the previous version, never half-migrated;
//! 4. the install id (16 hex digits) is generated once, stored in `meta`, and read back.
//!
//! Every write is one statement or one transaction, so each state transition is atomic: a
//! crash leaves either the old row or the new one. `vms.image` references `images.name`, so a
//! VM can never name an image that is not there, and an image a VM uses cannot be deleted
//! ([`StoreError::ImageInUse`]).
//!
//! Paths are stored as BLOBs of their raw bytes (any path the OS accepts round-trips); rows
//! written by hand with TEXT paths are read as well. Timestamps are seconds since the epoch;
//! [`Store::update_vm`] writes the row exactly as given (the caller owns `updated_at`, see
//! [`unix_now`]), while [`Store::set_state`] stamps `updated_at` itself.
//!
//! The store is synchronous and holds one connection; the daemon keeps it behind a
//! `std::sync::Mutex` and every call is short.
//!
//! By concern: `schema` (migrations, install id), `vms` and `images` (one table each); this
//! module opens the database and holds what they share (errors, column codecs).

mod images;
mod schema;
mod vms;

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use banger_protocol::{InstallId, VmId};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, ErrorCode, Row};

pub use self::images::{ImageInitrd, ImageRecord};
pub use self::schema::SCHEMA_VERSION;
use self::schema::{MIGRATIONS, ensure_install_id, migrate};

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be created or opened.
    #[error("cannot open the banger database {path}: check that its directory exists and is writable")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The database file could not be created with mode 0600.
    #[error("cannot create the banger database {path}")]
    Create {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database was written by a newer banger.
    #[error(
        "the banger database {path} has schema version {found}, newer than this banger understands ({supported}): upgrade banger, or use another BANGER_HOME"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// [`SCHEMA_VERSION`].
        supported: i64,
    },
    /// A migration failed; the database stays at the version before it.
    #[error("cannot migrate the banger database {path} to schema version {version}")]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The version the failed migration would have reached.
        version: i64,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// Another VM already has this name.
    #[error("a vm named {name:?} already exists: choose another name or delete that vm first")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// A VM with this id already exists.
    #[error("a vm with id {id} already exists")]
    DuplicateId {
        /// The id.
        id: VmId,
    },
    /// No VM has this id.
    #[error("no vm with id {id}")]
    VmNotFound {
        /// The id.
        id: VmId,
    },
    /// The VM names an image that is not in the store.
    #[error("image {image:?} is not imported: import it with `banger image import` first")]
    UnknownImage {
        /// The image name.
        image: String,
    },
    /// An image with this name already exists.
    #[error("an image named {name:?} already exists: remove it first or choose another name")]
    DuplicateImage {
        /// The name.
        name: String,
    },
    /// No image has this name.
    #[error("no image named {name:?}")]
    ImageNotFound {
        /// The name.
        name: String,
    },
    /// VMs still use the image.
    #[error("image {image:?} is used by vm(s) {}: delete them first", vms.join(", "))]
    ImageInUse {
        /// The image.
        image: String,
        /// Names of the VMs that use it.
        vms: Vec<String>,
    },
    /// A row holds a value this build cannot read.
    #[error("the banger database holds an unreadable {column} in {table} row {key:?}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The row's key.
        key: String,
        /// The column.
        column: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A value cannot be stored (e.g. a number out of SQLite's range).
    #[error("cannot store {what}: {detail}")]
    Unstorable {
        /// What was being stored.
        what: String,
        /// Why.
        detail: String,
    },
    /// SQLite failed.
    #[error("database error while trying to {op}")]
    Sqlite {
        /// What was being done.
        op: &'static str,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
}

/// Seconds since the epoch, for `created_at` / `updated_at`.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The banger database of one install.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    install_id: InstallId,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(StoreError::Create { path: path.to_owned(), source }),
        }
        let conn =
            Connection::open(path).map_err(|source| StoreError::Open { path: path.to_owned(), source })?;
        Self::init(conn, path, MIGRATIONS, true)
    }

    /// An in-memory database (for tests of code built on the store).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let path = Path::new(":memory:");
        let conn = Connection::open_in_memory()
            .map_err(|source| StoreError::Open { path: path.to_owned(), source })?;
        Self::init(conn, path, MIGRATIONS, false)
    }

    fn init(conn: Connection, path: &Path, migrations: &[&str], wal: bool) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open { path: path.to_owned(), source };
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        if wal {
            let mode: String =
                conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(open_err)?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(db = %path.display(), %mode, "sqlite refused WAL journaling");
            }
        }
        conn.pragma_update(None, "foreign_keys", true).map_err(open_err)?;
        let mut conn = conn;
        migrate(&mut conn, path, migrations)?;
        let install_id = ensure_install_id(&mut conn)?;
        Ok(Store { conn, install_id })
    }

    /// This install's id: generated when the database was created, never changed.
    pub fn install_id(&self) -> &InstallId {
        &self.install_id
    }
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation)
}

fn path_value(p: &Path) -> Value {
    Value::Blob(p.as_os_str().as_bytes().to_vec())
}

fn opt_text<T: ToString>(v: &Option<T>) -> Value {
    v.as_ref().map_or(Value::Null, |v| Value::Text(v.to_string()))
}

/// Reads typed columns of one row, turning every oddity into [`StoreError::Corrupt`].
struct Cols<'r, 's> {
    row: &'r Row<'s>,
    table: &'static str,
    key: String,
}

impl Cols<'_, '_> {
    fn corrupt(&self, column: &'static str, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt { table: self.table, key: self.key.clone(), column, detail: detail.into() }
    }

    fn raw(&self, idx: usize, column: &'static str) -> Result<ValueRef<'_>, StoreError> {
        self.row.get_ref(idx).map_err(|e| self.corrupt(column, e.to_string()))
    }

    fn opt_text(&self, idx: usize, column: &'static str) -> Result<Option<String>, StoreError> {
        match self.raw(idx, column)? {
            ValueRef::Null => Ok(None),
            ValueRef::Text(t) => {
                String::from_utf8(t.to_vec()).map(Some).map_err(|_| self.corrupt(column, "text is not utf-8"))
            }
            other => Err(self.corrupt(column, format!("expected text, found {:?}", other.data_type()))),
        }
    }

    fn text(&self, idx: usize, column: &'static str) -> Result<String, StoreError> {
        self.opt_text(idx, column)?.ok_or_else(|| self.corrupt(column, "missing"))
    }

    fn opt_path(&self, idx: usize, column: &'static str) -> Result<Option<PathBuf>, StoreError> {
        match self.raw(idx, column)? {
            ValueRef::Null => Ok(None),
            ValueRef::Text(b) | ValueRef::Blob(b) => Ok(Some(PathBuf::from(OsStr::from_bytes(b)))),
            other => Err(self.corrupt(column, format!("expected a path, found {:?}", other.data_type()))),
        }
    }

    fn path(&self, idx: usize, column: &'static str) -> Result<PathBuf, StoreError> {
        self.opt_path(idx, column)?.ok_or_else(|| self.corrupt(column, "missing"))
    }

    fn int(&self, idx: usize, column: &'static str) -> Result<i64, StoreError> {
        match self.raw(idx, column)? {
            ValueRef::Integer(i) => Ok(i),
            other => Err(self.corrupt(column, format!("expected an integer, found {:?}", other.data_type()))),
        }
    }

    fn opt_int(&self, idx: usize, column: &'static str) -> Result<Option<i64>, StoreError> {
        match self.raw(idx, column)? {
            ValueRef::Null => Ok(None),
            ValueRef::Integer(i) => Ok(Some(i)),
            other => Err(self.corrupt(column, format!("expected an integer, found {:?}", other.data_type()))),
        }
    }

    fn u32(&self, idx: usize, column: &'static str) -> Result<u32, StoreError> {
        let v = self.int(idx, column)?;
        u32::try_from(v).map_err(|_| self.corrupt(column, format!("{v} is out of range")))
    }

    fn parsed<T: std::str::FromStr>(&self, idx: usize, column: &'static str) -> Result<Option<T>, StoreError>
    where
        T::Err: std::fmt::Display,
    {
        match self.opt_text(idx, column)? {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|e: T::Err| self.corrupt(column, e.to_string())),
        }
    }
}

#[cfg(test)]
mod testing {
    use super::*;
    use crate::model::{VmRuntime, VmState};

    pub(super) fn image(name: &str) -> ImageRecord {
        ImageRecord {
            name: name.to_owned(),
            kernel_path: PathBuf::from(format!("/state/images/{name}/vmlinux")),
            rootfs_path: PathBuf::from(format!("/state/images/{name}/rootfs.ext4")),
            kernel_sha256: "a".repeat(64),
            rootfs_sha256: "b".repeat(64),
            size_bytes: 3 << 30,
            created_at: 1_700_000_000,
            kernel_identity: None,
            rootfs_identity: Some(crate::daemon::file_identity::FileIdentity {
                dev: 2049,
                ino: 12,
                size: 3 << 30,
                mtime_ns: 1_700_000_000_000_000_001,
                ctime_ns: 1_700_000_000_000_000_002,
            }),
            initrd: None,
        }
    }

    pub(super) fn vm(id: &str, name: &str) -> VmRuntime {
        let dir = PathBuf::from(format!("/state/vms/{id}"));
        VmRuntime {
            id: VmId::new(id).unwrap(),
            name: name.to_owned(),
            state: VmState::Created,
            vcpus: 2,
            memory_mib: 512,
            image: "base".to_owned(),
            guest_ip: None,
            gateway_ip: None,
            api_socket: PathBuf::from(format!("/run/fc-{id}.sock")),
            vsock_path: dir.join("vsock"),
            vsock_cid: 3,
            log_path: dir.join("serial.log"),
            metrics_path: dir.join("metrics"),
            dns_name: format!("{name}.banger.internal"),
            overlay_path: dir.join("root.ext4"),
            vm_dir: dir,
            work_disk_path: None,
            work_disk_bytes: None,
            storage: None,
            launch: None,
            last_error: None,
            created_at: 1_700_000_001,
            updated_at: 1_700_000_001,
            cleanup_pending: None,
        }
    }

    pub(super) fn store_with_image() -> Store {
        let s = Store::open_in_memory().unwrap();
        s.insert_image(&image("base")).unwrap();
        s
    }

    pub(super) fn user_version(path: &Path) -> i64 {
        Connection::open(path).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::model::VmState;

    #[test]
    fn two_connections_see_each_others_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let a = Store::open(&path).unwrap();
        let b = Store::open(&path).unwrap();
        assert_eq!(a.install_id(), b.install_id());
        a.insert_image(&image("base")).unwrap();
        a.insert_vm(&vm("k1", "dev")).unwrap();
        b.set_state(&VmId::new("k1").unwrap(), VmState::Running, None, None).unwrap();
        assert_eq!(a.get_vm_by_name("dev").unwrap().unwrap().state, VmState::Running);
    }
}
