//! Durable intent: the per-user SQLite database (`banger.db`).
//!
//! What a VM *is* lives here and nowhere else: one row of `vms` per VM with every
//! [`VmRuntime`] field, and one row of `images` per imported image. What is *currently true*
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

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use banger_protocol::{InstallId, VmId};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior, params};

use crate::model::{StorageKind, VmRuntime, VmState};

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one entry per version: entry `i` takes `user_version` from `i` to `i + 1`.
/// Entries are only ever appended; an applied migration never changes.
const MIGRATIONS: &[&str] = &[
    // 1: meta, images, vms.
    "CREATE TABLE meta (
         key   TEXT PRIMARY KEY NOT NULL,
         value TEXT NOT NULL
     ) STRICT;
     CREATE TABLE images (
         name          TEXT PRIMARY KEY NOT NULL,
         kernel_path   ANY NOT NULL,
         rootfs_path   ANY NOT NULL,
         kernel_sha256 TEXT NOT NULL,
         rootfs_sha256 TEXT NOT NULL,
         size_bytes    INTEGER NOT NULL CHECK (size_bytes >= 0),
         created_at    INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE vms (
         id             TEXT PRIMARY KEY NOT NULL,
         name           TEXT NOT NULL UNIQUE,
         state          TEXT NOT NULL CHECK (state IN
                            ('created', 'starting', 'running', 'stopping', 'stopped', 'failed')),
         vcpus          INTEGER NOT NULL CHECK (vcpus > 0),
         memory_mib     INTEGER NOT NULL CHECK (memory_mib > 0),
         image          TEXT NOT NULL REFERENCES images (name) ON UPDATE RESTRICT ON DELETE RESTRICT,
         guest_ip       TEXT,
         gateway_ip     TEXT,
         api_socket     ANY NOT NULL,
         vsock_path     ANY NOT NULL,
         vsock_cid      INTEGER NOT NULL,
         log_path       ANY NOT NULL,
         metrics_path   ANY NOT NULL,
         dns_name       TEXT NOT NULL,
         vm_dir         ANY NOT NULL,
         overlay_path   ANY NOT NULL,
         work_disk_path ANY,
         storage        TEXT CHECK (storage IN ('reflink', 'sparse-copy', 'dm-snapshot')),
         last_error     TEXT,
         created_at     INTEGER NOT NULL,
         updated_at     INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX vms_image ON vms (image);",
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const VM_COLUMNS: &str = "id, name, state, vcpus, memory_mib, image, guest_ip, gateway_ip, api_socket, \
     vsock_path, vsock_cid, log_path, metrics_path, dns_name, vm_dir, overlay_path, work_disk_path, \
     storage, last_error, created_at, updated_at";

const IMAGE_COLUMNS: &str =
    "name, kernel_path, rootfs_path, kernel_sha256, rootfs_sha256, size_bytes, created_at";

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

/// An imported image: one row of `images`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// The name VMs refer to.
    pub name: String,
    /// The kernel (uncompressed ELF) in banger's image store.
    pub kernel_path: PathBuf,
    /// The root filesystem in banger's image store.
    pub rootfs_path: PathBuf,
    /// SHA-256 of the kernel, lowercase hex.
    pub kernel_sha256: String,
    /// SHA-256 of the rootfs, lowercase hex.
    pub rootfs_sha256: String,
    /// Bytes of both files together.
    pub size_bytes: u64,
    /// Seconds since the epoch.
    pub created_at: i64,
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

    /// Adds a VM.
    pub fn insert_vm(&self, vm: &VmRuntime) -> Result<(), StoreError> {
        let sql_text = format!(
            "INSERT INTO vms ({VM_COLUMNS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)"
        );
        let values = vm_values(vm);
        self.conn
            .execute(&sql_text, rusqlite::params_from_iter(values))
            .map_err(|e| self.vm_write_error(e, vm, true))?;
        Ok(())
    }

    /// Replaces the whole row of `vm.id` with `vm`, exactly as given (including `updated_at`).
    pub fn update_vm(&self, vm: &VmRuntime) -> Result<(), StoreError> {
        let sql_text = "UPDATE vms SET name = ?2, state = ?3, vcpus = ?4, memory_mib = ?5, image = ?6, \
             guest_ip = ?7, gateway_ip = ?8, api_socket = ?9, vsock_path = ?10, vsock_cid = ?11, \
             log_path = ?12, metrics_path = ?13, dns_name = ?14, vm_dir = ?15, overlay_path = ?16, \
             work_disk_path = ?17, storage = ?18, last_error = ?19, created_at = ?20, updated_at = ?21 \
             WHERE id = ?1";
        let n = self
            .conn
            .execute(sql_text, rusqlite::params_from_iter(vm_values(vm)))
            .map_err(|e| self.vm_write_error(e, vm, false))?;
        if n == 0 {
            return Err(StoreError::VmNotFound { id: vm.id.clone() });
        }
        Ok(())
    }

    /// Sets a VM's state and its `last_error` (`None` clears it), stamping `updated_at`.
    pub fn set_state(&self, id: &VmId, state: VmState, last_error: Option<&str>) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE vms SET state = ?2, last_error = ?3, updated_at = ?4 WHERE id = ?1",
                params![id.as_str(), state.as_str(), last_error, unix_now()],
            )
            .map_err(sql("set a vm's state"))?;
        if n == 0 {
            return Err(StoreError::VmNotFound { id: id.clone() });
        }
        Ok(())
    }

    /// Removes a VM's row.
    pub fn delete_vm(&self, id: &VmId) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM vms WHERE id = ?1", params![id.as_str()])
            .map_err(sql("delete a vm"))?;
        if n == 0 {
            return Err(StoreError::VmNotFound { id: id.clone() });
        }
        Ok(())
    }

    /// The VM with this id, if any.
    pub fn get_vm(&self, id: &VmId) -> Result<Option<VmRuntime>, StoreError> {
        self.query_vms(&format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"), params![id.as_str()])
            .map(|mut v| v.pop())
    }

    /// The VM with this name, if any.
    pub fn get_vm_by_name(&self, name: &str) -> Result<Option<VmRuntime>, StoreError> {
        self.query_vms(&format!("SELECT {VM_COLUMNS} FROM vms WHERE name = ?1"), params![name])
            .map(|mut v| v.pop())
    }

    /// Every VM, ordered by name.
    pub fn list_vms(&self) -> Result<Vec<VmRuntime>, StoreError> {
        self.query_vms(&format!("SELECT {VM_COLUMNS} FROM vms ORDER BY name"), [])
    }

    /// Adds an image.
    pub fn insert_image(&self, image: &ImageRecord) -> Result<(), StoreError> {
        let size = i64::try_from(image.size_bytes).map_err(|_| StoreError::Unstorable {
            what: format!("the size of image {:?}", image.name),
            detail: format!("{} bytes is out of range", image.size_bytes),
        })?;
        self.conn
            .execute(
                &format!("INSERT INTO images ({IMAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
                params![
                    image.name,
                    path_value(&image.kernel_path),
                    path_value(&image.rootfs_path),
                    image.kernel_sha256,
                    image.rootfs_sha256,
                    size,
                    image.created_at
                ],
            )
            .map_err(|e| {
                if is_constraint(&e) {
                    StoreError::DuplicateImage { name: image.name.clone() }
                } else {
                    StoreError::Sqlite { op: "insert an image", source: e }
                }
            })?;
        Ok(())
    }

    /// The image with this name, if any.
    pub fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.query_images(&format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"), params![name])
            .map(|mut v| v.pop())
    }

    /// Every image, ordered by name.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.query_images(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"), [])
    }

    /// Removes an image's row; refused while any VM uses it.
    pub fn delete_image(&self, name: &str) -> Result<(), StoreError> {
        // One statement: the foreign key from `vms.image` refuses the delete atomically while a
        // VM uses the image; the VMs are listed only to say which ones.
        match self.conn.execute("DELETE FROM images WHERE name = ?1", params![name]) {
            Ok(0) => Err(StoreError::ImageNotFound { name: name.to_owned() }),
            Ok(_) => Ok(()),
            Err(e) if is_constraint(&e) => {
                let mut stmt = self
                    .conn
                    .prepare("SELECT name FROM vms WHERE image = ?1 ORDER BY name")
                    .map_err(sql("list the vms of an image"))?;
                let vms = stmt
                    .query_map(params![name], |r| r.get(0))
                    .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
                    .map_err(sql("list the vms of an image"))?;
                Err(StoreError::ImageInUse { image: name.to_owned(), vms })
            }
            Err(source) => Err(StoreError::Sqlite { op: "delete an image", source }),
        }
    }

    fn vm_write_error(&self, e: rusqlite::Error, vm: &VmRuntime, inserting: bool) -> StoreError {
        let op = if inserting { "insert a vm" } else { "update a vm" };
        if !is_constraint(&e) {
            return StoreError::Sqlite { op, source: e };
        }
        // Tell which constraint failed by looking, rather than by parsing SQLite's message.
        let name_taken: Option<String> = self
            .conn
            .query_row("SELECT id FROM vms WHERE name = ?1", params![vm.name], |r| r.get(0))
            .optional()
            .ok()
            .flatten();
        if name_taken.is_some_and(|id| id != vm.id.as_str()) {
            return StoreError::DuplicateName { name: vm.name.clone() };
        }
        let image_known = self
            .conn
            .query_row("SELECT 1 FROM images WHERE name = ?1", params![vm.image], |_| Ok(()))
            .optional()
            .ok()
            .flatten()
            .is_some();
        if !image_known {
            return StoreError::UnknownImage { image: vm.image.clone() };
        }
        if inserting {
            let id_taken = self
                .conn
                .query_row("SELECT 1 FROM vms WHERE id = ?1", params![vm.id.as_str()], |_| Ok(()))
                .optional()
                .ok()
                .flatten()
                .is_some();
            if id_taken {
                return StoreError::DuplicateId { id: vm.id.clone() };
            }
        }
        StoreError::Sqlite { op, source: e }
    }

    fn query_vms(&self, sql_text: &str, p: impl rusqlite::Params) -> Result<Vec<VmRuntime>, StoreError> {
        let mut stmt = self.conn.prepare(sql_text).map_err(sql("read vms"))?;
        let mut rows = stmt.query(p).map_err(sql("read vms"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql("read vms"))? {
            out.push(vm_from_row(row)?);
        }
        Ok(out)
    }

    fn query_images(&self, sql_text: &str, p: impl rusqlite::Params) -> Result<Vec<ImageRecord>, StoreError> {
        let mut stmt = self.conn.prepare(sql_text).map_err(sql("read images"))?;
        let mut rows = stmt.query(p).map_err(sql("read images"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql("read images"))? {
            out.push(image_from_row(row)?);
        }
        Ok(out)
    }
}

/// Brings the schema up to `migrations.len()`, one transaction per step.
fn migrate(conn: &mut Connection, path: &Path, migrations: &[&str]) -> Result<(), StoreError> {
    let open_err = |source| StoreError::Open { path: path.to_owned(), source };
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(open_err)?;
    let latest = migrations.len() as i64;
    if current < 0 {
        return Err(StoreError::Corrupt {
            table: "database header",
            key: "user_version".into(),
            column: "user_version",
            detail: format!("{current} is not a banger schema version"),
        });
    }
    if current > latest {
        return Err(StoreError::TooNew { path: path.to_owned(), found: current, supported: latest });
    }
    for (index, migration) in migrations.iter().enumerate().skip(current as usize) {
        let version = index as i64 + 1;
        let fail = |source| StoreError::Migrate { path: path.to_owned(), version, source };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(fail)?;
        // Another process may have migrated while we waited for the write lock.
        let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(fail)?;
        if now >= version {
            continue;
        }
        tx.execute_batch(migration).map_err(fail)?;
        tx.pragma_update(None, "user_version", version).map_err(fail)?;
        tx.commit().map_err(fail)?;
        tracing::info!(db = %path.display(), version, "migrated the banger database");
    }
    Ok(())
}

fn ensure_install_id(conn: &mut Connection) -> Result<InstallId, StoreError> {
    let tx =
        conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql("read the install id"))?;
    let existing: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'install_id'", [], |r| r.get(0))
        .optional()
        .map_err(sql("read the install id"))?;
    let value = match existing {
        Some(v) => v,
        None => {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(|e| StoreError::Unstorable {
                what: "a new install id".into(),
                detail: format!("the kernel's random source failed: {e}"),
            })?;
            let v: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            tx.execute("INSERT INTO meta (key, value) VALUES ('install_id', ?1)", params![v])
                .map_err(sql("store the install id"))?;
            v
        }
    };
    tx.commit().map_err(sql("store the install id"))?;
    InstallId::new(value.clone()).map_err(|e| StoreError::Corrupt {
        table: "meta",
        key: "install_id".into(),
        column: "value",
        detail: e.to_string(),
    })
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

fn vm_values(vm: &VmRuntime) -> Vec<Value> {
    vec![
        Value::Text(vm.id.as_str().to_owned()),
        Value::Text(vm.name.clone()),
        Value::Text(vm.state.as_str().to_owned()),
        Value::Integer(vm.vcpus.into()),
        Value::Integer(vm.memory_mib.into()),
        Value::Text(vm.image.clone()),
        opt_text(&vm.guest_ip),
        opt_text(&vm.gateway_ip),
        path_value(&vm.api_socket),
        path_value(&vm.vsock_path),
        Value::Integer(vm.vsock_cid.into()),
        path_value(&vm.log_path),
        path_value(&vm.metrics_path),
        Value::Text(vm.dns_name.clone()),
        path_value(&vm.vm_dir),
        path_value(&vm.overlay_path),
        vm.work_disk_path.as_deref().map_or(Value::Null, path_value),
        vm.storage.map_or(Value::Null, |s| Value::Text(s.as_str().to_owned())),
        vm.last_error.clone().map_or(Value::Null, Value::Text),
        Value::Integer(vm.created_at),
        Value::Integer(vm.updated_at),
    ]
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

fn vm_from_row(row: &Row<'_>) -> Result<VmRuntime, StoreError> {
    let key = match row.get_ref(0) {
        Ok(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        _ => "?".to_owned(),
    };
    let c = Cols { row, table: "vms", key };
    let id = VmId::new(c.text(0, "id")?).map_err(|e| c.corrupt("id", e.to_string()))?;
    Ok(VmRuntime {
        id,
        name: c.text(1, "name")?,
        state: c.parsed::<VmState>(2, "state")?.ok_or_else(|| c.corrupt("state", "missing"))?,
        vcpus: c.u32(3, "vcpus")?,
        memory_mib: c.u32(4, "memory_mib")?,
        image: c.text(5, "image")?,
        guest_ip: c.parsed::<Ipv4Addr>(6, "guest_ip")?,
        gateway_ip: c.parsed::<Ipv4Addr>(7, "gateway_ip")?,
        api_socket: c.path(8, "api_socket")?,
        vsock_path: c.path(9, "vsock_path")?,
        vsock_cid: c.u32(10, "vsock_cid")?,
        log_path: c.path(11, "log_path")?,
        metrics_path: c.path(12, "metrics_path")?,
        dns_name: c.text(13, "dns_name")?,
        vm_dir: c.path(14, "vm_dir")?,
        overlay_path: c.path(15, "overlay_path")?,
        work_disk_path: c.opt_path(16, "work_disk_path")?,
        storage: c.parsed::<StorageKind>(17, "storage")?,
        last_error: c.opt_text(18, "last_error")?,
        created_at: c.int(19, "created_at")?,
        updated_at: c.int(20, "updated_at")?,
    })
}

fn image_from_row(row: &Row<'_>) -> Result<ImageRecord, StoreError> {
    let key = match row.get_ref(0) {
        Ok(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        _ => "?".to_owned(),
    };
    let c = Cols { row, table: "images", key };
    let size = c.int(5, "size_bytes")?;
    Ok(ImageRecord {
        name: c.text(0, "name")?,
        kernel_path: c.path(1, "kernel_path")?,
        rootfs_path: c.path(2, "rootfs_path")?,
        kernel_sha256: c.text(3, "kernel_sha256")?,
        rootfs_sha256: c.text(4, "rootfs_sha256")?,
        size_bytes: u64::try_from(size)
            .map_err(|_| c.corrupt("size_bytes", format!("{size} is negative")))?,
        created_at: c.int(6, "created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn image(name: &str) -> ImageRecord {
        ImageRecord {
            name: name.to_owned(),
            kernel_path: PathBuf::from(format!("/state/images/{name}/vmlinux")),
            rootfs_path: PathBuf::from(format!("/state/images/{name}/rootfs.ext4")),
            kernel_sha256: "a".repeat(64),
            rootfs_sha256: "b".repeat(64),
            size_bytes: 3 << 30,
            created_at: 1_700_000_000,
        }
    }

    fn vm(id: &str, name: &str) -> VmRuntime {
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
            storage: None,
            last_error: None,
            created_at: 1_700_000_001,
            updated_at: 1_700_000_001,
        }
    }

    fn store_with_image() -> Store {
        let s = Store::open_in_memory().unwrap();
        s.insert_image(&image("base")).unwrap();
        s
    }

    fn user_version(path: &Path) -> i64 {
        Connection::open(path).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn fresh_database_is_migrated_private_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let s = Store::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        let id = s.install_id().as_str().to_owned();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let journal: String =
            Connection::open(&path).unwrap().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(journal.to_lowercase(), "wal");
        let fk: i64 = s.conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).unwrap();
        assert_eq!(fk, 1);
    }

    #[test]
    fn an_existing_empty_database_at_version_0_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("CREATE TABLE unrelated (x INTEGER); INSERT INTO unrelated VALUES (7);").unwrap();
        }
        assert_eq!(user_version(&path), 0);
        let s = Store::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        assert!(s.list_vms().unwrap().is_empty());
        let kept: i64 = s.conn.query_row("SELECT x FROM unrelated", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, 7);
    }

    #[test]
    fn reopening_at_the_current_version_keeps_data_and_install_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let first = {
            let s = Store::open(&path).unwrap();
            s.insert_image(&image("base")).unwrap();
            s.insert_vm(&vm("aaaa", "dev")).unwrap();
            s.install_id().clone()
        };
        let s = Store::open(&path).unwrap();
        assert_eq!(s.install_id(), &first);
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        assert_eq!(s.get_vm_by_name("dev").unwrap().unwrap(), vm("aaaa", "dev"));
    }

    #[test]
    fn a_newer_database_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        drop(Store::open(&path).unwrap());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::TooNew { found, supported, .. } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains("upgrade banger"), "{msg}");
        assert_eq!(user_version(&path), SCHEMA_VERSION + 1);
    }

    #[test]
    fn a_negative_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", -3).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { column: "user_version", .. }), "{err:?}");
    }

    #[test]
    fn a_failing_migration_leaves_the_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let mut conn = Connection::open(&path).unwrap();
        let steps = [MIGRATIONS[0], "CREATE TABLE half (x INTEGER); INSERT INTO no_such_table VALUES (1);"];
        let err = migrate(&mut conn, &path, &steps).unwrap_err();
        assert!(matches!(err, StoreError::Migrate { version: 2, .. }), "{err:?}");
        assert_eq!(user_version(&path), 1);
        let half: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'half'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(half, 0, "the failed step's table must be rolled back");
        // Running only the good step again is a no-op.
        migrate(&mut conn, &path, &steps[..1]).unwrap();
        assert_eq!(user_version(&path), 1);
    }

    #[test]
    fn vms_round_trip_with_every_field() {
        let s = store_with_image();
        let mut v = vm("0123456789abcdef", "dev");
        v.state = VmState::Running;
        v.guest_ip = Some(Ipv4Addr::new(172, 30, 0, 2));
        v.gateway_ip = Some(Ipv4Addr::new(172, 30, 0, 1));
        v.work_disk_path = Some(PathBuf::from(OsStr::from_bytes(b"/state/odd-\xff-name/work.img")));
        v.storage = Some(StorageKind::SparseCopy);
        v.last_error = Some("previous start failed".into());
        s.insert_vm(&v).unwrap();
        assert_eq!(s.get_vm(&v.id).unwrap().unwrap(), v);
        assert_eq!(s.get_vm_by_name("dev").unwrap().unwrap(), v);
        assert_eq!(s.get_vm(&VmId::new("ffff").unwrap()).unwrap(), None);
        assert_eq!(s.get_vm_by_name("nope").unwrap(), None);
    }

    #[test]
    fn list_is_ordered_by_name() {
        let s = store_with_image();
        s.insert_vm(&vm("c1", "zeta")).unwrap();
        s.insert_vm(&vm("c2", "alpha")).unwrap();
        s.insert_vm(&vm("c3", "mid")).unwrap();
        let names: Vec<String> = s.list_vms().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
    }

    #[test]
    fn duplicates_and_unknown_images_are_refused_without_change() {
        let s = store_with_image();
        s.insert_vm(&vm("a1", "dev")).unwrap();
        let err = s.insert_vm(&vm("a2", "dev")).unwrap_err();
        assert!(matches!(&err, StoreError::DuplicateName { name } if name == "dev"), "{err:?}");
        assert!(err.to_string().contains("\"dev\" already exists"), "{err}");
        let err = s.insert_vm(&vm("a1", "other")).unwrap_err();
        assert!(matches!(err, StoreError::DuplicateId { .. }), "{err:?}");
        let mut v = vm("a3", "third");
        v.image = "missing".into();
        let err = s.insert_vm(&v).unwrap_err();
        assert!(matches!(&err, StoreError::UnknownImage { image } if image == "missing"), "{err:?}");
        assert!(err.to_string().contains("banger image import"), "{err}");
        assert_eq!(s.list_vms().unwrap().len(), 1);
    }

    #[test]
    fn update_replaces_the_whole_row() {
        let s = store_with_image();
        s.insert_image(&image("other")).unwrap();
        s.insert_vm(&vm("b1", "dev")).unwrap();
        s.insert_vm(&vm("b2", "taken")).unwrap();
        let mut v = vm("b1", "renamed");
        v.image = "other".into();
        v.vcpus = 4;
        v.storage = Some(StorageKind::Reflink);
        v.updated_at = 1_800_000_000;
        s.update_vm(&v).unwrap();
        assert_eq!(s.get_vm(&v.id).unwrap().unwrap(), v);
        assert_eq!(s.get_vm_by_name("dev").unwrap(), None);

        let mut clash = v.clone();
        clash.name = "taken".into();
        let err = s.update_vm(&clash).unwrap_err();
        assert!(matches!(err, StoreError::DuplicateName { .. }), "{err:?}");
        assert_eq!(s.get_vm(&v.id).unwrap().unwrap(), v);

        let err = s.update_vm(&vm("b9", "ghost")).unwrap_err();
        assert!(matches!(err, StoreError::VmNotFound { .. }), "{err:?}");
    }

    #[test]
    fn set_state_sets_and_clears_last_error() {
        let s = store_with_image();
        let v = vm("d1", "dev");
        s.insert_vm(&v).unwrap();
        s.set_state(&v.id, VmState::Failed, Some("tap busy")).unwrap();
        let got = s.get_vm(&v.id).unwrap().unwrap();
        assert_eq!((got.state, got.last_error.as_deref()), (VmState::Failed, Some("tap busy")));
        assert!(got.updated_at >= unix_now() - 5, "updated_at is stamped");
        s.set_state(&v.id, VmState::Running, None).unwrap();
        let got = s.get_vm(&v.id).unwrap().unwrap();
        assert_eq!((got.state, got.last_error), (VmState::Running, None));
        let err = s.set_state(&VmId::new("nope").unwrap(), VmState::Stopped, None).unwrap_err();
        assert!(matches!(err, StoreError::VmNotFound { .. }), "{err:?}");
    }

    #[test]
    fn delete_vm_removes_the_row_once() {
        let s = store_with_image();
        let v = vm("e1", "dev");
        s.insert_vm(&v).unwrap();
        s.delete_vm(&v.id).unwrap();
        assert_eq!(s.get_vm(&v.id).unwrap(), None);
        assert!(matches!(s.delete_vm(&v.id), Err(StoreError::VmNotFound { .. })));
        // The name is free again.
        s.insert_vm(&vm("e2", "dev")).unwrap();
    }

    #[test]
    fn images_crud_and_in_use_refusal() {
        let s = store_with_image();
        s.insert_image(&image("alpine")).unwrap();
        let err = s.insert_image(&image("alpine")).unwrap_err();
        assert!(matches!(err, StoreError::DuplicateImage { .. }), "{err:?}");
        assert_eq!(s.get_image("alpine").unwrap().unwrap(), image("alpine"));
        assert_eq!(s.get_image("nope").unwrap(), None);
        let names: Vec<String> = s.list_images().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["alpine", "base"]);

        s.insert_vm(&vm("f1", "web")).unwrap();
        s.insert_vm(&vm("f2", "db")).unwrap();
        let err = s.delete_image("base").unwrap_err();
        match &err {
            StoreError::ImageInUse { image, vms } => {
                assert_eq!(image, "base");
                assert_eq!(vms, &["db", "web"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("db, web"), "{err}");
        assert!(s.get_image("base").unwrap().is_some());

        s.delete_image("alpine").unwrap();
        assert!(matches!(s.delete_image("alpine"), Err(StoreError::ImageNotFound { .. })));
    }

    #[test]
    fn image_sizes_beyond_sqlite_range_are_refused() {
        let s = Store::open_in_memory().unwrap();
        let mut i = image("huge");
        i.size_bytes = u64::MAX;
        assert!(matches!(s.insert_image(&i), Err(StoreError::Unstorable { .. })));
    }

    #[test]
    fn hand_written_rows_with_text_paths_are_read() {
        let s = store_with_image();
        s.conn
            .execute(
                "INSERT INTO vms VALUES ('h1', 'hand', 'stopped', 1, 128, 'base', '10.0.0.2', NULL,
                 '/run/a.sock', '/v/vsock', 3, '/v/log', '/v/metrics', 'hand.banger.internal', '/v',
                 '/v/root', NULL, 'reflink', NULL, 1, 2)",
                [],
            )
            .unwrap();
        let v = s.get_vm_by_name("hand").unwrap().unwrap();
        assert_eq!(v.api_socket, PathBuf::from("/run/a.sock"));
        assert_eq!(v.guest_ip, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(v.storage, Some(StorageKind::Reflink));
    }

    #[test]
    fn unreadable_values_are_reported_with_row_and_column() {
        let s = store_with_image();
        s.insert_vm(&vm("g1", "dev")).unwrap();
        s.conn.execute("UPDATE vms SET guest_ip = 'not-an-ip' WHERE id = 'g1'", []).unwrap();
        let err = s.list_vms().unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { table: "vms", column: "guest_ip", key, .. } if key == "g1"),
            "{err:?}"
        );
        assert!(err.to_string().contains("guest_ip"), "{err}");
    }

    #[test]
    fn two_connections_see_each_others_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let a = Store::open(&path).unwrap();
        let b = Store::open(&path).unwrap();
        assert_eq!(a.install_id(), b.install_id());
        a.insert_image(&image("base")).unwrap();
        a.insert_vm(&vm("k1", "dev")).unwrap();
        b.set_state(&VmId::new("k1").unwrap(), VmState::Running, None).unwrap();
        assert_eq!(a.get_vm_by_name("dev").unwrap().unwrap().state, VmState::Running);
    }
}
