//! `banger doctor`: whether this host and this user can run VMs, one line per check, each failure
//! with the exact command that fixes it.
//!
//! The checks ([`checks`]) ask the machine through [`host::Host`], so each one can be made to
//! fail on purpose in a test. A check is *required* when no VM can start without it; the command
//! exits non-zero when a required check fails, and only warns about the rest.

pub mod checks;
pub mod host;

use std::path::PathBuf;

use serde::Serialize;

/// The Firecracker release banger is tested against (`install.sh` installs it).
pub const TESTED_FIRECRACKER_VERSION: &str = "1.16.1";

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// As it should be.
    Ok,
    /// Works, but something is missing or different (a VM may still start).
    Warn,
    /// Broken: a required check fails the command.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// A short name, e.g. `kvm`.
    pub name: &'static str,
    /// How it came out.
    pub outcome: Outcome,
    /// Whether a failure means no VM can start.
    pub required: bool,
    /// What was found.
    pub detail: String,
    /// What to do, when it is not [`Outcome::Ok`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    /// A passing check.
    pub fn ok(name: &'static str, required: bool, detail: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Ok, required, detail: detail.into(), fix: None }
    }

    /// A failing check: [`Outcome::Fail`] when `required`, else [`Outcome::Warn`].
    pub fn bad(
        name: &'static str,
        required: bool,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        let outcome = if required { Outcome::Fail } else { Outcome::Warn };
        Check { name, outcome, required, detail: detail.into(), fix: Some(fix.into()) }
    }

    /// The check as one line of text.
    pub fn line(&self) -> String {
        let tag = match self.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        match &self.fix {
            Some(fix) => format!("{tag} {}: {}; fix: {fix}", self.name, self.detail),
            None => format!("{tag} {}: {}", self.name, self.detail),
        }
    }
}

/// Where the checks look (from the user's configuration and paths).
#[derive(Debug, Clone)]
pub struct Setup {
    /// `/dev/kvm`.
    pub kvm: PathBuf,
    /// `/dev/net/tun`.
    pub tun: PathBuf,
    /// The helper's socket.
    pub helper_socket: PathBuf,
    /// The VMM binary, resolved, or why it cannot be.
    pub firecracker: Result<PathBuf, String>,
    /// The user's banger state directory.
    pub state_dir: PathBuf,
    /// Where imported images live.
    pub images_dir: PathBuf,
    /// The root `/proc`, `/sys`, `/etc` and `/lib/modules` are found under (`/`).
    pub root: PathBuf,
}

/// Every check, in the order they are printed.
pub async fn run(host: &impl host::Host, setup: &Setup) -> Vec<Check> {
    let mut out = vec![
        checks::kvm(host, setup),
        checks::tun_device(host, setup),
        checks::helper(host, setup).await,
        checks::firecracker(host, setup),
        checks::images(host, setup),
    ];
    out.extend(checks::kernel_features(host, setup));
    out.push(checks::subordinate_ids(host, setup));
    out.push(checks::free_space(host, setup));
    out
}

/// Whether every required check passed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.outcome != Outcome::Fail)
}

#[cfg(test)]
mod tests {
    use super::host::{Host, SystemHost};
    use super::*;

    #[test]
    fn install_sh_installs_the_tested_firecracker() {
        let script = include_str!("../../../install.sh");
        assert!(
            script.lines().any(|l| l == format!("FIRECRACKER_VERSION={TESTED_FIRECRACKER_VERSION}")),
            "install.sh and TESTED_FIRECRACKER_VERSION disagree"
        );
    }

    #[test]
    fn a_check_is_one_line_with_its_fix() {
        let c = Check::bad("tun", true, "/dev/net/tun is not usable", "sudo chmod 0666 /dev/net/tun");
        assert_eq!(c.line(), "FAIL tun: /dev/net/tun is not usable; fix: sudo chmod 0666 /dev/net/tun");
        assert_eq!(Check::bad("images", false, "no images yet", "x").outcome, Outcome::Warn);
        assert_eq!(Check::ok("kvm", true, "fine").line(), "ok   kvm: fine");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["outcome"], "fail");
        assert_eq!(json["fix"], "sudo chmod 0666 /dev/net/tun");
        assert!(serde_json::to_value(Check::ok("kvm", true, "fine")).unwrap().get("fix").is_none());
    }

    #[test]
    fn the_system_host_lists_image_directories_and_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let host = SystemHost::default();
        assert!(host.images(&dir.path().join("absent")).unwrap().is_empty());
        std::fs::create_dir(dir.path().join("debian")).unwrap();
        std::fs::create_dir(dir.path().join(".staging-1")).unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        assert_eq!(host.images(dir.path()).unwrap(), ["debian"]);
        assert!(host.free_bytes(dir.path()).unwrap() > 0);
        let e = host.open_rw(&dir.path().join("absent")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
