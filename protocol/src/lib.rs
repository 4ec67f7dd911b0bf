//! The wire protocol between `bangerd` (unprivileged) and `banger-helper` (root).
//!
//! Everything that crosses the helper's socket is defined here and nowhere else:
//!
//! 1. [`ids`]: validated newtypes ([`VmId`], [`InstallId`], [`IfName`]) that can only hold
//!    well-formed values, so code that decoded or parsed one can never hold an unchecked string.
//! 2. [`message`]: the closed set of requests ([`Request`]) and answers ([`Response`]), and the
//!    version handshake ([`Request::Hello`]).
//! 3. [`error`]: typed errors with stable numeric codes ([`HelperError`], [`ErrorCode`]).
//! 4. [`codec`]: the only place that knows the byte encoding (bincode today).
//! 5. [`frame`]: length-prefixed frames with file descriptors passed beside them (SCM_RIGHTS),
//!    with the size cap checked before anything is allocated.
//!
//! A connection starts with exactly one `Hello`; every later frame is one request answered by one
//! response, in order.
#![deny(missing_docs)]

pub mod codec;
pub mod error;
pub mod frame;
pub mod ids;
pub mod message;

pub use error::{ErrorCode, HelperError, quoted};
pub use ids::{IdError, IfName, InstallId, VmId};
pub use message::{
    Capabilities, DmInfo, FirewallBackend, HelloReply, JailFiles, JailInfo, LeaseInfo, LoopInfo, LoopRole,
    NatInfo, OwnedObjects, Request, Response, TapInfo, TeardownFailure, TeardownReport, VmShape, jail_paths,
};

/// Where the helper listens unless its unit, its `--socket` or bangerd's configuration says
/// otherwise.
pub const DEFAULT_SOCKET: &str = "/run/banger/helper.sock";

/// The protocol version this crate speaks. A helper answers a `Hello` carrying another version
/// with [`HelperError::VersionMismatch`].
pub const PROTOCOL_VERSION: u32 = 5;

/// The largest message either side sends or accepts, in encoded bytes: the one size limit of the
/// protocol. The frame layer checks it before allocating; the codec refuses to encode more and
/// derives its own decoding bound from it ([`codec`]).
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// The most file descriptors one frame may carry.
pub const MAX_FDS_PER_FRAME: usize = 4;

/// The most vCPUs a VM may have (Firecracker's limit).
pub const MAX_VCPUS: u8 = 32;

/// The least memory a VM may have, in MiB.
pub const MIN_MEM_MIB: u32 = 128;

/// The largest kernel or initrd a jail takes, in bytes (512 MiB): one that is not
/// other-readable is copied into the jail while the helper waits.
pub const MAX_BOOT_FILE_BYTES: u64 = 512 << 20;

/// The most VMs one [`Request::TeardownVms`] may name.
pub const MAX_TEARDOWN_VMS: usize = MAX_LIST_LEN;

/// The most elements any list in a message may hold (checked while decoding, before allocating).
pub const MAX_LIST_LEN: usize = 256;

/// The chunk size, in 512-byte sectors, of every dm-snapshot the helper builds (4 KiB).
pub const SNAPSHOT_CHUNK_SECTORS: u64 = 8;

/// The smallest copy-on-write file that can hold every chunk of an origin of `origin_bytes`:
/// a persistent snapshot stores a header chunk, each copied chunk, and one metadata chunk per
/// 256 copied chunks (16 bytes per exception in a 4 KiB chunk), plus the zeroed metadata chunk
/// that ends the table. A COW this large can never fill up, so the snapshot can never turn
/// invalid under the guest. Both the daemon (sizing the file) and the helper (refusing a smaller
/// one) use this one formula.
pub fn min_cow_bytes(origin_bytes: u64) -> u64 {
    let chunk = SNAPSHOT_CHUNK_SECTORS * 512;
    let data = origin_bytes.div_ceil(chunk);
    let exceptions_per_chunk = chunk / 16;
    let metadata = data.div_ceil(exceptions_per_chunk) + 1;
    (1 + data + metadata) * chunk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cow_holds_every_chunk_and_its_metadata() {
        assert_eq!(min_cow_bytes(0), 2 * 4096);
        // 1 GiB: 262144 chunks, 1024 metadata chunks and the end marker, one header.
        assert_eq!(min_cow_bytes(1 << 30), (1 + 262_144 + 1_025) * 4096);
        // A partial chunk counts whole.
        assert_eq!(min_cow_bytes(1), (1 + 1 + 2) * 4096);
        for origin in [4095u64, 4096, 4097, 1 << 20, 8 << 30] {
            assert!(min_cow_bytes(origin) > origin + origin / 256);
        }
    }
}
