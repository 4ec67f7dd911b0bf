//! The programs the initramfs carries besides busybox: the guest's `init` (`init.sh`), the
//! `/sbin/modprobe` the kernel's module autoload runs, and the run's settings that `init` reads.
//!
//! `init` mounts `/proc`, `/sys`, `/dev`; loads the initramfs's modules in order; mounts the run's
//! directory (9p tag `out`), then the host's root read-only (9p tag `hostroot`) under an overlay
//! with a tmpfs upper layer, with fresh `/proc`, `/sys`, `/dev`, `/run` in it and the
//! run's directory at its host path; binds the kernel's extracted modules at
//! `/lib/modules/$(uname -r)`; runs each job's script in a mount namespace of its own whose root
//! is the shared root moved over `/` (not a `chroot`, in which the kernel refuses user
//! namespaces), writing `status-N` to the run's directory; and ends through `isa-debug-exit` with
//! the first non-zero status (at most 127), or 125 with `setup-error` written when a step fails.

use std::path::Path;

use super::jobs::quote;

/// The guest's init script.
pub const INIT: &str = include_str!("init.sh");

/// The initramfs's `/sbin/modprobe`: the shared root's modprobe, run in it, so that modules
/// load with the host's kmod from the extracted kernel's module tree.
pub const MODPROBE: &str = "#!/bin/busybox sh\n\
exec /bin/busybox chroot /newroot /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin modprobe \"$@\"\n";

/// The guest's exit code when its set-up failed (it writes `setup-error` first).
pub const SETUP_FAILED: i32 = 125;

/// The settings of one run, as `/kernel-tier.conf`.
#[derive(Debug)]
pub struct Settings<'a> {
    /// Module files in the initramfs, relative to its root, in load order.
    pub initramfs_modules: &'a [String],
    /// The extracted kernel's `lib/modules/RELEASE` directory (a host path).
    pub kernel_modules: &'a Path,
    /// The run's directory (a host path, bound at the same path in the guest).
    pub out: &'a Path,
    /// How many jobs there are (`job-1.sh` … in the run's directory).
    pub jobs: usize,
}

impl Settings<'_> {
    /// The text of `/kernel-tier.conf`.
    pub fn conf(&self) -> String {
        format!(
            "KT_INITRAMFS_MODULES={}\nKT_KERNEL_MODULES={}\nKT_OUT={}\nKT_JOBS={}\n",
            quote(&self.initramfs_modules.join(" ")),
            quote(&self.kernel_modules.to_string_lossy()),
            quote(&self.out.to_string_lossy()),
            self.jobs
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn conf_reads_back_in_a_shell() {
        let modules = vec!["lib/modules/virtio.ko".to_string(), "lib/modules/9p.ko".to_string()];
        let settings = Settings {
            initramfs_modules: &modules,
            kernel_modules: Path::new("/work/x y/lib/modules/6.1.0-57-amd64"),
            out: Path::new("/work/target/kernel-tier/runs/run-1"),
            jobs: 3,
        };
        let script = format!(
            "{}\nprintf '%s|' \"$KT_INITRAMFS_MODULES\" \"$KT_KERNEL_MODULES\" \"$KT_OUT\" \"$KT_JOBS\"",
            settings.conf()
        );
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "lib/modules/virtio.ko lib/modules/9p.ko|/work/x y/lib/modules/6.1.0-57-amd64|\
             /work/target/kernel-tier/runs/run-1|3|"
        );
    }

    #[test]
    fn init_parses_and_reports_through_the_debug_exit_port() {
        let out = Command::new("sh").arg("-n").arg("-c").arg(INIT).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(INIT.contains("dd of=/dev/port bs=1 seek=244 count=1"), "port 0xf4 is isa-debug-exit's");
        assert!(INIT.contains(&format!("finish {SETUP_FAILED}")));
    }
}
