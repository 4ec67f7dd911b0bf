//! A file's identity: device, inode, size, and modification and change times in nanoseconds.
//!
//! An imported image must never change (a dm-snapshot reads its origin at every start, and a
//! changed origin corrupts every VM built on it), but hashing a large image at every start is
//! too slow. The identity stands in for the hash: any write changes the mtime and the ctime, a
//! replaced file has another inode, and the ctime cannot be set by a user at all (`utimensat`
//! sets only the access and modification times, and itself moves the ctime to now), so an
//! unchanged identity means unchanged content. A changed one only means the file must be hashed
//! again ([`crate::daemon::images::verify`]).
//!
//! Stored as text, `DEV:INO:SIZE:MTIME_NS:CTIME_NS`.

use std::fmt;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::str::FromStr;

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// The filesystem's device number.
    pub dev: u64,
    /// The inode number.
    pub ino: u64,
    /// The size in bytes.
    pub size: u64,
    /// The last modification, in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// The last status change, in nanoseconds since the epoch.
    pub ctime_ns: i64,
}

impl FileIdentity {
    /// The identity `meta` describes.
    pub fn of(meta: &Metadata) -> FileIdentity {
        let ns = |secs: i64, nsecs: i64| secs.saturating_mul(1_000_000_000).saturating_add(nsecs);
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The identity of the file at `path` (links followed).
    pub fn read(path: &Path) -> io::Result<FileIdentity> {
        Ok(FileIdentity::of(&std::fs::metadata(path)?))
    }
}

impl fmt::Display for FileIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}:{}:{}", self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)
    }
}

impl FromStr for FileIdentity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not DEV:INO:SIZE:MTIME_NS:CTIME_NS");
        let parts: Vec<&str> = s.split(':').collect();
        let [dev, ino, size, mtime, ctime] = parts[..] else { return Err(bad()) };
        Ok(FileIdentity {
            dev: dev.parse().map_err(|_| bad())?,
            ino: ino.parse().map_err(|_| bad())?,
            size: size.parse().map_err(|_| bad())?,
            mtime_ns: mtime.parse().map_err(|_| bad())?,
            ctime_ns: ctime.parse().map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn text_round_trips_and_junk_is_refused() {
        let id =
            FileIdentity { dev: 2049, ino: 77, size: 1 << 30, mtime_ns: -5, ctime_ns: 1_700_000_000_123 };
        assert_eq!(id.to_string(), "2049:77:1073741824:-5:1700000000123");
        assert_eq!(id.to_string().parse::<FileIdentity>().unwrap(), id);
        for junk in ["", "1:2:3:4", "1:2:3:4:5:6", "a:2:3:4:5", "1:2:-3:4:5"] {
            assert!(junk.parse::<FileIdentity>().is_err(), "{junk:?}");
        }
    }

    #[test]
    fn a_write_a_chmod_or_a_replacement_changes_it_and_a_read_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, "one").unwrap();
        let first = FileIdentity::read(&path).unwrap();
        let _ = fs::read(&path).unwrap();
        assert_eq!(FileIdentity::read(&path).unwrap(), first);

        // The same bytes written again still move mtime and ctime.
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&path, "one").unwrap();
        let rewritten = FileIdentity::read(&path).unwrap();
        assert_ne!(rewritten, first);
        assert_eq!((rewritten.ino, rewritten.size), (first.ino, first.size));

        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
        let chmodded = FileIdentity::read(&path).unwrap();
        assert_ne!(chmodded.ctime_ns, rewritten.ctime_ns);
        assert_eq!(chmodded.mtime_ns, rewritten.mtime_ns);

        let other = dir.path().join("g");
        fs::write(&other, "one").unwrap();
        fs::rename(&other, &path).unwrap();
        assert_ne!(FileIdentity::read(&path).unwrap().ino, first.ino);
    }
}
