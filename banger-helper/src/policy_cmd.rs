//! `banger-helper policy check` and `policy explain`: a policy file read against this host's
//! accounts and files.
//!
//! The policy crate is pure; whether a user or group it names exists, and which groups an account
//! is in, come from the account databases, behind the [`Accounts`] trait so tests can give their
//! own. Whether an account may connect is decided by `Access::admits` (through
//! [`banger_policy::explain_peer`]), the same check the helper makes when it connects.
//!
//! What `[jailer]` needs from the host ([`check_host`]) comes through [`HostFacts`]: both
//! binaries root's and writable by nobody else, Firecracker statically linked (no `PT_INTERP`: the
//! jail has no dynamic loader), the chroot base an existing directory of root's that others cannot
//! write, and no uid of the range used by an account (`/etc/passwd`), a group (`/etc/group`) or a
//! subordinate id range (`/etc/subuid`, `/etc/subgid`): a jail's uid must give its VMM nobody
//! else's files. A failure makes `policy check` fail and the helper refuse to start.

use std::path::Path;

use banger_policy::{Peer, Policy};
use nix::unistd::{Group, Uid, User};

/// What this host's account databases say.
pub trait Accounts {
    /// The account `name` (a user name, or a decimal uid): its uid, name and groups (gid and name,
    /// primary included), or `None` if there is no such account.
    fn user(&self, name: &str) -> Option<Account>;
    /// Whether the group `name` (a group name) exists.
    fn group_exists(&self, name: &str) -> bool;
}

/// One account as [`Accounts`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// Every group it is in, primary included: gid and name (when it has one).
    pub groups: Vec<(u32, Option<String>)>,
}

impl Account {
    /// The account as the helper would see it connect.
    pub fn peer(&self) -> Peer {
        Peer {
            uid: self.uid,
            gid: self.gid,
            pid: 0,
            user: self.name.clone(),
            groups: self.groups.iter().map(|(gid, _)| *gid).collect(),
            group_names: self.groups.iter().filter_map(|(_, name)| name.clone()).collect(),
            install: None,
        }
    }
}

/// The host's account databases (`getpwnam`, `getgrouplist`, `getgrnam`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemAccounts;

impl Accounts for SystemAccounts {
    fn user(&self, name: &str) -> Option<Account> {
        let user = match name.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
            Err(_) => User::from_name(name).ok().flatten(),
        };
        let Some(user) = user else {
            // A decimal uid without a passwd entry can still connect: no name, no groups.
            return name.parse::<u32>().ok().map(|uid| Account { uid, gid: uid, name: None, groups: vec![] });
        };
        let cname = std::ffi::CString::new(user.name.clone()).ok()?;
        let gids = nix::unistd::getgrouplist(&cname, user.gid).unwrap_or_else(|_| vec![user.gid]);
        let groups = gids
            .into_iter()
            .map(|gid| (gid.as_raw(), Group::from_gid(gid).ok().flatten().map(|g| g.name)))
            .collect();
        Some(Account { uid: user.uid.as_raw(), gid: user.gid.as_raw(), name: Some(user.name), groups })
    }

    fn group_exists(&self, name: &str) -> bool {
        Group::from_name(name).ok().flatten().is_some()
    }
}

/// What `policy check` warns about in a valid policy: nobody may connect, or a user or group it
/// names does not exist here (an entry written as a decimal id is always taken as it is).
pub fn check_warnings(policy: &Policy, accounts: &impl Accounts) -> Vec<String> {
    let access = &policy.access;
    let mut warnings = Vec::new();
    if access.users.is_empty() && access.groups.is_empty() {
        warnings.push(
            "nobody may connect: access.users and access.groups are both empty; add users or a group \
             (e.g. groups = [\"banger\"]) under [access]"
                .to_owned(),
        );
    }
    for user in access.users.iter().filter(|u| !banger_policy::is_account_id(u)) {
        if accounts.user(user).is_none() {
            warnings.push(format!(
                "access.users names {user}, but there is no such user here: create it, or fix the name"
            ));
        }
    }
    for group in access.groups.iter().filter(|g| !banger_policy::is_account_id(g)) {
        if !accounts.group_exists(group) {
            warnings.push(format!(
                "access.groups names {group}, but there is no such group here: create it (groupadd --system {group}), or fix the name"
            ));
        }
    }
    let socket_group = &access.socket_group;
    if !banger_policy::is_account_id(socket_group) && !accounts.group_exists(socket_group) {
        warnings.push(format!(
            "access.socket_group is {socket_group}, but there is no such group here, so the helper will not start: create it (groupadd --system {socket_group})"
        ));
    }
    for user in policy.user_quotas.keys().filter(|u| !banger_policy::is_account_id(u)) {
        if accounts.user(user).is_none() {
            warnings.push(format!(
                "quotas.users.{user} names a user that does not exist here: create it, or fix the name"
            ));
        }
    }
    warnings
}

/// A file as `stat` (following symlinks) sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileFacts {
    /// A regular file.
    pub regular: bool,
    /// A directory.
    pub dir: bool,
    /// Its owner.
    pub uid: u32,
    /// Its permission bits.
    pub mode: u32,
}

/// An id range of `/etc/subuid` or `/etc/subgid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubIdRange {
    /// `/etc/subuid` or `/etc/subgid`.
    pub file: &'static str,
    /// The user it belongs to.
    pub owner: String,
    /// Its first id.
    pub start: u32,
    /// How many ids.
    pub count: u32,
}

/// What [`check_host`] looks at on the host.
pub trait HostFacts {
    /// The file at `path`, or why it cannot be looked at.
    fn file(&self, path: &Path) -> Result<FileFacts, String>;
    /// Whether the ELF file at `path` asks for a program interpreter (is dynamically linked).
    fn has_interpreter(&self, path: &Path) -> Result<bool, String>;
    /// Every account of `/etc/passwd`: name and uid.
    fn users(&self) -> Vec<(String, u32)>;
    /// Every group of `/etc/group`: name and gid.
    fn groups(&self) -> Vec<(String, u32)>;
    /// Every range of `/etc/subuid` and `/etc/subgid`.
    fn subids(&self) -> Vec<SubIdRange>;
}

/// One host problem of `[jailer]`: the key and what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProblem {
    /// The policy key, e.g. `jailer.firecracker`.
    pub key: &'static str,
    /// What is wrong and what to do.
    pub reason: String,
}

/// Why the host does not fit the policy's `[jailer]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the host does not fit the policy's [jailer]: {}", list(.0))]
pub struct HostCheckError(pub Vec<HostProblem>);

fn list(problems: &[HostProblem]) -> String {
    problems.iter().map(|p| format!("{}: {}", p.key, p.reason)).collect::<Vec<_>>().join("; ")
}

/// Checks the host against the policy's `[jailer]` (nothing to check without one).
pub fn check_host(policy: &Policy, host: &impl HostFacts) -> Result<(), HostCheckError> {
    let Some(j) = &policy.jailer else { return Ok(()) };
    let mut problems = Vec::new();
    let mut problem = |key, reason: String| problems.push(HostProblem { key, reason });
    for (key, path) in [("jailer.jailer", &j.jailer), ("jailer.firecracker", &j.firecracker)] {
        match host.file(path) {
            Err(e) => problem(
                key,
                format!("{} cannot be used ({e}); install it there or fix the path", path.display()),
            ),
            Ok(f) if !f.regular => {
                problem(key, format!("{} is not a regular file; name the binary itself", path.display()))
            }
            Ok(f) if f.uid != 0 => problem(
                key,
                format!(
                    "{} belongs to uid {}, not root; chown root:root {}",
                    path.display(),
                    f.uid,
                    path.display()
                ),
            ),
            Ok(f) if f.mode & 0o022 != 0 => problem(
                key,
                format!(
                    "{} is writable by {} (mode {:04o}); chmod go-w {}",
                    path.display(),
                    if f.mode & 0o020 != 0 { "its group" } else { "others" },
                    f.mode & 0o7777,
                    path.display()
                ),
            ),
            Ok(_) if key == "jailer.firecracker" => match host.has_interpreter(path) {
                Ok(false) => {}
                Ok(true) => problem(
                    key,
                    format!(
                        "{} is dynamically linked (it has a PT_INTERP header), but a jail holds no loader or \
                         libraries; install a statically linked Firecracker (the release binaries are)",
                        path.display()
                    ),
                ),
                Err(e) => problem(
                    key,
                    format!(
                        "{} is not a readable ELF binary ({e}); install Firecracker there",
                        path.display()
                    ),
                ),
            },
            Ok(_) => {}
        }
    }
    let base = &j.chroot_base;
    match host.file(base) {
        Err(e) => problem(
            "jailer.chroot_base",
            format!(
                "{} cannot be used ({e}); create it: install -d -o root -g root -m 0755 {}",
                base.display(),
                base.display()
            ),
        ),
        Ok(f) if !f.dir => {
            problem("jailer.chroot_base", format!("{} is not a directory; name a directory", base.display()))
        }
        Ok(f) if f.uid != 0 => problem(
            "jailer.chroot_base",
            format!(
                "{} belongs to uid {}, not root; chown root:root {}",
                base.display(),
                f.uid,
                base.display()
            ),
        ),
        // The same rule as the helper's start (`JailConfig::new`): writable by root alone.
        Ok(f) if f.mode & 0o022 != 0 => problem(
            "jailer.chroot_base",
            format!(
                "{} is writable by {} (mode {:04o}); chmod go-w {}",
                base.display(),
                match (f.mode & 0o020 != 0, f.mode & 0o002 != 0) {
                    (true, true) => "its group and others",
                    (true, false) => "its group",
                    _ => "others",
                },
                f.mode & 0o7777,
                base.display()
            ),
        ),
        Ok(_) => {}
    }
    let (first, last) = j.uids;
    let range = format!("{first}-{last}");
    let inside = |id: u32| (first..=last).contains(&id);
    for (name, uid) in host.users().into_iter().filter(|(_, uid)| inside(*uid)) {
        problem(
            "jailer.uid_range",
            format!("{range} holds uid {uid} of user {name} (/etc/passwd); pick a range no account uses"),
        );
    }
    for (name, gid) in host.groups().into_iter().filter(|(_, gid)| inside(*gid)) {
        problem(
            "jailer.uid_range",
            format!(
                "{range} holds gid {gid} of group {name} (/etc/group); each jail's gid is its uid: pick a range no group uses"
            ),
        );
    }
    for r in host.subids() {
        let end = u64::from(r.start) + u64::from(r.count);
        if r.count > 0 && u64::from(r.start) <= u64::from(last) && end > u64::from(first) {
            problem(
                "jailer.uid_range",
                format!(
                    "{range} overlaps {}:{}:{} of {} in {}; pick a range outside every subordinate id range",
                    r.owner, r.start, r.count, r.owner, r.file
                ),
            );
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(HostCheckError(problems)) }
}

/// Whether an ELF image has a `PT_INTERP` program header; from its first bytes (the header and
/// the program headers, which [`SystemHost::has_interpreter`] reads).
pub fn elf_has_interpreter(bytes: &[u8]) -> Result<bool, String> {
    if bytes.len() < 52 || bytes[..4] != *b"\x7fELF" {
        return Err("not an ELF file".to_owned());
    }
    let wide = match bytes[4] {
        1 => false,
        2 => true,
        _ => return Err("an ELF file of unknown class".to_owned()),
    };
    let little = match bytes[5] {
        1 => true,
        2 => false,
        _ => return Err("an ELF file of unknown byte order".to_owned()),
    };
    let read = |at: usize, len: usize| -> Result<u64, String> {
        let b = bytes.get(at..at + len).ok_or("a truncated ELF header")?;
        let mut v = 0u64;
        for i in 0..len {
            let byte = if little { b[len - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        Ok(v)
    };
    let (phoff, phentsize, phnum) = if wide {
        (read(0x20, 8)?, read(0x36, 2)?, read(0x38, 2)?)
    } else {
        (read(0x1c, 4)?, read(0x2a, 2)?, read(0x2c, 2)?)
    };
    for i in 0..phnum {
        let at = usize::try_from(phoff + i * phentsize).map_err(|_| "a program header out of reach")?;
        if read(at, 4)? == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The host's own files.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemHost;

/// Reads `name:x:id:...` lines of an `/etc` database: name and id.
fn id_lines(path: &str) -> Vec<(String, u32)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(':');
            let name = parts.next()?.to_owned();
            Some((name, parts.nth(1)?.parse().ok()?))
        })
        .collect()
}

impl HostFacts for SystemHost {
    fn file(&self, path: &Path) -> Result<FileFacts, String> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).map_err(|e| e.to_string())?;
        Ok(FileFacts { regular: m.is_file(), dir: m.is_dir(), uid: m.uid(), mode: m.mode() })
    }

    fn has_interpreter(&self, path: &Path) -> Result<bool, String> {
        use std::io::Read;
        let mut head = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
            .map_err(|e| e.to_string())?;
        elf_has_interpreter(&head)
    }

    fn users(&self) -> Vec<(String, u32)> {
        id_lines("/etc/passwd")
    }

    fn groups(&self) -> Vec<(String, u32)> {
        id_lines("/etc/group")
    }

    fn subids(&self) -> Vec<SubIdRange> {
        let mut out = Vec::new();
        for file in ["/etc/subuid", "/etc/subgid"] {
            for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
                let mut parts = line.split(':');
                if let (Some(owner), Some(Ok(start)), Some(Ok(count))) =
                    (parts.next(), parts.next().map(str::parse), parts.next().map(str::parse))
                {
                    out.push(SubIdRange { file, owner: owner.to_owned(), start, count });
                }
            }
        }
        out
    }
}

/// What `policy explain --user NAME` prints: for an account of this host, whether it may connect
/// (decided as the helper decides) and why; for a name without an account, what would admit it.
pub fn explain_user(policy: &Policy, name: &str, accounts: &impl Accounts) -> String {
    match accounts.user(name) {
        Some(account) => banger_policy::explain_peer(policy, &account.peer()),
        None => format!(
            "There is no user {name} on this host; if it is created:\n{}",
            banger_policy::explain(policy, Some(name))
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Accounts from a table.
    #[derive(Default)]
    struct Table {
        users: BTreeMap<&'static str, Account>,
        groups: Vec<&'static str>,
    }

    fn table() -> Table {
        let mut t = Table { groups: vec!["banger", "kvm", "alice"], ..Table::default() };
        t.users.insert(
            "alice",
            Account {
                uid: 1001,
                gid: 1001,
                name: Some("alice".into()),
                groups: vec![(1001, Some("alice".into())), (995, Some("banger".into()))],
            },
        );
        t
    }

    impl Accounts for Table {
        fn user(&self, name: &str) -> Option<Account> {
            self.users.get(name).cloned()
        }
        fn group_exists(&self, name: &str) -> bool {
            self.groups.contains(&name)
        }
    }

    fn policy(text: &str) -> Policy {
        Policy::from_toml("p.toml", text).unwrap()
    }

    #[test]
    fn a_policy_admitting_nobody_is_warned_about() {
        let w = check_warnings(&Policy::default_policy(), &table());
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("nobody may connect") && w[0].contains("groups = [\"banger\"]"), "{w:?}");
        assert!(check_warnings(&policy("[access]\ngroups = [\"banger\"]\n"), &table()).is_empty());
    }

    #[test]
    fn names_without_an_account_are_warned_about() {
        let p = policy(
            "[access]\nusers = [\"alice\", \"bob\", \"1007\"]\ngroups = [\"kvm\", \"devs\", \"300\"]\n\
             socket_group = \"vmusers\"\n[quotas.users.carol]\nmax_vms = 1\n",
        );
        let w = check_warnings(&p, &table());
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].contains("access.users names bob"), "{w:?}");
        assert!(
            w[1].contains("access.groups names devs") && w[1].contains("groupadd --system devs"),
            "{w:?}"
        );
        assert!(w[2].contains("socket_group is vmusers") && w[2].contains("will not start"), "{w:?}");
        assert!(w[3].contains("quotas.users.carol"), "{w:?}");
    }

    #[test]
    fn explain_decides_an_account_by_its_groups() {
        let p = policy("[access]\ngroups = [\"banger\"]\n");
        let text = explain_user(&p, "alice", &table());
        assert!(
            text.starts_with("alice may connect (a member of group banger, listed in access.groups)."),
            "{text}"
        );
        let p = policy("[access]\ngroups = [\"kvm\"]\n");
        let text = explain_user(&p, "alice", &table());
        assert!(text.starts_with("alice may not connect: add alice to access.users"), "{text}");
        let text = explain_user(&p, "bob", &table());
        assert!(
            text.starts_with("There is no user bob on this host; if it is created:\nbob is not in"),
            "{text}"
        );
    }

    /// A host of files, accounts and subordinate ids from tables.
    struct Host {
        files: BTreeMap<&'static str, FileFacts>,
        dynamic: Vec<&'static str>,
        users: Vec<(String, u32)>,
        groups: Vec<(String, u32)>,
        subids: Vec<SubIdRange>,
    }

    const BIN: FileFacts = FileFacts { regular: true, dir: false, uid: 0, mode: 0o100755 };
    const DIR: FileFacts = FileFacts { regular: false, dir: true, uid: 0, mode: 0o40755 };

    fn host() -> Host {
        Host {
            files: BTreeMap::from([("/opt/jailer", BIN), ("/opt/firecracker", BIN), ("/srv/jails", DIR)]),
            dynamic: vec![],
            users: vec![("root".into(), 0), ("alice".into(), 1000), ("nobody".into(), 65534)],
            groups: vec![("root".into(), 0), ("alice".into(), 1000)],
            subids: vec![SubIdRange {
                file: "/etc/subuid",
                owner: "alice".into(),
                start: 100000,
                count: 65536,
            }],
        }
    }

    impl HostFacts for Host {
        fn file(&self, path: &Path) -> Result<FileFacts, String> {
            self.files.get(path.to_str().unwrap()).copied().ok_or_else(|| "No such file or directory".into())
        }
        fn has_interpreter(&self, path: &Path) -> Result<bool, String> {
            Ok(self.dynamic.contains(&path.to_str().unwrap()))
        }
        fn users(&self) -> Vec<(String, u32)> {
            self.users.clone()
        }
        fn groups(&self) -> Vec<(String, u32)> {
            self.groups.clone()
        }
        fn subids(&self) -> Vec<SubIdRange> {
            self.subids.clone()
        }
    }

    fn jailed(range: &str) -> Policy {
        policy(&format!(
            "[jailer]\njailer = \"/opt/jailer\"\nfirecracker = \"/opt/firecracker\"\nchroot_base = \"/srv/jails\"\n\
             uid_range = \"{range}\"\n"
        ))
    }

    /// The problems found, as `key: reason`.
    fn problems(p: &Policy, h: &Host) -> Vec<String> {
        match check_host(p, h) {
            Ok(()) => vec![],
            Err(HostCheckError(v)) => v.into_iter().map(|p| format!("{}: {}", p.key, p.reason)).collect(),
        }
    }

    #[test]
    fn a_fitting_host_passes_and_no_jailer_checks_nothing() {
        assert_eq!(problems(&jailed("900000-900099"), &host()), Vec::<String>::new());
        let nothing = Host { files: BTreeMap::new(), ..host() };
        assert!(check_host(&Policy::default_policy(), &nothing).is_ok());
    }

    #[test]
    fn binaries_must_be_roots_not_writable_by_others_and_firecracker_static() {
        let p = jailed("900000-900099");
        let cases: [(&str, FileFacts, &[&str]); 5] = [
            (
                "/opt/jailer",
                FileFacts { uid: 1000, ..BIN },
                &["jailer.jailer", "uid 1000", "chown root:root /opt/jailer"],
            ),
            (
                "/opt/jailer",
                FileFacts { mode: 0o100775, ..BIN },
                &["jailer.jailer", "its group", "chmod go-w"],
            ),
            (
                "/opt/firecracker",
                FileFacts { mode: 0o100757, ..BIN },
                &["jailer.firecracker", "others", "0757"],
            ),
            ("/opt/firecracker", DIR, &["jailer.firecracker", "not a regular file"]),
            ("/srv/jails", BIN, &["jailer.chroot_base", "not a directory"]),
        ];
        for (path, facts, needles) in cases {
            let mut h = host();
            h.files.insert(path, facts);
            let found = problems(&p, &h);
            assert_eq!(found.len(), 1, "{found:?}");
            for n in needles {
                assert!(found[0].contains(n), "{found:?} lacks {n}");
            }
        }
        let mut h = host();
        h.files.remove("/opt/firecracker");
        assert!(problems(&p, &h)[0].contains("install it there"));
        let mut h = host();
        h.dynamic.push("/opt/firecracker");
        let found = problems(&p, &h);
        assert!(
            found[0].starts_with("jailer.firecracker") && found[0].contains("statically linked"),
            "{found:?}"
        );
        h.dynamic = vec!["/opt/jailer"];
        assert!(problems(&p, &h).is_empty(), "only Firecracker goes into the jail");
    }

    #[test]
    fn the_chroot_base_must_be_roots_and_writable_by_root_alone() {
        let p = jailed("900000-900099");
        for (facts, needle) in [
            (FileFacts { uid: 5, ..DIR }, "chown root:root /srv/jails"),
            (FileFacts { mode: 0o41757, ..DIR }, "others (mode 1757); chmod go-w /srv/jails"),
            (FileFacts { mode: 0o41777, ..DIR }, "its group and others (mode 1777)"),
            // The helper's start refuses a group-writable base: the check says so first.
            (FileFacts { mode: 0o40775, ..DIR }, "its group (mode 0775); chmod go-w /srv/jails"),
        ] {
            let mut h = host();
            h.files.insert("/srv/jails", facts);
            let found = problems(&p, &h);
            assert!(
                found.len() == 1 && found[0].starts_with("jailer.chroot_base") && found[0].contains(needle),
                "{found:?}"
            );
        }
        let mut h = host();
        h.files.insert("/srv/jails", FileFacts { mode: 0o40755, ..DIR });
        assert!(problems(&p, &h).is_empty());
        h.files.remove("/srv/jails");
        assert!(problems(&p, &h)[0].contains("install -d -o root -g root -m 0755 /srv/jails"));
    }

    #[test]
    fn the_uid_range_must_miss_every_account_group_and_subordinate_range() {
        let found = problems(&jailed("999-1000"), &host());
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("uid 1000 of user alice (/etc/passwd)"), "{found:?}");
        assert!(found[1].contains("gid 1000 of group alice (/etc/group)"), "{found:?}");
        for range in ["165535-170000", "90000-100000", "100100-100200"] {
            let found = problems(&jailed(range), &host());
            assert_eq!(found.len(), 1, "{range}: {found:?}");
            assert!(found[0].contains("alice:100000:65536 of alice in /etc/subuid"), "{found:?}");
        }
        for range in ["165536-170000", "90000-99999"] {
            assert!(problems(&jailed(range), &host()).is_empty(), "{range}");
        }
        let mut h = host();
        h.subids.push(SubIdRange { file: "/etc/subgid", owner: "bob".into(), start: 900050, count: 1 });
        let found = problems(&jailed("900000-900099"), &h);
        assert!(found[0].contains("/etc/subgid"), "{found:?}");
    }

    /// An ELF header of `class` (1: 32-bit, 2: 64-bit), little-endian, with program headers of
    /// these types.
    fn elf(class: u8, types: &[u32]) -> Vec<u8> {
        let (phoff, entsize): (usize, usize) = if class == 2 { (64, 56) } else { (52, 32) };
        let mut b = vec![0u8; phoff + entsize * types.len()];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = class;
        b[5] = 1;
        if class == 2 {
            b[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
            b[0x36..0x38].copy_from_slice(&(entsize as u16).to_le_bytes());
            b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        } else {
            b[0x1c..0x20].copy_from_slice(&(phoff as u32).to_le_bytes());
            b[0x2a..0x2c].copy_from_slice(&(entsize as u16).to_le_bytes());
            b[0x2c..0x2e].copy_from_slice(&(types.len() as u16).to_le_bytes());
        }
        for (i, t) in types.iter().enumerate() {
            b[phoff + i * entsize..][..4].copy_from_slice(&t.to_le_bytes());
        }
        b
    }

    #[test]
    fn a_pt_interp_header_makes_an_elf_dynamic() {
        for class in [1, 2] {
            assert_eq!(elf_has_interpreter(&elf(class, &[1, 1, 4])), Ok(false), "static, class {class}");
            assert_eq!(elf_has_interpreter(&elf(class, &[6, 3, 1])), Ok(true), "dynamic, class {class}");
        }
        assert!(elf_has_interpreter(b"#!/bin/sh\n").is_err());
        let mut cut = elf(2, &[1, 3]);
        cut.truncate(64 + 56 + 2);
        assert!(elf_has_interpreter(&cut).is_err(), "a truncated header");
        // This machine's shell is dynamically linked.
        assert_eq!(SystemHost.has_interpreter(Path::new("/bin/sh")), Ok(true));
        assert!(SystemHost.users().iter().any(|(name, uid)| name == "root" && *uid == 0));
    }

    #[test]
    fn the_system_accounts_know_root() {
        let root = SystemAccounts.user("root").unwrap();
        assert_eq!((root.uid, root.name.as_deref()), (0, Some("root")));
        assert!(root.groups.iter().any(|(gid, _)| *gid == 0));
        assert_eq!(SystemAccounts.user("0").map(|a| a.uid), Some(0));
        assert!(SystemAccounts.user("no-such-user-banger").is_none());
        assert!(!SystemAccounts.group_exists("no-such-group-banger"));
    }
}
