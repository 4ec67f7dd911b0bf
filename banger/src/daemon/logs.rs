//! Size-capped log files. A guest controls what it prints on its serial console and a daemon can
//! log a lot over weeks, so every log banger writes is capped: when a write would take the file
//! past its cap, the file is renamed to `<name>.1` (replacing an older one) and a new file begun.
//! At most twice the cap is ever on disk per log.
//!
//! A VM's logs (its serial console, and Firecracker's own log) begin again at each start
//! ([`begin_run`]): the file then holds the current run, and `<name>.1` the one before.
//! [`run_tail`] reads the current run's last lines, for error messages; [`tail`] reads across
//! both; [`follow`] prints what is appended, as `tail -F` does.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The default cap of a serial log.
pub const SERIAL_LOG_CAP: u64 = 4 * 1024 * 1024;
/// The default cap of the daemon log.
pub const DAEMON_LOG_CAP: u64 = 8 * 1024 * 1024;

/// A file that rotates to `<path>.1` when it would grow past `cap` bytes.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    cap: u64,
    file: File,
    len: u64,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

/// The path of the previous generation of `path`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl RotatingFile {
    /// Opens (appending to) `path`, capped at `cap` bytes.
    pub fn open(path: &Path, cap: u64) -> io::Result<Self> {
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        Ok(Self { path: path.to_owned(), cap: cap.max(1), file, len })
    }

    fn rotate(&mut self) -> io::Result<()> {
        fs::rename(&self.path, rotated_path(&self.path))?;
        self.file = open_append(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let total = buf.len();
        while !buf.is_empty() {
            if self.len >= self.cap {
                self.rotate()?;
            }
            let room = (self.cap - self.len) as usize;
            let n = buf.len().min(room);
            self.file.write_all(&buf[..n])?;
            self.len += n as u64;
            buf = &buf[n..];
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Copies `input` into a capped log until end of file (used for a VMM's serial console, whose
/// output arrives on a pipe). Returns the bytes copied.
pub fn relay(mut input: impl Read, path: &Path, cap: u64) -> io::Result<u64> {
    let mut out = RotatingFile::open(path, cap)?;
    let mut buf = [0u8; 16 * 1024];
    let mut copied = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        copied += n as u64;
    }
}

/// Starts a new run of the log at `path`: the file so far becomes `<path>.1` (replacing an
/// older one), so the file holds only what the new run writes. Nothing to move is fine.
pub fn begin_run(path: &Path) -> io::Result<()> {
    match fs::rename(path, rotated_path(path)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// At most the last `max_bytes` of the current run of a log ([`begin_run`]), from a line's
/// start: a line cut by the limit is left out. A missing log reads as empty.
pub fn run_tail(path: &Path, max_bytes: u64) -> io::Result<String> {
    let mut bytes = read_tail(path, max_bytes)?;
    let whole = fs::metadata(path).map(|m| m.len() <= max_bytes).unwrap_or(true);
    if !whole {
        let start = bytes.iter().position(|&b| b == b'\n').map_or(bytes.len(), |i| i + 1);
        bytes.drain(..start);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Copies to `out` what is appended to the log at `path` from byte `offset` on, looking every
/// `poll`, until `keep_going` says stop (it is asked after each look). A log that was rotated
/// or begun again (another file, or a shorter one) is read from its start; a missing one is
/// waited for.
pub fn follow(
    path: &Path,
    mut offset: u64,
    out: &mut dyn Write,
    poll: std::time::Duration,
    keep_going: &mut dyn FnMut() -> bool,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut identity = fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    loop {
        match File::open(path) {
            Ok(mut f) => {
                let meta = f.metadata()?;
                let now = Some((meta.dev(), meta.ino()));
                if now != identity || meta.len() < offset {
                    (identity, offset) = (now, 0);
                }
                if meta.len() > offset {
                    f.seek(SeekFrom::Start(offset))?;
                    offset += io::copy(&mut (&mut f).take(meta.len() - offset), out)?;
                    out.flush()?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if !keep_going() {
            return Ok(());
        }
        std::thread::sleep(poll);
    }
}

/// The last `max_bytes` of a log (its previous generation included when the current one is
/// shorter), as text with invalid UTF-8 replaced. A missing log reads as empty.
pub fn tail(path: &Path, max_bytes: u64) -> io::Result<String> {
    let mut out = Vec::new();
    let current = read_tail(path, max_bytes)?;
    if (current.len() as u64) < max_bytes {
        out = read_tail(&rotated_path(path), max_bytes - current.len() as u64)?;
    }
    out.extend_from_slice(&current);
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn read_tail(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_the_cap_and_keeps_two_generations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut f = RotatingFile::open(&path, 100).unwrap();
        f.write_all(&[b'a'; 150]).unwrap();
        f.write_all(&[b'b'; 120]).unwrap();
        drop(f);
        let cur = fs::read(&path).unwrap();
        let old = fs::read(rotated_path(&path)).unwrap();
        assert_eq!(cur.len(), 70);
        assert_eq!(old.len(), 100);
        assert!(cur.iter().all(|&b| b == b'b'));
        // Total on disk never exceeds two caps, whatever was written.
        assert!(cur.len() + old.len() <= 200);
    }

    #[test]
    fn reopening_continues_counting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        RotatingFile::open(&path, 10).unwrap().write_all(b"123456").unwrap();
        RotatingFile::open(&path, 10).unwrap().write_all(b"789012").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"12");
        assert_eq!(fs::read(rotated_path(&path)).unwrap(), b"1234567890");
    }

    #[test]
    fn relay_caps_a_flood_and_tail_reads_across_generations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let flood: Vec<u8> = (0..10_000u32).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
        let copied = relay(&flood[..], &path, 4096).unwrap();
        assert_eq!(copied, flood.len() as u64);
        assert!(fs::metadata(&path).unwrap().len() <= 4096);
        let t = tail(&path, 6000).unwrap();
        assert!(t.ends_with("line 9999\n"), "{}", &t[t.len() - 20..]);
        assert_eq!(t.len(), 6000.min(4096 + fs::metadata(&path).unwrap().len() as usize));
        assert_eq!(tail(&dir.path().join("missing"), 10).unwrap(), "");
    }

    #[test]
    fn a_run_tail_holds_the_current_run_from_a_line_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        fs::write(&path, "old run line 1\nold run line 2\n").unwrap();
        begin_run(&path).unwrap();
        assert_eq!(run_tail(&path, 100).unwrap(), "", "nothing of the old run");
        fs::write(&path, "boot line one\nboot line two\n").unwrap();
        assert_eq!(run_tail(&path, 1000).unwrap(), "boot line one\nboot line two\n");
        // Cut inside the first line: that line is left out.
        assert_eq!(run_tail(&path, 20).unwrap(), "boot line two\n");
        // The whole log across runs is still there.
        assert!(tail(&path, 1000).unwrap().starts_with("old run line 1"));
        begin_run(&dir.path().join("never-written")).unwrap();
    }

    #[test]
    fn follow_prints_what_is_appended_and_starts_over_after_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        fs::write(&path, "before\n").unwrap();
        let mut out = Vec::new();
        let mut step = 0;
        let p = path.clone();
        follow(&path, 7, &mut out, std::time::Duration::from_millis(1), &mut || {
            step += 1;
            match step {
                1 => OpenOptions::new().append(true).open(&p).unwrap().write_all(b"one\n").unwrap(),
                2 => {
                    begin_run(&p).unwrap();
                    fs::write(&p, "two\n").unwrap();
                }
                _ => return false,
            }
            true
        })
        .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "one\ntwo\n");
    }
}
