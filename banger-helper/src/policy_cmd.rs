//! `banger-helper policy check` and `policy explain`: a policy file read against this host's
//! accounts.
//!
//! The policy crate is pure; whether a user or group it names exists, and which groups an account
//! is in, come from the account databases, behind the [`Accounts`] trait so tests can give their
//! own. Whether an account may connect is decided by `Access::admits` (through
//! [`banger_policy::explain_peer`]), the same check the helper makes when it connects.

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
