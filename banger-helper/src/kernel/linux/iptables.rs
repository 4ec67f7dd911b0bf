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

use std::collections::BTreeSet;

use banger_policy::Network;
use banger_protocol::FirewallBackend;

use crate::firewall::VmRules;
use crate::firewall::iptables::{FirewallBatch, FirewallView, plan_vm_rules, vm_rules};
use crate::kernel::{Firewall, KResult, KernelError};
use crate::names::VmKey;

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

    /// Runs a tool (with `input` on its standard input, else none) and returns what it printed.
    /// A tool that fails, or that is still running after the timeout (it is then killed, being
    /// dropped: `kill_on_drop`), is an error.
    async fn run(&self, op: &'static str, mut cmd: Command, input: Option<&str>) -> KResult<Vec<u8>> {
        let err = |e: std::io::Error| KernelError::other(op, "banger chains", e.to_string());
        let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
        let mut child =
            cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(err)?;
        let run = async {
            if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
                stdin.write_all(input.as_bytes()).await?;
            }
            child.wait_with_output().await
        };
        let after = self.timeout.as_secs_f32();
        let out = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| {
                KernelError::other(op, "banger chains", format!("still running after {after:.1} s; killed"))
            })?
            .map_err(err)?;
        if !out.status.success() {
            if let Some(input) = input {
                tracing::debug!("{op} input was:\n{input}");
            }
            return Err(tool_error(op, out.status, &out.stderr));
        }
        Ok(out.stdout)
    }
}

impl Iptables {
    /// Reads the helper's chains, jumps and rules (`iptables-save`).
    async fn read(&self) -> KResult<FirewallView> {
        let out = self.run("iptables-save", command(&self.save), None).await?;
        FirewallView::parse_save(&String::from_utf8_lossy(&out))
            .map_err(|e| KernelError::other("iptables-save", "banger chains", e.to_string()))
    }

    /// Applies a batch, atomically per table (one `iptables-restore --noflush` run).
    async fn apply(&self, batch: &FirewallBatch) -> KResult<()> {
        let mut restore = command(&self.restore);
        restore.args(["--noflush", "--wait", "10"]);
        self.run("iptables-restore", restore, Some(&batch.render())).await.map(|_| ())
    }
}

impl Firewall for Iptables {
    fn backend(&self) -> FirewallBackend {
        FirewallBackend::Iptables
    }

    async fn vms(&self) -> KResult<BTreeSet<VmKey>> {
        Ok(self.read().await?.vms())
    }

    /// Reads the chains, works out the difference ([`plan_vm_rules`]) and applies it in one
    /// `iptables-restore` run, or none when there is none.
    async fn update(&self, net: &Network, up: &[VmRules], down: &[VmKey]) -> KResult<bool> {
        let view = self.read().await?;
        let up: Vec<_> = up.iter().map(|r| (r.key.clone(), vm_rules(r, net))).collect();
        let batch = plan_vm_rules(&view, &up, down);
        if batch.is_empty() {
            return Ok(false);
        }
        self.apply(&batch).await.map(|()| true)
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
