//! What the host's apt uses, handed to the image build's own apt (mmdebstrap runs one): the
//! host's release (its suite), its source lists, and its `Acquire::` options (proxies, a mirror
//! that needs `Check-Valid-Until "false"`, retries...). Never a mirror of banger's choosing: a
//! host that reaches Debian only through its own mirror or proxy builds images the same way.
//!
//! Only `Acquire::` options are taken (not `DPkg::` or `APT::Update::` hooks, which would run the
//! host's programs on the image, nor `Acquire::IndexTargets`, which only adds downloads).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::BuildError;

/// The host's apt setup, as the image build hands it to mmdebstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostApt {
    /// The host's release codename (`VERSION_CODENAME` of `/etc/os-release`).
    pub suite: String,
    /// The host's active source lists (`sources.list`, `sources.list.d/*.list` and `*.sources`).
    pub sources: Vec<PathBuf>,
    /// The host's `Acquire::` options, one apt configuration statement each.
    pub options: Vec<String>,
}

impl HostApt {
    /// Reads this host's apt setup: `/etc/os-release`, `/etc/apt`, and `apt-config dump`.
    pub fn read() -> Result<HostApt, BuildError> {
        let dump = Command::new("apt-config")
            .arg("dump")
            .output()
            .map_err(|source| BuildError::Spawn { program: "apt-config", source })?;
        if !dump.status.success() {
            return Err(BuildError::HostApt {
                problem: format!(
                    "`apt-config dump` failed ({}): {}",
                    dump.status,
                    String::from_utf8_lossy(&dump.stderr).trim()
                ),
            });
        }
        Self::from_files(
            Path::new("/etc/os-release"),
            Path::new("/etc/apt"),
            &String::from_utf8_lossy(&dump.stdout),
        )
    }

    /// The setup from an os-release file, an apt configuration directory and `apt-config dump`'s
    /// output.
    pub fn from_files(os_release: &Path, etc_apt: &Path, dump: &str) -> Result<HostApt, BuildError> {
        let text = std::fs::read_to_string(os_release)
            .map_err(|source| BuildError::Read { path: os_release.to_owned(), source })?;
        let suite = os_release_field(&text, "VERSION_CODENAME")
            .filter(|_| os_release_field(&text, "ID").as_deref() == Some("debian"))
            .ok_or_else(|| BuildError::HostApt {
                problem: format!(
                    "{} does not name a Debian release (ID=debian and VERSION_CODENAME): the default image is built from the host's Debian sources",
                    os_release.display()
                ),
            })?;
        let sources = source_lists(etc_apt)?;
        if sources.is_empty() {
            return Err(BuildError::HostApt {
                problem: format!(
                    "no apt sources in {0}/sources.list or {0}/sources.list.d/ (*.list, *.sources)",
                    etc_apt.display()
                ),
            });
        }
        Ok(HostApt { suite, sources, options: acquire_options(dump) })
    }
}

/// A field of an os-release file, unquoted.
fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.trim().strip_prefix(key)?.strip_prefix('=')?;
        let value = value.trim_matches(|c| c == '"' || c == '\'');
        (!value.is_empty()).then(|| value.to_owned())
    })
}

/// The source lists apt reads, in its order: `sources.list` when it has an entry, then
/// `sources.list.d/*.list` and `*.sources` by name.
fn source_lists(etc_apt: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let mut lists = Vec::new();
    let main = etc_apt.join("sources.list");
    if let Ok(text) = std::fs::read_to_string(&main)
        && text.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    {
        lists.push(main);
    }
    let dir = etc_apt.join("sources.list.d");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(lists),
        Err(source) => return Err(BuildError::Read { path: dir, source }),
    };
    let mut parts: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources") && p.is_file())
        .collect();
    parts.sort();
    lists.extend(parts);
    Ok(lists)
}

/// The `Acquire::` statements of `apt-config dump`, without `Acquire::IndexTargets`.
pub fn acquire_options(dump: &str) -> Vec<String> {
    dump.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Acquire::") && !l.starts_with("Acquire::IndexTargets"))
        .map(|l| l.trim_end_matches(';').to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_acquire_options_are_taken() {
        let dump = "APT \"\";\nAcquire::Check-Valid-Until \"false\";\nAcquire::http::Proxy \"http://p:3142\";\n\
                    Acquire::IndexTargets::deb::DEP-11::MetaKey \"x\";\nDPkg::Post-Invoke:: \"rm -f /x\";\n\
                    Acquire::Languages:: \"none\";\n";
        assert_eq!(
            acquire_options(dump),
            [
                "Acquire::Check-Valid-Until \"false\"",
                "Acquire::http::Proxy \"http://p:3142\"",
                "Acquire::Languages:: \"none\""
            ]
        );
    }

    #[test]
    fn the_host_sources_and_release_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let apt = dir.path().join("apt");
        std::fs::create_dir_all(apt.join("sources.list.d")).unwrap();
        std::fs::write(apt.join("sources.list"), "# only a comment\n").unwrap();
        std::fs::write(apt.join("sources.list.d/debian.sources"), "Types: deb\n").unwrap();
        std::fs::write(apt.join("sources.list.d/a.list"), "deb http://m/debian bookworm main\n").unwrap();
        std::fs::write(apt.join("sources.list.d/old.list.disabled"), "deb x\n").unwrap();
        let os = dir.path().join("os-release");
        std::fs::write(
            &os,
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_CODENAME=bookworm\n",
        )
        .unwrap();
        let host = HostApt::from_files(&os, &apt, "Acquire::Retries \"3\";\n").unwrap();
        assert_eq!(host.suite, "bookworm");
        assert_eq!(
            host.sources,
            [apt.join("sources.list.d/a.list"), apt.join("sources.list.d/debian.sources")]
        );
        assert_eq!(host.options, ["Acquire::Retries \"3\""]);

        std::fs::write(&os, "ID=ubuntu\nVERSION_CODENAME=noble\n").unwrap();
        let err = HostApt::from_files(&os, &apt, "").unwrap_err().to_string();
        assert!(err.contains("Debian release"), "{err}");
        std::fs::write(&os, "ID=debian\nVERSION_CODENAME=bookworm\n").unwrap();
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = HostApt::from_files(&os, &empty, "").unwrap_err().to_string();
        assert!(err.contains("no apt sources"), "{err}");
    }
}
