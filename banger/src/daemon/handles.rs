//! Momentary reality: the handles of running VMs (PID, TAP, loops, dm, a jailed VMM's jail),
//! kept in memory and mirrored to `<vm_dir>/handles.json`.
//!
//! The in-memory [`HandleCache`] is what the daemon consults; the scratch file exists so that a
//! daemon that died can find out, at its next start, which kernel objects its VMs held (see
//! [`crate::daemon::reconcile`]). Both change together through [`HandleCache::record`] and
//! [`HandleCache::forget`]: the file is written first (temp file in the same directory, fsync,
//! rename over `handles.json`, fsync of the directory), and only once it is durable does the cache
//! change. A failed write leaves both as they were, so the cache never claims what the file does
//! not.
//!
//! The file carries a format version ([`HANDLES_VERSION`]). Fields added later default when
//! absent, so older files read fine; a file from a newer banger is refused
//! ([`HandlesError::UnsupportedVersion`]) rather than half-understood, and callers fall back to
//! asking the OS and the helper. A missing file is `Ok(None)`; an unreadable or corrupt one is an
//! error naming the path, never a panic.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use banger_protocol::VmId;

use crate::model::{HANDLES_VERSION, VmHandles};

/// The scratch file's name inside a VM's directory.
pub const SCRATCH_FILE: &str = "handles.json";

/// Why a scratch file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HandlesError {
    /// The file exists but could not be read.
    #[error("cannot read vm handles file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not valid handles JSON.
    #[error("vm handles file {path} is corrupt; banger will rediscover the vm's state from the system")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The file was written by a newer banger.
    #[error(
        "vm handles file {path} has format version {found}, newer than this banger understands ({supported}); upgrade banger"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// [`HANDLES_VERSION`].
        supported: u32,
    },
    /// The file could not be written, synced, renamed or removed.
    #[error("cannot write vm handles file {path}: check that the vm directory exists and is writable")]
    Write {
        /// The file (or the temporary file being written).
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The path of a VM's scratch file.
pub fn scratch_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(SCRATCH_FILE)
}

/// Writes `handles` to `<vm_dir>/handles.json` atomically and durably (see
/// [`crate::atomic_file`]): readers see the old file or the new one, never a mix, and after a
/// crash the new one if this returned `Ok`. The written version is always [`HANDLES_VERSION`].
pub fn write_scratch(vm_dir: &Path, handles: &VmHandles) -> Result<(), HandlesError> {
    let path = scratch_path(vm_dir);
    let mut doc = handles.clone();
    doc.version = HANDLES_VERSION;
    let mut bytes = serde_json::to_vec_pretty(&doc)
        .map_err(|e| HandlesError::Write { path: path.clone(), source: io::Error::other(e) })?;
    bytes.push(b'\n');
    crate::atomic_file::write(&path, &bytes, 0o600).map_err(|source| HandlesError::Write { path, source })
}

/// Reads `<vm_dir>/handles.json`: `Ok(None)` when there is none.
pub fn read_scratch(vm_dir: &Path) -> Result<Option<VmHandles>, HandlesError> {
    let path = scratch_path(vm_dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(HandlesError::Read { path, source }),
    };
    // The document must be a JSON object: serde would also accept an array for a struct.
    let corrupt = |source| HandlesError::Corrupt { path: path.clone(), source };
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(corrupt)?;
    let handles: VmHandles = serde_json::from_value(serde_json::Value::Object(object)).map_err(corrupt)?;
    if handles.version > HANDLES_VERSION {
        return Err(HandlesError::UnsupportedVersion {
            path,
            found: handles.version,
            supported: HANDLES_VERSION,
        });
    }
    Ok(Some(handles))
}

/// Removes `<vm_dir>/handles.json`; absent is success.
pub fn remove_scratch(vm_dir: &Path) -> Result<(), HandlesError> {
    let path = scratch_path(vm_dir);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(HandlesError::Write { path, source }),
    }
}

/// The daemon's in-memory view of every VM's handles.
#[derive(Debug, Default)]
pub struct HandleCache {
    /// Guards the map from VM id to the handles that VM holds right now. Held only for map
    /// operations, never across I/O, so readers are never delayed by a disk write.
    map: Mutex<HashMap<VmId, VmHandles>>,
    /// Guards the order of [`HandleCache::record`] and [`HandleCache::forget`]: held across the
    /// scratch-file write and the map update that follows it, so two writers for one VM cannot
    /// leave the file with one's handles and the map with the other's.
    writes: Mutex<()>,
}

impl HandleCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> MutexGuard<'_, HashMap<VmId, VmHandles>> {
        // A panic while holding the lock cannot leave the map half-updated (each operation is
        // one call on the map), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writes(&self) -> MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handles of `vm`, if it has any.
    pub fn get(&self, vm: &VmId) -> Option<VmHandles> {
        self.map().get(vm).cloned()
    }

    /// Sets the in-memory handles of `vm` only (e.g. when reconcile seeds the cache from a
    /// scratch file that is already correct). Use [`HandleCache::record`] for new handles.
    pub fn set(&self, vm: VmId, handles: VmHandles) {
        self.map().insert(vm, handles);
    }

    /// Drops the in-memory handles of `vm` only, returning them.
    pub fn remove(&self, vm: &VmId) -> Option<VmHandles> {
        self.map().remove(vm)
    }

    /// A copy of every entry.
    pub fn snapshot(&self) -> HashMap<VmId, VmHandles> {
        self.map().clone()
    }

    /// Makes `handles` the VM's handles on disk (`<vm_dir>/handles.json`) and then in memory.
    /// On error neither changed.
    pub fn record(&self, vm: &VmId, vm_dir: &Path, handles: VmHandles) -> Result<(), HandlesError> {
        let _order = self.writes();
        let mut handles = handles;
        handles.version = HANDLES_VERSION;
        write_scratch(vm_dir, &handles)?;
        self.map().insert(vm.clone(), handles);
        Ok(())
    }

    /// Removes the VM's scratch file and then its in-memory handles, returning what the cache
    /// held. On error neither changed.
    pub fn forget(&self, vm: &VmId, vm_dir: &Path) -> Result<Option<VmHandles>, HandlesError> {
        let _order = self.writes();
        remove_scratch(vm_dir)?;
        Ok(self.map().remove(vm))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use super::*;

    fn sample(pid: i32) -> VmHandles {
        VmHandles {
            version: HANDLES_VERSION,
            pid: Some(pid),
            tap: Some("bg0123456789ab".into()),
            base_loop: Some("/dev/loop3".into()),
            cow_loop: Some("/dev/loop4".into()),
            dm_name: Some("banger-1000-vm1".into()),
            dm_dev: Some("/dev/dm-2".into()),
            jail: None,
        }
    }

    fn id(s: &str) -> VmId {
        VmId::new(s).unwrap()
    }

    #[test]
    fn round_trip_is_private_and_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = sample(42);
        h.version = 0;
        write_scratch(dir.path(), &h).unwrap();
        let back = read_scratch(dir.path()).unwrap().unwrap();
        assert_eq!(back, VmHandles { version: HANDLES_VERSION, ..h });
        let mode = fs::metadata(scratch_path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [SCRATCH_FILE]);
        // Overwriting replaces.
        write_scratch(dir.path(), &VmHandles { pid: Some(7), ..Default::default() }).unwrap();
        assert_eq!(read_scratch(dir.path()).unwrap().unwrap().pid, Some(7));
        assert_eq!(read_scratch(dir.path()).unwrap().unwrap().tap, None);
    }

    #[test]
    fn missing_file_is_none_and_remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_scratch(dir.path()).unwrap(), None);
        remove_scratch(dir.path()).unwrap();
        write_scratch(dir.path(), &sample(1)).unwrap();
        remove_scratch(dir.path()).unwrap();
        assert_eq!(read_scratch(dir.path()).unwrap(), None);
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        for junk in [&b"{\"pid\": 12"[..], b"", b"[]", b"{\"pid\": \"twelve\"}"] {
            fs::write(scratch_path(dir.path()), junk).unwrap();
            let err = read_scratch(dir.path()).unwrap_err();
            assert!(matches!(err, HandlesError::Corrupt { .. }), "{junk:?}: {err:?}");
            assert!(err.to_string().contains(&scratch_path(dir.path()).display().to_string()));
        }
    }

    #[test]
    fn version_3_keeps_a_jail_and_version_2_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let jail = crate::model::JailHandles {
            id: "bg-0123abcd".into(),
            uid: 900_001,
            root: "/srv/jailer/firecracker/bg-0123abcd/root".into(),
            api_socket: "/srv/jailer/firecracker/bg-0123abcd/root/run/firecracker.socket".into(),
        };
        let h = VmHandles { jail: Some(jail.clone()), ..sample(4242) };
        write_scratch(dir.path(), &h).unwrap();
        let text = fs::read_to_string(scratch_path(dir.path())).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["version"], 3);
        assert_eq!(json["jail"]["id"], "bg-0123abcd", "{text}");
        assert_eq!(json["jail"]["uid"], 900_001, "{text}");
        assert_eq!(json["jail"]["api_socket"], jail.api_socket.to_str().unwrap(), "{text}");
        assert_eq!(read_scratch(dir.path()).unwrap().unwrap(), h);
        assert_eq!(
            jail.host_path(banger_protocol::jail_paths::SERIAL),
            Path::new("/srv/jailer/firecracker/bg-0123abcd/root/run/serial")
        );

        // A version 2 file, as bangerd wrote it before jails: no jail, everything else kept.
        fs::write(
            scratch_path(dir.path()),
            br#"{"version": 2, "pid": 8, "tap": "bg2", "base_loop": "/dev/loop1", "cow_loop": "/dev/loop2", "dm_name": "d", "dm_dev": "/dev/dm-1"}"#,
        )
        .unwrap();
        let old = read_scratch(dir.path()).unwrap().unwrap();
        assert_eq!((old.version, old.pid, old.jail), (2, Some(8), None));
        assert_eq!(old.dm_dev.as_deref(), Some("/dev/dm-1"));
        // A jail without one of its fields is corrupt, not a jail with defaults.
        fs::write(scratch_path(dir.path()), br#"{"version": 3, "pid": 8, "jail": {"id": "x", "uid": 1}}"#)
            .unwrap();
        assert!(matches!(read_scratch(dir.path()), Err(HandlesError::Corrupt { .. })));
    }

    #[test]
    fn version_2_names_the_dm_device_dm_dev_and_version_1_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        write_scratch(dir.path(), &sample(3)).unwrap();
        let text = fs::read_to_string(scratch_path(dir.path())).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["version"], HANDLES_VERSION);
        for (key, value) in [
            ("base_loop", "/dev/loop3"),
            ("cow_loop", "/dev/loop4"),
            ("dm_name", "banger-1000-vm1"),
            ("dm_dev", "/dev/dm-2"),
        ] {
            assert_eq!(json[key], value, "{text}");
        }
        assert!(json.get("dm_device").is_none(), "{text}");

        // A version 1 file, as bangerd wrote it (TAP and PID only), and one naming the dm node
        // by its old key.
        fs::write(
            scratch_path(dir.path()),
            br#"{"version": 1, "pid": 7, "tap": "bg1", "base_loop": null, "cow_loop": null, "dm_name": null, "dm_device": null}"#,
        )
        .unwrap();
        let h = read_scratch(dir.path()).unwrap().unwrap();
        assert_eq!((h.version, h.pid, h.tap.as_deref(), h.dm_dev), (1, Some(7), Some("bg1"), None));
        fs::write(scratch_path(dir.path()), br#"{"version": 1, "dm_name": "d", "dm_device": "/dev/dm-9"}"#)
            .unwrap();
        assert_eq!(read_scratch(dir.path()).unwrap().unwrap().dm_dev.as_deref(), Some("/dev/dm-9"));
    }

    #[test]
    fn older_files_with_fewer_fields_read_and_newer_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(scratch_path(dir.path()), br#"{"pid": 99}"#).unwrap();
        let h = read_scratch(dir.path()).unwrap().unwrap();
        assert_eq!((h.version, h.pid, h.tap), (0, Some(99), None));
        fs::write(scratch_path(dir.path()), br#"{"version": 1, "pid": 5, "jail_uid": 100000}"#).unwrap();
        assert_eq!(read_scratch(dir.path()).unwrap().unwrap().pid, Some(5));
        let newer = format!(r#"{{"version": {}, "pid": 5}}"#, HANDLES_VERSION + 1);
        fs::write(scratch_path(dir.path()), newer).unwrap();
        let err = read_scratch(dir.path()).unwrap_err();
        assert!(
            matches!(err, HandlesError::UnsupportedVersion { found, .. } if found == HANDLES_VERSION + 1)
        );
    }

    #[test]
    fn unreadable_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails with something other than ENOENT.
        fs::create_dir(scratch_path(dir.path())).unwrap();
        assert!(matches!(read_scratch(dir.path()), Err(HandlesError::Read { .. })));
    }

    #[test]
    fn record_writes_file_then_cache_and_failure_changes_neither() {
        let dir = tempfile::tempdir().unwrap();
        let cache = HandleCache::new();
        let vm = id("vm1");
        cache.record(&vm, dir.path(), sample(10)).unwrap();
        assert_eq!(cache.get(&vm), Some(sample(10)));
        assert_eq!(read_scratch(dir.path()).unwrap(), Some(sample(10)));

        let gone = dir.path().join("no-such-dir");
        let err = cache.record(&vm, &gone, sample(11)).unwrap_err();
        assert!(matches!(err, HandlesError::Write { .. }), "{err:?}");
        assert_eq!(cache.get(&vm), Some(sample(10)), "cache unchanged after a failed write");

        assert_eq!(cache.forget(&vm, dir.path()).unwrap(), Some(sample(10)));
        assert_eq!(cache.get(&vm), None);
        assert_eq!(read_scratch(dir.path()).unwrap(), None);
    }

    #[test]
    fn failed_forget_keeps_the_cache_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = HandleCache::new();
        let vm = id("vm1");
        cache.record(&vm, dir.path(), sample(10)).unwrap();
        // Make removal fail: a non-empty directory in place of the file.
        fs::remove_file(scratch_path(dir.path())).unwrap();
        fs::create_dir(scratch_path(dir.path())).unwrap();
        fs::write(scratch_path(dir.path()).join("x"), b"x").unwrap();
        assert!(cache.forget(&vm, dir.path()).is_err());
        assert_eq!(cache.get(&vm), Some(sample(10)));
    }

    #[test]
    fn set_remove_snapshot() {
        let cache = HandleCache::new();
        cache.set(id("a"), sample(1));
        cache.set(id("b"), sample(2));
        cache.set(id("a"), sample(3));
        let snap = cache.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[&id("a")].pid, Some(3));
        assert_eq!(cache.remove(&id("b")), Some(sample(2)));
        assert_eq!(cache.remove(&id("b")), None);
        assert_eq!(cache.snapshot().len(), 1);
    }

    #[test]
    fn concurrent_writers_and_readers_agree_with_the_files() {
        let root = tempfile::tempdir().unwrap();
        let cache = Arc::new(HandleCache::new());
        let vms: Vec<(VmId, PathBuf)> = (0..8)
            .map(|i| {
                let d = root.path().join(format!("vm{i}"));
                fs::create_dir(&d).unwrap();
                (id(&format!("vm{i}")), d)
            })
            .collect();
        let vms = Arc::new(vms);
        let mut threads = Vec::new();
        for t in 0..16i32 {
            let cache = Arc::clone(&cache);
            let vms = Arc::clone(&vms);
            threads.push(std::thread::spawn(move || {
                for round in 0..40i32 {
                    let (vm, dir) = &vms[((t + round) % 8) as usize];
                    cache.record(vm, dir, sample(t * 1000 + round)).unwrap();
                    // Every read sees a complete entry written by some writer.
                    let got = cache.get(vm).unwrap();
                    assert_eq!(got.tap.as_deref(), Some("bg0123456789ab"));
                    let _ = cache.snapshot();
                }
            }));
        }
        for th in threads {
            th.join().unwrap();
        }
        for (vm, dir) in vms.iter() {
            let on_disk = read_scratch(dir).unwrap().unwrap();
            assert_eq!(cache.get(vm), Some(on_disk), "cache and file disagree for {vm}");
            let leftovers = fs::read_dir(dir).unwrap().count();
            assert_eq!(leftovers, 1, "temporary files left in {}", dir.display());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_tasks_share_the_cache() {
        let cache = Arc::new(HandleCache::new());
        let mut tasks = Vec::new();
        for t in 0..64i32 {
            let cache = Arc::clone(&cache);
            tasks.push(tokio::spawn(async move {
                let vm = id(&format!("vm{t}"));
                for round in 0..50 {
                    cache.set(vm.clone(), VmHandles { pid: Some(t * 100 + round), ..Default::default() });
                    assert_eq!(cache.get(&vm).unwrap().pid, Some(t * 100 + round));
                    // Readers of the whole map run beside the writers.
                    for (other, h) in cache.snapshot() {
                        let n: i32 = other.as_str()[2..].parse().unwrap();
                        assert_eq!(h.pid.unwrap() / 100, n, "{other} holds another vm's value");
                    }
                    tokio::task::yield_now().await;
                }
                if t % 4 == 0 {
                    assert!(cache.remove(&vm).is_some());
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let snap = cache.snapshot();
        assert_eq!(snap.len(), 48);
        for t in 0..64i32 {
            let got = snap.get(&id(&format!("vm{t}"))).map(|h| h.pid);
            let want = if t % 4 == 0 { None } else { Some(Some(t * 100 + 49)) };
            assert_eq!(got, want, "vm{t}");
        }
    }
}
