//! The byte encoding of messages. This is the only module that knows it is bincode.
//!
//! bincode 2 is pinned (`=2.0.1`) and flagged unmaintained (RUSTSEC-2025-0141); keeping every use
//! behind [`encode`] and [`decode`] means it can be swapped (e.g. for postcard) in one place.
//! A message is at most [`MAX_FRAME_LEN`] encoded bytes, on both sides; decoding refuses
//! trailing bytes and is bounded by [`DECODE_LIMIT`], derived from that one limit.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::MAX_FRAME_LEN;

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoding failed (or the message is larger than a frame may be).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Decode(String),
    /// A valid message was followed by extra bytes.
    #[error("malformed message: {0} trailing bytes after the message")]
    Trailing(usize),
}

/// The bound bincode's decoder applies while decoding one message.
///
/// bincode does not count the bytes it reads but the size of what it decodes: each integer
/// claims its full width whatever its encoding (a `u64` or a length claims 8 bytes for a one-byte
/// varint, a `u32` or an enum tag 4 for one byte), and a string or list claims its elements as
/// they are read. The messages hold nothing wider than 8 bytes (no `u128`), and the smallest
/// encoding of anything is one byte, so a payload of `n` bytes claims at most `8 * n`. With the
/// frame layer holding a payload to [`MAX_FRAME_LEN`] bytes, this bound therefore refuses no
/// message that fits a frame, while still capping what a hostile length field can make the
/// decoder reserve before the bytes behind it fail to arrive (512 KiB).
pub const DECODE_LIMIT: usize = 8 * MAX_FRAME_LEN;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_variable_int_encoding().with_limit::<DECODE_LIMIT>()
}

/// Encodes a message into a frame payload.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let bytes =
        bincode::serde::encode_to_vec(msg, config()).map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > MAX_FRAME_LEN {
        return Err(CodecError::Encode(format!(
            "{} bytes is over the {MAX_FRAME_LEN}-byte frame cap",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Decodes a frame payload; the whole payload must be exactly one message of at most
/// [`MAX_FRAME_LEN`] bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_FRAME_LEN {
        return Err(CodecError::Decode(format!(
            "{} bytes is over the {MAX_FRAME_LEN}-byte frame cap",
            bytes.len()
        )));
    }
    let (msg, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::*;

    fn vm_id() -> impl Strategy<Value = VmId> {
        "[a-z0-9-]{1,32}".prop_map(|s| VmId::new(s).unwrap())
    }

    fn install_id() -> impl Strategy<Value = InstallId> {
        "[a-z0-9-]{1,32}".prop_map(|s| InstallId::new(s).unwrap())
    }

    fn role() -> impl Strategy<Value = LoopRole> {
        prop::sample::select(LoopRole::ALL.to_vec())
    }

    fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
        any::<u32>().prop_map(Ipv4Addr::from)
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (any::<u32>(), install_id())
                .prop_map(|(version, install_id)| Request::Hello { version, install_id }),
            Just(Request::Ping),
            vm_id().prop_map(|vm| Request::TapCreate { vm }),
            vm_id().prop_map(|vm| Request::NatUp { vm }),
            (vm_id(), role(), any::<bool>()).prop_map(|(vm, role, read_only)| Request::LoopAttach {
                vm,
                role,
                read_only
            }),
            Just(Request::ListOwned),
            prop::collection::vec(vm_id(), 0..20).prop_map(|vms| Request::TeardownVms { vms }),
            vm_id().prop_map(|vm| Request::DmCreate { vm }),
            (vm_id(), shape(), any::<bool>(), any::<bool>()).prop_map(|(vm, shape, initrd, work)| {
                Request::JailLaunch { vm, shape, files: JailFiles { initrd, work } }
            }),
            vm_id().prop_map(|vm| Request::JailKill { vm }),
        ]
    }

    fn shape() -> impl Strategy<Value = VmShape> {
        (any::<u8>(), any::<u32>()).prop_map(|(vcpus, mem_mib)| VmShape { vcpus, mem_mib })
    }

    fn jail() -> impl Strategy<Value = JailInfo> {
        (
            install_id(),
            vm_id(),
            "[a-z0-9-]{1,64}",
            any::<u32>(),
            any::<Option<i32>>(),
            ".{0,40}",
            ".{0,40}",
            shape(),
        )
            .prop_map(|(install, vm, id, uid, pid, root, api_socket, shape)| JailInfo {
                install,
                vm,
                id,
                uid,
                pid,
                root,
                api_socket,
                shape,
            })
    }

    fn error() -> impl Strategy<Value = HelperError> {
        prop_oneof![
            (".*", ".*").prop_map(|(rule, reason)| HelperError::Denied { rule, reason }),
            ".*".prop_map(|what| HelperError::NotFound { what }),
            ".*".prop_map(|what| HelperError::Conflict { what }),
            (".*", any::<u32>()).prop_map(|(resource, limit)| HelperError::QuotaExceeded { resource, limit }),
            ".*".prop_map(HelperError::invalid),
            (".*", any::<i32>(), ".*").prop_map(|(op, errno, detail)| HelperError::Kernel {
                op,
                errno,
                detail
            }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(client, helper)| HelperError::VersionMismatch { client, helper }),
            ".*".prop_map(HelperError::internal),
        ]
    }

    fn tap() -> impl Strategy<Value = TapInfo> {
        (install_id(), vm_id(), "[a-z0-9]{1,15}", ipv4(), ipv4(), 0u8..=32, ".{0,17}").prop_map(
            |(install, vm, name, host_ip, guest_ip, prefix_len, guest_mac)| TapInfo {
                install,
                vm,
                name,
                host_ip,
                guest_ip,
                prefix_len,
                guest_mac,
            },
        )
    }

    fn dm_info() -> impl Strategy<Value = DmInfo> {
        (install_id(), vm_id(), "[a-z0-9-]{1,40}", ".{0,40}", any::<u64>())
            .prop_map(|(install, vm, name, device, sectors)| DmInfo { install, vm, name, device, sectors })
    }

    fn loop_info() -> impl Strategy<Value = LoopInfo> {
        (install_id(), vm_id(), role(), ".{0,20}", any::<bool>()).prop_map(
            |(install, vm, role, device, read_only)| LoopInfo { install, vm, role, device, read_only },
        )
    }

    fn nat() -> impl Strategy<Value = NatInfo> {
        (install_id(), vm_id(), ipv4(), ".{0,15}").prop_map(|(install, vm, guest_ip, uplink)| NatInfo {
            install,
            vm,
            guest_ip,
            uplink,
        })
    }

    fn lease() -> impl Strategy<Value = LeaseInfo> {
        (ipv4(), 0u8..=32).prop_map(|(network, prefix_len)| LeaseInfo { network, prefix_len })
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (any::<u32>(), ".*", any::<[bool; 6]>()).prop_map(|(version, helper_version, c)| {
                Response::Hello(HelloReply {
                    version,
                    helper_version,
                    capabilities: Capabilities {
                        device_mapper: c[0],
                        jailer: c[1],
                        loop_configure: c[2],
                        ipv6: c[3],
                        direct: c[4],
                        firewall: if c[5] { FirewallBackend::Nftables } else { FirewallBackend::Iptables },
                    },
                })
            }),
            Just(Response::Pong),
            tap().prop_map(Response::Tap),
            nat().prop_map(Response::Nat),
            loop_info().prop_map(Response::Loop),
            (
                prop::option::of(lease()),
                prop::collection::vec(tap(), 0..5),
                prop::collection::vec(nat(), 0..5),
                prop::collection::vec(loop_info(), 0..5),
                prop::collection::vec(dm_info(), 0..5),
                prop::collection::vec(jail(), 0..5)
            )
                .prop_map(|(lease, taps, nat, loops, dms, jails)| Response::Owned(
                    OwnedObjects { lease, taps, nat, loops, dms, jails }
                )),
            dm_info().prop_map(Response::Dm),
            jail().prop_map(Response::Jail),
            (
                prop::collection::vec(vm_id(), 0..5),
                prop::collection::vec((vm_id(), ".{0,30}", error()), 0..5)
            )
                .prop_map(|(torn_down, failures)| Response::Teardown(TeardownReport {
                    torn_down,
                    failures: failures
                        .into_iter()
                        .map(|(vm, object, error)| TeardownFailure { vm, object, error })
                        .collect(),
                })),
            error().prop_map(Response::Error),
        ]
    }

    proptest! {
        #[test]
        fn every_request_round_trips(req in request()) {
            let bytes = encode(&req).unwrap();
            prop_assert_eq!(decode::<Request>(&bytes).unwrap(), req);
        }

        #[test]
        fn every_response_round_trips(resp in response()) {
            let bytes = encode(&resp).unwrap();
            prop_assert_eq!(decode::<Response>(&bytes).unwrap(), resp);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }

        #[test]
        fn trailing_bytes_are_refused(req in request(), extra in prop::collection::vec(any::<u8>(), 1..16)) {
            let mut bytes = encode(&req).unwrap();
            bytes.extend_from_slice(&extra);
            prop_assert!(decode::<Request>(&bytes).is_err());
        }
    }

    #[test]
    fn a_huge_length_field_does_not_allocate() {
        // TeardownVms (variant 6) whose vector claims u64::MAX elements: varint 0xFF + 8 bytes.
        let mut bytes = vec![6u8, 0xFF];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = decode::<Request>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Decode(_)), "{err}");
        // A vm id claiming 60 KiB with no bytes behind it fails without reading past the end.
        let mut bytes = vec![2u8, 0xFC];
        bytes.extend_from_slice(&60_000u16.to_le_bytes());
        assert!(decode::<Request>(&bytes).is_err());
    }

    /// The largest answer there can be: an error whose text fills the rest of the frame.
    fn filling(len: usize) -> Response {
        // Response tag (1 byte), HelperError tag (1), string length (0xFB + u16: 3), text.
        Response::Error(HelperError::Conflict { what: "x".repeat(len - 5) })
    }

    #[test]
    fn a_message_of_exactly_the_frame_cap_goes_through_and_one_byte_more_does_not() {
        use std::os::fd::AsFd;
        let max = filling(MAX_FRAME_LEN);
        let bytes = encode(&max).unwrap();
        assert_eq!(bytes.len(), MAX_FRAME_LEN);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || crate::frame::send_blocking(a.as_fd(), &max, &[]));
        let (got, _) = crate::frame::recv_blocking::<Response>(b.as_fd()).unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(got, filling(MAX_FRAME_LEN));

        let over = filling(MAX_FRAME_LEN + 1);
        assert!(matches!(encode(&over), Err(CodecError::Encode(_))));
        let raw = bincode::serde::encode_to_vec(&over, config()).unwrap();
        assert_eq!(raw.len(), MAX_FRAME_LEN + 1);
        assert!(decode::<Response>(&raw).is_err());
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut a, &(raw.len() as u32).to_be_bytes()).unwrap();
        assert!(matches!(
            crate::frame::read_frame_blocking(b.as_fd()),
            Err(crate::frame::FrameError::TooLarge(n)) if n == MAX_FRAME_LEN + 1
        ));
    }

    #[test]
    fn invalid_ids_are_refused_when_decoded() {
        // Encode a request whose vm id would be invalid by encoding the raw string shape.
        #[derive(serde::Serialize)]
        enum Raw {
            _Hello,
            _Ping,
            TapCreate { vm: String },
        }
        let bytes = encode(&Raw::TapCreate { vm: "../etc".into() }).unwrap();
        let err = decode::<Request>(&bytes).unwrap_err().to_string();
        assert!(err.contains("vm id"), "{err}");
    }
}
