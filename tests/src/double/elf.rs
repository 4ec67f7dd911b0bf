//! The kernel image check Firecracker does at `InstanceStart` on x86_64, and a tiny valid
//! "kernel" for tests.
//!
//! Firecracker 1.16 loads an uncompressed ELF `vmlinux` with linux-loader's `Elf` loader. That
//! loader checks the ELF header (magic, little endian, program header size and offset), refuses an
//! entry point below the start of high memory (1 MiB), then copies every `PT_LOAD` segment into
//! guest memory at its physical address. [`check_kernel`] performs the same checks, in the same
//! order, without guest memory: a segment must fit in the guest RAM configured by
//! `machine-config`. Like the real loader it does not look at `e_machine` or the ELF class.
//!
//! [`write_test_kernel`] writes the smallest image that passes: one 64-byte header, one program
//! header and a 3-byte `hlt; jmp .-1` loop loaded at 1 MiB.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Where x86_64 guest high memory starts; the kernel entry point may not be below it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole of a Firecracker x86_64 guest (RAM skips [3 GiB, 4 GiB)).
const MMIO32_START: u64 = 3 << 30;
const FIRST_ADDR_PAST_32BITS: u64 = 4 << 30;

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const PT_LOAD: u32 = 1;

/// Why a kernel image was refused, worded as linux-loader words it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// The file is shorter than an ELF header.
    #[error("Kernel Loader: Unable to read elf header")]
    ReadElfHeader,
    /// The file does not start with `\x7fELF`.
    #[error("Kernel Loader: Invalid Elf magic number")]
    InvalidElfMagicNumber,
    /// The image is big endian.
    #[error("Kernel Loader: Trying to load big-endian binary on little-endian machine")]
    BigEndianElfOnLittle,
    /// `e_phentsize` is not the size of an ELF64 program header.
    #[error("Kernel Loader: Invalid program header size")]
    InvalidProgramHeaderSize,
    /// `e_phoff` points into the ELF header.
    #[error("Kernel Loader: Invalid program header offset")]
    InvalidProgramHeaderOffset,
    /// The entry point is below 1 MiB.
    #[error("Kernel Loader: Invalid entry address")]
    InvalidEntryAddress,
    /// The program header table is cut short.
    #[error("Kernel Loader: Unable to read program header")]
    ReadProgramHeader,
    /// A loadable segment is cut short or does not fit in guest memory.
    #[error("Kernel Loader: Unable to read kernel image")]
    ReadKernelImage,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// True when `[addr, addr + len)` lies in the RAM of a guest with `mem_bytes` bytes.
fn fits_in_guest_ram(addr: u64, len: u64, mem_bytes: u64) -> bool {
    let Some(end) = addr.checked_add(len) else { return false };
    let low_end = mem_bytes.min(MMIO32_START);
    if end <= low_end {
        return true;
    }
    let high_len = mem_bytes.saturating_sub(MMIO32_START);
    addr >= FIRST_ADDR_PAST_32BITS && end <= FIRST_ADDR_PAST_32BITS + high_len
}

/// Checks `kernel` as Firecracker's x86_64 ELF loader would for a guest of `mem_size_mib` MiB.
pub fn check_kernel(kernel: &mut File, mem_size_mib: u64) -> Result<(), ElfError> {
    let mem_bytes = mem_size_mib.saturating_mul(1 << 20);
    kernel.seek(SeekFrom::Start(0)).map_err(|_| ElfError::ReadElfHeader)?;
    let mut ehdr = [0u8; EHDR_LEN];
    kernel.read_exact(&mut ehdr).map_err(|_| ElfError::ReadElfHeader)?;
    if &ehdr[..4] != b"\x7fELF" {
        return Err(ElfError::InvalidElfMagicNumber);
    }
    if ehdr[5] != 1 {
        return Err(ElfError::BigEndianElfOnLittle);
    }
    if usize::from(u16_at(&ehdr, 54)) != PHDR_LEN {
        return Err(ElfError::InvalidProgramHeaderSize);
    }
    let phoff = u64_at(&ehdr, 32);
    if phoff < EHDR_LEN as u64 {
        return Err(ElfError::InvalidProgramHeaderOffset);
    }
    if u64_at(&ehdr, 24) < HIMEM_START {
        return Err(ElfError::InvalidEntryAddress);
    }
    let file_len = kernel.metadata().map_err(|_| ElfError::ReadProgramHeader)?.len();
    kernel.seek(SeekFrom::Start(phoff)).map_err(|_| ElfError::ReadProgramHeader)?;
    let mut phdrs = Vec::new();
    for _ in 0..u16_at(&ehdr, 56) {
        let mut phdr = [0u8; PHDR_LEN];
        kernel.read_exact(&mut phdr).map_err(|_| ElfError::ReadProgramHeader)?;
        phdrs.push(phdr);
    }
    for phdr in phdrs {
        let filesz = u64_at(&phdr, 32);
        if u32_at(&phdr, 0) != PT_LOAD || filesz == 0 {
            continue;
        }
        let offset = u64_at(&phdr, 8);
        let paddr = u64_at(&phdr, 24);
        let in_file = offset.checked_add(filesz).is_some_and(|end| end <= file_len);
        if !in_file || !fits_in_guest_ram(paddr, filesz, mem_bytes) {
            return Err(ElfError::ReadKernelImage);
        }
    }
    Ok(())
}

/// The bytes of the smallest x86_64 ELF image Firecracker's loader accepts.
pub fn test_kernel_bytes() -> Vec<u8> {
    let code: [u8; 3] = [0xf4, 0xeb, 0xfd]; // hlt; jmp back to hlt
    let code_off = (EHDR_LEN + PHDR_LEN) as u64;
    let mut b = Vec::with_capacity(EHDR_LEN + PHDR_LEN + code.len());
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, System V ABI, padding.
    b.extend_from_slice(b"\x7fELF");
    b.extend_from_slice(&[2, 1, 1, 0]);
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    b.extend_from_slice(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    b.extend_from_slice(&1u32.to_le_bytes()); // e_version
    b.extend_from_slice(&HIMEM_START.to_le_bytes()); // e_entry
    b.extend_from_slice(&(EHDR_LEN as u64).to_le_bytes()); // e_phoff
    b.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    b.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    b.extend_from_slice(&(EHDR_LEN as u16).to_le_bytes()); // e_ehsize
    b.extend_from_slice(&(PHDR_LEN as u16).to_le_bytes()); // e_phentsize
    b.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    b.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    b.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    b.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    debug_assert_eq!(b.len(), EHDR_LEN);
    b.extend_from_slice(&PT_LOAD.to_le_bytes()); // p_type
    b.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R + X
    b.extend_from_slice(&code_off.to_le_bytes()); // p_offset
    b.extend_from_slice(&HIMEM_START.to_le_bytes()); // p_vaddr
    b.extend_from_slice(&HIMEM_START.to_le_bytes()); // p_paddr
    b.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    b.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    b.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    b.extend_from_slice(&code);
    b
}

/// Writes a minimal valid x86_64 ELF "kernel" to `path` (created or truncated).
///
/// Firecracker and the double both accept it at `InstanceStart`; a real Firecracker would run
/// it and halt, the double boots its emulated guest instead.
pub fn write_test_kernel(path: &Path) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(&test_kernel_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bytes(bytes: &[u8], mib: u64) -> Result<(), ElfError> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        check_kernel(&mut f, mib)
    }

    #[test]
    fn test_kernel_passes() {
        assert_eq!(check_bytes(&test_kernel_bytes(), 128), Ok(()));
    }

    #[test]
    fn refusals_follow_the_loader_order() {
        assert_eq!(check_bytes(b"short", 128), Err(ElfError::ReadElfHeader));
        assert_eq!(check_bytes(&[0u8; 64], 128), Err(ElfError::InvalidElfMagicNumber));
        let mut big = test_kernel_bytes();
        big[5] = 2;
        assert_eq!(check_bytes(&big, 128), Err(ElfError::BigEndianElfOnLittle));
        let mut phsz = test_kernel_bytes();
        phsz[54] = 32;
        assert_eq!(check_bytes(&phsz, 128), Err(ElfError::InvalidProgramHeaderSize));
        let mut phoff = test_kernel_bytes();
        phoff[32] = 8;
        assert_eq!(check_bytes(&phoff, 128), Err(ElfError::InvalidProgramHeaderOffset));
        let mut entry = test_kernel_bytes();
        entry[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(check_bytes(&entry, 128), Err(ElfError::InvalidEntryAddress));
        let full = test_kernel_bytes();
        assert_eq!(check_bytes(&full[..EHDR_LEN + 10], 128), Err(ElfError::ReadProgramHeader));
        assert_eq!(check_bytes(&full[..full.len() - 1], 128), Err(ElfError::ReadKernelImage));
    }

    #[test]
    fn segment_must_fit_in_guest_ram() {
        let mut high = test_kernel_bytes();
        let paddr = EHDR_LEN + 24;
        high[paddr..paddr + 8].copy_from_slice(&(200u64 << 20).to_le_bytes());
        assert_eq!(check_bytes(&high, 128), Err(ElfError::ReadKernelImage));
        assert_eq!(check_bytes(&high, 256), Ok(()));
        assert!(fits_in_guest_ram(4 << 30, 10, (3 << 30) + 4096));
        assert!(!fits_in_guest_ram(3 << 30, 10, 8 << 30));
    }
}
