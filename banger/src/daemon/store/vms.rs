//! The `vms` table: one row per VM, every [`VmRuntime`] field.

use std::net::Ipv4Addr;

use banger_protocol::VmId;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{OptionalExtension, Row, params};

use super::{Cols, Store, StoreError, is_constraint, opt_text, path_value, sql, unix_now};
use crate::model::{LaunchMode, StorageKind, VmRuntime, VmState};

const VM_COLUMNS: &str = "id, name, state, vcpus, memory_mib, image, guest_ip, gateway_ip, api_socket, \
     vsock_path, vsock_cid, log_path, metrics_path, dns_name, vm_dir, overlay_path, work_disk_path, \
     storage, last_error, created_at, updated_at, cleanup_pending, work_disk_bytes, launch";

impl Store {
    /// Adds a VM.
    pub fn insert_vm(&self, vm: &VmRuntime) -> Result<(), StoreError> {
        let sql_text = format!(
            "INSERT INTO vms ({VM_COLUMNS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24)"
        );
        let values = vm_values(vm)?;
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
             work_disk_path = ?17, storage = ?18, last_error = ?19, created_at = ?20, updated_at = ?21, \
             cleanup_pending = ?22, work_disk_bytes = ?23, launch = ?24 WHERE id = ?1";
        let n = self
            .conn
            .execute(sql_text, rusqlite::params_from_iter(vm_values(vm)?))
            .map_err(|e| self.vm_write_error(e, vm, false))?;
        if n == 0 {
            return Err(StoreError::VmNotFound { id: vm.id.clone() });
        }
        Ok(())
    }

    /// Sets a VM's state, its `last_error` and its `cleanup_pending` (`None` clears either) in
    /// one statement, stamping `updated_at`.
    pub fn set_state(
        &self,
        id: &VmId,
        state: VmState,
        last_error: Option<&str>,
        cleanup_pending: Option<&str>,
    ) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE vms SET state = ?2, last_error = ?3, cleanup_pending = ?4, updated_at = ?5 WHERE id = ?1",
                params![id.as_str(), state.as_str(), last_error, cleanup_pending, unix_now()],
            )
            .map_err(sql("set a vm's state"))?;
        if n == 0 {
            return Err(StoreError::VmNotFound { id: id.clone() });
        }
        Ok(())
    }

    /// Sets only a VM's `cleanup_pending` (`None` clears it), stamping `updated_at`.
    pub fn set_cleanup_pending(&self, id: &VmId, cleanup_pending: Option<&str>) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE vms SET cleanup_pending = ?2, updated_at = ?3 WHERE id = ?1",
                params![id.as_str(), cleanup_pending, unix_now()],
            )
            .map_err(sql("record a vm's pending cleanup"))?;
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
}

fn vm_values(vm: &VmRuntime) -> Result<Vec<Value>, StoreError> {
    let work_disk_bytes = match vm.work_disk_bytes {
        None => Value::Null,
        Some(b) => Value::Integer(i64::try_from(b).map_err(|_| StoreError::Unstorable {
            what: format!("the work disk size of vm {:?}", vm.name),
            detail: format!("{b} bytes is out of range"),
        })?),
    };
    Ok(vec![
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
        vm.cleanup_pending.clone().map_or(Value::Null, Value::Text),
        work_disk_bytes,
        vm.launch.map_or(Value::Null, |l| Value::Text(l.as_str().to_owned())),
    ])
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
        cleanup_pending: c.opt_text(21, "cleanup_pending")?,
        work_disk_bytes: match c.opt_int(22, "work_disk_bytes")? {
            None => None,
            Some(b) => {
                Some(u64::try_from(b).map_err(|_| c.corrupt("work_disk_bytes", format!("{b} is negative")))?)
            }
        },
        launch: c.parsed::<LaunchMode>(23, "launch")?,
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    use super::*;
    use crate::daemon::store::testing::*;

    #[test]
    fn vms_round_trip_with_every_field() {
        let s = store_with_image();
        let mut v = vm("0123456789abcdef", "dev");
        v.state = VmState::Running;
        v.guest_ip = Some(Ipv4Addr::new(172, 30, 0, 2));
        v.gateway_ip = Some(Ipv4Addr::new(172, 30, 0, 1));
        v.work_disk_path = Some(PathBuf::from(OsStr::from_bytes(b"/state/odd-\xff-name/work.img")));
        v.work_disk_bytes = Some(10 << 30);
        v.storage = Some(StorageKind::SparseCopy);
        v.launch = Some(LaunchMode::Jailer);
        v.last_error = Some("previous start failed".into());
        v.cleanup_pending = Some("banger-helper could not be reached".into());
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
        v.launch = Some(LaunchMode::Direct);
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
    fn set_state_sets_and_clears_last_error_and_cleanup_pending() {
        let s = store_with_image();
        let v = vm("d1", "dev");
        s.insert_vm(&v).unwrap();
        s.set_state(&v.id, VmState::Failed, Some("tap busy"), Some("helper down")).unwrap();
        let got = s.get_vm(&v.id).unwrap().unwrap();
        assert_eq!((got.state, got.last_error.as_deref()), (VmState::Failed, Some("tap busy")));
        assert_eq!(got.cleanup_pending.as_deref(), Some("helper down"));
        s.set_cleanup_pending(&v.id, Some("helper still down")).unwrap();
        let got = s.get_vm(&v.id).unwrap().unwrap();
        assert_eq!((got.state, got.cleanup_pending.as_deref()), (VmState::Failed, Some("helper still down")));
        assert!(got.updated_at >= unix_now() - 5, "updated_at is stamped");
        s.set_state(&v.id, VmState::Running, None, None).unwrap();
        let got = s.get_vm(&v.id).unwrap().unwrap();
        assert_eq!((got.state, got.last_error, got.cleanup_pending), (VmState::Running, None, None));
        let err = s.set_state(&VmId::new("nope").unwrap(), VmState::Stopped, None, None).unwrap_err();
        assert!(matches!(err, StoreError::VmNotFound { .. }), "{err:?}");
        let err = s.set_cleanup_pending(&VmId::new("nope").unwrap(), None).unwrap_err();
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
    fn hand_written_rows_with_text_paths_are_read() {
        let s = store_with_image();
        s.conn
            .execute(
                "INSERT INTO vms VALUES ('h1', 'hand', 'stopped', 1, 128, 'base', '10.0.0.2', NULL,
                 '/run/a.sock', '/v/vsock', 3, '/v/log', '/v/metrics', 'hand.banger.internal', '/v',
                 '/v/root', NULL, 'reflink', NULL, 1, 2, NULL, NULL, NULL)",
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
}
