//! Reading files out of the guest's root drive without mounting it: e2fsprogs `debugfs` dumps a
//! file from the ext2/3/4 image (opened read-only through the descriptor the VMM holds) into the
//! guest's private tmpfs. A file that does not exist is simply not dumped, so presence is known
//! from the result, not from debugfs's messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Directories searched for the guest's tools, as a root shell's PATH would.
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds `name` in [`GUEST_PATH`].
pub fn find_program(name: &str) -> Option<PathBuf> {
    GUEST_PATH.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// `name` found in [`GUEST_PATH`], else `name` itself (for an error naming it).
pub fn program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| name.into())
}

/// A root drive readable through a path (e.g. `/proc/self/fd/4`).
#[derive(Debug, Clone)]
pub struct RootDrive {
    image: PathBuf,
}

/// Why a file could not be read from the root drive.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// debugfs could not be run.
    #[error("cannot run debugfs to read {file} from the root drive (install e2fsprogs)")]
    Debugfs {
        /// The file asked for.
        file: String,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
}

impl RootDrive {
    /// A drive readable at `image`.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        RootDrive { image: image.into() }
    }

    /// Copies `file` (absolute path inside the image) to `out`; `Ok(false)` when the image has no
    /// such file or is not an ext2/3/4 filesystem.
    pub fn dump(&self, file: &str, out: &Path) -> Result<bool, RootfsError> {
        let _ = std::fs::remove_file(out);
        Command::new(program("debugfs"))
            .env("PATH", GUEST_PATH)
            .arg("-R")
            .arg(format!("dump {file} {}", out.display()))
            .arg(&self.image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| RootfsError::Debugfs { file: file.to_string(), source })?;
        Ok(out.is_file())
    }

    /// Where the symbolic link `file` (absolute path inside the image) points, when it is one
    /// (a fast link, as every short target is); `Ok(None)` otherwise.
    pub fn symlink_target(&self, file: &str) -> Result<Option<String>, RootfsError> {
        let out = Command::new(program("debugfs"))
            .env("PATH", GUEST_PATH)
            .arg("-R")
            .arg(format!("stat {file}"))
            .arg(&self.image)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|source| RootfsError::Debugfs { file: file.to_string(), source })?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Fast link dest: \"")?.strip_suffix('"').map(str::to_owned)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs `mkfs.ext4` and `debugfs` (e2fsprogs), not root.
    #[test]
    fn dumps_existing_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hostname"), "guest-one\n").unwrap();
        std::fs::create_dir_all(tree.join("etc/systemd/system")).unwrap();
        std::os::unix::fs::symlink("/dev/null", tree.join("etc/systemd/system/ctrl-alt-del.target")).unwrap();
        let image = dir.path().join("root.ext4");
        let ok = Command::new(program("mkfs.ext4"))
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&image)
            .arg("8M")
            .status()
            .unwrap()
            .success();
        assert!(ok, "mkfs.ext4 failed");
        let drive = RootDrive::new(&image);
        let out = dir.path().join("out");
        assert!(drive.dump("/etc/hostname", &out).unwrap());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "guest-one\n");
        assert!(!drive.dump("/etc/missing", &out).unwrap());
        let target = drive.symlink_target("/etc/systemd/system/ctrl-alt-del.target").unwrap();
        assert_eq!(target.as_deref(), Some("/dev/null"));
        assert_eq!(drive.symlink_target("/etc/hostname").unwrap(), None, "not a link");
        assert_eq!(drive.symlink_target("/etc/missing").unwrap(), None);
        let not_ext = dir.path().join("zero");
        std::fs::write(&not_ext, vec![0u8; 65536]).unwrap();
        assert!(!RootDrive::new(&not_ext).dump("/etc/hostname", &out).unwrap());
    }
}
