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
    Capabilities, DmInfo, HelloReply, LeaseInfo, LoopInfo, LoopRole, NatInfo, OwnedObjects, Request,
    Response, TapInfo, TeardownFailure, TeardownReport,
};

/// The protocol version this crate speaks. A helper answers a `Hello` carrying another version
/// with [`HelperError::VersionMismatch`].
pub const PROTOCOL_VERSION: u32 = 3;

/// The largest message either side sends or accepts, in encoded bytes: the one size limit of the
/// protocol. The frame layer checks it before allocating; the codec refuses to encode more and
/// derives its own decoding bound from it ([`codec`]).
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// The most file descriptors one frame may carry.
pub const MAX_FDS_PER_FRAME: usize = 4;

/// The most VMs one [`Request::TeardownVms`] may name.
pub const MAX_TEARDOWN_VMS: usize = MAX_LIST_LEN;

/// The most elements any list in a message may hold (checked while decoding, before allocating).
pub const MAX_LIST_LEN: usize = 256;
