//! The leak check of one world: everything banger could leave behind, looked for only among the
//! world's own objects so tests running in parallel do not see each other.
//!
//! - TAP devices in the world's host namespace;
//! - firewall rules or chains mentioning banger in that namespace (`iptables-save`, and
//!   `iptables-legacy-save` where installed), and the helper's nftables table there
//!   (`nft list table ip banger`);
//! - loop devices whose backing file is under the world's temporary directory or the users'
//!   homes;
//! - processes of the world's users, or whose arguments, working directory or environment mention
//!   its temporary directory (other than the helper and the test itself);
//! - files of VMs (`handles.json`, sockets other than the daemon's) under the users' homes;
//! - objects the helper's ledger still lists for a user.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::proc;
use super::run::root_unchecked;

/// What to look at.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The host network namespace.
    pub netns: String,
    /// The world's temporary directory.
    pub temp: PathBuf,
    /// The users' uids.
    pub uids: Vec<u32>,
    /// The users' homes.
    pub homes: Vec<PathBuf>,
    /// Processes that belong there (the helper).
    pub allowed_pids: Vec<u32>,
}

/// TAP/TUN devices in `netns`, by name.
pub fn taps(netns: &str) -> Vec<String> {
    let Ok(out) = root_unchecked("ip", &["-n", netns, "-d", "-j", "link", "show"]) else { return Vec::new() };
    let links: Vec<Value> = serde_json::from_str(&out.stdout).unwrap_or_default();
    links
        .iter()
        .filter(|l| l.pointer("/linkinfo/info_kind").and_then(Value::as_str) == Some("tun"))
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect()
}

/// Lines of the firewall of `netns` that mention banger (any case), each prefixed by the tool.
pub fn firewall_lines(netns: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for tool in ["iptables-save", "iptables-legacy-save"] {
        if tool != "iptables-save" && !Path::new("/usr/sbin").join(tool).exists() {
            continue;
        }
        if let Ok(out) = root_unchecked("ip", &["netns", "exec", netns, tool]) {
            lines.extend(
                out.stdout
                    .lines()
                    .filter(|l| l.to_lowercase().contains("banger"))
                    .map(|l| format!("{tool}: {l}")),
            );
        }
    }
    lines.extend(
        nft_table(netns).lines().filter(|l| l.contains("banger")).map(|l| format!("nft: {}", l.trim())),
    );
    lines
}

/// `nft list table ip banger` in `netns` (the helper's own table); empty when there is none.
pub fn nft_table(netns: &str) -> String {
    match root_unchecked("ip", &["netns", "exec", netns, "nft", "list", "table", "ip", "banger"]) {
        Ok(out) if out.success() => out.stdout,
        _ => String::new(),
    }
}

/// The whole `iptables-save` output of `netns` and the helper's nftables table there, for reports.
pub fn firewall_dump(netns: &str) -> String {
    let save = root_unchecked("ip", &["netns", "exec", netns, "iptables-save"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    format!("{save}{}", nft_table(netns))
}

/// Loop devices whose backing file is under `dir`: `(device, backing file)`.
pub fn loops_under(dir: &Path) -> Vec<(String, String)> {
    let Ok(out) = root_unchecked("losetup", &["-n", "-l", "-O", "NAME,BACK-FILE"]) else { return Vec::new() };
    let prefix = dir.to_string_lossy();
    out.stdout
        .lines()
        .filter_map(|l| l.trim().split_once(char::is_whitespace))
        .map(|(d, f)| (d.to_owned(), f.trim().to_owned()))
        .filter(|(_, f)| f.starts_with(&*prefix))
        .collect()
}

/// Processes of the scope (see the module docs), excluding the allowed ones and this process.
pub fn processes(scope: &Scope) -> Vec<proc::ProcInfo> {
    let me = std::process::id();
    proc::find(|p| {
        p.pid != me
            && !scope.allowed_pids.contains(&p.pid)
            && (scope.uids.contains(&p.uid) || p.mentions(&scope.temp))
    })
}

/// Files of VMs left under `home`: any `handles.json`, and sockets other than the daemon's.
pub fn vm_files(home: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![home.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "handles.json") {
                found.push(path);
            } else {
                use std::os::unix::fs::FileTypeExt;
                if ft.is_socket() && path.file_name().is_some_and(|n| n != "bangerd.sock") {
                    found.push(path);
                }
            }
        }
    }
    found
}

/// Everything leaked in the scope, one line each (empty when clean). Ledger checks are added by
/// the world, which can speak to the helper.
pub fn check(scope: &Scope) -> Vec<String> {
    let mut leaks = Vec::new();
    leaks.extend(taps(&scope.netns).into_iter().map(|t| format!("tap {t} in {}", scope.netns)));
    leaks.extend(
        firewall_lines(&scope.netns).into_iter().map(|l| format!("firewall in {}: {l}", scope.netns)),
    );
    let homes_apart = scope.homes.iter().filter(|h| !h.starts_with(&scope.temp));
    for dir in std::iter::once(&scope.temp).chain(homes_apart) {
        leaks.extend(loops_under(dir).into_iter().map(|(d, f)| format!("loop {d} backed by {f}")));
    }
    leaks.extend(processes(scope).into_iter().map(|p| format!("process {}", p.describe())));
    for home in &scope.homes {
        leaks.extend(vm_files(home).into_iter().map(|f| format!("file {}", f.display())));
    }
    leaks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_files_finds_handles_and_vm_sockets_but_not_the_daemon_socket() {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("state/vms/0123");
        fs::create_dir_all(&vm).unwrap();
        fs::create_dir_all(dir.path().join("run")).unwrap();
        fs::write(vm.join("handles.json"), "{}").unwrap();
        fs::write(vm.join("serial.log"), "").unwrap();
        let _api = std::os::unix::net::UnixListener::bind(vm.join("api.sock")).unwrap();
        let _daemon = std::os::unix::net::UnixListener::bind(dir.path().join("run/bangerd.sock")).unwrap();
        let mut found = vm_files(dir.path());
        found.sort();
        assert_eq!(found, [vm.join("api.sock"), vm.join("handles.json")]);
    }

    #[test]
    fn processes_in_scope_are_found_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut child =
            std::process::Command::new("sleep").arg("30").current_dir(dir.path()).spawn().unwrap();
        let mut scope = Scope {
            netns: String::new(),
            temp: dir.path().to_path_buf(),
            uids: Vec::new(),
            homes: Vec::new(),
            allowed_pids: Vec::new(),
        };
        let found = processes(&scope).iter().any(|p| p.pid == child.id());
        scope.allowed_pids.push(child.id());
        let allowed = processes(&scope).iter().any(|p| p.pid == child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found, "the process working in the scope's directory was not found");
        assert!(!allowed, "an allowed process was reported");
    }
}
