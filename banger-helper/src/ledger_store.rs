//! The ownership ledger on disk and in memory.
//!
//! The ledger (the policy crate's [`Ledger`]) says which uid, install and VM every helper-made
//! object belongs to, and which lease each uid holds. It lives in `<state-dir>/ledger.json` and is
//! replaced atomically on every change: written to a temporary file, fsynced, renamed over the
//! old one, and the directory fsynced. A lock file keeps a second helper off the same state dir.
//!
//! Beside the ledger the helper keeps the identity (device, inode) of each loop device's backing
//! file, per ledger entry (owner, install, VM, role and device), so a loop number that was
//! released and reused is never taken for the caller's, and one owner's record never vouches for
//! another's device.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use banger_policy::{Ledger, LedgerEntry, Object, ObjectKind};
use banger_protocol::{InstallId, LoopRole, VmId};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

const LEASES: &str = "leases.json";
const OBJECTS: &str = "objects.json";
const LOCK: &str = "lock";
const FORMAT: u32 = 1;

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

/// The identity of a loop device's backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backing {
    /// Device of the file.
    pub dev: u64,
    /// Inode of the file.
    pub ino: u64,
}

/// The backing file identity of one loop entry of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopBacking {
    /// The entry's owner.
    pub uid: u32,
    /// The entry's install.
    pub install: InstallId,
    /// The entry's VM.
    pub vm: VmId,
    /// The entry's role.
    pub role: LoopRole,
    /// The entry's device.
    pub device: String,
    /// The file it was attached to.
    pub backing: Backing,
}

impl LoopBacking {
    fn is_for(&self, e: &LedgerEntry) -> bool {
        matches!(&e.object, Object::Loop { role, device, .. }
            if (self.uid, &self.install, &self.vm, self.role, &self.device) == (e.uid, &e.install, &e.vm, *role, device))
    }
}

/// What the state file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Format version of this file.
    pub format: u32,
    /// The ownership ledger.
    pub ledger: Ledger,
    /// Backing file identity of every loop entry in the ledger.
    #[serde(default)]
    pub loop_backings: Vec<LoopBacking>,
}

impl Stored {
    /// The entry of this kind for this VM.
    pub fn find(&self, uid: u32, install: &InstallId, vm: &VmId, kind: ObjectKind) -> Option<&LedgerEntry> {
        self.ledger.find(uid, install, vm, kind)
    }

    /// Removes the entry of this kind for this VM (and a loop device's backing identity),
    /// returning it.
    pub fn remove(
        &mut self,
        uid: u32,
        install: &InstallId,
        vm: &VmId,
        kind: ObjectKind,
    ) -> Option<LedgerEntry> {
        let e = self.ledger.remove(uid, install, vm, kind)?;
        self.loop_backings.retain(|b| !b.is_for(&e));
        Some(e)
    }

    /// Removes `entry` exactly (and its backing identity), if the ledger has it.
    pub fn remove_entry(&mut self, entry: &LedgerEntry) {
        self.ledger.entries.retain(|e| e != entry);
        self.loop_backings.retain(|b| !b.is_for(entry));
    }

    /// The backing file identity recorded for this loop entry.
    pub fn backing_of(&self, entry: &LedgerEntry) -> Option<Backing> {
        self.loop_backings.iter().find(|b| b.is_for(entry)).map(|b| b.backing)
    }

    /// Records a loop entry with its backing identity. Every other entry naming the same device,
    /// of any owner, is stale (the device was free to attach) and is removed; they are returned.
    pub fn insert_loop(&mut self, entry: LedgerEntry, backing: Backing) -> Vec<LedgerEntry> {
        let Object::Loop { role, device, .. } = &entry.object else {
            self.insert(entry);
            return Vec::new();
        };
        let (role, device) = (*role, device.clone());
        let stale: Vec<LedgerEntry> = self
            .ledger
            .entries
            .iter()
            .filter(|e| matches!(&e.object, Object::Loop { device: d, .. } if *d == device))
            .cloned()
            .collect();
        for e in &stale {
            self.remove_entry(e);
        }
        self.loop_backings.push(LoopBacking {
            uid: entry.uid,
            install: entry.install.clone(),
            vm: entry.vm.clone(),
            role,
            device,
            backing,
        });
        self.insert(entry);
        stale
    }

    /// Whether any entry, of any owner, holds the TAP `name`.
    pub fn ledger_names_tap(&self, name: &str) -> bool {
        self.ledger.entries.iter().any(|e| matches!(&e.object, Object::Tap { name: n, .. } if n == name))
    }

    /// Adds an entry (replacing one of the same VM and kind).
    pub fn insert(&mut self, entry: LedgerEntry) {
        self.ledger.insert(entry);
    }
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
    /// Backing identities by device path, as earlier versions wrote them: read, never written.
    #[serde(default, skip_serializing)]
    loop_backing: BTreeMap<String, Backing>,
    #[serde(default)]
    loop_backings: Vec<LoopBacking>,
}

/// Backing identities by device path (earlier versions) as per-entry ones: kept only where exactly
/// one entry names the device; an ambiguous one is dropped (the device then counts as not the
/// entry's unless its node still belongs to the entry's owner).
fn migrate_backings(entries: &[LedgerEntry], legacy: BTreeMap<String, Backing>) -> Vec<LoopBacking> {
    legacy
        .into_iter()
        .filter_map(|(path, backing)| {
            let mut naming = entries.iter().filter_map(|e| match &e.object {
                Object::Loop { role, device, .. } if *device == path => Some((e, *role)),
                _ => None,
            });
            let (e, role) = naming.next()?;
            if naming.next().is_some() {
                tracing::warn!("{path} is named by several ledger entries; its backing identity is dropped");
                return None;
            }
            Some(LoopBacking {
                uid: e.uid,
                install: e.install.clone(),
                vm: e.vm.clone(),
                role,
                device: path,
                backing,
            })
        })
        .collect()
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
    pub fn open(dir: &Path) -> Result<(LedgerStore, Stored), StoreError> {
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
        let mut loop_backings = objects.loop_backings;
        loop_backings.extend(migrate_backings(&objects.entries, objects.loop_backing));
        let stored = Stored {
            format: FORMAT,
            ledger: Ledger { leases: leases.leases.clone(), entries: objects.entries },
            loop_backings,
        };
        Ok((LedgerStore { dir: dir.to_owned(), synced_leases: leases.leases, _lock: lock }, stored))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `bytes` to `name` atomically (temporary file, rename), fsyncing file and directory
    /// when `durable`.
    fn replace(&self, name: &str, bytes: &[u8], durable: bool) -> Result<(), StoreError> {
        let path = self.dir.join(name);
        let temp = self.dir.join(format!("{name}.tmp"));
        let io_err = |source| StoreError::Io { action: "write", path: path.clone(), source };
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&temp)
            .map_err(io_err)?;
        f.write_all(bytes).map_err(io_err)?;
        if durable {
            f.sync_all().map_err(io_err)?;
        }
        drop(f);
        fs::rename(&temp, &path).map_err(io_err)?;
        if durable {
            let d = File::open(&self.dir).map_err(io_err)?;
            nix::unistd::fsync(d.as_fd()).map_err(|e| io_err(io::Error::from(e)))?;
        }
        Ok(())
    }

    /// Saves `stored`: the leases durably when they changed, the objects always.
    pub fn save(&mut self, stored: &Stored) -> Result<(), StoreError> {
        let encode_err = |path: &str, e: serde_json::Error| StoreError::Io {
            action: "write",
            path: self.dir.join(path),
            source: io::Error::other(e),
        };
        if stored.ledger.leases != self.synced_leases {
            let file = LeasesFile { format: FORMAT, leases: stored.ledger.leases.clone() };
            let bytes = to_json(&file).map_err(|e| encode_err(LEASES, e))?;
            self.replace(LEASES, &bytes, true)?;
            self.synced_leases = file.leases;
        }
        let objects = ObjectsFile {
            format: FORMAT,
            entries: stored.ledger.entries.clone(),
            loop_backing: BTreeMap::new(),
            loop_backings: stored.loop_backings.clone(),
        };
        let bytes = to_json(&objects).map_err(|e| encode_err(OBJECTS, e))?;
        self.replace(OBJECTS, &bytes, false)
    }
}

/// Pretty JSON with a trailing newline.
fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut bytes = serde_json::to_vec_pretty(v)?;
    bytes.push(b'\n');
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use banger_protocol::LoopRole;

    use super::*;

    fn entry(uid: u32, vm: &str, object: Object) -> LedgerEntry {
        LedgerEntry { uid, install: InstallId::new("home").unwrap(), vm: VmId::new(vm).unwrap(), object }
    }

    fn tap(slot: u32) -> Object {
        Object::Tap {
            name: format!("bg{slot:013}"),
            slot,
            host_ip: Ipv4Addr::new(172, 30, 0, 1),
            guest_ip: Ipv4Addr::new(172, 30, 0, 2),
        }
    }

    #[test]
    fn saves_and_loads_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (mut store, mut stored) = LedgerStore::open(&state).unwrap();
        assert_eq!(stored.format, FORMAT);
        stored.ledger.leases.insert(1000, 3);
        stored.insert(entry(1000, "a", tap(0)));
        stored.insert_loop(
            entry(
                1000,
                "a",
                Object::Loop { role: LoopRole::Base, device: "/dev/loop3".into(), read_only: true },
            ),
            Backing { dev: 1, ino: 2 },
        );
        store.save(&stored).unwrap();
        assert!(!state.join("objects.json.tmp").exists() && !state.join("leases.json.tmp").exists());
        drop(store);
        let (_store, again) = LedgerStore::open(&state).unwrap();
        assert_eq!(again, stored);
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
            let (mut store, mut stored) = LedgerStore::open(dir.path()).unwrap();
            stored.ledger.leases.insert(7, 1);
            stored.insert(entry(7, "a", tap(0)));
            store.save(&stored).unwrap();
        }
        fs::write(dir.path().join(OBJECTS), b"").unwrap();
        let (_store, stored) = LedgerStore::open(dir.path()).unwrap();
        assert!(stored.ledger.entries.is_empty());
        assert_eq!(stored.ledger.leases.get(&7), Some(&1));
    }

    #[test]
    fn leases_are_rewritten_only_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut stored) = LedgerStore::open(dir.path()).unwrap();
        stored.ledger.leases.insert(7, 1);
        store.save(&stored).unwrap();
        let first = fs::metadata(dir.path().join(LEASES)).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        stored.insert(entry(7, "a", tap(0)));
        store.save(&stored).unwrap();
        assert_eq!(fs::metadata(dir.path().join(LEASES)).unwrap().modified().unwrap(), first);
        let text = fs::read_to_string(dir.path().join(OBJECTS)).unwrap();
        assert!(text.contains("\"entries\""), "{text}");
    }

    #[test]
    fn remove_forgets_a_loop_devices_backing() {
        let mut s = Stored::default();
        s.insert_loop(
            entry(
                1,
                "a",
                Object::Loop { role: LoopRole::Cow, device: "/dev/loop1".into(), read_only: false },
            ),
            Backing { dev: 1, ino: 1 },
        );
        let home = InstallId::new("home").unwrap();
        let a = VmId::new("a").unwrap();
        assert!(s.find(1, &home, &a, ObjectKind::Loop(LoopRole::Cow)).is_some());
        assert!(s.find(1, &home, &a, ObjectKind::Loop(LoopRole::Base)).is_none());
        assert!(s.remove(1, &home, &a, ObjectKind::Loop(LoopRole::Cow)).is_some());
        assert!(s.loop_backings.is_empty());
        assert!(s.remove(1, &home, &a, ObjectKind::Loop(LoopRole::Cow)).is_none());
    }

    fn lp(role: LoopRole, device: &str) -> Object {
        Object::Loop { role, device: device.into(), read_only: true }
    }

    #[test]
    fn a_new_loop_entry_replaces_every_stale_one_naming_its_device_and_keeps_its_own_backing() {
        let mut s = Stored::default();
        let a = entry(1, "a", lp(LoopRole::Base, "/dev/loop1"));
        let a_other = entry(1, "a", lp(LoopRole::Cow, "/dev/loop2"));
        assert!(s.insert_loop(a.clone(), Backing { dev: 1, ino: 1 }).is_empty());
        s.insert_loop(a_other.clone(), Backing { dev: 1, ino: 2 });
        let b = entry(2, "b", lp(LoopRole::Base, "/dev/loop1"));
        let stale = s.insert_loop(b.clone(), Backing { dev: 9, ino: 9 });
        assert_eq!(stale, vec![a.clone()]);
        assert_eq!(s.backing_of(&a), None, "a's identity must not vouch for b's device");
        assert_eq!(s.backing_of(&b), Some(Backing { dev: 9, ino: 9 }));
        assert_eq!(s.backing_of(&a_other), Some(Backing { dev: 1, ino: 2 }));
        assert_eq!(s.ledger.entries.len(), 2);
        // Removing b's entry leaves a's other device alone.
        s.remove(
            2,
            &InstallId::new("home").unwrap(),
            &VmId::new("b").unwrap(),
            ObjectKind::Loop(LoopRole::Base),
        );
        assert_eq!(s.loop_backings.len(), 1);
    }

    #[test]
    fn backings_by_device_from_earlier_versions_are_migrated_when_unambiguous() {
        let dir = tempfile::tempdir().unwrap();
        let one = entry(1, "a", lp(LoopRole::Base, "/dev/loop1"));
        let two =
            [entry(1, "b", lp(LoopRole::Base, "/dev/loop2")), entry(2, "c", lp(LoopRole::Cow, "/dev/loop2"))];
        let legacy = serde_json::json!({
            "format": 1,
            "entries": [one, two[0], two[1]],
            "loop_backing": { "/dev/loop1": { "dev": 1, "ino": 1 }, "/dev/loop2": { "dev": 2, "ino": 2 } },
        });
        fs::write(dir.path().join(OBJECTS), serde_json::to_vec(&legacy).unwrap()).unwrap();
        let (mut store, stored) = LedgerStore::open(dir.path()).unwrap();
        assert_eq!(stored.backing_of(&one), Some(Backing { dev: 1, ino: 1 }));
        assert_eq!(stored.backing_of(&two[0]), None);
        assert_eq!(stored.backing_of(&two[1]), None);
        store.save(&stored).unwrap();
        let text = fs::read_to_string(dir.path().join(OBJECTS)).unwrap();
        assert!(!text.contains("\"loop_backing\""), "{text}");
    }
}
