//! The firewall through the `iptables` tools: `iptables-save` to read, one
//! `iptables-restore --noflush` per batch to change. Success is the exit status; the tools'
//! messages are only carried into the error for a person to read.
//!
//! The tools run with an empty environment (a fixed `PATH` and `LC_ALL=C`), from absolute paths
//! resolved once at start in fixed system directories, and inherit the helper's sandbox.
//!
//! With the nf_tables backend the helper keeps the last view it read or wrote together with the
//! ruleset generation it belongs to ([`NftGeneration`]). Every commit by anyone moves the
//! generation, so while it stands still the view is exactly what `iptables-save` would print and
//! the tool need not run again. After its own `iptables-restore`, the helper keeps the updated view
//! only if the generation moved by exactly its own commits (one per table block); anything else —
//! a failure, a concurrent change by another program — drops the view, and the next read runs
//! `iptables-save`. The legacy backend has no generation: every read runs the tool.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use std::sync::Mutex;

use super::nft_gen::NftGeneration;
use crate::firewall::{FirewallBatch, FirewallView, apply_to_view};
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
    /// The nf_tables generation, when the tools use that backend.
    generation: Option<NftGeneration>,
    /// The last view read or written and its generation; taken and put back, never held across
    /// an await.
    cache: Mutex<Option<(u32, FirewallView)>>,
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
    /// Finds the tools in [`SAFE_PATH`], and the nf_tables generation if they use that backend.
    pub fn locate() -> Result<Self, ToolMissing> {
        let restore = find("iptables-restore")?;
        let nft = std::fs::canonicalize(&restore).is_ok_and(|p| p.to_string_lossy().contains("nft"));
        let generation = if nft {
            NftGeneration::open()
                .inspect_err(|e| {
                    tracing::warn!(
                        "cannot read the nf_tables generation ({e}); every read runs iptables-save"
                    )
                })
                .ok()
        } else {
            None
        };
        Ok(Iptables { save: find("iptables-save")?, restore, generation, cache: Mutex::new(None) })
    }

    /// Whether reads can be answered from the last view while nothing changes.
    pub fn caches(&self) -> bool {
        self.generation.is_some()
    }

    fn generation(&self) -> Option<u32> {
        self.generation.as_ref().and_then(|g| g.current().ok())
    }

    fn take_cache(&self) -> Option<(u32, FirewallView)> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn put_cache(&self, entry: Option<(u32, FirewallView)>) {
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = entry;
    }

    async fn save(&self) -> KResult<FirewallView> {
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

    /// The two tools' paths (read-only, for the sandbox).
    pub fn paths(&self) -> [&Path; 2] {
        [&self.save, &self.restore]
    }
}

impl Firewall for Iptables {
    async fn read(&self) -> KResult<FirewallView> {
        let now = self.generation();
        if let (Some(now), Some((at, view))) = (now, self.take_cache())
            && now == at
        {
            tracing::debug!("firewall unchanged since generation {at}; iptables-save skipped");
            self.put_cache(Some((at, view.clone())));
            return Ok(view);
        }
        let view = self.save().await?;
        let after = self.generation();
        self.put_cache(match (now, after) {
            (Some(before), Some(after)) if before == after => Some((after, view.clone())),
            _ => None,
        });
        Ok(view)
    }

    async fn apply(&self, batch: &FirewallBatch) -> KResult<()> {
        let cached = self.take_cache();
        let before = self.generation();
        self.restore(batch).await?;
        let after = self.generation();
        let commits = batch.tables().len() as u32;
        self.put_cache(match (cached, before, after) {
            (Some((at, view)), Some(before), Some(after))
                if at == before && after == before.wrapping_add(commits) =>
            {
                apply_to_view(&view, batch).ok().map(|v| (after, v))
            }
            _ => None,
        });
        Ok(())
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
