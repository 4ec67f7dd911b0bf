//! The initramfs of one run: static busybox, the modules the guest needs before it can mount the
//! shared root (in load order), `init`, `/sbin/modprobe` and the run's settings.

use std::path::{Path, PathBuf};

use super::cpio::{self, Entry};
use super::guest_init::{self, Settings};
use super::modules::{self, ModulesDep, ModulesError};
use super::prepare::Prepared;

/// Why the initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The modules the guest needs cannot be found in the kernel package.
    #[error("finding the initramfs's modules in {dir}")]
    Modules {
        /// The kernel's modules directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: ModulesError,
    },
}

/// Writes the initramfs for a run with `jobs` jobs whose directory is `out`, to `dest`.
pub fn build(prepared: &Prepared, out: &Path, jobs: usize, dest: &Path) -> Result<(), InitramfsError> {
    let read =
        |path: &Path| std::fs::read(path).map_err(|source| InitramfsError::Io { path: path.into(), source });
    let modules_dir = prepared.modules_dir();
    let dep = ModulesDep::parse(&String::from_utf8_lossy(&read(&modules_dir.join("modules.dep"))?));
    let order = dep
        .load_order(modules::INITRAMFS_MODULES)
        .map_err(|source| InitramfsError::Modules { dir: modules_dir.clone(), source })?;

    let dir = |path: &str| Entry::Dir { path: path.into(), mode: 0o755 };
    let mut entries = vec![
        dir("bin"),
        dir("sbin"),
        dir("dev"),
        dir("proc"),
        dir("sys"),
        dir("lib"),
        dir("lib/modules"),
        Entry::CharDev { path: "dev/console".into(), mode: 0o600, major: 5, minor: 1 },
        Entry::File { path: "bin/busybox".into(), mode: 0o755, data: read(&prepared.busybox())? },
        Entry::File { path: "init".into(), mode: 0o755, data: guest_init::INIT.into() },
        Entry::File { path: "sbin/modprobe".into(), mode: 0o755, data: guest_init::MODPROBE.into() },
    ];
    let mut in_initramfs = Vec::new();
    for file in &order {
        let name = format!("lib/modules/{}", file.rsplit('/').next().unwrap_or(file));
        entries.push(Entry::File { path: name.clone(), mode: 0o644, data: read(&modules_dir.join(file))? });
        in_initramfs.push(name);
    }
    let settings = Settings { initramfs_modules: &in_initramfs, kernel_modules: &modules_dir, out, jobs };
    entries.push(Entry::File { path: "kernel-tier.conf".into(), mode: 0o644, data: settings.conf().into() });
    std::fs::write(dest, cpio::write(&entries))
        .map_err(|source| InitramfsError::Io { path: dest.into(), source })
}
