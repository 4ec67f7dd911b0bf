//! The kernel tier: test binaries built on this machine run as root inside Debian's stock kernel,
//! booted under qemu with software emulation (TCG), for the kernel features this machine lacks
//! (device-mapper above all; also loop, tun and nf_tables as a real kernel has them).
//!
//! How one run goes:
//!
//! 1. [`prepare`]: Debian's generic kernel package, `qemu-system-x86` with the libraries this
//!    machine lacks, and `busybox-static` are fetched with `apt-get download` (the machine's own
//!    apt setup) and unpacked with `dpkg -x` into a cache under the workspace's `target/`, never
//!    installed; the ELF `vmlinux` is extracted from the packaged bzImage ([`vmlinux`]) and the
//!    kernel's modules indexed with `depmod -b`. Done once; later runs find the cache ready.
//! 2. [`initramfs`]: a small initramfs is written for the run: static busybox, the virtio, 9p and
//!    overlay modules and those of tun, loop and device-mapper in load order ([`modules`]), a `/sbin/modprobe` that runs the shared root's
//!    modprobe, and the guest's `init` ([`guest_init`]) with the run's settings.
//! 3. [`qemu`]: qemu boots the kernel (always `-accel tcg`) with the host's `/` shared read-only
//!    over virtio-9p and the run's directory shared writable; the guest's console is streamed to
//!    the caller. The guest sees the host's root through an overlay with a tmpfs upper layer, so
//!    tests may write anywhere; `tun`, `loop`, `dm-mod` and `dm-snapshot` are loaded, and any
//!    other module loads on demand.
//! 4. [`jobs`]: each job is a shell script in the run's directory, run in turn as root in the
//!    guest with the caller's working directory and a chosen environment; its exit status is
//!    written back to the run's directory, and the guest ends through qemu's `isa-debug-exit`.
//!
//! There is no udev in the guest: `/dev/mapper/NAME` never appears; tests use `/dev/dm-N` or make
//! the node themselves. Tests know they run inside from `BANGER_KERNEL_TIER=1` ([`guest`]).

pub mod cargo;
pub mod cpio;
pub mod guest;
pub mod guest_init;
pub mod initramfs;
pub mod jobs;
pub mod modules;
pub mod prepare;
pub mod qemu;
pub mod run;
pub use banger::image_build::vmlinux;

pub use prepare::{Prepared, prepare};
pub use run::{RunOptions, RunReport, run};

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment variable set to `1` for every job inside the guest.
pub const MARKER_ENV: &str = "BANGER_KERNEL_TIER";
/// The environment variable naming, inside the guest, the run's writable directory shared with
/// the host (the same path on both sides).
pub const OUT_ENV: &str = "BANGER_KERNEL_TIER_OUT";
/// Overrides the cache directory (default: `kernel-tier` in the workspace's target directory).
pub const CACHE_ENV: &str = "BANGER_KERNEL_TIER_CACHE";

/// Why the tier cannot run on this machine, as opposed to a run that failed: callers report the
/// tier as skipped with this reason, or fail under `CI=true`.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Unavailable {
    /// What is missing and what to do about it.
    pub reason: String,
}

impl Unavailable {
    /// An unavailability with its reason.
    pub fn new(reason: impl Into<String>) -> Unavailable {
        Unavailable { reason: reason.into() }
    }
}

/// The default cache directory: `$BANGER_KERNEL_TIER_CACHE`, else `kernel-tier` in
/// `$CARGO_TARGET_DIR`, else in the cargo target directory holding `exe` (recognised by cargo's
/// `CACHEDIR.TAG`), else in this workspace's `target/`.
pub fn default_cache_dir(exe: Option<&Path>) -> PathBuf {
    cache_dir_from(std::env::var_os(CACHE_ENV), std::env::var_os("CARGO_TARGET_DIR"), exe)
}

fn cache_dir_from(cache: Option<OsString>, target: Option<OsString>, exe: Option<&Path>) -> PathBuf {
    if let Some(dir) = cache.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    target_dir_from(target, exe).join("kernel-tier")
}

/// The cargo target directory: `$CARGO_TARGET_DIR`, else the one holding `exe` (recognised by
/// cargo's `CACHEDIR.TAG`), else this workspace's `target/`. Other test caches live there too.
pub fn target_dir(exe: Option<&Path>) -> PathBuf {
    target_dir_from(std::env::var_os("CARGO_TARGET_DIR"), exe)
}

fn target_dir_from(target: Option<OsString>, exe: Option<&Path>) -> PathBuf {
    if let Some(dir) = target.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let from_exe = exe.and_then(|e| e.ancestors().skip(1).find(|d| d.join("CACHEDIR.TAG").is_file()));
    match from_exe {
        Some(target) => target.to_path_buf(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"),
    }
}

/// True when `CI=true`: a tier that cannot run is then a failure, not a skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_the_overrides_then_the_target_dir_holding_the_binary() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("debug")).unwrap();
        std::fs::write(dir.path().join("CACHEDIR.TAG"), "").unwrap();
        let exe = dir.path().join("debug").join("kernel-tier");
        assert_eq!(cache_dir_from(None, None, Some(&exe)), dir.path().join("kernel-tier"));
        assert_eq!(cache_dir_from(Some("/c".into()), Some("/t".into()), Some(&exe)), Path::new("/c"));
        assert_eq!(cache_dir_from(None, Some("/t".into()), Some(&exe)), Path::new("/t/kernel-tier"));
        let elsewhere = Path::new("/nonexistent/debug/kernel-tier");
        assert!(cache_dir_from(None, None, Some(elsewhere)).ends_with("target/kernel-tier"));
    }
}
