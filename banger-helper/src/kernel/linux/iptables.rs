//! The firewall through the `iptables` tools: `iptables-save` to read, one
//! `iptables-restore --noflush` per batch to change. Success is the exit status; the tools'
//! messages are only carried into the error for a person to read.
//!
//! The tools run with an empty environment (a fixed `PATH` and `LC_ALL=C`), from absolute paths
//! resolved once at start in fixed system directories, and inherit the helper's sandbox.

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
#[derive(Debug, Clone)]
pub struct Iptables {
    save: PathBuf,
    restore: PathBuf,
}

fn find(tool: &'static str) -> Result<PathBuf, ToolMissing> {
    SAFE_PATH.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.exists()).ok_or(ToolMissing { tool })
}

fn command(path: &Path) -> Command {
    let mut c = Command::new(path);
    c.env_clear().env("PATH", SAFE_PATH).env("LC_ALL", "C").kill_on_drop(true);
    c
}

fn tool_error(op: &'static str, status: std::process::ExitStatus, stderr: &[u8]) -> KernelError {
    let msg = String::from_utf8_lossy(stderr);
    let msg = msg.lines().filter(|l| !l.trim().is_empty()).take(3).collect::<Vec<_>>().join("; ");
    KernelError::other(op, "banger chains", format!("{status}: {msg}"))
}

impl Iptables {
    /// Finds the tools in [`SAFE_PATH`].
    pub fn locate() -> Result<Self, ToolMissing> {
        Ok(Iptables { save: find("iptables-save")?, restore: find("iptables-restore")? })
    }

    /// The two tools' paths (read-only, for the sandbox).
    pub fn paths(&self) -> [&Path; 2] {
        [&self.save, &self.restore]
    }
}

impl Firewall for Iptables {
    async fn read(&self) -> KResult<FirewallView> {
        let out = command(&self.save)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| KernelError::other("iptables-save", "banger chains", e.to_string()))?;
        if !out.status.success() {
            return Err(tool_error("iptables-save", out.status, &out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        FirewallView::parse_save(&text)
            .map_err(|e| KernelError::other("iptables-save", "banger chains", e.to_string()))
    }

    async fn apply(&self, batch: &FirewallBatch) -> KResult<()> {
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
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).await.map_err(spawn_err)?;
        }
        let out = child.wait_with_output().await.map_err(spawn_err)?;
        if !out.status.success() {
            tracing::debug!("iptables-restore input was:\n{input}");
            return Err(tool_error("iptables-restore", out.status, &out.stderr));
        }
        Ok(())
    }
}
