//! The firewall through the `iptables` tools: `iptables-save` to read, one
//! `iptables-restore --noflush` per batch to change. Success is the exit status; the tools'
//! messages are only carried into the error for a person to read.
//!
//! The tools run with an empty environment (a fixed `PATH` and `LC_ALL=C`), from absolute paths
//! resolved once at start in fixed system directories, and inherit the helper's sandbox. Which
//! backend they use (legacy or nf_tables) is probed once, there too; start-up asks [`Iptables`]
//! rather than probing again (the legacy tools need their lock file inside the sandbox).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::firewall::{FirewallBatch, FirewallView};
use crate::kernel::{Firewall, KResult, KernelError};

/// The directories the tools are looked up in, and the `PATH` they run with.
pub const SAFE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the tools could not be found.
#[derive(Debug, thiserror::Error)]
#[error("{tool} not found in {SAFE_PATH}; install the iptables package")]
pub struct ToolMissing {
    /// The tool.
    pub tool: &'static str,
}

/// The firewall through `iptables-save` and `iptables-restore`.
#[derive(Debug)]
pub struct Iptables {
    save: PathBuf,
    restore: PathBuf,
    /// The tools are the legacy (x_tables) backend, not nf_tables.
    legacy: bool,
    /// How long one run of a tool may take.
    timeout: std::time::Duration,
}

fn find(tool: &'static str) -> Result<PathBuf, ToolMissing> {
    SAFE_PATH.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.exists()).ok_or(ToolMissing { tool })
}

fn command(path: &Path) -> Command {
    let mut c = Command::new(path);
    c.env_clear().env("PATH", SAFE_PATH).env("LC_ALL", "C").kill_on_drop(true);
    c
}

/// How long one run of a tool may take (`iptables-restore` itself waits at most 10 s for the
/// legacy backend's lock); a tool still running then is killed.
pub const TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn timed_out(op: &'static str, after: std::time::Duration) -> KernelError {
    KernelError::other(
        op,
        "banger chains",
        format!("still running after {:.1} s; killed", after.as_secs_f32()),
    )
}

fn tool_error(op: &'static str, status: std::process::ExitStatus, stderr: &[u8]) -> KernelError {
    let msg = String::from_utf8_lossy(stderr);
    let msg = msg.lines().filter(|l| !l.trim().is_empty()).take(3).collect::<Vec<_>>().join("; ");
    KernelError::other(op, "banger chains", format!("{status}: {msg}"))
}

impl Iptables {
    /// Finds the tools in [`SAFE_PATH`] and which backend they use (`iptables-restore` is a
    /// link to `xtables-legacy-multi` or to `xtables-nft-multi`).
    pub fn locate() -> Result<Self, ToolMissing> {
        let restore = find("iptables-restore")?;
        let legacy = std::fs::canonicalize(&restore).is_ok_and(|p| p.to_string_lossy().contains("legacy"));
        Ok(Iptables { save: find("iptables-save")?, restore, legacy, timeout: TOOL_TIMEOUT })
    }

    /// Whether the tools are the legacy backend (which locks `/run/xtables.lock`).
    pub fn legacy(&self) -> bool {
        self.legacy
    }

    async fn save(&self) -> KResult<FirewallView> {
        let run = command(&self.save).stdin(Stdio::null()).output();
        let out = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| timed_out("iptables-save", self.timeout))?
            .map_err(|e| KernelError::other("iptables-save", "banger chains", e.to_string()))?;
        if !out.status.success() {
            return Err(tool_error("iptables-save", out.status, &out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        FirewallView::parse_save(&text)
            .map_err(|e| KernelError::other("iptables-save", "banger chains", e.to_string()))
    }
}

impl Firewall for Iptables {
    async fn read(&self) -> KResult<FirewallView> {
        self.save().await
    }

    async fn apply(&self, batch: &FirewallBatch) -> KResult<()> {
        self.restore(batch).await
    }
}

impl Iptables {
    async fn restore(&self, batch: &FirewallBatch) -> KResult<()> {
        let input = batch.render();
        let spawn_err =
            |e: std::io::Error| KernelError::other("iptables-restore", "banger chains", e.to_string());
        let mut child = command(&self.restore)
            .args(["--noflush", "--wait", "10"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        let run = async {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(input.as_bytes()).await?;
            }
            child.wait_with_output().await
        };
        // On a timeout the child is dropped, which kills it (`kill_on_drop`).
        let out = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| timed_out("iptables-restore", self.timeout))?
            .map_err(spawn_err)?;
        if !out.status.success() {
            tracing::debug!("iptables-restore input was:\n{input}");
            return Err(tool_error("iptables-restore", out.status, &out.stderr));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    use super::*;

    /// A tool that never finishes: it is killed at the time limit and the operation fails.
    #[tokio::test]
    async fn a_tool_that_hangs_is_killed_at_the_time_limit() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let tool = dir.path().join("hang");
        std::fs::write(&tool, format!("#!/bin/sh\necho $$ > {}\nexec sleep 30\n", pid_file.display()))
            .unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let fw = Iptables {
            save: tool.clone(),
            restore: tool,
            legacy: false,
            timeout: Duration::from_millis(300),
        };
        let start = Instant::now();
        let e = fw.read().await.unwrap_err();
        assert!(e.to_string().contains("killed"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        let gone = (0..100).any(|_| {
            let running = std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z "));
            if running {
                std::thread::sleep(Duration::from_millis(20));
            }
            !running
        });
        assert!(gone, "the hung tool {} still runs", pid.trim());
        let e = fw.apply(&FirewallBatch::default()).await.unwrap_err();
        assert!(e.to_string().contains("iptables-restore") && e.to_string().contains("killed"), "{e}");
    }
}
