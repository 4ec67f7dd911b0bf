//! Reading the process table (`/proc`) to find, describe and kill a test's processes.

use std::fs;
use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One process as `/proc` shows it.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// Real uid.
    pub uid: u32,
    /// `comm` (the first 15 bytes of the program name).
    pub comm: String,
    /// The state letter (`R`, `S`, `Z` …).
    pub state: char,
    /// Arguments joined by spaces.
    pub cmdline: String,
    /// The working directory, if readable.
    pub cwd: String,
    /// The environment, `K=V` joined by spaces, if readable.
    pub environ: String,
}

impl ProcInfo {
    /// Reads one process; `None` when it is gone.
    pub fn read(pid: u32) -> Option<ProcInfo> {
        let dir = format!("/proc/{pid}");
        let status = fs::read_to_string(format!("{dir}/status")).ok()?;
        let field = |key: &str| {
            status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned()).unwrap_or_default()
        };
        let uid = field("Uid:").split_whitespace().next().and_then(|u| u.parse().ok()).unwrap_or(u32::MAX);
        let ppid = field("PPid:").parse().unwrap_or(0);
        let state = field("State:").chars().next().unwrap_or('?');
        let nul_joined = |name: &str| {
            fs::read(format!("{dir}/{name}"))
                .map(|b| {
                    b.split(|c| *c == 0)
                        .filter(|s| !s.is_empty())
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        };
        Some(ProcInfo {
            pid,
            ppid,
            uid,
            comm: field("Name:"),
            state,
            cmdline: nul_joined("cmdline"),
            cwd: fs::read_link(format!("{dir}/cwd")).map(|p| p.display().to_string()).unwrap_or_default(),
            environ: nul_joined("environ"),
        })
    }

    /// Whether its arguments, working directory or environment mention `path`.
    pub fn mentions(&self, path: &Path) -> bool {
        let p = path.to_string_lossy();
        self.cmdline.contains(&*p) || self.cwd.contains(&*p) || self.environ.contains(&*p)
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "pid {} ppid {} uid {} state {} comm {} cwd {} cmd: {}",
            self.pid, self.ppid, self.uid, self.state, self.comm, self.cwd, self.cmdline
        )
    }
}

/// Every process now.
pub fn all() -> Vec<ProcInfo> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).filter_map(ProcInfo::read).collect()
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    ProcInfo::read(pid).is_some_and(|p| p.state != 'Z' && p.state != 'X')
}

/// Waits up to 10 s for `pid` to be gone (after a SIGKILL); panics naming it otherwise.
#[track_caller]
pub fn wait_dead(pid: u32) {
    let dead = super::run::wait_for(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(20),
        || (!alive(pid)).then_some(()),
    );
    assert!(dead.is_some(), "process {pid} survived SIGKILL for 10 s");
}

/// Sends SIGKILL to `pid` (no error if it is gone).
pub fn kill9(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// The processes for which `pred` holds.
pub fn find(pred: impl Fn(&ProcInfo) -> bool) -> Vec<ProcInfo> {
    all().into_iter().filter(|p| pred(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = ProcInfo::read(std::process::id()).expect("this process exists");
        assert_eq!(me.uid, nix::unistd::getuid().as_raw());
        assert!(alive(me.pid));
        assert!(me.mentions(&std::env::current_dir().unwrap()) || me.cwd.is_empty());
        assert!(all().iter().any(|p| p.pid == me.pid));
    }
}
