//! The schema: migrations by `PRAGMA user_version`, and the install id kept in `meta`.

use std::path::Path;

use banger_protocol::InstallId;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{StoreError, sql};

/// The schema, one entry per version: entry `i` takes `user_version` from `i` to `i + 1`.
/// Entries are only ever appended; an applied migration never changes.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // 2: why a VM's kernel objects are not removed yet (NULL: nothing pending).
    "ALTER TABLE vms ADD COLUMN cleanup_pending TEXT;",
    // 3: the identities of an image's files when their hashes were last checked (NULL: never;
    //    hashed at the next use), and the size of a VM's work disk.
    "ALTER TABLE images ADD COLUMN kernel_identity TEXT;
     ALTER TABLE images ADD COLUMN rootfs_identity TEXT;
     ALTER TABLE vms ADD COLUMN work_disk_bytes INTEGER CHECK (work_disk_bytes > 0);",
    // 4: an image's optional initrd, its hash and identity (all NULL for images without one).
    "ALTER TABLE images ADD COLUMN initrd_path ANY;
     ALTER TABLE images ADD COLUMN initrd_sha256 TEXT;
     ALTER TABLE images ADD COLUMN initrd_identity TEXT;",
    // 5: how a VM's VMM is launched, fixed at its first start (NULL: never started).
    "ALTER TABLE vms ADD COLUMN launch TEXT CHECK (launch IN ('direct', 'jailer'));",
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema up to `migrations.len()`, one transaction per step.
pub(super) fn migrate(conn: &mut Connection, path: &Path, migrations: &[&str]) -> Result<(), StoreError> {
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

pub(super) fn ensure_install_id(conn: &mut Connection) -> Result<InstallId, StoreError> {
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rusqlite::Connection;

    use super::*;
    use crate::daemon::store::Store;
    use crate::daemon::store::testing::*;
    use crate::model::VmState;

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
    fn a_version_1_database_gains_cleanup_pending_and_keeps_its_vms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        {
            let mut c = Connection::open(&path).unwrap();
            migrate(&mut c, &path, &MIGRATIONS[..1]).unwrap();
            c.execute_batch(
                "INSERT INTO images VALUES ('base', '/k', '/r', 'a', 'b', 1, 0);
                 INSERT INTO vms VALUES ('v1', 'old', 'stopped', 1, 128, 'base', NULL, NULL,
                 '/run/a.sock', '/v/vsock', 3, '/v/log', '/v/metrics', 'old.banger.internal', '/v',
                 '/v/root', NULL, NULL, 'it stopped', 1, 2);",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        let vm = s.get_vm_by_name("old").unwrap().unwrap();
        assert_eq!((vm.last_error.as_deref(), vm.cleanup_pending), (Some("it stopped"), None));
    }

    #[test]
    fn a_version_2_database_gains_image_identities_and_work_disk_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        {
            let mut c = Connection::open(&path).unwrap();
            migrate(&mut c, &path, &MIGRATIONS[..2]).unwrap();
            c.execute_batch(
                "INSERT INTO images VALUES ('base', '/k', '/r', 'a', 'b', 1, 0);
                 INSERT INTO vms VALUES ('v1', 'old', 'running', 1, 128, 'base', NULL, NULL,
                 '/run/a.sock', '/v/vsock', 3, '/v/log', '/v/metrics', 'old.banger.internal', '/v',
                 '/v/root', NULL, 'sparse-copy', NULL, 1, 2, NULL);",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        let img = s.get_image("base").unwrap().unwrap();
        assert_eq!((img.kernel_identity, img.rootfs_identity), (None, None), "hashed at its next use");
        let vm = s.get_vm_by_name("old").unwrap().unwrap();
        assert_eq!((vm.state, vm.work_disk_path, vm.work_disk_bytes), (VmState::Running, None, None));
        assert!(s.conn.execute("UPDATE vms SET work_disk_bytes = 0", []).is_err(), "a work disk has a size");
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
}
