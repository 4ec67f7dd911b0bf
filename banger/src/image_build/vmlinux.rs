//! The ELF `vmlinux` inside a packaged x86 bzImage. qemu boots it through its PVH note, which
//! under TCG is several seconds faster than letting the bzImage decompress itself.
//!
//! The compressed kernel sits `payload_offset` (header offset 0x248) bytes after the real-mode
//! setup code, which is `(setup_sects + 1) * 512` bytes long (`setup_sects` at 0x1f1, 0 meaning
//! 4), and is `payload_length` (0x24c) bytes long. Its compression is named by its magic; it is
//! decompressed by the matching command-line tool.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How a bzImage's payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`1f 8b`); its trailer already ends with the uncompressed size.
    Gzip,
    /// xz (`fd 37 7a 58 5a 00`).
    Xz,
    /// zstd (`28 b5 2f fd`).
    Zstd,
    /// lzma (`5d 00 00`).
    Lzma,
    /// bzip2 (`BZh`).
    Bzip2,
    /// lz4, legacy frames (`02 21 4c 18`).
    Lz4,
    /// lzo (`89 4c 5a 4f`).
    Lzo,
    /// Not compressed: the payload is the ELF itself.
    None,
}

impl Compression {
    /// The compression a payload starts with, if known.
    pub fn from_magic(data: &[u8]) -> Option<Compression> {
        const MAGICS: &[(&[u8], Compression)] = &[
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (b"BZh", Compression::Bzip2),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
            (b"\x7fELF", Compression::None),
        ];
        MAGICS.iter().find(|(magic, _)| data.starts_with(magic)).map(|(_, c)| *c)
    }

    /// The command (program and arguments) that decompresses it from stdin to stdout, and the
    /// Debian package that has the program.
    fn decompressor(self) -> Option<(&'static [&'static str], &'static str)> {
        Some(match self {
            Compression::Gzip => (&["gzip", "-dc"], "gzip"),
            Compression::Xz => (&["xz", "-dc", "--single-stream"], "xz-utils"),
            Compression::Zstd => (&["zstd", "-dcq"], "zstd"),
            Compression::Lzma => (&["xz", "-dc", "--format=lzma", "--single-stream"], "xz-utils"),
            Compression::Bzip2 => (&["bzip2", "-dc"], "bzip2"),
            Compression::Lz4 => (&["lz4", "-dc"], "lz4"),
            Compression::Lzo => (&["lzop", "-dc"], "lzop"),
            Compression::None => return None,
        })
    }
}

/// Why a bzImage's kernel could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    /// The file could not be read or the result written.
    #[error("{path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not an x86 bzImage with payload fields (boot protocol 2.08 or later).
    #[error("{path} is not an x86 bzImage with a payload header (boot protocol 2.08 or later)")]
    NotBzImage {
        /// The file.
        path: PathBuf,
    },
    /// The header points outside the file.
    #[error("{path}: the payload ({offset:#x}, {length} bytes) lies outside the file")]
    PayloadOutside {
        /// The file.
        path: PathBuf,
        /// Where the payload starts in the file.
        offset: usize,
        /// Its length.
        length: usize,
    },
    /// The payload's magic is not a known compression.
    #[error("{path}: unknown payload compression (magic {magic})")]
    UnknownCompression {
        /// The file.
        path: PathBuf,
        /// The payload's first bytes, in hex.
        magic: String,
    },
    /// The decompressor could not run or failed.
    #[error("{path}: `{program}` could not decompress the {compression:?} payload (install {package})")]
    Decompress {
        /// The file.
        path: PathBuf,
        /// The program run.
        program: &'static str,
        /// The compression.
        compression: Compression,
        /// The Debian package that has the program.
        package: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The decompressed payload is not an ELF file.
    #[error("{path}: the decompressed payload is not an ELF file")]
    NotElf {
        /// The file.
        path: PathBuf,
    },
}

/// The byte range of a bzImage's payload, or `None` if `image` is not a bzImage with payload
/// fields. Its end may lie beyond the image; the caller checks.
pub fn payload_range(image: &[u8]) -> Option<(usize, usize)> {
    let u16_at = |o: usize| image.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| image.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if image.get(0x202..0x206) != Some(b"HdrS") || u16_at(0x206)? < 0x0208 {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)? as usize;
    Some((start, u32_at(0x24c)? as usize))
}

/// Extracts the ELF kernel of the bzImage at `bzimage` into `out`.
pub fn extract(bzimage: &Path, out: &Path) -> Result<Compression, VmlinuxError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmlinuxError::Io { path, source }
    };
    let image = std::fs::read(bzimage).map_err(io(bzimage))?;
    let path = bzimage.to_path_buf();
    let (offset, length) = payload_range(&image).ok_or(VmlinuxError::NotBzImage { path: path.clone() })?;
    let payload = image.get(offset..offset.saturating_add(length)).ok_or(VmlinuxError::PayloadOutside {
        path: path.clone(),
        offset,
        length,
    })?;
    let compression = Compression::from_magic(payload).ok_or_else(|| VmlinuxError::UnknownCompression {
        path: path.clone(),
        magic: payload.iter().take(6).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "),
    })?;
    let elf = match compression.decompressor() {
        None => payload.to_vec(),
        Some((argv, package)) => {
            // Every compressor but gzip has the uncompressed size appended (4 bytes), which the
            // tools would take for a second, broken stream.
            let stream = match compression {
                Compression::Gzip => payload,
                _ => &payload[..payload.len().saturating_sub(4)],
            };
            decompress(argv, stream).map_err(|source| VmlinuxError::Decompress {
                path: path.clone(),
                program: argv[0],
                compression,
                package,
                source,
            })?
        }
    };
    if !elf.starts_with(b"\x7fELF") {
        return Err(VmlinuxError::NotElf { path });
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &elf).map_err(io(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(compression)
}

fn decompress(argv: &[&str], stream: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // Feed from another thread: the tool's output fills its pipe long before its input is read.
    let output = std::thread::scope(|s| {
        let feeder = s.spawn(move || stdin.write_all(stream));
        let output = child.wait_with_output();
        // A tool that stops reading early (bad data) fails the write; its status says why.
        let _ = feeder.join();
        output
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(std::io::Error::other(format!("{}: {}", output.status, stderr.trim())));
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped file: `setup_sects` sectors of setup after the boot sector, then
    /// `pad` bytes, then the payload.
    fn bzimage(setup_sects: u8, pad: usize, payload: &[u8]) -> Vec<u8> {
        let sects = if setup_sects == 0 { 4 } else { usize::from(setup_sects) };
        let mut image = vec![0u8; (sects + 1) * 512 + pad];
        image[0x1f1] = setup_sects;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&(pad as u32).to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(b"trailer after the payload");
        image
    }

    fn compress(argv: &[&str], data: &[u8]) -> Vec<u8> {
        decompress(argv, data).unwrap()
    }

    #[test]
    fn payload_range_reads_the_header() {
        let image = bzimage(39, 0x2cc, b"PAYLOAD");
        assert_eq!(payload_range(&image), Some((40 * 512 + 0x2cc, 7)));
        // setup_sects 0 means 4.
        let image = bzimage(0, 16, b"P");
        assert_eq!(payload_range(&image), Some((5 * 512 + 16, 1)));
    }

    #[test]
    fn payload_range_refuses_other_files_and_old_protocols() {
        assert_eq!(payload_range(b"\x7fELF not a bzImage"), None);
        assert_eq!(payload_range(&[0u8; 4096]), None);
        let mut old = bzimage(4, 0, b"P");
        old[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        assert_eq!(payload_range(&old), None);
    }

    #[test]
    fn compression_is_named_by_magic() {
        assert_eq!(Compression::from_magic(&[0xfd, b'7', b'z', b'X', b'Z', 0, 1]), Some(Compression::Xz));
        assert_eq!(Compression::from_magic(&[0x1f, 0x8b, 8]), Some(Compression::Gzip));
        assert_eq!(Compression::from_magic(&[0x28, 0xb5, 0x2f, 0xfd]), Some(Compression::Zstd));
        assert_eq!(Compression::from_magic(b"\x7fELF\x02"), Some(Compression::None));
        assert_eq!(Compression::from_magic(b"MZ"), None);
    }

    #[test]
    fn extracts_a_gzip_payload() {
        let elf = b"\x7fELF\x02\x01\x01 a fake kernel".repeat(100);
        let gz = compress(&["gzip", "-c", "-n"], &elf);
        let dir = tempfile::tempdir().unwrap();
        let (bz, out) = (dir.path().join("vmlinuz"), dir.path().join("vmlinux"));
        std::fs::write(&bz, bzimage(27, 0x2cc, &gz)).unwrap();
        assert_eq!(extract(&bz, &out).unwrap(), Compression::Gzip);
        assert_eq!(std::fs::read(&out).unwrap(), elf);
    }

    #[test]
    fn extracts_an_xz_payload_with_its_size_appended() {
        if Command::new("xz").arg("--version").output().is_err() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "xz (xz-utils) is missing, and CI=true");
            eprintln!("SKIPPED: xz (xz-utils) is not installed");
            return;
        }
        let elf = b"\x7fELF\x02\x01\x01 another fake kernel".repeat(100);
        let mut xz = compress(&["xz", "-c", "--check=crc32"], &elf);
        xz.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let (bz, out) = (dir.path().join("vmlinuz"), dir.path().join("vmlinux"));
        std::fs::write(&bz, bzimage(39, 0x100, &xz)).unwrap();
        assert_eq!(extract(&bz, &out).unwrap(), Compression::Xz);
        assert_eq!(std::fs::read(&out).unwrap(), elf);
    }

    #[test]
    fn refuses_a_payload_outside_the_file_or_not_elf() {
        let dir = tempfile::tempdir().unwrap();
        let (bz, out) = (dir.path().join("vmlinuz"), dir.path().join("vmlinux"));
        let mut image = bzimage(4, 0, b"P");
        image[0x24c..0x250].copy_from_slice(&1_000_000u32.to_le_bytes());
        std::fs::write(&bz, image).unwrap();
        assert!(matches!(extract(&bz, &out), Err(VmlinuxError::PayloadOutside { .. })));
        let gz = compress(&["gzip", "-c", "-n"], b"not an ELF file");
        std::fs::write(&bz, bzimage(4, 0, &gz)).unwrap();
        let err = extract(&bz, &out).unwrap_err();
        assert!(matches!(err, VmlinuxError::NotElf { .. }), "{err}");
        assert!(!out.exists());
    }
}
