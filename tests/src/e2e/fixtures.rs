//! Files a world needs: the workspace's binaries where test users can run them, a test kernel and
//! an ext4 root filesystem.
//!
//! `cargo test` does not build other crates' binaries, so the test command (`tests/run`) runs
//! `cargo build --workspace --bins` first; the harness finds them next to the test executable
//! (`target/debug`), or in `BANGER_E2E_BIN_DIR`. The checkout may sit under a 0700 home, so each
//! world hard-links them (copies across filesystems) into a 0755 directory of its own.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::run::root;

/// The binaries a world runs.
pub const BINARIES: [&str; 4] = ["banger", "bangerd", "banger-helper", "firecracker-double"];

/// Where the workspace's binaries were built.
pub fn build_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BANGER_E2E_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // target/debug/deps/<test executable>, or target/release/bench beside the binaries
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    if let Some(dir) = exe.parent().filter(|d| d.join("bangerd").is_file()) {
        return Ok(dir.to_path_buf());
    }
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .with_context(|| format!("cannot find the build directory above {}", exe.display()))
}

/// Puts every binary of [`BINARIES`] that was built into `dest` (mode 0755); fails unless those
/// named in `required` are there.
pub fn stage_binaries(dest: &Path, required: &[&str]) -> anyhow::Result<()> {
    let src = build_dir()?;
    let missing: Vec<&str> = required.iter().copied().filter(|b| !src.join(b).is_file()).collect();
    if !missing.is_empty() {
        bail!(
            "missing binaries {missing:?} in {}: build them first with `cargo build --workspace --bins` \
             (tests/run does), or point BANGER_E2E_BIN_DIR at them",
            src.display()
        );
    }
    fs::create_dir_all(dest)?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755))?;
    for b in BINARIES.iter().filter(|b| src.join(b).is_file()) {
        let (from, to) = (src.join(b), dest.join(b));
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to)
                .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        }
        let mode = fs::metadata(&to)?.permissions().mode();
        if mode & 0o005 != 0o005 {
            fs::set_permissions(&to, fs::Permissions::from_mode(mode | 0o755))?;
        }
    }
    Ok(())
}

/// Writes the test kernel (an ELF the double accepts) to `path`, mode 0644.
pub fn write_kernel(path: &Path) -> anyhow::Result<()> {
    crate::double::elf::write_test_kernel(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// Builds a 32 MiB ext4 root filesystem at `path` (mode 0644) with what a small distribution has
/// where banger personalises it: `/etc/hostname`, `/etc/ssh`, `/root`.
pub fn write_rootfs(path: &Path, scratch: &Path) -> anyhow::Result<()> {
    write_rootfs_with(path, scratch, &|_| Ok(()))
}

/// [`write_rootfs`] with `extra` adding to the tree (given its root) before the image is made.
pub fn write_rootfs_with(
    path: &Path,
    scratch: &Path,
    extra: &dyn Fn(&Path) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let tree = scratch
        .join(format!("rootfs-tree-{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    for d in ["etc/ssh", "root", "tmp", "var", "dev", "proc", "sys"] {
        fs::create_dir_all(tree.join(d))?;
    }
    fs::set_permissions(tree.join("root"), fs::Permissions::from_mode(0o700))?;
    fs::set_permissions(tree.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::write(tree.join("etc/hostname"), "image\n")?;
    fs::write(tree.join("etc/hosts"), "127.0.0.1 localhost\n")?;
    fs::write(tree.join("etc/os-release"), "ID=banger-e2e\nNAME=\"banger end-to-end test image\"\n")?;
    extra(&tree)?;
    let (p, t) = (path.to_string_lossy(), tree.to_string_lossy());
    root("mkfs.ext4", &["-q", "-F", "-E", "root_owner=0:0", "-d", &t, &p, "32M"])?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    fs::remove_dir_all(&tree)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_dir_is_above_the_test_executable() {
        let dir = build_dir().unwrap();
        let exe = std::env::current_exe().unwrap();
        assert!(exe.starts_with(&dir), "{} is not under {}", exe.display(), dir.display());
    }

    #[test]
    fn the_kernel_is_an_elf_readable_by_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        write_kernel(&k).unwrap();
        assert_eq!(&fs::read(&k).unwrap()[..4], b"\x7fELF");
        assert_eq!(fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o644);
    }
}
