//! The ownership ledger as data: which uid, install and VM each helper-made object belongs to.
//!
//! The helper persists it (atomically, as JSON) and reconciles it with the kernel; here it is plain
//! data that [`authorize`](fn@crate::authorize) reads for quotas and ownership checks, with the pure queries
//! and updates the helper needs.
//!
//! An object is keyed by `(uid, install, vm, kind)` ([`ObjectKind`]): one TAP, one NAT rule set
//! and one dm-snapshot target per VM, one loop device per VM and [`LoopRole`]. Every query takes the caller's uid and only
//! ever looks at that uid's entries, so one user's objects can never stand in for another's.
//! Leases are per uid (not per install): all installs of one user share one slice of the pool.
//!
//! An entry is counted from before the kernel call that makes its object ([`EntryState::Intent`],
//! written ahead) until the kernel has really let the object go ([`EntryState::Released`] while
//! it has not), so a crash or a slow release never lets a user hold more than the quotas say.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use banger_protocol::{
    DmInfo, InstallId, JailInfo, LeaseInfo, LoopInfo, LoopRole, NatInfo, OwnedObjects, TapInfo, VmId,
    VmShape, jail_paths,
};
use serde::{Deserialize, Serialize};

use crate::Network;
use crate::addr::guest_mac;

/// Every object the helper made and still answers for, and every uid's lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// uid → index of its lease within the pool (stable for the uid).
    pub leases: std::collections::BTreeMap<u32, u32>,
    /// The objects.
    pub entries: Vec<LedgerEntry>,
    /// The uids of live jails that no entry holds (the start-up reconcile found them under the
    /// chroot base and left them alone): never handed out while the helper runs. Not saved: each
    /// start's reconcile finds them again.
    #[serde(skip)]
    pub unheld_jail_uids: BTreeSet<u32>,
}

/// One object with its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The owner.
    pub uid: u32,
    /// The owner's install.
    pub install: InstallId,
    /// The VM.
    pub vm: VmId,
    /// The object.
    pub object: Object,
    /// Where the object stands with the kernel.
    #[serde(default)]
    pub state: EntryState,
}

/// Where an entry's object stands with the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryState {
    /// Recorded (and saved) before the kernel call that makes the object; a helper that stopped
    /// before settling it left an object that may or may not exist, which is removed.
    Intent,
    /// Made and in use.
    #[default]
    Settled,
    /// Given up by its owner, but the kernel has not let it go yet (a loop device or dm target
    /// not yet removed): still counted.
    Released,
}

/// The identity of a file: the device it is on and its inode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// The filesystem's device.
    pub dev: u64,
    /// The inode.
    pub ino: u64,
}

/// A device number, as `major:minor`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevNum {
    /// The major number.
    pub major: u32,
    /// The minor number.
    pub minor: u32,
}

impl std::fmt::Display for DevNum {
    /// `major:minor`, as device-mapper tables name devices.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// A kernel object the helper made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Object {
    /// A TAP and the VM slot (subnet index within the owner's lease) it uses.
    Tap {
        /// Interface name.
        name: String,
        /// Subnet index within the lease.
        slot: u32,
        /// Host-side address.
        host_ip: Ipv4Addr,
        /// Guest address.
        guest_ip: Ipv4Addr,
    },
    /// The VM's NAT rule set.
    Nat {
        /// Guest address masqueraded.
        guest_ip: Ipv4Addr,
        /// Uplink used.
        uplink: String,
    },
    /// A loop device.
    Loop {
        /// Its role.
        role: LoopRole,
        /// `/dev/loopN`.
        device: String,
        /// Read-only or not.
        read_only: bool,
        /// The file it was attached to, to recognise it later (a device number is reused once
        /// the device is gone).
        #[serde(default)]
        backing: FileId,
        /// The file's size in bytes when it was attached (0 in ledgers of earlier releases).
        #[serde(default)]
        size: u64,
    },
    /// The VM's dm-snapshot target over its base and copy-on-write loop devices, and the device
    /// node handed to the owner.
    Dm {
        /// The device-mapper name.
        name: String,
        /// The device-mapper uuid, to recognise the target as this entry's.
        uuid: String,
        /// The path of the node the owner opens.
        node: String,
        /// The target's device number (`0:0` until it is made).
        #[serde(default)]
        dev: DevNum,
        /// Its size in 512-byte sectors.
        sectors: u64,
    },
    /// The VM's jailed VMM: its jail (chroot directory and cgroups) and the process the jailer
    /// started in it.
    Jail {
        /// The jailer's `--id`, derived from `(uid, install, vm)`.
        id: String,
        /// The uid and gid the VMM runs as, from the policy's range: this jail's alone.
        jail_uid: u32,
        /// The VM's shape, counted against the owner's `max_vcpus` and `max_memory_mib`.
        shape: VmShape,
        /// The VMM's host PID once the jailer reported it.
        #[serde(default)]
        pid: Option<i32>,
    },
}

/// What kind of object an entry is: with the uid, install and VM it names one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ObjectKind {
    /// The VM's TAP.
    Tap,
    /// The VM's NAT rule set.
    Nat,
    /// The VM's loop device of this role.
    Loop(LoopRole),
    /// The VM's dm-snapshot target.
    Dm,
    /// The VM's jailed VMM.
    Jail,
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> ObjectKind {
        match self {
            Object::Tap { .. } => ObjectKind::Tap,
            Object::Nat { .. } => ObjectKind::Nat,
            Object::Loop { role, .. } => ObjectKind::Loop(*role),
            Object::Dm { .. } => ObjectKind::Dm,
            Object::Jail { .. } => ObjectKind::Jail,
        }
    }
}

impl std::fmt::Display for ObjectKind {
    /// `tap`, `nat`, `loop base` / `loop cow`, or `dm`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectKind::Tap => f.write_str("tap"),
            ObjectKind::Nat => f.write_str("nat"),
            ObjectKind::Loop(role) => write!(f, "loop {}", role.as_str()),
            ObjectKind::Dm => f.write_str("dm"),
            ObjectKind::Jail => f.write_str("jail"),
        }
    }
}

impl LedgerEntry {
    /// The entry's kind.
    pub fn kind(&self) -> ObjectKind {
        self.object.kind()
    }

    /// A settled entry.
    pub fn new(uid: u32, install: InstallId, vm: VmId, object: Object) -> Self {
        LedgerEntry { uid, install, vm, object, state: EntryState::Settled }
    }

    /// Whether this entry is the object `(uid, install, vm, kind)`.
    pub fn is(&self, uid: u32, install: &InstallId, vm: &VmId, kind: ObjectKind) -> bool {
        self.uid == uid && &self.install == install && &self.vm == vm && self.kind() == kind
    }
}

impl Ledger {
    /// The lease index of `uid`, if it has one.
    pub fn lease_of(&self, uid: u32) -> Option<u32> {
        self.leases.get(&uid).copied()
    }

    /// The lowest lease index below `total` that no uid holds.
    pub fn next_free_lease(&self, total: u32) -> Option<u32> {
        let taken: BTreeSet<u32> = self.leases.values().copied().collect();
        (0..total).find(|index| !taken.contains(index))
    }

    /// The lease of `uid`, assigning it the lowest free index below `total` if it has none.
    /// `None` when the uid has no lease and the pool is exhausted.
    pub fn lease_or_assign(&mut self, uid: u32, total: u32) -> Option<u32> {
        if let Some(index) = self.lease_of(uid) {
            return Some(index);
        }
        let index = self.next_free_lease(total)?;
        self.leases.insert(uid, index);
        Some(index)
    }

    /// The object `(uid, install, vm, kind)`, if the ledger has it.
    pub fn find(&self, uid: u32, install: &InstallId, vm: &VmId, kind: ObjectKind) -> Option<&LedgerEntry> {
        self.entries.iter().find(|e| e.is(uid, install, vm, kind))
    }

    /// The name of the TAP the ledger holds for `(uid, install, vm)`, if any.
    pub fn tap_name(&self, uid: u32, install: &InstallId, vm: &VmId) -> Option<&str> {
        match self.find(uid, install, vm, ObjectKind::Tap) {
            Some(LedgerEntry { object: Object::Tap { name, .. }, .. }) => Some(name),
            _ => None,
        }
    }

    /// Every object of `uid`, across its installs, in ledger order.
    pub fn entries_of(&self, uid: u32) -> impl Iterator<Item = &LedgerEntry> {
        self.entries.iter().filter(move |e| e.uid == uid)
    }

    /// Every object of one VM of one install of `uid`, in ledger order.
    pub fn entries_of_vm<'a>(
        &'a self,
        uid: u32,
        install: &'a InstallId,
        vm: &'a VmId,
    ) -> impl Iterator<Item = &'a LedgerEntry> {
        self.entries.iter().filter(move |e| e.uid == uid && &e.install == install && &e.vm == vm)
    }

    /// How many TAPs `uid` owns, across its installs.
    pub fn count_taps(&self, uid: u32) -> u32 {
        count(self.entries_of(uid).filter(|e| e.kind() == ObjectKind::Tap))
    }

    /// How many loop devices `uid` owns, across its installs.
    pub fn count_loops(&self, uid: u32) -> u32 {
        count(self.entries_of(uid).filter(|e| matches!(e.kind(), ObjectKind::Loop(_))))
    }

    /// How many VMs `uid` has: distinct `(install, vm)` pairs with at least one object.
    pub fn count_vms(&self, uid: u32) -> u32 {
        let vms: BTreeSet<(&InstallId, &VmId)> = self.entries_of(uid).map(|e| (&e.install, &e.vm)).collect();
        u32::try_from(vms.len()).unwrap_or(u32::MAX)
    }

    /// Whether `uid` has any object for this VM of this install.
    pub fn has_vm(&self, uid: u32, install: &InstallId, vm: &VmId) -> bool {
        self.entries_of_vm(uid, install, vm).next().is_some()
    }

    /// The lowest VM slot below `slots_per_lease` that no TAP of `uid` uses, across its installs
    /// (they share the uid's lease).
    pub fn free_slot(&self, uid: u32, slots_per_lease: u32) -> Option<u32> {
        let used: BTreeSet<u32> = self
            .entries_of(uid)
            .filter_map(|e| match e.object {
                Object::Tap { slot, .. } => Some(slot),
                _ => None,
            })
            .collect();
        (0..slots_per_lease).find(|slot| !used.contains(slot))
    }

    /// Records `entry`, replacing (and returning) the entry with the same
    /// `(uid, install, vm, kind)` if there was one.
    pub fn insert(&mut self, entry: LedgerEntry) -> Option<LedgerEntry> {
        match self.entries.iter_mut().find(|e| e.is(entry.uid, &entry.install, &entry.vm, entry.kind())) {
            Some(old) => Some(std::mem::replace(old, entry)),
            None => {
                self.entries.push(entry);
                None
            }
        }
    }

    /// Forgets the object `(uid, install, vm, kind)` and returns it; `None` if it was not there.
    pub fn remove(
        &mut self,
        uid: u32,
        install: &InstallId,
        vm: &VmId,
        kind: ObjectKind,
    ) -> Option<LedgerEntry> {
        let at = self.entries.iter().position(|e| e.is(uid, install, vm, kind))?;
        Some(self.entries.remove(at))
    }

    /// Whether any entry, of any owner, holds the TAP `name`.
    pub fn holds_tap(&self, name: &str) -> bool {
        self.entries.iter().any(|e| matches!(&e.object, Object::Tap { name: n, .. } if n == name))
    }

    /// The vCPUs and MiB of memory of every jail of `uid`, across its installs.
    pub fn jail_totals(&self, uid: u32) -> (u32, u64) {
        self.entries_of(uid).fold((0, 0), |(vcpus, mem), e| match &e.object {
            Object::Jail { shape, .. } => (vcpus + u32::from(shape.vcpus), mem + u64::from(shape.mem_mib)),
            _ => (vcpus, mem),
        })
    }

    /// The jail uids held by any entry, of any owner.
    pub fn jail_uids(&self) -> BTreeSet<u32> {
        self.entries
            .iter()
            .filter_map(|e| match e.object {
                Object::Jail { jail_uid, .. } => Some(jail_uid),
                _ => None,
            })
            .collect()
    }

    /// The lowest uid of `first..=last` that no jail of any owner holds, nor a live jail no
    /// entry holds ([`Ledger::unheld_jail_uids`]): jail uids are one pool for the whole host,
    /// since a uid is what keeps one VMM from another's files.
    pub fn free_jail_uid(&self, (first, last): (u32, u32)) -> Option<u32> {
        let taken = self.jail_uids();
        (first..=last).find(|uid| !taken.contains(uid) && !self.unheld_jail_uids.contains(uid))
    }

    /// Whether any entry, of any owner, holds the jail `id`.
    pub fn holds_jail(&self, id: &str) -> bool {
        self.entries.iter().any(|e| matches!(&e.object, Object::Jail { id: i, .. } if i == id))
    }

    /// Whether any entry, of any owner, holds the dm target `name`.
    pub fn holds_dm(&self, name: &str) -> bool {
        self.entries.iter().any(|e| matches!(&e.object, Object::Dm { name: n, .. } if n == name))
    }

    /// Everything `uid` owns, in the protocol's shape, for `ListOwned`. `network` turns the lease
    /// index into addresses and gives the VM prefix length; the guest MAC is
    /// [`guest_mac`] of the guest address.
    /// `jail_root` gives the host path of a jail's root directory from its id.
    pub fn owned_objects(
        &self,
        uid: u32,
        network: &Network,
        jail_root: &dyn Fn(&str) -> String,
    ) -> OwnedObjects {
        let lease = self
            .lease_of(uid)
            .and_then(|index| network.lease(index))
            .map(|net| LeaseInfo { network: net.network(), prefix_len: net.prefix_len() });
        let mut owned = OwnedObjects { lease, ..OwnedObjects::default() };
        for e in self.entries_of(uid) {
            let (install, vm) = (e.install.clone(), e.vm.clone());
            match &e.object {
                Object::Tap { name, host_ip, guest_ip, .. } => owned.taps.push(TapInfo {
                    install,
                    vm,
                    name: name.clone(),
                    host_ip: *host_ip,
                    guest_ip: *guest_ip,
                    prefix_len: network.vm_prefix,
                    guest_mac: guest_mac(*guest_ip),
                }),
                Object::Nat { guest_ip, uplink } => {
                    owned.nat.push(NatInfo { install, vm, guest_ip: *guest_ip, uplink: uplink.clone() })
                }
                Object::Loop { role, device, read_only, .. } => owned.loops.push(LoopInfo {
                    install,
                    vm,
                    role: *role,
                    device: device.clone(),
                    read_only: *read_only,
                }),
                Object::Dm { name, node, sectors, .. } => owned.dms.push(DmInfo {
                    install,
                    vm,
                    name: name.clone(),
                    device: node.clone(),
                    sectors: *sectors,
                }),
                Object::Jail { id, jail_uid, shape, pid } => {
                    owned.jails.push(jail_info(e, id, *jail_uid, *shape, *pid, &jail_root(id)))
                }
            }
        }
        owned
    }

    /// Every uid that has an object or a lease.
    pub fn uids(&self) -> BTreeSet<u32> {
        self.leases.keys().copied().chain(self.entries.iter().map(|e| e.uid)).collect()
    }
}

/// The wire form of a jail entry whose root directory is `root` on the host.
pub fn jail_info(
    e: &LedgerEntry,
    id: &str,
    jail_uid: u32,
    shape: VmShape,
    pid: Option<i32>,
    root: &str,
) -> JailInfo {
    JailInfo {
        install: e.install.clone(),
        vm: e.vm.clone(),
        id: id.to_owned(),
        uid: jail_uid,
        pid,
        root: root.to_owned(),
        api_socket: format!("{root}{}", jail_paths::API_SOCKET),
        shape,
    }
}

fn count<'a>(entries: impl Iterator<Item = &'a LedgerEntry>) -> u32 {
    u32::try_from(entries.count()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Policy;

    fn install(s: &str) -> InstallId {
        InstallId::new(s).unwrap()
    }

    fn vm(s: &str) -> VmId {
        VmId::new(s).unwrap()
    }

    fn tap(uid: u32, inst: &str, v: &str, slot: u32) -> LedgerEntry {
        LedgerEntry::new(
            uid,
            install(inst),
            vm(v),
            Object::Tap {
                name: format!("bg{uid}{v}"),
                slot,
                host_ip: Ipv4Addr::new(172, 30, 0, (slot * 4 + 1) as u8),
                guest_ip: Ipv4Addr::new(172, 30, 0, (slot * 4 + 2) as u8),
            },
        )
    }

    fn lp(uid: u32, inst: &str, v: &str, role: LoopRole) -> LedgerEntry {
        LedgerEntry::new(
            uid,
            install(inst),
            vm(v),
            Object::Loop {
                role,
                device: "/dev/loop3".into(),
                read_only: role == LoopRole::Base,
                backing: FileId { dev: 1, ino: 2 },
                size: 1 << 20,
            },
        )
    }

    fn dm(uid: u32, inst: &str, v: &str) -> LedgerEntry {
        LedgerEntry::new(
            uid,
            install(inst),
            vm(v),
            Object::Dm {
                name: format!("banger-{uid}{v}"),
                uuid: format!("BANGER-{uid}{v}"),
                node: format!("/dev/banger/banger-{uid}{v}"),
                dev: DevNum { major: 254, minor: 3 },
                sectors: 2048,
            },
        )
    }

    fn nat(uid: u32, inst: &str, v: &str) -> LedgerEntry {
        LedgerEntry::new(
            uid,
            install(inst),
            vm(v),
            Object::Nat { guest_ip: Ipv4Addr::new(172, 30, 0, 2), uplink: "eth0".into() },
        )
    }

    fn sample() -> Ledger {
        let mut l = Ledger::default();
        l.leases.insert(1000, 0);
        l.leases.insert(1001, 2);
        for e in [
            tap(1000, "a", "vm1", 0),
            nat(1000, "a", "vm1"),
            lp(1000, "a", "vm1", LoopRole::Base),
            lp(1000, "a", "vm1", LoopRole::Cow),
            dm(1000, "a", "vm1"),
            tap(1000, "b", "vm1", 2),
            lp(1000, "b", "vm2", LoopRole::Base),
            tap(1001, "a", "vm1", 1),
            lp(1001, "a", "vm9", LoopRole::Cow),
        ] {
            assert_eq!(l.insert(e), None);
        }
        l
    }

    #[test]
    fn counts_are_per_uid_across_installs() {
        let l = sample();
        assert_eq!((l.count_taps(1000), l.count_loops(1000), l.count_vms(1000)), (2, 3, 3));
        assert_eq!((l.count_taps(1001), l.count_loops(1001), l.count_vms(1001)), (1, 1, 2));
        assert_eq!((l.count_taps(7), l.count_loops(7), l.count_vms(7)), (0, 0, 0));
        assert_eq!(l.entries_of(1000).count(), 7);
        assert_eq!(l.entries_of_vm(1000, &install("a"), &vm("vm1")).count(), 5);
        assert!(l.has_vm(1000, &install("b"), &vm("vm2")));
        assert!(!l.has_vm(1001, &install("b"), &vm("vm2")));
        assert_eq!(l.uids(), BTreeSet::from([1000, 1001]));
    }

    #[test]
    fn find_matches_every_part_of_the_key() {
        let l = sample();
        let (a, v1) = (install("a"), vm("vm1"));
        assert!(l.find(1000, &a, &v1, ObjectKind::Tap).is_some());
        assert!(l.find(1000, &a, &v1, ObjectKind::Nat).is_some());
        assert!(l.find(1000, &a, &v1, ObjectKind::Loop(LoopRole::Cow)).is_some());
        assert!(l.find(1000, &a, &v1, ObjectKind::Dm).is_some());
        assert!(l.find(1000, &install("b"), &v1, ObjectKind::Loop(LoopRole::Cow)).is_none());
        assert!(l.find(1000, &a, &vm("vm2"), ObjectKind::Dm).is_none());
        assert!(l.find(1001, &a, &v1, ObjectKind::Nat).is_none(), "another uid's key");
        assert!(l.find(1000, &install("c"), &v1, ObjectKind::Tap).is_none(), "another install");
        assert!(l.find(1000, &a, &vm("vm2"), ObjectKind::Tap).is_none(), "another vm");
        // The TAP's name, only for a TAP of that very key.
        let name = |uid, i: &str, v: &str| l.tap_name(uid, &install(i), &vm(v)).map(str::to_owned);
        assert_eq!(name(1000, "a", "vm1").as_deref(), Some("bg1000vm1"));
        assert_eq!(name(1001, "a", "vm1").as_deref(), Some("bg1001vm1"));
        assert_eq!(name(1000, "b", "vm2"), None, "a VM with only a loop");
        assert_eq!(name(1000, "c", "vm1"), None, "another install");
        assert_eq!(name(1002, "a", "vm1"), None);
    }

    #[test]
    fn free_slot_skips_slots_of_every_install_of_the_uid_only() {
        let l = sample();
        // uid 1000 uses 0 (install a) and 2 (install b); 1001's slot 1 is in another lease.
        assert_eq!(l.free_slot(1000, 64), Some(1));
        assert_eq!(l.free_slot(1001, 64), Some(0));
        assert_eq!(l.free_slot(1000, 1), None);
        assert_eq!(l.free_slot(1000, 0), None);
        assert_eq!(l.free_slot(5, 1), Some(0));
    }

    #[test]
    fn leases_are_stable_and_the_lowest_free_one_is_handed_out() {
        let mut l = sample();
        assert_eq!(l.lease_of(1000), Some(0));
        assert_eq!(l.lease_of(1002), None);
        assert_eq!(l.next_free_lease(4), Some(1));
        assert_eq!(l.lease_or_assign(1002, 4), Some(1));
        assert_eq!(l.lease_or_assign(1002, 4), Some(1), "stable");
        assert_eq!(l.lease_or_assign(1000, 4), Some(0));
        assert_eq!(l.lease_or_assign(1003, 4), Some(3));
        assert_eq!(l.next_free_lease(4), None);
        assert_eq!(l.lease_or_assign(1004, 4), None, "pool exhausted");
        assert_eq!(l.lease_of(1004), None);
    }

    #[test]
    fn insert_replaces_the_same_key_and_remove_returns_it() {
        let mut l = sample();
        let before = l.entries.len();
        let old = l.insert(tap(1000, "a", "vm1", 5)).expect("replaced");
        assert!(matches!(old.object, Object::Tap { slot: 0, .. }));
        assert_eq!(l.entries.len(), before);
        let (a, v1) = (install("a"), vm("vm1"));
        assert!(matches!(
            l.find(1000, &a, &v1, ObjectKind::Tap).unwrap().object,
            Object::Tap { slot: 5, .. }
        ));
        assert_eq!(l.remove(1001, &a, &v1, ObjectKind::Nat), None, "not 1001's");
        let gone = l.remove(1000, &a, &v1, ObjectKind::Nat).unwrap();
        assert_eq!(gone.kind(), ObjectKind::Nat);
        assert_eq!(l.remove(1000, &a, &v1, ObjectKind::Nat), None);
        assert_eq!(l.entries.len(), before - 1);
        assert!(l.find(1001, &a, &v1, ObjectKind::Tap).is_some(), "others untouched");
    }

    #[test]
    fn round_trips_through_json() {
        let l = sample();
        let json = serde_json::to_string_pretty(&l).unwrap();
        let back: Ledger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
        let bad = json.replace("\"vm9\"", "\"VM/../9\"");
        assert!(serde_json::from_str::<Ledger>(&bad).is_err(), "ids are re-validated on load");
    }

    #[test]
    fn owned_objects_lists_only_the_uid_with_addresses_from_the_policy() {
        let l = sample();
        let network = Policy::default_policy().network;
        let root = |id: &str| format!("/jails/{id}/root");
        let owned = l.owned_objects(1000, &network, &root);
        assert_eq!(owned.lease, Some(LeaseInfo { network: Ipv4Addr::new(172, 30, 0, 0), prefix_len: 24 }));
        assert_eq!(owned.taps.len(), 2);
        assert_eq!(owned.nat.len(), 1);
        assert_eq!(owned.loops.len(), 3);
        assert_eq!(
            owned.dms,
            vec![DmInfo {
                install: install("a"),
                vm: vm("vm1"),
                name: "banger-1000vm1".into(),
                device: "/dev/banger/banger-1000vm1".into(),
                sectors: 2048,
            }]
        );
        assert!(l.holds_dm("banger-1000vm1") && !l.holds_dm("banger-1001vm1"));
        assert!(owned.taps.iter().all(|t| t.prefix_len == 30 && t.guest_mac.starts_with("06:00:")));
        let other = l.owned_objects(1001, &network, &root);
        assert_eq!(other.lease.unwrap().network, Ipv4Addr::new(172, 30, 2, 0));
        assert_eq!((other.taps.len(), other.nat.len(), other.loops.len(), other.dms.len()), (1, 0, 1, 0));
        assert_eq!(l.owned_objects(4242, &network, &root), OwnedObjects::default());
    }

    fn jail(uid: u32, inst: &str, v: &str, jail_uid: u32, vcpus: u8, mem_mib: u32) -> LedgerEntry {
        LedgerEntry::new(
            uid,
            install(inst),
            vm(v),
            Object::Jail {
                id: format!("bg-{uid}{v}"),
                jail_uid,
                shape: VmShape { vcpus, mem_mib },
                pid: Some(7),
            },
        )
    }

    #[test]
    fn jails_count_per_owner_and_their_uids_are_one_pool_for_the_host() {
        let mut l = sample();
        for e in [
            jail(1000, "a", "vm1", 500, 2, 1024),
            jail(1000, "b", "vm1", 502, 1, 256),
            jail(1001, "a", "vm1", 501, 4, 4096),
        ] {
            l.insert(e);
        }
        assert_eq!(l.jail_totals(1000), (3, 1280));
        assert_eq!(l.jail_totals(1001), (4, 4096));
        assert_eq!(l.jail_totals(7), (0, 0));
        assert_eq!(l.count_vms(1000), 3, "a jail of a vm with other objects does not count twice");
        assert_eq!(l.free_jail_uid((500, 510)), Some(503), "another owner's uid is never reused");
        assert_eq!(l.free_jail_uid((500, 502)), None);
        assert_eq!(l.free_jail_uid((400, 400)), Some(400));
        // The uid of a live jail no entry holds is never handed out either.
        let mut running = l.clone();
        running.unheld_jail_uids.insert(503);
        assert_eq!(running.free_jail_uid((500, 510)), Some(504));
        assert!(l.holds_jail("bg-1001vm1") && !l.holds_jail("bg-1001vm2"));
        let owned = l.owned_objects(1000, &Policy::default_policy().network, &|id| format!("/j/{id}/root"));
        assert_eq!(owned.jails.len(), 2);
        let j = &owned.jails[0];
        assert_eq!((j.uid, j.pid, j.root.as_str()), (500, Some(7), "/j/bg-1000vm1/root"));
        assert_eq!(j.api_socket, "/j/bg-1000vm1/root/run/firecracker.socket");
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<Ledger>(&json).unwrap(), l);
    }

    #[test]
    fn object_kinds_read_as_names() {
        assert_eq!(ObjectKind::Tap.to_string(), "tap");
        assert_eq!(ObjectKind::Loop(LoopRole::Cow).to_string(), "loop cow");
        assert_eq!(ObjectKind::Dm.to_string(), "dm");
        assert_eq!(ObjectKind::Jail.to_string(), "jail");
        assert_eq!(DevNum { major: 7, minor: 12 }.to_string(), "7:12");
    }
}
