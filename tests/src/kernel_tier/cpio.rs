//! A writer for the `newc` cpio format the kernel unpacks as an initramfs
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`): each entry is a 110-byte ASCII
//! header, the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes; the
//! archive ends with an entry named `TRAILER!!!`.

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Path inside the archive, without a leading `/`.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Path inside the archive, without a leading `/`.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Its contents.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Path inside the archive, without a leading `/`.
        path: String,
        /// What it points to.
        target: String,
    },
    /// A character device node.
    CharDev {
        /// Path inside the archive, without a leading `/`.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes `entries` as one `newc` archive (root-owned, mtime 0).
pub fn write(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match entry {
            Entry::Dir { path, mode } => member(&mut out, ino, S_IFDIR | mode, 2, (0, 0), path, &[]),
            Entry::File { path, mode, data } => member(&mut out, ino, S_IFREG | mode, 1, (0, 0), path, data),
            Entry::Symlink { path, target } => {
                member(&mut out, ino, S_IFLNK | 0o777, 1, (0, 0), path, target.as_bytes())
            }
            Entry::CharDev { path, mode, major, minor } => {
                member(&mut out, ino, S_IFCHR | mode, 1, (*major, *minor), path, &[])
            }
        }
    }
    member(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
    out
}

fn member(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, rdev: (u32, u32), name: &str, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
    out.extend_from_slice(data);
    pad(out);
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads an archive back: (name, mode, rdev major, rdev minor, data) per member.
    fn read(mut archive: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let total = archive.len();
        let mut members = Vec::new();
        loop {
            assert_eq!((total - archive.len()) % 4, 0, "member not aligned");
            assert_eq!(&archive[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&archive[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, major, minor, namesize) = (field(1), field(6), field(9), field(10), field(11));
            let name_end = 110 + namesize as usize;
            let name = std::str::from_utf8(&archive[110..name_end - 1]).unwrap().to_string();
            assert_eq!(archive[name_end - 1], 0);
            let data_start = name_end.div_ceil(4) * 4;
            let data = archive[data_start..data_start + size as usize].to_vec();
            archive = &archive[(data_start + size as usize).div_ceil(4) * 4..];
            if name == "TRAILER!!!" {
                assert!(archive.is_empty());
                return members;
            }
            members.push((name, mode, major, minor, data));
        }
    }

    #[test]
    fn members_read_back_with_their_kinds_and_data() {
        let archive = write(&[
            Entry::Dir { path: "bin".into(), mode: 0o755 },
            Entry::File { path: "bin/busybox".into(), mode: 0o755, data: b"odd-length".to_vec() },
            Entry::Symlink { path: "bin/sh".into(), target: "busybox".into() },
            Entry::CharDev { path: "dev/console".into(), mode: 0o600, major: 5, minor: 1 },
            Entry::File { path: "init".into(), mode: 0o755, data: b"#!/bin/sh\n".to_vec() },
        ]);
        let members = read(&archive);
        let summary: Vec<_> =
            members.iter().map(|(n, m, ma, mi, d)| (n.as_str(), *m, *ma, *mi, d.as_slice())).collect();
        assert_eq!(
            summary,
            [
                ("bin", 0o040755, 0, 0, &b""[..]),
                ("bin/busybox", 0o100755, 0, 0, b"odd-length"),
                ("bin/sh", 0o120777, 0, 0, b"busybox"),
                ("dev/console", 0o020600, 5, 1, b""),
                ("init", 0o100755, 0, 0, b"#!/bin/sh\n"),
            ]
        );
    }

    #[test]
    fn an_empty_archive_is_only_the_trailer() {
        let archive = write(&[]);
        assert_eq!(archive.len(), 124); // 110 + "TRAILER!!!\0" = 121, padded to 124
        assert!(read(&archive).is_empty());
    }
}
