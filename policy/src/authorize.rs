//! The pure decision every request goes through: the one place a request is allowed or refused.
//!
//! [`authorize`] looks only at its arguments: the policy, the peer the helper authenticated, the
//! decoded request, the ledger as it stands and what the helper [`Observed`] about the request's
//! inputs (the descriptors that came with it, the loop backing file it inspected). It answers
//! before anything is touched, and on [`Decision::Allow`] hands over a [`Grant`]: what it decided
//! (the lease and VM slot of a new TAP, the TAP a NAT goes over, how a loop device is attached),
//! so the helper acts on the grant and never decides again. The checks, in order:
//!
//! 1. **Access** (rule `access`): the peer's user name or decimal uid is in `access.users`, or
//!    one of its groups (by name or decimal gid) is in `access.groups`. Nothing else grants
//!    access: uid 0 is treated like any other uid and is refused unless listed. An entry made
//!    only of digits is an id; anything else is a name.
//! 2. **Handshake**: every request but `Hello` needs the install the connection said `Hello`
//!    for, because objects are keyed by `(uid, install, vm)`.
//! 3. **Descriptors**: exactly [`Request::expected_fds`] must have come with the request.
//! 4. **Per operation**, always against the caller's own entries only (the ledger queries take
//!    the caller's uid), with the caller's quotas ([`Policy::quotas_for_uid`]):
//!    - `TapCreate`: granted at once if this VM of this install already has its TAP (the helper
//!      answers with it); else `quotas.max_taps`, then `quotas.max_vms` if the VM has no object
//!      yet, then a free VM subnet in the caller's lease, then (for a caller without a lease) a
//!      free lease in the pool (rule `network.pool`).
//!    - `NatUp`: the caller's TAP for that VM of this install must be in the ledger.
//!    - `LoopAttach`: refused where the helper cannot make dm-snapshot targets
//!      ([`Observed::device_mapper`]): a loop device is only ever the base or copy-on-write half
//!      of a dm-snapshot, and the daemon gives the VM a file of its own instead. Then the
//!      inspected backing file must be a regular file, owned by the caller (rule
//!      `loop.backing_owner`), on a local filesystem ([`LOCAL_FILESYSTEMS`]), opened for reading
//!      (read-write is granted only when asked *and* the descriptor is writable); then refused
//!      if that VM and role already has a device, else `quotas.max_loops`, then `quotas.max_vms`
//!      if the VM has no object yet.
//!    - `DmCreate`: refused without device-mapper, and while the VM's target is still being
//!      released; then the caller's base loop device of that VM of this install must be settled
//!      and read-only, its copy-on-write loop device settled and read-write, the base at least
//!      one sector, and the copy-on-write file at least
//!      [`min_cow_bytes`](banger_protocol::min_cow_bytes) of the base (by the sizes recorded at
//!      attach), so the snapshot can never fill up. The VM's existing target, if the ledger has
//!      one, is granted to be answered again (or made again if the kernel lost it). No quota of
//!      its own: the VM already counts, and it has at most one target.
//!    - `JailLaunch`: refused without a `[jailer]` section (rule `jailer`), and where the helper
//!      cannot launch jails now ([`Observed::jails`]); then the shape must be sane (1 to
//!      [`MAX_VCPUS`] vCPUs, at least [`MIN_MEM_MIB`] MiB); a VM of this install that already
//!      has a jail is a conflict; then `quotas.max_vms` if the VM has no object yet, and the
//!      caller's totals over all of its jails with this one: `quotas.max_vcpus`,
//!      `quotas.max_memory_mib`; then a free uid of `jailer.uid_range` — the lowest that no jail
//!      of *any* user holds (rule `jailer.uid_range`); then the descriptors as the helper
//!      inspected them ([`Observed::jail_files`]): kernel and initrd regular files opened for
//!      reading, on a local filesystem ([`LOCAL_FILESYSTEMS`]), at most
//!      [`MAX_BOOT_FILE_BYTES`]; each drive opened read-write and either a regular file of the
//!      caller's on a local filesystem (rule
//!      `jail.drive_owner`) or the block device of this VM's settled dm-snapshot target (rule
//!      `jail.drive_device`). The grant carries the jail uid, the VM's TAP from the ledger and
//!      the caller's cgroup with its limits (its `max_vcpus` and `max_memory_mib`).
//!    - `JailKill`: the caller's jail of that VM of this install, if the ledger has one (none:
//!      nothing to do).
//!    - `TeardownVms`: at most [`MAX_TEARDOWN_VMS`] VMs.
//!    - `Ping`, `ListOwned`: granted; they only read the caller's own entries.
//!
//! Every entry counts, whatever its [`crate::EntryState`]: an object is the caller's from before
//! the kernel makes it until the kernel has let it go. Other users' entries never change a
//! decision, with one exception: which uid a new jail gets (jail uids are one pool for the host,
//! since the uid is what keeps one VMM from another's files). A lease that a policy change left outside
//! the pool is refused (rule `network.pool`) rather than handed out, so no address outside
//! `network.pool` is ever used.

use std::net::Ipv4Addr;

use banger_protocol::{
    HelperError, InstallId, JailFiles, LoopRole, MAX_BOOT_FILE_BYTES, MAX_TEARDOWN_VMS, MAX_VCPUS,
    MIN_MEM_MIB, Request, VmId, VmShape, min_cow_bytes,
};

use crate::{Access, DevNum, EntryState, FileId, Ledger, LedgerEntry, Object, ObjectKind, Policy, Quotas};

/// The filesystems a loop backing file may be on: local ones, which never wait on a server or a
/// user process (a loop device over a FUSE or network file can hang the kernel).
pub const LOCAL_FILESYSTEMS: [&str; 7] = ["ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs"];

/// Who is asking, as the helper established it (SO_PEERCRED and the account databases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's primary gid.
    pub gid: u32,
    /// The peer's pid at connect time.
    pub pid: i32,
    /// The user name of `uid`, when it has one.
    pub user: Option<String>,
    /// Every group the peer is in (primary and supplementary), as gids.
    pub groups: Vec<u32>,
    /// The names of those groups that have one.
    pub group_names: Vec<String>,
    /// The install this connection said `Hello` for (`None` before the handshake).
    pub install: Option<InstallId>,
}

/// What the helper observed about a request's inputs before deciding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// How many descriptors came with the request.
    pub fds: usize,
    /// For a `LoopAttach` with its descriptor: the backing file as the helper inspected it, or
    /// why it could not.
    pub backing: Option<Result<BackingFile, HelperError>>,
    /// The helper can make dm-snapshot targets on this host (its `Hello` capability).
    pub device_mapper: bool,
    /// For a `JailLaunch` with its descriptors: each one as the helper inspected it (or why it
    /// could not), in [`banger_protocol::JailFiles`] order.
    pub jail_files: Option<Vec<Result<BackingFile, HelperError>>>,
    /// The helper can launch jails on this host: its `[jailer]` was set up and its launcher
    /// runs.
    pub jails: bool,
}

/// What the helper learns about a backing file from its descriptor, without calling into the
/// file's filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    /// It is a regular file.
    pub regular: bool,
    /// Its owner.
    pub uid: u32,
    /// The type of its filesystem, as the mount table names it (`ext4`, `fuse.sshfs`), or
    /// `unknown` when its mount is not in the helper's mount table.
    pub fs_type: String,
    /// How the descriptor was opened.
    pub access: FdAccess,
    /// Device and inode, to recognise the file later.
    pub id: FileId,
    /// Its size in bytes.
    pub size: u64,
    /// The device it names, when it is a block device node.
    pub rdev: Option<DevNum>,
}

/// How a descriptor was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdAccess {
    /// `O_RDONLY`.
    ReadOnly,
    /// `O_WRONLY`.
    WriteOnly,
    /// `O_RDWR`.
    ReadWrite,
    /// `O_PATH`: no I/O possible.
    Path,
}

/// What [`authorize`] decided for an allowed request; the helper acts on exactly this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Go ahead: the request reads or removes only the caller's own objects (or none).
    Proceed,
    /// `TapCreate` for a VM whose TAP the ledger holds: answer with this entry (made again in
    /// its slot if the kernel lost it).
    TapExisting(LedgerEntry),
    /// `TapCreate` of a new TAP in this lease (taken by the caller now when `new_lease`) and VM
    /// slot.
    TapNew {
        /// The caller's lease index.
        lease: u32,
        /// The lease is the caller's first: record it with the TAP.
        new_lease: bool,
        /// The VM slot within the lease.
        slot: u32,
    },
    /// `NatUp` over the caller's TAP of that VM.
    Nat {
        /// The TAP.
        tap: String,
        /// The TAP's (host side) address.
        host_ip: Ipv4Addr,
        /// The guest's address.
        guest_ip: Ipv4Addr,
    },
    /// `LoopAttach` of the inspected file.
    Loop {
        /// Attach read-only.
        read_only: bool,
        /// The backing file's identity, recorded with the device.
        backing: FileId,
        /// The backing file's size, recorded with the device.
        size: u64,
    },
    /// `DmCreate` over the caller's loop devices of that VM.
    Dm(Box<DmGrant>),
    /// `JailLaunch` as a new uid of the policy's range.
    Jail(Box<JailGrant>),
    /// `JailKill` of the caller's jail of that VM (`None`: it has none, nothing to do).
    JailKill(Option<LedgerEntry>),
}

/// What [`Grant::Jail`] decided: everything the jail is made of that is not derived from the
/// caller's ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailGrant {
    /// The uid (and gid) the VMM runs as: the lowest of the policy's range no jail holds.
    pub jail_uid: u32,
    /// The VM's TAP from the ledger, handed to the jail uid.
    pub tap: Option<String>,
    /// The caller's cgroup, `<cgroup_parent>/u<uid>`.
    pub user_cgroup: String,
    /// The caller's `max_vcpus`: the limit of its cgroup.
    pub user_vcpus: u32,
    /// The caller's `max_memory_mib`: the limit of its cgroup.
    pub user_mem_mib: u64,
}

/// What [`Grant::Dm`] decided: answer with `existing` (made again if the kernel lost it or it
/// never settled), or make a new target over `base` and `cow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmGrant {
    /// The VM's target the ledger holds, if any.
    pub existing: Option<LedgerEntry>,
    /// The settled, read-only base loop device: the snapshot's origin.
    pub base: LedgerEntry,
    /// The settled, read-write copy-on-write loop device.
    pub cow: LedgerEntry,
    /// The target's length in 512-byte sectors: the whole base.
    pub sectors: u64,
}

/// The outcome of [`authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead, with what was decided.
    Allow(Grant),
    /// Refuse with this error; every refusal names the policy rule (or ledger fact) that decided.
    Refuse(HelperError),
}

impl Decision {
    /// Whether the decision is [`Decision::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

/// Which `[access]` entry lets a peer in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// This entry of `access.users` (a user name or decimal uid).
    User(String),
    /// This entry of `access.groups` (a group name or decimal gid).
    Group(String),
}

/// Whether a policy entry naming an account (`access.users`, `access.groups`,
/// `access.socket_group`, a `quotas.users` key) is a numeric id rather than a name: all digits.
pub fn is_account_id(entry: &str) -> bool {
    !entry.is_empty() && entry.bytes().all(|b| b.is_ascii_digit())
}

/// Whether an access entry names the account `name` / `id`: an all-digit entry is an id, any
/// other entry a name.
pub(crate) fn entry_names(entry: &str, name: Option<&str>, id: Option<u32>) -> bool {
    if is_account_id(entry) { id.is_some() && entry.parse::<u32>().ok() == id } else { name == Some(entry) }
}

impl Access {
    /// The entry that admits `peer`, if any: its user first, then its groups.
    pub fn admits(&self, peer: &Peer) -> Option<Admission> {
        if let Some(entry) = self.users.iter().find(|e| entry_names(e, peer.user.as_deref(), Some(peer.uid)))
        {
            return Some(Admission::User(entry.clone()));
        }
        self.groups
            .iter()
            .find(|e| {
                peer.groups.iter().any(|gid| entry_names(e, None, Some(*gid)))
                    || peer.group_names.iter().any(|name| entry_names(e, Some(name), None))
            })
            .map(|e| Admission::Group(e.clone()))
    }
}

/// Decides whether `peer` may make `request` now, given the policy, the ledger and what the
/// helper observed about the request's inputs.
pub fn authorize(
    policy: &Policy,
    peer: &Peer,
    request: &Request,
    ledger: &Ledger,
    observed: &Observed,
) -> Decision {
    match check(policy, peer, request, ledger, observed) {
        Ok(grant) => Decision::Allow(grant),
        Err(error) => Decision::Refuse(error),
    }
}

fn check(
    policy: &Policy,
    peer: &Peer,
    request: &Request,
    ledger: &Ledger,
    observed: &Observed,
) -> Result<Grant, HelperError> {
    if policy.access.admits(peer).is_none() {
        return Err(not_admitted(peer));
    }
    let install = match (request, &peer.install) {
        (Request::Hello { .. }, _) => return Ok(Grant::Proceed),
        (_, Some(install)) => install,
        (_, None) => {
            return Err(HelperError::invalid(format!(
                "{} before the handshake: say Hello first",
                request.op_name()
            )));
        }
    };
    if observed.fds != request.expected_fds() {
        return Err(HelperError::invalid(format!(
            "{} takes {} file descriptor(s), {} arrived; all were closed",
            request.op_name(),
            request.expected_fds(),
            observed.fds
        )));
    }
    let uid = peer.uid;
    let quotas = policy.quotas_for_uid(peer.user.as_deref(), uid);
    match request {
        Request::Hello { .. } | Request::Ping | Request::ListOwned => Ok(Grant::Proceed),
        Request::TapCreate { vm } => tap_create(policy, ledger, uid, install, vm, quotas),
        Request::NatUp { vm } => match ledger.find(uid, install, vm, ObjectKind::Tap) {
            Some(LedgerEntry { object: Object::Tap { name, host_ip, guest_ip, .. }, .. }) => {
                Ok(Grant::Nat { tap: name.clone(), host_ip: *host_ip, guest_ip: *guest_ip })
            }
            _ => Err(HelperError::NotFound {
                what: format!("no tap for vm {vm} of this install: create it first"),
            }),
        },
        Request::DmCreate { vm } => dm_create(ledger, uid, install, vm, observed),
        Request::JailLaunch { vm, shape, files } => {
            jail_launch(policy, ledger, uid, install, vm, *shape, *files, quotas, observed)
        }
        Request::JailKill { vm } => {
            Ok(Grant::JailKill(ledger.find(uid, install, vm, ObjectKind::Jail).cloned()))
        }
        Request::LoopAttach { .. } if !observed.device_mapper => {
            Err(no_device_mapper("attaches no loop devices"))
        }
        Request::LoopAttach { vm, role, read_only } => {
            let file = match &observed.backing {
                Some(Ok(file)) => file,
                Some(Err(e)) => return Err(e.clone()),
                None => {
                    return Err(HelperError::internal("loop-attach was decided without its backing file"));
                }
            };
            let read_only = backing_file(file, uid, *read_only)?;
            if ledger.find(uid, install, vm, ObjectKind::Loop(*role)).is_some() {
                return Err(HelperError::Conflict {
                    what: format!(
                        "loop device for vm {vm} role {} already attached; tear the vm down first",
                        role.as_str()
                    ),
                });
            }
            if ledger.count_loops(uid) >= quotas.max_loops {
                return Err(quota("loops", quotas.max_loops));
            }
            new_vm_fits(ledger, uid, install, vm, quotas)?;
            Ok(Grant::Loop { read_only, backing: file.id, size: file.size })
        }
        Request::TeardownVms { vms } => {
            if vms.len() > MAX_TEARDOWN_VMS {
                return Err(HelperError::invalid(format!(
                    "teardown names {} vms; at most {MAX_TEARDOWN_VMS} per request",
                    vms.len()
                )));
            }
            Ok(Grant::Proceed)
        }
    }
}

/// Refuses a file whose filesystem is not one of [`LOCAL_FILESYSTEMS`]: `what` is on it, and
/// `only` over those filesystems is it taken, `why`.
fn local_filesystem(file: &BackingFile, what: &str, only: &str, why: &str) -> Result<(), HelperError> {
    if LOCAL_FILESYSTEMS.contains(&file.fs_type.as_str()) {
        return Ok(());
    }
    let on = if file.fs_type == "unknown" {
        "a filesystem missing from the helper's mount table".to_owned()
    } else {
        format!("a filesystem of type {}", banger_protocol::quoted(&file.fs_type))
    };
    Err(HelperError::invalid(format!(
        "{what} is on {on}; {only} {} {why}; copy it to one of those",
        LOCAL_FILESYSTEMS.join(", ")
    )))
}

/// Checks a loop backing file and returns whether it is attached read-only.
fn backing_file(file: &BackingFile, uid: u32, read_only: bool) -> Result<bool, HelperError> {
    if !file.regular {
        return Err(HelperError::invalid("the backing file must be a regular file"));
    }
    if file.uid != uid {
        return Err(HelperError::Denied {
            rule: "loop.backing_owner".into(),
            reason: format!(
                "the backing file belongs to uid {}, not to the caller (uid {uid}); only your own files can be attached",
                file.uid
            ),
        });
    }
    local_filesystem(
        file,
        "the backing file",
        "loop devices are attached only over",
        "(a network or FUSE filesystem could hang the kernel)",
    )?;
    match file.access {
        FdAccess::ReadWrite => Ok(read_only),
        FdAccess::ReadOnly => Ok(true),
        FdAccess::WriteOnly | FdAccess::Path => {
            Err(HelperError::invalid("open the backing file for reading (O_RDONLY or O_RDWR)"))
        }
    }
}

/// `JailLaunch`: the checks of the module doc, in order.
#[allow(clippy::too_many_arguments)]
fn jail_launch(
    policy: &Policy,
    ledger: &Ledger,
    uid: u32,
    install: &InstallId,
    vm: &VmId,
    shape: VmShape,
    files: JailFiles,
    quotas: Quotas,
    observed: &Observed,
) -> Result<Grant, HelperError> {
    let Some(jailer) = &policy.jailer else {
        return Err(HelperError::Denied {
            rule: "jailer".to_owned(),
            reason: "this helper's policy has no [jailer] section: VMs run in direct mode here; an admin \
                     must add [jailer] to the helper's policy to allow jailed VMs"
                .to_owned(),
        });
    };
    if !observed.jails {
        return Err(HelperError::Conflict {
            what: "this host's banger-helper cannot launch jails now (its jail launcher is not running): \
                   an admin must restart banger-helper (its log says why the launcher ended), or run the \
                   vm in direct mode"
                .to_owned(),
        });
    }
    if !(1..=MAX_VCPUS).contains(&shape.vcpus) {
        return Err(HelperError::invalid(format!(
            "a vm has 1 to {MAX_VCPUS} vcpus, not {}; set vcpus in that range",
            shape.vcpus
        )));
    }
    if shape.mem_mib < MIN_MEM_MIB {
        return Err(HelperError::invalid(format!(
            "a vm has at least {MIN_MEM_MIB} MiB of memory, not {}; give it more",
            shape.mem_mib
        )));
    }
    if ledger.find(uid, install, vm, ObjectKind::Jail).is_some() {
        return Err(HelperError::Conflict {
            what: format!(
                "vm {vm} of this install already has a jailed VMM; kill it (or tear the vm down) first"
            ),
        });
    }
    new_vm_fits(ledger, uid, install, vm, quotas)?;
    let (vcpus, mem) = ledger.jail_totals(uid);
    if vcpus + u32::from(shape.vcpus) > quotas.max_vcpus {
        return Err(quota("vcpus", quotas.max_vcpus));
    }
    if mem + u64::from(shape.mem_mib) > u64::from(quotas.max_memory_mib) {
        return Err(quota("memory MiB", quotas.max_memory_mib));
    }
    let Some(jail_uid) = ledger.free_jail_uid(jailer.uids) else {
        let (first, last) = jailer.uids;
        return Err(HelperError::Denied {
            rule: "jailer.uid_range".to_owned(),
            reason: format!(
                "every uid of jailer.uid_range {first}-{last} runs a jail now; an admin must widen the range"
            ),
        });
    };
    jail_files(ledger, uid, install, vm, files, observed)?;
    let tap = ledger.tap_name(uid, install, vm).map(str::to_owned);
    Ok(Grant::Jail(Box::new(JailGrant {
        jail_uid,
        tap,
        user_cgroup: jailer.user_cgroup(uid),
        user_vcpus: quotas.max_vcpus,
        user_mem_mib: u64::from(quotas.max_memory_mib),
    })))
}

/// The descriptors of a `JailLaunch`, in [`JailFiles`] order: the kernel and initrd regular
/// files opened for reading; each drive a regular file of the caller's opened read-write, or the
/// block device of this VM's settled dm-snapshot target opened read-write.
fn jail_files(
    ledger: &Ledger,
    uid: u32,
    install: &InstallId,
    vm: &VmId,
    files: JailFiles,
    observed: &Observed,
) -> Result<(), HelperError> {
    let Some(inspected) = &observed.jail_files else {
        return Err(HelperError::internal("jail-launch was decided without its descriptors"));
    };
    let mut roles = vec!["kernel"];
    if files.initrd {
        roles.push("initrd");
    }
    roles.push("root drive");
    if files.work {
        roles.push("work drive");
    }
    if inspected.len() != roles.len() {
        return Err(HelperError::internal("jail-launch was decided on another number of descriptors"));
    }
    let dm = match ledger.find(uid, install, vm, ObjectKind::Dm) {
        Some(LedgerEntry { object: Object::Dm { dev, .. }, state: EntryState::Settled, .. }) => Some(*dev),
        _ => None,
    };
    for (role, file) in roles.into_iter().zip(inspected) {
        let file = file.as_ref().map_err(Clone::clone)?;
        // The launcher reads (links, or copies) regular files while the helper waits for it.
        let local = || {
            local_filesystem(
                file,
                &format!("the {role}"),
                "jails take files only from",
                "(a network or FUSE filesystem could stall the helper)",
            )
        };
        if matches!(role, "kernel" | "initrd") {
            if !file.regular || !matches!(file.access, FdAccess::ReadOnly | FdAccess::ReadWrite) {
                return Err(HelperError::invalid(format!(
                    "the {role} must be a regular file opened for reading (O_RDONLY)"
                )));
            }
            local()?;
            if file.size > MAX_BOOT_FILE_BYTES {
                return Err(HelperError::invalid(format!(
                    "the {role} is {} bytes, over the {} MiB a jail takes; use a smaller {role}",
                    file.size,
                    MAX_BOOT_FILE_BYTES >> 20
                )));
            }
            continue;
        }
        if file.regular {
            local()?;
        }
        if file.access != FdAccess::ReadWrite {
            return Err(HelperError::invalid(format!("open the {role} read-write (O_RDWR)")));
        }
        match (file.regular, file.rdev) {
            (true, _) if file.uid == uid => {}
            (true, _) => {
                return Err(HelperError::Denied {
                    rule: "jail.drive_owner".into(),
                    reason: format!(
                        "the {role} belongs to uid {}, not to the caller (uid {uid}); only your own files go into a jail",
                        file.uid
                    ),
                });
            }
            (false, Some(rdev)) if Some(rdev) == dm => {}
            (false, Some(rdev)) => {
                return Err(HelperError::Denied {
                    rule: "jail.drive_device".into(),
                    reason: format!(
                        "the {role} is the block device {rdev}, which is not the dm-snapshot root of vm {vm} of this install; only that device goes into its jail"
                    ),
                });
            }
            (false, None) => {
                return Err(HelperError::invalid(format!(
                    "the {role} must be a regular file or the vm's dm-snapshot device"
                )));
            }
        }
    }
    Ok(())
}

/// Without device-mapper no dm-snapshot root is made, and no loop device attached: the daemon
/// gives the VM its own copy of the image instead.
fn no_device_mapper(what: &str) -> HelperError {
    HelperError::Conflict {
        what: format!(
            "this host's banger-helper {what}: it cannot make dm-snapshot roots (no device-mapper \
             with the snapshot target); use file storage (a reflink clone or a copy of the image)"
        ),
    }
}

/// `DmCreate`: the checks of the module doc, in order.
fn dm_create(
    ledger: &Ledger,
    uid: u32,
    install: &InstallId,
    vm: &VmId,
    observed: &Observed,
) -> Result<Grant, HelperError> {
    if !observed.device_mapper {
        return Err(no_device_mapper("makes no dm-snapshot roots"));
    }
    let existing = ledger.find(uid, install, vm, ObjectKind::Dm);
    if existing.is_some_and(|e| e.state == EntryState::Released) {
        return Err(HelperError::Conflict {
            what: format!(
                "the dm-snapshot of vm {vm} is being torn down but is still open (its VMM may still \
                 run); stop whatever holds it and tear the vm down again"
            ),
        });
    }
    let (base, base_size) = dm_half(ledger, uid, install, vm, LoopRole::Base, true)?;
    let (cow, cow_size) = dm_half(ledger, uid, install, vm, LoopRole::Cow, false)?;
    if base_size < 512 {
        return Err(HelperError::invalid(format!(
            "the base image of vm {vm} holds {base_size} bytes, less than one 512-byte sector; \
             attach a real image"
        )));
    }
    let needed = min_cow_bytes(base_size);
    if cow_size < needed {
        return Err(HelperError::invalid(format!(
            "the copy-on-write file of vm {vm} holds {cow_size} bytes; a snapshot of a base of \
             {base_size} bytes needs at least {needed} (so it can never fill up): tear the vm down, \
             make the file that large (it may be sparse) and attach it again"
        )));
    }
    Ok(Grant::Dm(Box::new(DmGrant {
        existing: existing.cloned(),
        base: base.clone(),
        cow: cow.clone(),
        sectors: base_size / 512,
    })))
}

/// The VM's settled loop device of `role`, read-only or read-write as a dm-snapshot needs it, and
/// the size of its file.
fn dm_half<'l>(
    ledger: &'l Ledger,
    uid: u32,
    install: &InstallId,
    vm: &VmId,
    role: LoopRole,
    read_only: bool,
) -> Result<(&'l LedgerEntry, u64), HelperError> {
    let (name, how) = (role.as_str(), if read_only { "read-only" } else { "read-write" });
    let entry =
        ledger.find(uid, install, vm, ObjectKind::Loop(role)).ok_or_else(|| HelperError::NotFound {
            what: format!("no {name} loop device for vm {vm} of this install: attach it first ({how})"),
        })?;
    let Object::Loop { read_only: ro, size, .. } = &entry.object else {
        return Err(HelperError::internal(format!("the {name} loop entry of vm {vm} is not a loop device")));
    };
    if entry.state != EntryState::Settled {
        return Err(HelperError::Conflict {
            what: format!(
                "the {name} loop device of vm {vm} is not in use any more; tear the vm down and attach it again"
            ),
        });
    }
    if *ro != read_only {
        return Err(HelperError::Conflict {
            what: format!(
                "the {name} loop device of vm {vm} is attached {}; a dm-snapshot needs it {how}: \
                 tear the vm down and attach it {how}",
                if *ro { "read-only" } else { "read-write" }
            ),
        });
    }
    Ok((entry, *size))
}

fn not_admitted(peer: &Peer) -> HelperError {
    let (who, entry) = match &peer.user {
        Some(name) => (format!("uid {} ({name})", peer.uid), name.clone()),
        None => (format!("uid {}", peer.uid), format!("\"{}\"", peer.uid)),
    };
    HelperError::Denied {
        rule: "access".to_owned(),
        reason: format!(
            "{who} may not use banger-helper; an admin must add {entry} to access.users, or one of \
             its groups to access.groups, in the helper's policy"
        ),
    }
}

fn quota(resource: &str, limit: u32) -> HelperError {
    HelperError::QuotaExceeded { resource: resource.to_owned(), limit }
}

/// A VM that has no object yet must fit under `quotas.max_vms`.
fn new_vm_fits(
    ledger: &Ledger,
    uid: u32,
    install: &InstallId,
    vm: &VmId,
    quotas: Quotas,
) -> Result<(), HelperError> {
    if !ledger.has_vm(uid, install, vm) && ledger.count_vms(uid) >= quotas.max_vms {
        return Err(quota("vms", quotas.max_vms));
    }
    Ok(())
}

fn tap_create(
    policy: &Policy,
    ledger: &Ledger,
    uid: u32,
    install: &InstallId,
    vm: &VmId,
    quotas: Quotas,
) -> Result<Grant, HelperError> {
    if let Some(entry) = ledger.find(uid, install, vm, ObjectKind::Tap) {
        return Ok(Grant::TapExisting(entry.clone()));
    }
    if ledger.count_taps(uid) >= quotas.max_taps {
        return Err(quota("taps", quotas.max_taps));
    }
    new_vm_fits(ledger, uid, install, vm, quotas)?;
    let slots = policy.network.slots_per_lease();
    let Some(slot) = ledger.free_slot(uid, slots) else {
        return Err(quota("vm subnets", slots));
    };
    let (lease, new_lease) = lease_for(policy, ledger, uid)?;
    Ok(Grant::TapNew { lease, new_lease, slot })
}

/// The lease `uid` has, or would get now (then `true`).
fn lease_for(policy: &Policy, ledger: &Ledger, uid: u32) -> Result<(u32, bool), HelperError> {
    let network = &policy.network;
    let total = network.lease_count();
    let denied = |reason: String| HelperError::Denied { rule: "network.pool".to_owned(), reason };
    match ledger.lease_of(uid) {
        Some(index) if index < total => Ok((index, false)),
        Some(index) => Err(denied(format!(
            "uid {uid} holds lease {index}, which network.pool {} (/{} leases) no longer contains since \
             the policy changed; an admin must restore the pool or release the lease",
            network.pool, network.lease_prefix
        ))),
        None => ledger.next_free_lease(total).map(|index| (index, true)).ok_or_else(|| {
            denied(format!(
                "the address pool {} is exhausted: all {total} leases of /{} are taken; an admin must \
                 enlarge network.pool or raise network.lease_prefix",
                network.pool, network.lease_prefix
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use banger_protocol::{HelperError, LoopRole, PROTOCOL_VERSION};
    use proptest::prelude::*;

    use super::*;
    use crate::{LedgerEntry, Object};

    const ALICE: u32 = 1000;
    const BOB: u32 = 1001;
    const CAROL: u32 = 1002;
    const KVM_GID: u32 = 120;
    /// The size of the base images in the ledgers of these tests.
    const BASE: u64 = 1 << 20;
    /// The first uid of the jail range (100 uids).
    const JAIL_FIRST: u32 = 900_000;

    /// alice and bob by name, uid 1005 by number, members of group `kvm` and of gid 300.
    /// Pool of 4 leases of 4 VM subnets each; small quotas so every limit is reachable.
    fn policy() -> Policy {
        Policy::from_toml(
            "test.toml",
            r#"
[access]
users = ["alice", "bob", "1005"]
groups = ["kvm", "300"]

[quotas]
max_vms = 3
max_taps = 3
max_loops = 4
max_vcpus = 4
max_memory_mib = 3072

[quotas.users.bob]
max_taps = 1

[jailer]
jailer = "/usr/local/bin/jailer"
firecracker = "/usr/local/bin/firecracker"
chroot_base = "/srv/jails"
uid_range = "900000-900099"

[network]
pool = "10.0.0.0/24"
lease_prefix = 26
vm_prefix = 28
"#,
        )
        .unwrap()
    }

    fn install(s: &str) -> InstallId {
        InstallId::new(s).unwrap()
    }

    fn vm(s: &str) -> VmId {
        VmId::new(s).unwrap()
    }

    fn peer(uid: u32, user: Option<&str>) -> Peer {
        Peer {
            uid,
            gid: uid,
            pid: 4242,
            user: user.map(str::to_owned),
            groups: vec![uid],
            group_names: user.map(|u| vec![u.to_owned()]).unwrap_or_default(),
            install: Some(install("main")),
        }
    }

    fn alice() -> Peer {
        peer(ALICE, Some("alice"))
    }

    fn bob() -> Peer {
        peer(BOB, Some("bob"))
    }

    fn carol() -> Peer {
        peer(CAROL, Some("carol"))
    }

    fn entry(uid: u32, inst: &str, v: &str, kind: ObjectKind, slot: u32) -> LedgerEntry {
        let object = match kind {
            ObjectKind::Tap => Object::Tap {
                name: format!("bg{uid:x}{slot}"),
                slot,
                host_ip: Ipv4Addr::new(10, 0, 0, 1),
                guest_ip: Ipv4Addr::new(10, 0, 0, 2),
            },
            ObjectKind::Nat => Object::Nat { guest_ip: Ipv4Addr::new(10, 0, 0, 2), uplink: "eth0".into() },
            // A base of 1 MiB, read-only, and a read-write copy-on-write file just large enough.
            ObjectKind::Loop(role) => Object::Loop {
                role,
                device: "/dev/loop0".into(),
                read_only: role == LoopRole::Base,
                backing: FileId::default(),
                size: if role == LoopRole::Base { BASE } else { min_cow_bytes(BASE) },
            },
            ObjectKind::Dm => Object::Dm {
                name: format!("banger-{uid}-{v}"),
                uuid: format!("BANGER-{uid}-{v}"),
                node: format!("/dev/banger/banger-{uid}-{v}"),
                dev: crate::DevNum { major: 254, minor: slot },
                sectors: BASE / 512,
            },
            // A jail of the range's uid `slot`, of 2 vcpus and 1 GiB.
            ObjectKind::Jail => Object::Jail {
                id: format!("bg-{uid}-{v}"),
                jail_uid: JAIL_FIRST + slot,
                shape: VmShape { vcpus: 2, mem_mib: 1024 },
                pid: Some(100),
            },
        };
        LedgerEntry::new(uid, install(inst), vm(v), object)
    }

    fn ledger(entries: &[LedgerEntry], leases: &[(u32, u32)]) -> Ledger {
        let mut l = Ledger::default();
        for e in entries {
            l.insert(e.clone());
        }
        l.leases.extend(leases.iter().copied());
        l
    }

    /// What the helper would observe for `r` from `p` on a host with device-mapper: the
    /// descriptors it takes, and for a loop attach a regular file of `p`'s on ext4 opened
    /// read-write.
    fn observed(p: &Peer, r: &Request) -> Observed {
        let backing = matches!(r, Request::LoopAttach { .. }).then(|| Ok(file(p.uid)));
        let jail_files = match r {
            Request::JailLaunch { files, .. } => Some(jail_fds(p.uid, *files)),
            _ => None,
        };
        Observed { fds: r.expected_fds(), backing, device_mapper: true, jail_files, jails: true }
    }

    /// What a jail launch of `uid` sends: a kernel (and initrd) of root's opened read-only, and
    /// drives of `uid`'s opened read-write.
    fn jail_fds(uid: u32, files: JailFiles) -> Vec<Result<BackingFile, HelperError>> {
        let ro = BackingFile { uid: 0, access: FdAccess::ReadOnly, ..file(0) };
        let mut v = vec![Ok(ro.clone())];
        if files.initrd {
            v.push(Ok(ro));
        }
        v.push(Ok(file(uid)));
        if files.work {
            v.push(Ok(file(uid)));
        }
        v
    }

    fn file(uid: u32) -> BackingFile {
        BackingFile {
            regular: true,
            uid,
            fs_type: "ext4".into(),
            access: FdAccess::ReadWrite,
            id: FileId { dev: 1, ino: 2 },
            size: BASE,
            rdev: None,
        }
    }

    fn auth(policy: &Policy, p: &Peer, r: &Request, l: &Ledger) -> Decision {
        authorize(policy, p, r, l, &observed(p, r))
    }

    fn decide(p: &Peer, r: Request, l: &Ledger) -> Decision {
        auth(&policy(), p, &r, l)
    }

    fn refused(d: Decision) -> HelperError {
        match d {
            Decision::Refuse(e) => e,
            Decision::Allow(g) => panic!("allowed: {g:?}"),
        }
    }

    fn denied_rule(d: Decision) -> (String, String) {
        match refused(d) {
            HelperError::Denied { rule, reason } => (rule, reason),
            other => panic!("not a denial: {other:?}"),
        }
    }

    fn tap_create(v: &str) -> Request {
        Request::TapCreate { vm: vm(v) }
    }

    fn loop_attach(v: &str, role: LoopRole) -> Request {
        Request::LoopAttach { vm: vm(v), role, read_only: true }
    }

    fn every_request() -> Vec<Request> {
        vec![
            Request::Hello { version: PROTOCOL_VERSION, install_id: install("main") },
            Request::Ping,
            tap_create("v1"),
            Request::NatUp { vm: vm("v1") },
            loop_attach("v1", LoopRole::Base),
            Request::DmCreate { vm: vm("v1") },
            Request::ListOwned,
            Request::TeardownVms { vms: vec![vm("v1")] },
            jail_launch("v1", 1, 256),
            Request::JailKill { vm: vm("v1") },
        ]
    }

    fn jail_launch(v: &str, vcpus: u8, mem_mib: u32) -> Request {
        Request::JailLaunch {
            vm: vm(v),
            shape: VmShape { vcpus, mem_mib },
            files: JailFiles { initrd: false, work: false },
        }
    }

    // --- access ---

    #[test]
    fn listed_users_by_name_or_uid_and_listed_groups_are_admitted() {
        let access = &policy().access;
        assert_eq!(access.admits(&alice()), Some(Admission::User("alice".into())));
        assert_eq!(access.admits(&peer(1005, None)), Some(Admission::User("1005".into())));
        assert_eq!(access.admits(&peer(1005, Some("zed"))), Some(Admission::User("1005".into())));
        let mut in_kvm = carol();
        in_kvm.groups.push(KVM_GID);
        in_kvm.group_names.push("kvm".into());
        assert_eq!(access.admits(&in_kvm), Some(Admission::Group("kvm".into())));
        let mut in_300 = peer(2000, None);
        in_300.groups.push(300);
        assert_eq!(access.admits(&in_300), Some(Admission::Group("300".into())));
        assert_eq!(access.admits(&carol()), None);
        // A name made of digits matches nothing but the id: "1005" is not a user called 1005.
        assert_eq!(access.admits(&peer(7, Some("1005"))), None);
        // A gid is not matched against user entries, nor a uid against group entries.
        let mut uid_300 = peer(300, None);
        uid_300.groups = vec![100];
        assert_eq!(access.admits(&uid_300), None);
    }

    #[test]
    fn unlisted_peer_is_denied_by_access_for_every_request_naming_what_to_add() {
        let l = Ledger::default();
        for r in every_request() {
            let (rule, reason) = denied_rule(decide(&carol(), r.clone(), &l));
            assert_eq!(rule, "access");
            assert!(
                reason.contains("uid 1002 (carol)") && reason.contains("add carol to access.users"),
                "{reason}"
            );
            let (_, reason) = denied_rule(decide(&peer(4321, None), r, &l));
            assert!(reason.contains("add \"4321\" to access.users"), "{reason}");
        }
    }

    #[test]
    fn root_is_not_implicitly_allowed() {
        let root = peer(0, Some("root"));
        for r in every_request() {
            assert_eq!(denied_rule(decide(&root, r, &Ledger::default())).0, "access");
        }
        let mut p = policy();
        p.access.users = vec!["0".into()];
        assert!(auth(&p, &root, &Request::Ping, &Ledger::default()).is_allow());
        p.access.users = vec!["root".into()];
        assert!(auth(&p, &root, &Request::Ping, &Ledger::default()).is_allow());
    }

    #[test]
    fn an_empty_policy_admits_nobody() {
        let p = Policy::from_toml("empty.toml", "").unwrap();
        for who in [alice(), peer(0, Some("root")), peer(1005, None)] {
            let d = auth(&p, &who, &Request::Ping, &Ledger::default());
            assert_eq!(denied_rule(d).0, "access");
        }
    }

    // --- handshake ---

    #[test]
    fn hello_is_allowed_without_install_and_everything_else_needs_it() {
        let mut p = alice();
        p.install = None;
        let l = Ledger::default();
        for r in every_request() {
            let d = decide(&p, r.clone(), &l);
            if matches!(r, Request::Hello { .. }) {
                assert!(d.is_allow());
            } else {
                match refused(d) {
                    HelperError::InvalidRequest { reason } => {
                        assert!(
                            reason.contains("say Hello first") && reason.contains(r.op_name()),
                            "{reason}"
                        )
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    // --- operations that act on the caller's own objects only ---

    #[test]
    fn deletes_lists_and_pings_are_allowed_to_admitted_peers() {
        let full = ledger(&[entry(BOB, "main", "v1", ObjectKind::Tap, 0)], &[(BOB, 0)]);
        for r in [
            Request::Ping,
            Request::ListOwned,
            Request::TeardownVms { vms: vec![] },
            Request::TeardownVms { vms: vec![vm("v1"), vm("v2")] },
        ] {
            assert!(decide(&alice(), r, &full).is_allow());
        }
    }

    #[test]
    fn teardown_is_bounded() {
        let vms = vec![vm("v1"); MAX_TEARDOWN_VMS];
        assert!(decide(&alice(), Request::TeardownVms { vms }, &Ledger::default()).is_allow());
        let vms = vec![vm("v1"); MAX_TEARDOWN_VMS + 1];
        match refused(decide(&alice(), Request::TeardownVms { vms }, &Ledger::default())) {
            HelperError::InvalidRequest { reason } => assert!(reason.contains("at most 256"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    // --- leases ---

    #[test]
    fn a_lease_outside_a_shrunk_pool_is_refused() {
        let l = ledger(&[], &[(ALICE, 9)]);
        let (rule, reason) = denied_rule(decide(&alice(), tap_create("v1"), &l));
        assert_eq!(rule, "network.pool");
        assert!(reason.contains("lease 9") && reason.contains("no longer contains"), "{reason}");
    }

    // --- TAP create ---

    #[test]
    fn tap_create_is_idempotent_even_at_the_limit() {
        let l = ledger(
            &[
                entry(ALICE, "main", "v1", ObjectKind::Tap, 0),
                entry(ALICE, "main", "v2", ObjectKind::Tap, 1),
                entry(ALICE, "main", "v3", ObjectKind::Tap, 2),
            ],
            &[(ALICE, 0)],
        );
        assert!(decide(&alice(), tap_create("v2"), &l).is_allow());
        assert_eq!(
            refused(decide(&alice(), tap_create("v4"), &l)),
            HelperError::QuotaExceeded { resource: "taps".into(), limit: 3 }
        );
    }

    #[test]
    fn tap_quota_counts_every_install_and_uses_the_per_user_override() {
        let l = ledger(
            &[entry(ALICE, "a", "v1", ObjectKind::Tap, 0), entry(ALICE, "b", "v1", ObjectKind::Tap, 1)],
            &[(ALICE, 0)],
        );
        assert!(decide(&alice(), tap_create("v1"), &l).is_allow(), "third tap, new key in main");
        let l = ledger(&[entry(BOB, "other", "v1", ObjectKind::Tap, 0)], &[(BOB, 1)]);
        assert_eq!(
            refused(decide(&bob(), tap_create("v1"), &l)),
            HelperError::QuotaExceeded { resource: "taps".into(), limit: 1 },
            "bob's override is max_taps = 1"
        );
    }

    #[test]
    fn tap_for_a_new_vm_respects_max_vms_but_a_vm_with_loops_does_not_count_twice() {
        let loops = |v: &str| entry(ALICE, "main", v, ObjectKind::Loop(LoopRole::Base), 0);
        let l = ledger(&[loops("v1"), loops("v2"), loops("v3")], &[(ALICE, 0)]);
        assert!(decide(&alice(), tap_create("v2"), &l).is_allow());
        assert_eq!(
            refused(decide(&alice(), tap_create("v4"), &l)),
            HelperError::QuotaExceeded { resource: "vms".into(), limit: 3 }
        );
    }

    #[test]
    fn tap_needs_a_free_vm_subnet_in_the_lease() {
        let mut p = policy();
        p.quotas = Quotas { max_vms: 10, max_taps: 10, max_loops: 10, max_vcpus: 32, max_memory_mib: 32768 };
        let taps: Vec<_> =
            (0..4).map(|slot| entry(ALICE, "main", &format!("v{slot}"), ObjectKind::Tap, slot)).collect();
        let l = ledger(&taps, &[(ALICE, 0)]);
        assert_eq!(
            refused(auth(&p, &alice(), &tap_create("v9"), &l)),
            HelperError::QuotaExceeded { resource: "vm subnets".into(), limit: 4 }
        );
        let l = ledger(&taps[..3], &[(ALICE, 0)]);
        assert!(auth(&p, &alice(), &tap_create("v9"), &l).is_allow());
    }

    #[test]
    fn first_tap_of_a_user_needs_a_free_lease() {
        let full = ledger(&[], &[(BOB, 0), (CAROL, 1), (1005, 2), (7, 3)]);
        let (rule, _) = denied_rule(decide(&alice(), tap_create("v1"), &full));
        assert_eq!(rule, "network.pool");
        let room = ledger(&[], &[(BOB, 0), (CAROL, 1), (1005, 2)]);
        assert!(decide(&alice(), tap_create("v1"), &room).is_allow());
    }

    // --- NAT ---

    #[test]
    fn nat_up_needs_the_callers_own_tap_of_this_install() {
        let mine = ledger(&[entry(ALICE, "main", "v1", ObjectKind::Tap, 0)], &[(ALICE, 0)]);
        assert!(decide(&alice(), Request::NatUp { vm: vm("v1") }, &mine).is_allow());
        let with_nat = ledger(
            &[entry(ALICE, "main", "v1", ObjectKind::Tap, 0), entry(ALICE, "main", "v1", ObjectKind::Nat, 0)],
            &[(ALICE, 0)],
        );
        assert!(decide(&alice(), Request::NatUp { vm: vm("v1") }, &with_nat).is_allow(), "idempotent");
        let cases = [
            ledger(&[], &[]),
            ledger(&[entry(BOB, "main", "v1", ObjectKind::Tap, 0)], &[(BOB, 0)]),
            ledger(&[entry(ALICE, "other", "v1", ObjectKind::Tap, 0)], &[(ALICE, 0)]),
            ledger(&[entry(ALICE, "main", "v2", ObjectKind::Tap, 0)], &[(ALICE, 0)]),
            ledger(&[entry(ALICE, "main", "v1", ObjectKind::Nat, 0)], &[(ALICE, 0)]),
        ];
        for l in cases {
            assert_eq!(
                refused(decide(&alice(), Request::NatUp { vm: vm("v1") }, &l)),
                HelperError::NotFound { what: "no tap for vm v1 of this install: create it first".into() }
            );
        }
    }

    // --- loops ---

    #[test]
    fn loop_backing_file_must_be_the_callers_regular_local_readable_file() {
        let l = Ledger::default();
        let with = |f: BackingFile, read_only: bool| {
            let r = Request::LoopAttach { vm: vm("v1"), role: LoopRole::Cow, read_only };
            authorize(
                &policy(),
                &alice(),
                &r,
                &l,
                &Observed { fds: 1, backing: Some(Ok(f)), device_mapper: true, ..Observed::default() },
            )
        };
        let ok = file(ALICE);
        let grant = |d: Decision| match d {
            Decision::Allow(Grant::Loop { read_only, backing, .. }) => (read_only, backing),
            other => panic!("{other:?}"),
        };
        assert_eq!(grant(with(ok.clone(), false)), (false, ok.id));
        assert!(grant(with(ok.clone(), true)).0);
        assert!(grant(with(BackingFile { access: FdAccess::ReadOnly, ..ok.clone() }, false)).0);
        for access in [FdAccess::WriteOnly, FdAccess::Path] {
            let e = refused(with(BackingFile { access, ..ok.clone() }, true));
            assert!(
                matches!(&e, HelperError::InvalidRequest { reason } if reason.contains("for reading")),
                "{e}"
            );
        }
        let e = refused(with(BackingFile { regular: false, ..ok.clone() }, true));
        assert!(
            matches!(&e, HelperError::InvalidRequest { reason } if reason.contains("regular file")),
            "{e}"
        );
        let (rule, reason) = denied_rule(with(BackingFile { uid: BOB, ..ok.clone() }, true));
        assert_eq!(rule, "loop.backing_owner");
        assert!(reason.contains("uid 1001"), "{reason}");
        for fs in ["fuse.sshfs", "nfs4", "unknown"] {
            let e = refused(with(BackingFile { fs_type: fs.into(), ..ok.clone() }, true));
            assert!(
                matches!(&e, HelperError::InvalidRequest { reason } if reason.contains("ext4, xfs")),
                "{e}"
            );
        }
        // An inspection that failed is the answer, after access and the handshake.
        let failed = HelperError::invalid("could not be inspected");
        let r = Request::LoopAttach { vm: vm("v1"), role: LoopRole::Cow, read_only: true };
        let o = Observed {
            fds: 1,
            backing: Some(Err(failed.clone())),
            device_mapper: true,
            ..Observed::default()
        };
        assert_eq!(refused(authorize(&policy(), &alice(), &r, &l, &o)), failed);
        assert_eq!(denied_rule(authorize(&policy(), &carol(), &r, &l, &o)).0, "access");
        // Descriptors are counted for every request.
        let e = refused(authorize(
            &policy(),
            &alice(),
            &Request::Ping,
            &l,
            &Observed { fds: 1, backing: None, device_mapper: true, ..Observed::default() },
        ));
        assert!(matches!(&e, HelperError::InvalidRequest { reason } if reason.contains("1 arrived")), "{e}");
    }

    #[test]
    fn loop_attach_twice_for_one_role_conflicts() {
        let l = ledger(&[entry(ALICE, "main", "v1", ObjectKind::Loop(LoopRole::Base), 0)], &[]);
        assert_eq!(
            refused(decide(&alice(), loop_attach("v1", LoopRole::Base), &l)),
            HelperError::Conflict {
                what: "loop device for vm v1 role base already attached; tear the vm down first".into()
            }
        );
        assert!(decide(&alice(), loop_attach("v1", LoopRole::Cow), &l).is_allow());
        let other_install = ledger(&[entry(ALICE, "other", "v1", ObjectKind::Loop(LoopRole::Base), 0)], &[]);
        assert!(decide(&alice(), loop_attach("v1", LoopRole::Base), &other_install).is_allow());
    }

    #[test]
    fn loop_attach_respects_max_loops_and_max_vms() {
        let l = ledger(
            &[
                entry(ALICE, "main", "v1", ObjectKind::Loop(LoopRole::Base), 0),
                entry(ALICE, "main", "v1", ObjectKind::Loop(LoopRole::Cow), 0),
                entry(ALICE, "main", "v2", ObjectKind::Loop(LoopRole::Base), 0),
                entry(ALICE, "main", "v2", ObjectKind::Loop(LoopRole::Cow), 0),
            ],
            &[],
        );
        assert_eq!(
            refused(decide(&alice(), loop_attach("v3", LoopRole::Base), &l)),
            HelperError::QuotaExceeded { resource: "loops".into(), limit: 4 }
        );
        let l = ledger(
            &[
                entry(ALICE, "main", "v1", ObjectKind::Tap, 0),
                entry(ALICE, "main", "v2", ObjectKind::Tap, 1),
                entry(ALICE, "x", "v1", ObjectKind::Tap, 2),
            ],
            &[(ALICE, 0)],
        );
        assert!(decide(&alice(), loop_attach("v2", LoopRole::Base), &l).is_allow());
        assert_eq!(
            refused(decide(&alice(), loop_attach("v3", LoopRole::Base), &l)),
            HelperError::QuotaExceeded { resource: "vms".into(), limit: 3 }
        );
    }

    // --- without device-mapper ---

    #[test]
    fn without_device_mapper_no_loop_is_attached_and_no_dm_made() {
        let l = ledger(
            &[
                entry(ALICE, "main", "v1", ObjectKind::Loop(LoopRole::Base), 0),
                entry(ALICE, "main", "v1", ObjectKind::Loop(LoopRole::Cow), 0),
            ],
            &[],
        );
        for r in [loop_attach("v2", LoopRole::Base), Request::DmCreate { vm: vm("v1") }] {
            let mut o = observed(&alice(), &r);
            o.device_mapper = false;
            match refused(authorize(&policy(), &alice(), &r, &l, &o)) {
                HelperError::Conflict { what } => {
                    assert!(what.contains("no device-mapper") && what.contains("use file storage"), "{what}")
                }
                other => panic!("{other:?}"),
            }
            // Access and the handshake still come first.
            assert_eq!(denied_rule(authorize(&policy(), &carol(), &r, &l, &o)).0, "access");
        }
        // Even a file that would be refused is refused for the missing device-mapper.
        let r = loop_attach("v2", LoopRole::Base);
        let o =
            Observed { fds: 1, backing: Some(Ok(file(BOB))), device_mapper: false, ..Observed::default() };
        assert!(matches!(refused(authorize(&policy(), &alice(), &r, &l, &o)), HelperError::Conflict { .. }));
    }

    // --- dm create ---

    fn dm(v: &str) -> Request {
        Request::DmCreate { vm: vm(v) }
    }

    fn vm_with_loops(v: &str) -> Vec<LedgerEntry> {
        vec![
            entry(ALICE, "main", v, ObjectKind::Loop(LoopRole::Base), 0),
            entry(ALICE, "main", v, ObjectKind::Loop(LoopRole::Cow), 0),
        ]
    }

    #[test]
    fn dm_create_is_granted_over_the_vms_own_loops() {
        let l = ledger(&vm_with_loops("v1"), &[]);
        let Decision::Allow(Grant::Dm(g)) = decide(&alice(), dm("v1"), &l) else { panic!() };
        let DmGrant { existing, base, cow, sectors } = *g;
        assert_eq!(existing, None);
        assert!(base.is(ALICE, &install("main"), &vm("v1"), ObjectKind::Loop(LoopRole::Base)));
        assert!(cow.is(ALICE, &install("main"), &vm("v1"), ObjectKind::Loop(LoopRole::Cow)));
        assert_eq!(sectors, BASE / 512);
        // The VM's target, once made, is answered again, even at every quota.
        let mut entries = vm_with_loops("v1");
        entries.push(entry(ALICE, "main", "v1", ObjectKind::Dm, 0));
        let l = ledger(&entries, &[]);
        let Decision::Allow(Grant::Dm(g)) = decide(&alice(), dm("v1"), &l) else { panic!() };
        let e = g.existing.expect("answered again");
        assert!(e.is(ALICE, &install("main"), &vm("v1"), ObjectKind::Dm));
        let mut tight = policy();
        tight.quotas = Quotas { max_vms: 1, max_taps: 1, max_loops: 2, max_vcpus: 32, max_memory_mib: 32768 };
        assert!(auth(&tight, &alice(), &dm("v1"), &l).is_allow());
    }

    #[test]
    fn dm_create_needs_both_loops_settled_and_the_right_way_round() {
        let l = ledger(&vm_with_loops("v1")[..1], &[]);
        match refused(decide(&alice(), dm("v1"), &l)) {
            HelperError::NotFound { what } => {
                assert!(
                    what.contains("no cow loop device for vm v1") && what.contains("read-write"),
                    "{what}"
                )
            }
            other => panic!("{other:?}"),
        }
        let l = ledger(&vm_with_loops("v1")[1..], &[]);
        assert!(matches!(refused(decide(&alice(), dm("v1"), &l)), HelperError::NotFound { .. }));
        // Another install's or another user's loops are not this VM's.
        let mut other = vm_with_loops("v1");
        other[1].install = install("other");
        assert!(matches!(
            refused(decide(&alice(), dm("v1"), &ledger(&other, &[]))),
            HelperError::NotFound { .. }
        ));
        // A base attached read-write, a copy-on-write file attached read-only.
        for (at, read_only) in [(0, false), (1, true)] {
            let mut entries = vm_with_loops("v1");
            if let Object::Loop { read_only: ro, .. } = &mut entries[at].object {
                *ro = read_only;
            }
            match refused(decide(&alice(), dm("v1"), &ledger(&entries, &[]))) {
                HelperError::Conflict { what } => {
                    assert!(what.contains("tear the vm down and attach it"), "{what}")
                }
                other => panic!("{other:?}"),
            }
        }
        // A loop device that never settled or is being released.
        for state in [EntryState::Intent, EntryState::Released] {
            let mut entries = vm_with_loops("v1");
            entries[0].state = state;
            assert!(matches!(
                refused(decide(&alice(), dm("v1"), &ledger(&entries, &[]))),
                HelperError::Conflict { .. }
            ));
        }
    }

    #[test]
    fn dm_create_needs_a_copy_on_write_file_that_can_never_fill_up() {
        let with_sizes = |base: u64, cow: u64| {
            let mut entries = vm_with_loops("v1");
            for (e, size) in entries.iter_mut().zip([base, cow]) {
                if let Object::Loop { size: s, .. } = &mut e.object {
                    *s = size;
                }
            }
            decide(&alice(), dm("v1"), &ledger(&entries, &[]))
        };
        let base = 10 << 20;
        assert!(with_sizes(base, min_cow_bytes(base)).is_allow());
        match refused(with_sizes(base, min_cow_bytes(base) - 1)) {
            HelperError::InvalidRequest { reason } => assert!(
                reason.contains(&format!("needs at least {}", min_cow_bytes(base)))
                    && reason.contains("make the file that large"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        // A base too small to map (e.g. recorded by an earlier release, without sizes).
        match refused(with_sizes(511, 1 << 20)) {
            HelperError::InvalidRequest { reason } => assert!(reason.contains("less than one"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let sectors = |d: Decision| match d {
            Decision::Allow(Grant::Dm(g)) => g.sectors,
            other => panic!("{other:?}"),
        };
        assert_eq!(sectors(with_sizes(1000, 1 << 20)), 1, "a partial sector is not mapped");
    }

    #[test]
    fn a_dm_still_being_released_is_not_answered_again() {
        let mut entries = vm_with_loops("v1");
        let mut dm_entry = entry(ALICE, "main", "v1", ObjectKind::Dm, 0);
        dm_entry.state = EntryState::Released;
        entries.push(dm_entry);
        match refused(decide(&alice(), dm("v1"), &ledger(&entries, &[]))) {
            HelperError::Conflict { what } => assert!(what.contains("still open"), "{what}"),
            other => panic!("{other:?}"),
        }
    }

    // --- cross-user isolation, by example ---

    #[test]
    fn another_users_objects_never_help_or_hurt() {
        // Bob owns a TAP, NAT and loops for alice's VM id in alice's install id.
        let bobs = ledger(
            &[
                entry(BOB, "main", "v1", ObjectKind::Tap, 0),
                entry(BOB, "main", "v1", ObjectKind::Nat, 0),
                entry(BOB, "main", "v1", ObjectKind::Loop(LoopRole::Base), 0),
                entry(BOB, "main", "v2", ObjectKind::Loop(LoopRole::Cow), 0),
                entry(BOB, "main", "v3", ObjectKind::Loop(LoopRole::Cow), 0),
                entry(BOB, "main", "v4", ObjectKind::Loop(LoopRole::Cow), 0),
            ],
            &[(BOB, 0)],
        );
        assert!(matches!(
            refused(decide(&alice(), Request::NatUp { vm: vm("v1") }, &bobs)),
            HelperError::NotFound { .. }
        ));
        // Bob's loops neither conflict with alice's attach nor use up her quota.
        assert!(decide(&alice(), loop_attach("v1", LoopRole::Base), &bobs).is_allow());
        // Bob's TAP for v1 does not make alice's TapCreate "already there": her quotas apply.
        assert!(decide(&alice(), tap_create("v1"), &bobs).is_allow());
    }

    // --- jails ---

    fn jail_grant(d: Decision) -> JailGrant {
        match d {
            Decision::Allow(Grant::Jail(g)) => *g,
            other => panic!("{other:?}"),
        }
    }

    fn jail(uid: u32, v: &str, jail_uid: u32, vcpus: u8, mem_mib: u32) -> LedgerEntry {
        let object = Object::Jail {
            id: format!("bg-{uid}-{v}"),
            jail_uid,
            shape: VmShape { vcpus, mem_mib },
            pid: Some(1),
        };
        LedgerEntry::new(uid, install("main"), vm(v), object)
    }

    #[test]
    fn jail_launch_needs_a_jailer_section_and_a_running_launcher() {
        let mut no_jailer = policy();
        no_jailer.jailer = None;
        let r = jail_launch("v1", 1, 256);
        let (rule, reason) = denied_rule(auth(&no_jailer, &alice(), &r, &Ledger::default()));
        assert_eq!(rule, "jailer");
        assert!(reason.contains("add [jailer]"), "{reason}");
        let mut o = observed(&alice(), &r);
        o.jails = false;
        let e = refused(authorize(&policy(), &alice(), &r, &Ledger::default(), &o));
        assert!(matches!(&e, HelperError::Conflict { what } if what.contains("launcher")), "{e:?}");
    }

    #[test]
    fn jail_launch_takes_the_lowest_free_uid_of_the_host_the_tap_and_the_users_cgroup() {
        let l = ledger(
            &[
                jail(BOB, "v1", JAIL_FIRST, 1, 256),
                jail(CAROL, "v1", JAIL_FIRST + 2, 1, 256),
                entry(ALICE, "main", "v1", ObjectKind::Tap, 0),
            ],
            &[(ALICE, 0)],
        );
        let g = jail_grant(decide(&alice(), jail_launch("v1", 2, 1024), &l));
        assert_eq!(g.jail_uid, JAIL_FIRST + 1, "bob's and carol's uids are never reused");
        assert_eq!(g.tap.as_deref(), Some("bg3e80"));
        assert_eq!(g.user_cgroup, format!("banger/u{ALICE}"));
        assert_eq!((g.user_vcpus, g.user_mem_mib), (4, 3072));
        let g = jail_grant(decide(&alice(), jail_launch("v2", 1, 256), &l));
        assert_eq!(g.tap, None, "a vm without a tap");
    }

    #[test]
    fn jail_shape_must_be_sane() {
        for (vcpus, mem) in
            [(0, 256), (banger_protocol::MAX_VCPUS + 1, 256), (1, banger_protocol::MIN_MEM_MIB - 1)]
        {
            let e = refused(decide(&alice(), jail_launch("v1", vcpus, mem), &Ledger::default()));
            assert!(matches!(e, HelperError::InvalidRequest { .. }), "{vcpus} {mem}: {e:?}");
        }
    }

    #[test]
    fn a_second_jail_for_one_vm_conflicts() {
        let l = ledger(&[jail(ALICE, "v1", JAIL_FIRST, 1, 256)], &[]);
        let e = refused(decide(&alice(), jail_launch("v1", 1, 256), &l));
        assert!(matches!(e, HelperError::Conflict { .. }), "{e:?}");
        assert!(decide(&alice(), jail_launch("v2", 1, 256), &l).is_allow());
    }

    #[test]
    fn jail_totals_and_vm_count_are_quotas() {
        // max_vcpus 4, max_memory_mib 3072, max_vms 3.
        let l = ledger(&[jail(ALICE, "v1", JAIL_FIRST, 3, 2048)], &[]);
        let e = refused(decide(&alice(), jail_launch("v2", 2, 256), &l));
        assert_eq!(e, HelperError::QuotaExceeded { resource: "vcpus".into(), limit: 4 });
        let e = refused(decide(&alice(), jail_launch("v2", 1, 1025), &l));
        assert_eq!(e, HelperError::QuotaExceeded { resource: "memory MiB".into(), limit: 3072 });
        assert!(decide(&alice(), jail_launch("v2", 1, 1024), &l).is_allow(), "exactly at the limits");
        let full = ledger(
            &[
                jail(ALICE, "v1", JAIL_FIRST, 1, 256),
                entry(ALICE, "main", "v2", ObjectKind::Tap, 1),
                entry(ALICE, "main", "v3", ObjectKind::Tap, 2),
            ],
            &[(ALICE, 0)],
        );
        let e = refused(decide(&alice(), jail_launch("v4", 1, 256), &full));
        assert_eq!(e, HelperError::QuotaExceeded { resource: "vms".into(), limit: 3 });
        assert!(decide(&alice(), jail_launch("v3", 1, 256), &full).is_allow(), "v3 counts already");
        // Bob's jails never use alice's totals.
        let bobs = ledger(&[jail(BOB, "v1", JAIL_FIRST, 4, 3072)], &[]);
        assert!(decide(&alice(), jail_launch("v1", 4, 3072), &bobs).is_allow());
    }

    #[test]
    fn no_free_uid_is_the_ranges_refusal() {
        let mut p = policy();
        p.jailer.as_mut().unwrap().uids = (JAIL_FIRST, JAIL_FIRST);
        let l = ledger(&[jail(BOB, "v1", JAIL_FIRST, 1, 256)], &[]);
        let (rule, reason) = denied_rule(auth(&p, &alice(), &jail_launch("v1", 1, 256), &l));
        assert_eq!(rule, "jailer.uid_range");
        assert!(reason.contains("widen"), "{reason}");
    }

    #[test]
    fn jail_descriptors_are_checked_as_observed() {
        let files = JailFiles { initrd: true, work: true };
        let r = Request::JailLaunch { vm: vm("v1"), shape: VmShape { vcpus: 1, mem_mib: 256 }, files };
        let with = |i: usize, f: Result<BackingFile, HelperError>, l: &Ledger| {
            let mut o = observed(&alice(), &r);
            o.jail_files.as_mut().unwrap()[i] = f;
            authorize(&policy(), &alice(), &r, l, &o)
        };
        let none = Ledger::default();
        assert!(auth(&policy(), &alice(), &r, &none).is_allow());
        // Kernel and initrd: regular files opened for reading, whoever owns them.
        for i in [0, 1] {
            let e = refused(with(i, Ok(BackingFile { regular: false, ..file(0) }), &none));
            assert!(matches!(e, HelperError::InvalidRequest { .. }), "{e:?}");
            let e = refused(with(i, Ok(BackingFile { access: FdAccess::Path, ..file(0) }), &none));
            assert!(matches!(e, HelperError::InvalidRequest { .. }), "{e:?}");
        }
        // On a local filesystem, the kernel and initrd at most MAX_BOOT_FILE_BYTES.
        for i in [0, 1, 2, 3] {
            let owner = if i < 2 { 0 } else { ALICE };
            for fs in ["fuse.sshfs", "nfs4", "unknown"] {
                let e = refused(with(i, Ok(BackingFile { fs_type: fs.into(), ..file(owner) }), &none));
                let text = e.to_string();
                assert!(text.contains("jails take files only from ext2"), "{fs}: {text}");
            }
        }
        for i in [0, 1] {
            let at_most = BackingFile { size: MAX_BOOT_FILE_BYTES, ..file(0) };
            assert!(with(i, Ok(at_most), &none).is_allow());
            let e = refused(with(i, Ok(BackingFile { size: MAX_BOOT_FILE_BYTES + 1, ..file(0) }), &none));
            assert!(e.to_string().contains("over the 512 MiB a jail takes"), "{e}");
        }
        // Drives: the caller's regular files, read-write.
        for i in [2, 3] {
            let (rule, _) = denied_rule(with(i, Ok(file(BOB)), &none));
            assert_eq!(rule, "jail.drive_owner");
            let e = refused(with(i, Ok(BackingFile { access: FdAccess::ReadOnly, ..file(ALICE) }), &none));
            assert!(matches!(e, HelperError::InvalidRequest { .. }), "{e:?}");
        }
        // Or the block device of this vm's settled dm target.
        let dev = crate::DevNum { major: 254, minor: 7 };
        let block = BackingFile { regular: false, uid: 0, rdev: Some(dev), ..file(0) };
        let (rule, _) = denied_rule(with(2, Ok(block.clone()), &none));
        assert_eq!(rule, "jail.drive_device");
        let mine = ledger(&[entry(ALICE, "main", "v1", ObjectKind::Dm, 7)], &[]);
        assert!(with(2, Ok(block.clone()), &mine).is_allow());
        let bobs = ledger(&[entry(BOB, "main", "v1", ObjectKind::Dm, 7)], &[]);
        assert_eq!(denied_rule(with(2, Ok(block.clone()), &bobs)).0, "jail.drive_device");
        let other_vm = ledger(&[entry(ALICE, "main", "v2", ObjectKind::Dm, 7)], &[]);
        assert_eq!(denied_rule(with(2, Ok(block.clone()), &other_vm)).0, "jail.drive_device");
        let mut released = mine.clone();
        released.entries[0].state = EntryState::Released;
        assert_eq!(denied_rule(with(2, Ok(block), &released)).0, "jail.drive_device");
        // An inspection that failed is the refusal.
        let failed = HelperError::invalid("could not inspect");
        assert_eq!(refused(with(3, Err(failed.clone()), &none)), failed);
    }

    #[test]
    fn jail_kill_grants_only_the_callers_own_jail_of_this_install() {
        let mut other_install = jail(ALICE, "v1", JAIL_FIRST, 1, 256);
        other_install.install = install("other");
        let l = ledger(&[jail(BOB, "v1", JAIL_FIRST + 1, 1, 256), other_install], &[]);
        let kill = Request::JailKill { vm: vm("v1") };
        assert_eq!(decide(&alice(), kill.clone(), &l), Decision::Allow(Grant::JailKill(None)));
        let mine = ledger(&[jail(ALICE, "v1", JAIL_FIRST, 1, 256)], &[]);
        match decide(&alice(), kill, &mine) {
            Decision::Allow(Grant::JailKill(Some(e))) => assert_eq!(e, mine.entries[0]),
            other => panic!("{other:?}"),
        }
    }

    // --- properties ---

    const UIDS: [(u32, Option<&str>); 5] =
        [(ALICE, Some("alice")), (BOB, Some("bob")), (CAROL, Some("carol")), (1005, None), (0, Some("root"))];
    const INSTALLS: [&str; 2] = ["main", "other"];
    const VMS: [&str; 5] = ["v0", "v1", "v2", "v3", "v4"];

    fn any_kind() -> impl Strategy<Value = ObjectKind> {
        prop_oneof![
            Just(ObjectKind::Tap),
            Just(ObjectKind::Nat),
            proptest::sample::select(LoopRole::ALL.to_vec()).prop_map(ObjectKind::Loop),
            Just(ObjectKind::Dm),
            Just(ObjectKind::Jail),
        ]
    }

    fn any_entry(uids: Vec<u32>) -> impl Strategy<Value = LedgerEntry> {
        (proptest::sample::select(uids), 0..INSTALLS.len(), 0..VMS.len(), any_kind(), 0u32..5)
            .prop_map(|(uid, i, v, kind, slot)| entry(uid, INSTALLS[i], VMS[v], kind, slot))
    }

    fn any_ledger() -> impl Strategy<Value = Ledger> {
        let uids: Vec<u32> = UIDS.iter().map(|(u, _)| *u).collect();
        (
            proptest::collection::vec(any_entry(uids.clone()), 0..24),
            proptest::collection::vec(proptest::option::of(0u32..6), UIDS.len()),
        )
            .prop_map(move |(entries, lease_choice)| {
                let mut l = ledger(&entries, &[]);
                for (uid, index) in uids.iter().zip(lease_choice) {
                    if let Some(index) = index
                        && !l.leases.values().any(|&taken| taken == index)
                    {
                        l.leases.insert(*uid, index);
                    }
                }
                l
            })
    }

    fn any_vm() -> impl Strategy<Value = VmId> {
        proptest::sample::select(VMS.to_vec()).prop_map(vm)
    }

    fn any_request() -> impl Strategy<Value = Request> {
        let role = proptest::sample::select(LoopRole::ALL.to_vec());
        prop_oneof![
            proptest::sample::select(INSTALLS.to_vec())
                .prop_map(|i| Request::Hello { version: PROTOCOL_VERSION, install_id: install(i) }),
            Just(Request::Ping),
            Just(Request::ListOwned),
            any_vm().prop_map(|vm| Request::TapCreate { vm }),
            any_vm().prop_map(|vm| Request::NatUp { vm }),
            (any_vm(), role, any::<bool>()).prop_map(|(vm, role, read_only)| Request::LoopAttach {
                vm,
                role,
                read_only
            }),
            any_vm().prop_map(|vm| Request::DmCreate { vm }),
            (
                any_vm(),
                0u8..4,
                prop_oneof![Just(64u32), Just(512), Just(1024), Just(2048)],
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(vm, vcpus, mem_mib, initrd, work)| Request::JailLaunch {
                    vm,
                    shape: VmShape { vcpus, mem_mib },
                    files: JailFiles { initrd, work },
                }),
            any_vm().prop_map(|vm| Request::JailKill { vm }),
            proptest::collection::vec(any_vm(), 0..4).prop_map(|vms| Request::TeardownVms { vms }),
            Just(Request::TeardownVms { vms: vec![vm("v0"); MAX_TEARDOWN_VMS + 1] }),
        ]
    }

    fn any_peer() -> impl Strategy<Value = Peer> {
        (0..UIDS.len(), proptest::option::of(proptest::sample::select(INSTALLS.to_vec())), any::<bool>())
            .prop_map(|(i, inst, in_kvm)| {
                let (uid, user) = UIDS[i];
                let mut p = peer(uid, user);
                p.install = inst.map(install);
                if in_kvm {
                    p.groups.push(KVM_GID);
                    p.group_names.push("kvm".into());
                }
                p
            })
    }

    /// The decision with the jail uid of a jail grant blanked out.
    fn any_jail_uid(d: Decision) -> Decision {
        match d {
            Decision::Allow(Grant::Jail(mut g)) => {
                g.jail_uid = 0;
                Decision::Allow(Grant::Jail(g))
            }
            d => d,
        }
    }

    /// The ledger with every entry of other uids removed (leases kept: the pool is shared).
    fn only_of(l: &Ledger, uid: u32) -> Ledger {
        Ledger {
            leases: l.leases.clone(),
            entries: l.entries_of(uid).cloned().collect(),
            ..Ledger::default()
        }
    }

    /// What the helper would record after an allowed request (a model of its bookkeeping).
    fn apply(p: &Peer, r: &Request, grant: Grant, l: &mut Ledger) {
        let (uid, Some(inst)) = (p.uid, p.install.clone()) else { return };
        match (r, grant) {
            (Request::TapCreate { vm }, Grant::TapNew { lease, new_lease, slot }) => {
                assert_eq!(new_lease, l.lease_of(uid).is_none());
                l.leases.insert(uid, lease);
                assert!(policy().network.vm_subnet(lease, slot).is_some());
                l.insert(entry(uid, inst.as_str(), vm.as_str(), ObjectKind::Tap, slot));
            }
            (Request::TapCreate { vm }, Grant::TapExisting(e)) => {
                assert!(e.is(uid, &inst, vm, ObjectKind::Tap));
            }
            (Request::NatUp { vm }, Grant::Nat { .. }) => {
                l.insert(entry(uid, inst.as_str(), vm.as_str(), ObjectKind::Nat, 0));
            }
            (Request::LoopAttach { vm, role, .. }, Grant::Loop { .. }) => {
                l.insert(entry(uid, inst.as_str(), vm.as_str(), ObjectKind::Loop(*role), 0));
            }
            (Request::DmCreate { vm }, Grant::Dm(g)) => {
                for half in [&g.base, &g.cow] {
                    assert_eq!((half.uid, &half.install, &half.vm), (uid, &inst, vm));
                }
                if g.existing.is_none() {
                    l.insert(entry(uid, inst.as_str(), vm.as_str(), ObjectKind::Dm, 0));
                }
            }
            (Request::JailLaunch { vm, shape, .. }, Grant::Jail(g)) => {
                assert!(!l.jail_uids().contains(&g.jail_uid), "jail uid {} handed out twice", g.jail_uid);
                let object = Object::Jail {
                    id: format!("bg-{uid}-{vm}"),
                    jail_uid: g.jail_uid,
                    shape: *shape,
                    pid: None,
                };
                l.insert(LedgerEntry::new(uid, inst.clone(), vm.clone(), object));
            }
            (Request::JailKill { vm }, Grant::JailKill(e)) => {
                if let Some(e) = e {
                    assert!(e.is(uid, &inst, vm, ObjectKind::Jail));
                }
                l.remove(uid, &inst, vm, ObjectKind::Jail);
            }
            (Request::TeardownVms { vms }, Grant::Proceed) => {
                l.entries.retain(|e| !(e.uid == uid && e.install == inst && vms.contains(&e.vm)))
            }
            (Request::Hello { .. } | Request::Ping | Request::ListOwned, Grant::Proceed) => {}
            (r, g) => panic!("{r:?} granted {g:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// (a) Other uids' objects never change a decision for uid A: A's decision on the full
        /// ledger equals its decision on the ledger holding only A's objects.
        /// The one exception is which uid of the jail range a new jail gets: jail uids are one
        /// pool for the host (the range is large enough here never to run out).
        #[test]
        fn objects_of_other_uids_never_matter(p in any_peer(), r in any_request(), l in any_ledger()) {
            let policy = policy();
            prop_assert_eq!(
                any_jail_uid(auth(&policy, &p, &r, &l)),
                any_jail_uid(auth(&policy, &p, &r, &only_of(&l, p.uid)))
            );
        }

        /// A jail launch never gets a uid outside the range or one that any jail, of anyone,
        /// holds.
        #[test]
        fn jail_uids_are_free_and_in_the_range(p in any_peer(), r in any_request(), l in any_ledger()) {
            if let Decision::Allow(Grant::Jail(g)) = auth(&policy(), &p, &r, &l) {
                prop_assert!((JAIL_FIRST..JAIL_FIRST + 100).contains(&g.jail_uid));
                prop_assert!(!l.jail_uids().contains(&g.jail_uid));
            }
        }

        /// (a) Adding other uids' objects and leases to a ledger where A already holds a lease
        /// never changes A's decision (a full ledger of B's never consumes A's quota).
        #[test]
        fn adding_foreign_objects_never_matters(
            p in any_peer(),
            r in any_request(),
            l in any_ledger(),
            extra in proptest::collection::vec(any_entry(vec![BOB, CAROL, 0, 1005, ALICE]), 0..40),
        ) {
            let policy = policy();
            let mut bigger = l.clone();
            for e in extra.into_iter().filter(|e| e.uid != p.uid) {
                bigger.insert(e);
            }
            if l.lease_of(p.uid).is_some() {
                for uid in [BOB, CAROL, 0, 1005, ALICE].into_iter().filter(|u| *u != p.uid) {
                    bigger.lease_or_assign(uid, policy.network.lease_count());
                }
            }
            prop_assert_eq!(any_jail_uid(auth(&policy, &p, &r, &l)), any_jail_uid(auth(&policy, &p, &r, &bigger)));
        }

        /// (a) An allowed request that uses an existing object uses one of the caller's own.
        #[test]
        fn allowed_nat_up_has_the_callers_own_tap(p in any_peer(), v in any_vm(), l in any_ledger()) {
            let r = Request::NatUp { vm: v.clone() };
            if auth(&policy(), &p, &r, &l).is_allow() {
                let inst = p.install.as_ref().expect("allowed after hello");
                let tap = l.find(p.uid, inst, &v, ObjectKind::Tap).expect("own tap");
                prop_assert_eq!(tap.uid, p.uid);
            }
        }

        /// (a) An allowed dm-create builds on the caller's own loop devices of that very VM.
        #[test]
        fn allowed_dm_create_uses_the_callers_own_loops(p in any_peer(), v in any_vm(), l in any_ledger()) {
            let r = Request::DmCreate { vm: v.clone() };
            if let Decision::Allow(Grant::Dm(g)) = auth(&policy(), &p, &r, &l) {
                let DmGrant { base, cow, existing, .. } = *g;
                let inst = p.install.as_ref().expect("allowed after hello");
                for e in [Some(&base), Some(&cow), existing.as_ref()].into_iter().flatten() {
                    prop_assert!(e.uid == p.uid && &e.install == inst && e.vm == v);
                }
            }
        }

        /// Without device-mapper no loop device is attached and no dm-snapshot made, whoever asks
        /// and whatever the ledger holds.
        #[test]
        fn without_device_mapper_loops_and_dms_are_always_refused(
            p in any_peer(), r in any_request(), l in any_ledger(),
        ) {
            let mut o = observed(&p, &r);
            o.device_mapper = false;
            if matches!(r, Request::LoopAttach { .. } | Request::DmCreate { .. }) {
                prop_assert!(!authorize(&policy(), &p, &r, &l, &o).is_allow());
            }
        }

        /// (b) A peer the access rules do not admit is refused, with rule `access`, whatever it
        /// asks and whatever the ledger holds.
        #[test]
        fn unadmitted_peers_are_always_refused(
            p in any_peer(), r in any_request(), l in any_ledger(),
        ) {
            let policy = policy();
            if policy.access.admits(&p).is_none() {
                match auth(&policy, &p, &r, &l) {
                    Decision::Refuse(HelperError::Denied { rule, .. }) => prop_assert_eq!(rule, "access"),
                    other => prop_assert!(false, "{:?}", other),
                }
            }
            let mut nobody = policy.clone();
            nobody.access.users.clear();
            nobody.access.groups.clear();
            prop_assert!(!auth(&nobody, &p, &r, &l).is_allow());
        }

        /// (c) The decision is a function of its inputs: the same on every call, on clones, and
        /// whatever the order of the ledger's entries.
        #[test]
        fn decisions_are_deterministic(p in any_peer(), r in any_request(), l in any_ledger()) {
            let policy = policy();
            let first = auth(&policy, &p, &r, &l);
            prop_assert_eq!(&first, &auth(&policy, &p, &r, &l));
            prop_assert_eq!(&first, &auth(&policy.clone(), &p.clone(), &r.clone(), &l.clone()));
            let mut reversed = l.clone();
            reversed.entries.reverse();
            prop_assert_eq!(&first, &auth(&policy, &p, &r, &reversed));
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Running any sequence of requests from several users through `authorize`, and recording
        /// what the allowed ones make, never takes anyone past their quotas, never gives two of a
        /// user's VMs one subnet, never gives two users one lease, and never leaves a lease
        /// outside the pool.
        #[test]
        fn allowed_sequences_keep_every_limit(
            steps in proptest::collection::vec((any_peer(), any_request()), 1..80),
        ) {
            let policy = policy();
            let mut l = Ledger::default();
            for (p, r) in &steps {
                if let Decision::Allow(grant) = auth(&policy, p, r, &l) {
                    apply(p, r, grant, &mut l);
                }
                for (uid, user) in UIDS {
                    let q = policy.quotas_for_uid(user, uid);
                    prop_assert!(l.count_taps(uid) <= q.max_taps);
                    prop_assert!(l.count_loops(uid) <= q.max_loops);
                    prop_assert!(l.count_vms(uid) <= q.max_vms);
                    let (vcpus, mem) = l.jail_totals(uid);
                    prop_assert!(vcpus <= q.max_vcpus && mem <= u64::from(q.max_memory_mib));
                    let mut slots: Vec<u32> = l.entries_of(uid).filter_map(|e| match e.object {
                        Object::Tap { slot, .. } => Some(slot),
                        _ => None,
                    }).collect();
                    let n = slots.len();
                    slots.sort_unstable();
                    slots.dedup();
                    prop_assert_eq!(slots.len(), n, "two TAPs of uid {} share a subnet", uid);
                    prop_assert!(slots.iter().all(|s| *s < policy.network.slots_per_lease()));
                    for e in l.entries_of(uid).filter(|e| e.kind() == ObjectKind::Dm) {
                        for role in LoopRole::ALL {
                            prop_assert!(
                                l.find(uid, &e.install, &e.vm, ObjectKind::Loop(role)).is_some(),
                                "a dm of uid {} without its {} loop", uid, role.as_str()
                            );
                        }
                    }
                }
                let mut leases: Vec<u32> = l.leases.values().copied().collect();
                let n = leases.len();
                leases.sort_unstable();
                leases.dedup();
                prop_assert_eq!(leases.len(), n, "two uids share a lease");
                let jails = l.entries.iter().filter(|e| e.kind() == ObjectKind::Jail).count();
                prop_assert_eq!(l.jail_uids().len(), jails, "two jails share a uid");
                prop_assert!(leases.iter().all(|i| *i < policy.network.lease_count()));
                let admitted: Vec<u32> = steps.iter()
                    .filter(|(p, _)| policy.access.admits(p).is_some())
                    .map(|(p, _)| p.uid)
                    .collect();
                prop_assert!(l.uids().iter().all(|u| admitted.contains(u)), "only admitted uids own objects");
            }
        }
    }
}
