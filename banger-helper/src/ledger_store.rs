//! The ownership ledger on disk.
//!
//! The ledger (the policy crate's [`Ledger`]) says which uid, install and VM every helper-made
//! object belongs to (with each loop device's backing file identity and each entry's state), and
//! which lease each uid holds. It lives in two files of the state directory, held by a third:
//!
//! - `leases.json`: the leases; replaced atomically and durably (temporary file, fsync, rename,
//!   directory fsync) whenever they change, which happens once per new uid;
//! - `objects.json`: the objects; replaced atomically (temporary file, rename) on every change,
//!   not fsynced: the objects live in the kernel and disappear on reboot, and after a power loss
//!   an unreadable file is read as empty, which is what the kernel then holds;
//! - `forwarding.json`: present only while the helper holds `net.ipv4.ip_forward` on that it
//!   turned on itself, with the value it had before and the boot it was written in; written
//!   durably *before* the sysctl is changed, removed once the value is put back. A record of an
//!   earlier boot is dropped unread: the kernel started with its own value since;
//! - `lock`: flocked while the helper runs, so a second helper refuses the same state directory.
//!
//! Files of the earlier format (1), which kept loop backing identities in a list beside the
//! entries, are read and migrated into the entries.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use banger_policy::{FileId, Ledger, LedgerEntry, Object};
use banger_protocol::{InstallId, LoopRole, VmId};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

const LEASES: &str = "leases.json";
const OBJECTS: &str = "objects.json";
const LOCK: &str = "lock";
const FORWARDING: &str = "forwarding.json";
/// Two boot times (each computed as the wall clock minus the time since boot) this close are the
/// same boot: the wall clock may have been adjusted a little in between.
const SAME_BOOT_SECS: i64 = 60;

/// `forwarding.json`: the helper turned `net.ipv4.ip_forward` on; what it was before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardingFile {
    /// The value `ip_forward` had before the helper turned it on.
    earlier: String,
    /// When the machine booted, in seconds since the epoch, when the record was written.
    boot: i64,
}

/// When this machine booted, in seconds since the epoch: the wall clock minus the time since
/// boot (`CLOCK_BOOTTIME`), which tells two boots apart without reading any file.
pub fn boot_epoch() -> i64 {
    use nix::time::{ClockId, clock_gettime};
    let now = clock_gettime(ClockId::CLOCK_REALTIME).map(|t| t.tv_sec()).unwrap_or(0);
    let up = clock_gettime(ClockId::CLOCK_BOOTTIME).map(|t| t.tv_sec()).unwrap_or(0);
    now - up
}
/// 2: loop backing identities inside the loop entries, entry states.
const FORMAT: u32 = 2;

/// Why the ledger could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory is unusable.
    #[error("cannot use state directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process holds the state directory.
    #[error("state directory {0} is in use by another banger-helper; give each helper its own --state-dir")]
    Locked(PathBuf),
    /// Reading or writing the ledger file failed.
    #[error("cannot {action} ledger {path}")]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The ledger file is not valid.
    #[error(
        "ledger {path} is corrupt; move it aside to start with an empty ledger (objects it listed are then reported as unknown)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// `leases.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LeasesFile {
    format: u32,
    leases: BTreeMap<u32, u32>,
}

/// `objects.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ObjectsFile {
    format: u32,
    entries: Vec<LedgerEntry>,
    /// Format 1: backing identities per loop entry, beside the entries. Read, never written.
    #[serde(default, skip_serializing)]
    loop_backings: Vec<LoopBackingV1>,
    /// Format 1 as first written: backing identities by device path. Read, never written.
    #[serde(default, skip_serializing)]
    loop_backing: BTreeMap<String, FileId>,
}

/// A backing identity as format 1 kept it, beside its entry.
#[derive(Debug, Deserialize)]
struct LoopBackingV1 {
    uid: u32,
    install: InstallId,
    vm: VmId,
    role: LoopRole,
    device: String,
    backing: FileId,
}

/// Moves format-1 backing identities into their loop entries. An identity by device path is used
/// only where exactly one entry names the device. A loop entry whose identity is unknown cannot
/// be recognised on its device any more: it is left out, with a warning naming the device.
fn migrate(objects: ObjectsFile) -> Vec<LedgerEntry> {
    let ObjectsFile { format, mut entries, loop_backings, loop_backing } = objects;
    if format >= FORMAT {
        return entries;
    }
    let named = |device: &str| {
        entries.iter().filter(|e| matches!(&e.object, Object::Loop { device: d, .. } if d == device)).count()
    };
    let by_path: BTreeMap<String, FileId> =
        loop_backing.into_iter().filter(|(device, _)| named(device) == 1).collect();
    entries.retain_mut(|e| {
        let Object::Loop { role, device, backing, .. } = &mut e.object else { return true };
        let found = loop_backings
            .iter()
            .find(|b| (b.uid, &b.install, &b.vm, b.role, &b.device) == (e.uid, &e.install, &e.vm, *role, &*device))
            .map(|b| b.backing)
            .or_else(|| by_path.get(device.as_str()).copied());
        match found {
            Some(id) => {
                *backing = id;
                true
            }
            None => {
                tracing::warn!(
                    "ledger of format {format}: {device} of uid {} has no backing identity; left out of the ledger",
                    e.uid
                );
                false
            }
        }
    });
    entries
}

/// The ledger files of one state directory, held exclusively while the helper runs.
#[derive(Debug)]
pub struct LedgerStore {
    dir: PathBuf,
    /// The leases as last synced to disk, to know when `leases.json` must be written again.
    synced_leases: BTreeMap<u32, u32>,
    /// Held for the helper's lifetime; keeps other helpers off this directory.
    _lock: Flock<File>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt { path: path.to_owned(), source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io { action: "read", path: path.to_owned(), source }),
    }
}

impl LedgerStore {
    /// Opens (creating, mode 0700) the state directory, locks it and loads the ledger (empty when
    /// there is none yet).
    pub fn open(dir: &Path) -> Result<(LedgerStore, Ledger), StoreError> {
        let dir_err = |source| StoreError::Dir { path: dir.to_owned(), source };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(dir_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join(LOCK))
            .map_err(dir_err)?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                StoreError::Locked(dir.to_owned())
            } else {
                dir_err(io::Error::from(errno))
            }
        })?;
        let leases: LeasesFile = read_json(&dir.join(LEASES))?.unwrap_or_default();
        let objects: ObjectsFile = match read_json(&dir.join(OBJECTS)) {
            Ok(o) => o.unwrap_or_default(),
            Err(e @ StoreError::Corrupt { .. }) => {
                tracing::error!(
                    "{e}; starting with no objects (after a power loss the kernel holds none either); \
                     banger-named objects still in the kernel are reported by the reconcile"
                );
                ObjectsFile::default()
            }
            Err(e) => return Err(e),
        };
        let ledger = Ledger { leases: leases.leases.clone(), entries: migrate(objects), ..Ledger::default() };
        Ok((LedgerStore { dir: dir.to_owned(), synced_leases: leases.leases, _lock: lock }, ledger))
    }

    /// Writes `value` to `name` as pretty JSON with a trailing newline, atomically (temporary
    /// file, rename), fsyncing file and directory when `durable`.
    fn write_json<T: Serialize>(&self, name: &str, value: &T, durable: bool) -> Result<(), StoreError> {
        let path = self.dir.join(name);
        let temp = self.dir.join(format!("{name}.tmp"));
        let io_err = |source| StoreError::Io { action: "write", path: path.clone(), source };
        let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| io_err(io::Error::other(e)))?;
        bytes.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&temp)
            .map_err(io_err)?;
        f.write_all(&bytes).map_err(io_err)?;
        if durable {
            f.sync_all().map_err(io_err)?;
        }
        drop(f);
        fs::rename(&temp, &path).map_err(io_err)?;
        if durable {
            self.sync_dir(&path)?;
        }
        Ok(())
    }

    /// Fsyncs the state directory after `path` in it was replaced or removed.
    fn sync_dir(&self, path: &Path) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io { action: "write", path: path.to_owned(), source };
        let d = File::open(&self.dir).map_err(io_err)?;
        nix::unistd::fsync(d.as_fd()).map_err(|e| io_err(io::Error::from(e)))
    }

    /// The value `ip_forward` had before this helper turned it on, if it did so in this boot
    /// (`boot`, from [`boot_epoch`]); a record of another boot is removed.
    pub fn load_forwarding(&self, boot: i64) -> Result<Option<String>, StoreError> {
        let path = self.dir.join(FORWARDING);
        let Some(record) = read_json::<ForwardingFile>(&path)? else { return Ok(None) };
        if (record.boot - boot).abs() <= SAME_BOOT_SECS {
            return Ok(Some(record.earlier));
        }
        tracing::info!(
            "{} is from an earlier boot: net.ipv4.ip_forward has the value the system gave it since; dropped",
            path.display()
        );
        self.save_forwarding(None, boot)?;
        Ok(None)
    }

    /// Records durably that the helper turned `ip_forward` on, and the value it had before
    /// (`Some`), or that it holds it no longer (`None`: the record is removed).
    pub fn save_forwarding(&self, earlier: Option<&str>, boot: i64) -> Result<(), StoreError> {
        match earlier {
            Some(earlier) => {
                self.write_json(FORWARDING, &ForwardingFile { earlier: earlier.to_owned(), boot }, true)
            }
            None => {
                let path = self.dir.join(FORWARDING);
                match fs::remove_file(&path) {
                    Ok(()) => self.sync_dir(&path),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(source) => Err(StoreError::Io { action: "write", path, source }),
                }
            }
        }
    }

    /// Saves `ledger`: the leases durably when they changed, the objects always.
    pub fn save(&mut self, ledger: &Ledger) -> Result<(), StoreError> {
        if ledger.leases != self.synced_leases {
            let file = LeasesFile { format: FORMAT, leases: ledger.leases.clone() };
            self.write_json(LEASES, &file, true)?;
            self.synced_leases = file.leases;
        }
        let objects =
            ObjectsFile { format: FORMAT, entries: ledger.entries.clone(), ..ObjectsFile::default() };
        self.write_json(OBJECTS, &objects, false)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use banger_policy::{EntryState, ObjectKind};
    use banger_protocol::LoopRole;

    use super::*;

    fn entry(uid: u32, vm: &str, object: Object) -> LedgerEntry {
        LedgerEntry::new(uid, InstallId::new("home").unwrap(), VmId::new(vm).unwrap(), object)
    }

    fn tap(slot: u32) -> Object {
        Object::Tap {
            name: format!("bg{slot:013}"),
            slot,
            host_ip: Ipv4Addr::new(172, 30, 0, 1),
            guest_ip: Ipv4Addr::new(172, 30, 0, 2),
        }
    }

    fn lp(role: LoopRole, device: &str, backing: FileId) -> Object {
        Object::Loop { role, device: device.into(), read_only: true, backing, size: 1 << 20 }
    }

    #[test]
    fn saves_and_loads_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (mut store, mut ledger) = LedgerStore::open(&state).unwrap();
        ledger.leases.insert(1000, 3);
        ledger.insert(entry(1000, "a", tap(0)));
        let mut intent = entry(1000, "a", lp(LoopRole::Base, "/dev/loop3", FileId { dev: 1, ino: 2 }));
        intent.state = EntryState::Intent;
        ledger.insert(intent);
        store.save(&ledger).unwrap();
        assert!(!state.join("objects.json.tmp").exists() && !state.join("leases.json.tmp").exists());
        drop(store);
        let (_store, again) = LedgerStore::open(&state).unwrap();
        assert_eq!(again, ledger);
        let text = fs::read_to_string(state.join(OBJECTS)).unwrap();
        assert!(text.contains("\"format\": 2") && !text.contains("loop_backings"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        for f in [LEASES, OBJECTS] {
            assert_eq!(fs::metadata(state.join(f)).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn a_second_store_on_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_a, _) = LedgerStore::open(dir.path()).unwrap();
        let err = LedgerStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked(_)), "{err}");
        assert!(err.to_string().contains("--state-dir"));
    }

    #[test]
    fn a_corrupt_lease_file_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LEASES), b"{not json").unwrap();
        let err = LedgerStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("move it aside"), "{err}");
    }

    #[test]
    fn an_unreadable_objects_file_reads_as_empty_and_leases_stay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, mut ledger) = LedgerStore::open(dir.path()).unwrap();
            ledger.leases.insert(7, 1);
            ledger.insert(entry(7, "a", tap(0)));
            store.save(&ledger).unwrap();
        }
        fs::write(dir.path().join(OBJECTS), b"").unwrap();
        let (_store, ledger) = LedgerStore::open(dir.path()).unwrap();
        assert!(ledger.entries.is_empty());
        assert_eq!(ledger.leases.get(&7), Some(&1));
    }

    #[test]
    fn leases_are_rewritten_only_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut ledger) = LedgerStore::open(dir.path()).unwrap();
        ledger.leases.insert(7, 1);
        store.save(&ledger).unwrap();
        let first = fs::metadata(dir.path().join(LEASES)).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        ledger.insert(entry(7, "a", tap(0)));
        store.save(&ledger).unwrap();
        assert_eq!(fs::metadata(dir.path().join(LEASES)).unwrap().modified().unwrap(), first);
        let text = fs::read_to_string(dir.path().join(OBJECTS)).unwrap();
        assert!(text.contains("\"entries\""), "{text}");
    }

    /// A file of format 1, with identities in a list beside the entries and, older still, by
    /// device path: each lands in its entry; an entry with none is left out.
    #[test]
    fn format_1_files_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let old = |vm: &str, role: &str, device: &str| {
            serde_json::json!({ "uid": 1, "install": "home", "vm": vm,
                "object": { "Loop": { "role": role, "device": device, "read_only": true } } })
        };
        let legacy = serde_json::json!({
            "format": 1,
            "entries": [
                old("a", "Base", "/dev/loop1"),
                old("b", "Cow", "/dev/loop2"),
                old("c", "Base", "/dev/loop3"),
                old("d", "Cow", "/dev/loop3"),
                { "uid": 1, "install": "home", "vm": "t", "object": { "Tap": {
                    "name": "bg0000000000000", "slot": 0, "host_ip": "172.30.0.1", "guest_ip": "172.30.0.2" } } },
            ],
            "loop_backings": [{ "uid": 1, "install": "home", "vm": "a", "role": "Base",
                "device": "/dev/loop1", "backing": { "dev": 1, "ino": 1 } }],
            "loop_backing": { "/dev/loop2": { "dev": 2, "ino": 2 }, "/dev/loop3": { "dev": 3, "ino": 3 } },
        });
        fs::write(dir.path().join(OBJECTS), serde_json::to_vec(&legacy).unwrap()).unwrap();
        let (mut store, ledger) = LedgerStore::open(dir.path()).unwrap();
        let home = InstallId::new("home").unwrap();
        let backing = |vm: &str, role| match &ledger
            .find(1, &home, &VmId::new(vm).unwrap(), ObjectKind::Loop(role))?
            .object
        {
            Object::Loop { backing, .. } => Some(*backing),
            _ => None,
        };
        assert_eq!(backing("a", LoopRole::Base), Some(FileId { dev: 1, ino: 1 }));
        assert_eq!(backing("b", LoopRole::Cow), Some(FileId { dev: 2, ino: 2 }));
        assert_eq!((backing("c", LoopRole::Base), backing("d", LoopRole::Cow)), (None, None), "ambiguous");
        assert_eq!(ledger.entries.len(), 3);
        assert!(ledger.entries.iter().all(|e| e.state == EntryState::Settled));
        store.save(&ledger).unwrap();
        let (_, again) = {
            drop(store);
            LedgerStore::open(dir.path()).unwrap()
        };
        assert_eq!(again, ledger);
    }

    #[test]
    fn the_forwarding_record_lasts_for_its_boot_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LedgerStore::open(dir.path()).unwrap();
        let boot = boot_epoch();
        assert!(
            boot > 0
                && boot
                    <= std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
                        as i64
        );
        assert_eq!(store.load_forwarding(boot).unwrap(), None);
        store.save_forwarding(Some("0"), boot).unwrap();
        assert_eq!(
            store.load_forwarding(boot + 5).unwrap().as_deref(),
            Some("0"),
            "a clock adjusted a little"
        );
        drop(store);
        let (store, _) = LedgerStore::open(dir.path()).unwrap();
        assert_eq!(store.load_forwarding(boot).unwrap().as_deref(), Some("0"), "kept across restarts");
        assert_eq!(store.load_forwarding(boot + 3600).unwrap(), None, "another boot");
        assert!(!dir.path().join(FORWARDING).exists(), "a record of another boot is removed");
        store.save_forwarding(Some("0"), boot).unwrap();
        store.save_forwarding(None, boot).unwrap();
        store.save_forwarding(None, boot).unwrap();
        assert_eq!(store.load_forwarding(boot).unwrap(), None);
    }
}
