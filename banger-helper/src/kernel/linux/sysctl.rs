//! Sysctls through `/proc/sys` (the root is a parameter so tests can point it at a directory).
//! Network sysctls are those of the helper's network namespace.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;

use crate::kernel::{KResult, KernelError, Sysctl};
use crate::sysctl_key::SysctlKey;

/// Sysctls under a root directory, normally `/proc/sys`.
#[derive(Debug, Clone)]
pub struct ProcSysctl {
    root: PathBuf,
}

impl ProcSysctl {
    /// Sysctls under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ProcSysctl { root: root.into() }
    }
}

impl Sysctl for ProcSysctl {
    fn read(&self, key: &SysctlKey) -> KResult<String> {
        let text = std::fs::read_to_string(key.path_under(&self.root))
            .map_err(|e| KernelError::io("read sysctl", key.as_str(), e))?;
        Ok(text.trim().to_owned())
    }

    fn write(&self, key: &SysctlKey, value: &str) -> KResult<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .open(key.path_under(&self.root))
            .map_err(|e| KernelError::io("write sysctl", key.as_str(), e))?;
        f.write_all(value.as_bytes()).map_err(|e| KernelError::io("write sysctl", key.as_str(), e))
    }

    fn exists(&self, key: &SysctlKey) -> bool {
        key.path_under(&self.root).exists()
    }
}

#[cfg(test)]
mod tests {
    use nix::errno::Errno;

    use super::*;

    #[test]
    fn reads_and_writes_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        std::fs::write(dir.path().join("net/ipv4/ip_forward"), "0\n").unwrap();
        let s = ProcSysctl::new(dir.path());
        let k = SysctlKey::ip_forward();
        assert!(s.exists(&k));
        assert_eq!(s.read(&k).unwrap(), "0");
        s.write(&k, "1").unwrap();
        assert_eq!(s.read(&k).unwrap(), "1");
        let missing = SysctlKey::new("net.ipv4.nope").unwrap();
        assert!(!s.exists(&missing));
        assert_eq!(s.write(&missing, "1").unwrap_err().errno_value(), Some(Errno::ENOENT));
    }
}
