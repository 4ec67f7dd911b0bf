//! Frames on the helper socket: a 4-byte big-endian length, then that many payload bytes, with
//! file descriptors passed beside the frame as SCM_RIGHTS ancillary data.
//!
//! Reading is bounded: the length is checked against [`MAX_FRAME_LEN`] before the payload buffer is
//! allocated, at most [`MAX_FDS_PER_FRAME`] descriptors are accepted (the kernel closes any beyond
//! the small control buffer; those that did arrive are owned at once and closed when the error
//! drops them, so no descriptor ever leaks), and every received descriptor is close-on-exec. Each read asks for exactly the bytes the frame still
//! needs, so a frame never consumes bytes (or descriptors) of the next one.
//!
//! Both a blocking flavour (any socket fd) and an async flavour ([`tokio::net::UnixStream`]) share
//! the same two syscall wrappers.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::codec::{self, CodecError};
use crate::{MAX_FDS_PER_FRAME, MAX_FRAME_LEN};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The announced length is over the cap.
    #[error("frame of {0} bytes is over the {MAX_FRAME_LEN}-byte cap")]
    TooLarge(usize),
    /// More descriptors arrived than a frame may carry.
    #[error("more than {MAX_FDS_PER_FRAME} file descriptors arrived with one frame")]
    TooManyFds,
    /// The payload is not a valid message.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    /// The payload.
    pub payload: Vec<u8>,
    /// The descriptors that travelled with it (owned: dropping closes them).
    pub fds: Vec<OwnedFd>,
}

/// Receives up to `buf.len()` bytes and any descriptors sent with them.
///
/// The control buffer has room for one descriptor more than a frame may carry, so a sender of
/// too many is always noticed; the kernel closes whatever does not fit (and says so with
/// `MSG_CTRUNC`). Every descriptor that *was* installed in our table is taken into an [`OwnedFd`]
/// before anything is checked, so none can leak whatever the peer sends. (This walks the control
/// messages itself because nix refuses to iterate them once `MSG_CTRUNC` is set.)
fn recv_some(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    const ROOM: usize = (MAX_FDS_PER_FRAME + 1) * std::mem::size_of::<libc::c_int>();
    // u64 elements keep the buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(ROOM as libc::c_uint) } as usize;
    debug_assert!(space <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at a live iovec over `buf` and a live control buffer of `space` bytes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: msg was filled by the kernel; CMSG_FIRSTHDR/NXTHDR stay within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and points at a header inside the control buffer.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_LEN(0) is arithmetic.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(header) / std::mem::size_of::<libc::c_int>();
            // SAFETY: the data of an SCM_RIGHTS message is `count` ints right after the header.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: within the message's data (count was derived from cmsg_len); the
                // kernel just installed each of these descriptors for us and nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(data.add(i).read_unaligned()) });
            }
        }
        // SAFETY: msg and cmsg are valid as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS_PER_FRAME {
        return Err(io::Error::other(FrameTooManyFds));
    }
    Ok(n as usize)
}

/// Marker carried inside an [`io::Error`] so the caller can map it back to [`FrameError::TooManyFds`].
#[derive(Debug)]
struct FrameTooManyFds;
impl std::fmt::Display for FrameTooManyFds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("too many file descriptors")
    }
}
impl std::error::Error for FrameTooManyFds {}

fn map_io(e: io::Error) -> FrameError {
    if e.get_ref().is_some_and(|inner| inner.is::<FrameTooManyFds>()) {
        FrameError::TooManyFds
    } else {
        FrameError::Io(e)
    }
}

/// Sends `bytes`, with `fds` attached when given.
fn send_some(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    Ok(sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?)
}

fn header(payload: &[u8]) -> Result<[u8; 4], FrameError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(payload.len()));
    }
    Ok((payload.len() as u32).to_be_bytes())
}

fn frame_bytes(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&header(payload)?);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Reads a frame's bytes into `buf` through `recv`, collecting descriptors, until full.
/// `at_start` says whether a clean end-of-stream here is [`FrameError::Closed`].
macro_rules! fill {
    ($recv:expr, $buf:expr, $fds:expr, $at_start:expr) => {{
        let mut got = 0;
        while got < $buf.len() {
            let n = $recv(&mut $buf[got..], $fds).map_err(map_io)?;
            if n == 0 {
                return Err(if $at_start && got == 0 { FrameError::Closed } else { FrameError::Truncated });
            }
            got += n;
        }
    }};
}

/// Reads one frame from a blocking socket.
pub fn read_frame_blocking(sock: BorrowedFd<'_>) -> Result<Frame, FrameError> {
    let raw = sock.as_raw_fd();
    let mut fds = Vec::new();
    let recv = |b: &mut [u8], fds: &mut Vec<OwnedFd>| loop {
        match recv_some(raw, b, fds) {
            Err(e) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
            other => break other,
        }
    };
    let mut len = [0u8; 4];
    fill!(recv, len, &mut fds, true);
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    fill!(recv, payload, &mut fds, false);
    Ok(Frame { payload, fds })
}

/// Writes one frame to a blocking socket, descriptors attached to its first byte.
pub fn write_frame_blocking(
    sock: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), FrameError> {
    let bytes = frame_bytes(payload)?;
    let raw_fds: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < bytes.len() {
        let attach = if sent == 0 { &raw_fds[..] } else { &[][..] };
        match send_some(sock.as_raw_fd(), &bytes[sent..], attach) {
            Ok(n) => sent += n,
            Err(e) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

/// Reads one frame from a tokio stream.
pub async fn read_frame(stream: &UnixStream) -> Result<Frame, FrameError> {
    let raw = stream.as_raw_fd();
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    read_exact_async(stream, raw, &mut len, &mut fds, true).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    read_exact_async(stream, raw, &mut payload, &mut fds, false).await?;
    Ok(Frame { payload, fds })
}

async fn read_exact_async(
    stream: &UnixStream,
    raw: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    at_start: bool,
) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        let n = stream
            .async_io(Interest::READABLE, || recv_some(raw, &mut buf[got..], fds))
            .await
            .map_err(map_io)?;
        if n == 0 {
            return Err(if at_start && got == 0 { FrameError::Closed } else { FrameError::Truncated });
        }
        got += n;
    }
    Ok(())
}

/// Writes one frame to a tokio stream, descriptors attached to its first byte.
pub async fn write_frame(
    stream: &UnixStream,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), FrameError> {
    let bytes = frame_bytes(payload)?;
    let raw = stream.as_fd().as_raw_fd();
    let raw_fds: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < bytes.len() {
        let attach = if sent == 0 { &raw_fds[..] } else { &[][..] };
        sent += stream.async_io(Interest::WRITABLE, || send_some(raw, &bytes[sent..], attach)).await?;
    }
    Ok(())
}

/// Encodes and sends one message on a tokio stream.
pub async fn send<T: Serialize>(
    stream: &UnixStream,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), FrameError> {
    write_frame(stream, &codec::encode(msg)?, fds).await
}

/// Receives and decodes one message from a tokio stream, with its descriptors.
pub async fn recv<T: DeserializeOwned>(stream: &UnixStream) -> Result<(T, Vec<OwnedFd>), FrameError> {
    let frame = read_frame(stream).await?;
    Ok((codec::decode(&frame.payload)?, frame.fds))
}

/// Encodes and sends one message on a blocking socket.
pub fn send_blocking<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), FrameError> {
    write_frame_blocking(sock, &codec::encode(msg)?, fds)
}

/// Receives and decodes one message from a blocking socket, with its descriptors.
pub fn recv_blocking<T: DeserializeOwned>(sock: BorrowedFd<'_>) -> Result<(T, Vec<OwnedFd>), FrameError> {
    let frame = read_frame_blocking(sock)?;
    Ok((codec::decode(&frame.payload)?, frame.fds))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream as StdStream;

    use super::*;
    use crate::{Request, VmId};

    fn pair() -> (StdStream, StdStream) {
        StdStream::pair().unwrap()
    }

    #[test]
    fn round_trip_with_fds() {
        let (a, b) = pair();
        let file = tempfile_fd();
        let req = Request::LoopAttach {
            vm: VmId::new("vm1").unwrap(),
            role: crate::LoopRole::Base,
            read_only: true,
        };
        send_blocking(a.as_fd(), &req, &[file.as_fd()]).unwrap();
        let (got, fds) = recv_blocking::<Request>(b.as_fd()).unwrap();
        assert_eq!(got, req);
        assert_eq!(fds.len(), 1);
        // The received descriptor refers to the same open file.
        let st_a = nix::sys::stat::fstat(&file).unwrap();
        let st_b = nix::sys::stat::fstat(&fds[0]).unwrap();
        assert_eq!((st_a.st_dev, st_a.st_ino), (st_b.st_dev, st_b.st_ino));
    }

    #[test]
    fn descriptors_stay_with_their_frame() {
        let (a, b) = pair();
        let file = tempfile_fd();
        send_blocking(a.as_fd(), &Request::Ping, &[file.as_fd()]).unwrap();
        send_blocking(a.as_fd(), &Request::ListOwned, &[]).unwrap();
        let (first, fds1) = recv_blocking::<Request>(b.as_fd()).unwrap();
        let (second, fds2) = recv_blocking::<Request>(b.as_fd()).unwrap();
        assert_eq!((first, fds1.len()), (Request::Ping, 1));
        assert_eq!((second, fds2.len()), (Request::ListOwned, 0));
    }

    #[test]
    fn oversized_length_is_refused_before_reading_the_payload() {
        let (mut a, b) = pair();
        a.write_all(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes()).unwrap();
        assert!(
            matches!(read_frame_blocking(b.as_fd()), Err(FrameError::TooLarge(n)) if n == MAX_FRAME_LEN + 1)
        );
    }

    #[test]
    fn too_many_fds_is_an_error() {
        let (a, b) = pair();
        let files: Vec<OwnedFd> = (0..MAX_FDS_PER_FRAME + 1).map(|_| tempfile_fd()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        write_frame_blocking(a.as_fd(), b"x", &borrowed).unwrap();
        let r = read_frame_blocking(b.as_fd());
        assert!(matches!(r, Err(FrameError::TooManyFds)), "{r:?}");
    }

    /// How many of this process's descriptors refer to `file`'s inode (other tests open and
    /// close descriptors of their own meanwhile, so only this file's are counted).
    fn fds_to(file: &OwnedFd) -> usize {
        use std::os::unix::fs::MetadataExt;
        let f = std::fs::File::from(file.try_clone().unwrap()).metadata().unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
            .filter(|m| m.dev() == f.dev() && m.ino() == f.ino())
            .count()
    }

    #[test]
    fn a_flood_of_descriptors_is_refused_and_none_leaks() {
        let (a, b) = pair();
        let file = tempfile_fd();
        // The kernel's maximum in one message.
        let many: Vec<BorrowedFd<'_>> = (0..253).map(|_| file.as_fd()).collect();
        let before = fds_to(&file);
        write_frame_blocking(a.as_fd(), b"x", &many).unwrap();
        assert!(matches!(read_frame_blocking(b.as_fd()), Err(FrameError::TooManyFds)));
        assert_eq!(fds_to(&file), before, "descriptors leaked");
    }

    #[test]
    fn clean_close_and_truncation_differ() {
        let (a, b) = pair();
        drop(a);
        assert!(matches!(read_frame_blocking(b.as_fd()), Err(FrameError::Closed)));
        let (mut a, b) = pair();
        a.write_all(&10u32.to_be_bytes()).unwrap();
        a.write_all(b"abc").unwrap();
        drop(a);
        assert!(matches!(read_frame_blocking(b.as_fd()), Err(FrameError::Truncated)));
    }

    #[test]
    fn garbage_payload_is_a_codec_error() {
        let (a, b) = pair();
        write_frame_blocking(a.as_fd(), &[0xFF; 9], &[]).unwrap();
        assert!(matches!(recv_blocking::<Request>(b.as_fd()), Err(FrameError::Codec(_))));
    }

    #[tokio::test]
    async fn async_round_trip() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let file = tempfile_fd();
        send(&a, &Request::Ping, &[file.as_fd()]).await.unwrap();
        let big = Request::TeardownVms {
            vms: (0..200).map(|i| VmId::new(format!("vm-{i:028}")).unwrap()).collect(),
        };
        send(&a, &big, &[]).await.unwrap();
        let (got, fds) = recv::<Request>(&b).await.unwrap();
        assert_eq!((got, fds.len()), (Request::Ping, 1));
        let (got, fds) = recv::<Request>(&b).await.unwrap();
        assert_eq!((got, fds.len()), (big, 0));
    }

    fn tempfile_fd() -> OwnedFd {
        let path = std::env::temp_dir().join(format!("banger-frame-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f.into()
    }
}
