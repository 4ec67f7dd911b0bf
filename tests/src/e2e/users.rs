//! The test's group and users, created with `groupadd`/`useradd` and removed on drop.
//!
//! Users are system users without a home directory and with no login shell; A and B are members
//! of the group the test policy allows, C is not. The account database is locked by the shadow
//! tools, so calls are serialized inside this process and retried when another process holds the
//! lock.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::unistd::{Group, User};

use super::run::{Output, root_unchecked};

/// Serializes account changes made by this process.
static ACCOUNTS: Mutex<()> = Mutex::new(());

/// Which test user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Who {
    /// First allowed user.
    A,
    /// Second allowed user.
    B,
    /// A user the policy does not allow.
    C,
}

impl Who {
    /// All three.
    pub const ALL: [Who; 3] = [Who::A, Who::B, Who::C];

    /// Index into per-user tables.
    pub fn index(self) -> usize {
        match self {
            Who::A => 0,
            Who::B => 1,
            Who::C => 2,
        }
    }

    /// Lowercase letter, for file names.
    pub fn letter(self) -> &'static str {
        ["a", "b", "c"][self.index()]
    }
}

/// One created account.
#[derive(Debug, Clone)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// uid.
    pub uid: u32,
    /// Primary gid (the user's private group).
    pub gid: u32,
    /// Supplementary gids.
    pub groups: Vec<u32>,
}

/// Runs an account tool, retrying while the account files are locked by someone else.
fn account_tool(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let _serial = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = None;
    for _ in 0..20 {
        let out = root_unchecked(program, args)?;
        if out.success() {
            return Ok(out);
        }
        let locked = out.stderr.contains("lock") || out.stderr.contains("try again");
        last = Some(out);
        if !locked {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("command failed:\n{}", last.expect("ran at least once"))
}

/// The group and users of one test; dropping it deletes them (after their processes are gone).
#[derive(Debug)]
pub struct Accounts {
    /// The group the policy allows.
    pub group: String,
    /// Its gid.
    pub gid: u32,
    /// A, B and C.
    pub users: Vec<Account>,
}

impl Accounts {
    /// Creates group `group` and users `names` (A, B, C); A and B join the group.
    pub fn create(group: &str, names: [String; 3]) -> anyhow::Result<Accounts> {
        account_tool("groupadd", &["--system", group])?;
        let mut accounts = Accounts { group: group.to_owned(), gid: 0, users: Vec::new() };
        accounts.gid =
            Group::from_name(group)?.with_context(|| format!("group {group} vanished"))?.gid.as_raw();
        for (i, name) in names.iter().enumerate() {
            let mut args = vec!["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"];
            args.extend(["--shell", "/usr/sbin/nologin"]);
            if i < 2 {
                args.extend(["--groups", group]);
            }
            args.push(name);
            account_tool("useradd", &args)?;
            // Record the account before anything else can fail, so drop removes it.
            let user = User::from_name(name)?.with_context(|| format!("user {name} vanished"))?;
            let mut account = Account {
                name: name.clone(),
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
                groups: Vec::new(),
            };
            if i < 2 {
                account.groups.push(accounts.gid);
            }
            accounts.users.push(account);
        }
        Ok(accounts)
    }

    /// The account of `who`.
    pub fn get(&self, who: Who) -> &Account {
        &self.users[who.index()]
    }

    /// Deletes the users and the group; best effort, returns what failed.
    pub fn remove(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        for user in self.users.drain(..) {
            if let Err(e) = remove_user(&user.name) {
                failures.push(format!("{e:#}"));
            }
        }
        if !self.group.is_empty() {
            if let Err(e) = remove_group(&self.group) {
                failures.push(format!("{e:#}"));
            }
            self.group.clear();
        }
        failures
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for f in self.remove() {
            eprintln!("e2e teardown: {f}");
        }
    }
}

/// Deletes a user (and its private group), killing its processes first.
pub fn remove_user(name: &str) -> anyhow::Result<()> {
    if User::from_name(name)?.is_none() {
        return Ok(());
    }
    let _ = root_unchecked("pkill", &["-KILL", "-u", name]);
    if account_tool("userdel", &[name]).is_err() {
        account_tool("userdel", &["--force", name])?;
    }
    if Group::from_name(name)?.is_some() {
        account_tool("groupdel", &[name])?;
    }
    Ok(())
}

/// Deletes a group if it exists.
pub fn remove_group(name: &str) -> anyhow::Result<()> {
    if Group::from_name(name)?.is_some() {
        account_tool("groupdel", &[name])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_follow_indices() {
        assert_eq!(Who::ALL.map(Who::letter), ["a", "b", "c"]);
        assert_eq!(Who::ALL.map(Who::index), [0, 1, 2]);
    }
}
