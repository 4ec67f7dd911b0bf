//! Which kernel module files the initramfs needs, in the order `insmod` must load them, read
//! from the `modules.dep` that `depmod -b` wrote for the extracted kernel.

use std::collections::{BTreeMap, BTreeSet};

/// The modules the guest's init loads itself with busybox's `insmod` (any other module is loaded
/// on demand by the kernel, through the shared root's modprobe): virtio over PCI, 9p over virtio
/// and overlayfs to mount the shared root; then tun (its node does not exist before its module,
/// so nothing would ask for it), loop and device-mapper with its snapshot target, so that tests
/// find their device nodes before first use. Loading these from the initramfs is about a second
/// faster under emulation than running the shared root's modprobe for them.
pub const INITRAMFS_MODULES: &[&str] =
    &["virtio_pci", "9pnet_virtio", "9p", "overlay", "tun", "loop", "dm-mod", "dm-snapshot"];

/// Why a module order could not be found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModulesError {
    /// A module named (or depended on) has no line in `modules.dep`.
    #[error("module {0} is not in modules.dep (is it built in, or missing from the kernel package?)")]
    Unknown(String),
    /// `modules.dep` has a dependency cycle.
    #[error("modules.dep has a dependency cycle through {0}")]
    Cycle(String),
}

/// `modules.dep` parsed: each module's file (relative to the modules directory) and the files it
/// depends on.
#[derive(Debug, Default)]
pub struct ModulesDep {
    deps: BTreeMap<String, Vec<String>>,
}

/// A module's name as the kernel knows it: the file's base name without `.ko` and any
/// compression suffix, with `-` read as `_`.
pub fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

impl ModulesDep {
    /// Parses the text of `modules.dep` (`file: dep dep ...` per line).
    pub fn parse(text: &str) -> ModulesDep {
        let deps = text
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(file, deps)| {
                (file.trim().to_string(), deps.split_whitespace().map(String::from).collect())
            })
            .collect();
        ModulesDep { deps }
    }

    fn file_of(&self, name: &str) -> Option<&str> {
        let wanted = module_name(name);
        self.deps.keys().find(|f| module_name(f) == wanted).map(String::as_str)
    }

    /// The files of `names` and everything they depend on, each once, every file after the
    /// files it depends on.
    pub fn load_order(&self, names: &[&str]) -> Result<Vec<String>, ModulesError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in names {
            let file = self.file_of(name).ok_or_else(|| ModulesError::Unknown(name.to_string()))?;
            self.visit(file, &mut Vec::new(), &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        file: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModulesError> {
        if done.contains(file) {
            return Ok(());
        }
        if path.iter().any(|p| p == file) {
            return Err(ModulesError::Cycle(module_name(file)));
        }
        let deps = self.deps.get(file).ok_or_else(|| ModulesError::Unknown(module_name(file)))?;
        path.push(file.to_string());
        for dep in deps {
            self.visit(dep, path, done, order)?;
        }
        path.pop();
        done.insert(file.to_string());
        order.push(file.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as depmod wrote them for Debian's 6.1 kernel.
    const DEP: &str = "\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/net/tun.ko:
kernel/drivers/block/loop.ko:
kernel/drivers/md/dm-snapshot.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-bufio.ko:
kernel/drivers/md/dm-mod.ko:
";

    fn names(files: &[String]) -> Vec<String> {
        files.iter().map(|f| module_name(f)).collect()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let dep = ModulesDep::parse(DEP);
        let order = dep.load_order(INITRAMFS_MODULES).unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "9pnet",
                "9pnet_virtio",
                "netfs",
                "fscache",
                "9p",
                "overlay",
                "tun",
                "loop",
                "dm_mod",
                "dm_bufio",
                "dm_snapshot"
            ]
        );
        for (i, file) in order.iter().enumerate() {
            for d in &dep.deps[file] {
                assert!(order[..i].contains(d), "{file} loaded before its dependency {d}");
            }
        }
    }

    #[test]
    fn dashes_and_underscores_name_the_same_module() {
        let dep = ModulesDep::parse(DEP);
        assert_eq!(names(&dep.load_order(&["dm_snapshot"]).unwrap()), ["dm_bufio", "dm_mod", "dm_snapshot"]);
        assert_eq!(module_name("kernel/drivers/md/dm-mod.ko.xz"), "dm_mod");
    }

    #[test]
    fn unknown_modules_and_cycles_are_errors() {
        let dep = ModulesDep::parse(DEP);
        assert_eq!(dep.load_order(&["virtio_blk"]), Err(ModulesError::Unknown("virtio_blk".into())));
        let missing = ModulesDep::parse("a.ko: b.ko\n");
        assert_eq!(missing.load_order(&["a"]), Err(ModulesError::Unknown("b".into())));
        let cycle = ModulesDep::parse("a.ko: b.ko\nb.ko: a.ko\n");
        assert!(matches!(cycle.load_order(&["a"]), Err(ModulesError::Cycle(_))));
    }
}
