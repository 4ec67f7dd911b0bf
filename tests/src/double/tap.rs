//! TAP devices, opened the way Firecracker opens them.
//!
//! At `PUT /network-interfaces/{id}` Firecracker opens `/dev/net/tun` (`O_RDWR | O_NONBLOCK |
//! O_CLOEXEC`), checks the name is shorter than 16 bytes, attaches with `TUNSETIFF` and
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (single queue), then sets the vnet header size to 12
//! (`struct virtio_net_hdr_v1`) with `TUNSETVNETHDRSZ`. A TAP owned by another user, missing
//! permission on `/dev/net/tun`, or a TAP already attached elsewhere fails right there, with the
//! error texts reproduced by [`NetError`].
//!
//! When the guest driver comes up, Firecracker sets the TAP offloads to what the guest acked.
//! The emulated guest acks none, so [`set_offload`] is called with 0: the kernel then hands every
//! frame over fully checksummed and unsegmented, and the 12-byte header the double strips from
//! (or prepends to) each frame is all zero.
//!
//! The guest side of the emulation creates its own plain TAP (`IFF_TAP | IFF_NO_PI`, no vnet
//! header) with [`create_tap`]; that runs inside the guest's network namespace.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

/// Length of the virtio-net header Firecracker configures on its TAP.
pub const VNET_HDR_LEN: usize = 12;
const IFACE_NAME_MAX_LEN: usize = 16;

mod ioctls {
    use std::mem::size_of;

    nix::ioctl_write_ptr_bad!(
        tunsetiff,
        nix::request_code_write!(b'T', 202, size_of::<libc::c_int>()),
        libc::ifreq
    );
    nix::ioctl_write_int_bad!(tunsetoffload, nix::request_code_write!(b'T', 208, size_of::<libc::c_uint>()));
    nix::ioctl_write_ptr_bad!(
        tunsetvnethdrsz,
        nix::request_code_write!(b'T', 216, size_of::<libc::c_int>()),
        libc::c_int
    );
}

/// TAP errors, worded as Firecracker's `TapError`.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error("Couldn't open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    /// The name does not fit in `IFNAMSIZ`.
    #[error("Invalid interface name")]
    InvalidIfname,
    /// `TUNSETIFF` failed.
    #[error(
        "Error while creating ifreq structure: {0}. Invalid TUN/TAP Backend provided by {1}. Check our documentation on setting up the network devices."
    )]
    IfreqExecuteError(io::Error, String),
    /// `TUNSETOFFLOAD` failed.
    #[error("Error while setting the offload flags: {0}")]
    SetOffloadFlags(io::Error),
    /// `TUNSETVNETHDRSZ` failed.
    #[error("Error while setting size of the vnet header: {0}")]
    SetSizeOfVnetHdr(io::Error),
}

/// Network device errors, worded as Firecracker's `NetError` (the variants PUT can produce).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening the TAP failed.
    #[error("Open tap device failed: {0}")]
    TapOpen(TapError),
    /// Setting the vnet header size failed.
    #[error("Setting vnet header size failed: {0}")]
    TapSetVnetHdrSize(TapError),
    /// MTU outside [68, 65535].
    #[error("MTU {0} is out of range [68, 65535]")]
    InvalidMtu(u16),
}

fn errno_to_io(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn open_tun() -> Result<OwnedFd, TapError> {
    let flags = OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    open("/dev/net/tun", flags, Mode::empty()).map_err(|e| TapError::OpenTun(errno_to_io(e)))
}

fn attach(fd: &OwnedFd, name: &str, flags: libc::c_int) -> Result<(), TapError> {
    let bytes = name.as_bytes();
    if bytes.len() >= IFACE_NAME_MAX_LEN {
        return Err(TapError::InvalidIfname);
    }
    // SAFETY: ifreq is a plain C struct (a name array and a union of integers); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: fd is an open /dev/net/tun descriptor and req a valid, initialised ifreq that
    // outlives the call; the kernel only reads and writes within it.
    unsafe { ioctls::tunsetiff(fd.as_raw_fd(), &req) }
        .map_err(|e| TapError::IfreqExecuteError(errno_to_io(e), name.to_string()))?;
    Ok(())
}

/// Opens the host TAP `name` exactly as Firecracker's `Net::new` does.
pub fn open_firecracker_tap(name: &str, mtu: Option<u16>) -> Result<OwnedFd, NetError> {
    let fd = open_tun().map_err(NetError::TapOpen)?;
    attach(&fd, name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR).map_err(NetError::TapOpen)?;
    let size = VNET_HDR_LEN as libc::c_int;
    // SAFETY: fd is an attached TAP descriptor; the kernel reads one int through the pointer.
    unsafe { ioctls::tunsetvnethdrsz(fd.as_raw_fd(), &size) }
        .map_err(|e| NetError::TapSetVnetHdrSize(TapError::SetSizeOfVnetHdr(errno_to_io(e))))?;
    if let Some(mtu) = mtu
        && mtu < 68
    {
        return Err(NetError::InvalidMtu(mtu));
    }
    Ok(fd)
}

/// Sets the TAP offload flags (`TUN_F_*`), as Firecracker does when the guest driver activates.
pub fn set_offload(fd: &OwnedFd, flags: libc::c_uint) -> Result<(), TapError> {
    // SAFETY: fd is an attached TAP descriptor; TUNSETOFFLOAD takes its argument by value.
    unsafe { ioctls::tunsetoffload(fd.as_raw_fd(), flags as libc::c_int) }
        .map_err(|e| TapError::SetOffloadFlags(errno_to_io(e)))?;
    Ok(())
}

/// Creates (or attaches to) a plain TAP `name` (`IFF_TAP | IFF_NO_PI`, no vnet header) in the
/// caller's network namespace.
pub fn create_tap(name: &str) -> Result<OwnedFd, TapError> {
    let fd = open_tun()?;
    attach(&fd, name, libc::IFF_TAP | libc::IFF_NO_PI)?;
    Ok(fd)
}

/// Opens host TAPs for the VMM. Injected so the VM state machine can be tested without
/// `/dev/net/tun`.
pub trait TapOpener: Send + Sync + 'static {
    /// Opens TAP `name` as Firecracker would, checking `mtu` afterwards.
    fn open(&self, name: &str, mtu: Option<u16>) -> Result<OwnedFd, NetError>;
}

/// The real `/dev/net/tun`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxTaps;

impl TapOpener for LinuxTaps {
    fn open(&self, name: &str, mtu: Option<u16>) -> Result<OwnedFd, NetError> {
        open_firecracker_tap(name, mtu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts_match_firecracker() {
        let e =
            NetError::TapOpen(TapError::IfreqExecuteError(io::Error::from_raw_os_error(1), "tap0".into()));
        assert_eq!(
            e.to_string(),
            "Open tap device failed: Error while creating ifreq structure: Operation not permitted (os error 1). \
             Invalid TUN/TAP Backend provided by tap0. Check our documentation on setting up the network devices."
        );
        assert_eq!(NetError::InvalidMtu(10).to_string(), "MTU 10 is out of range [68, 65535]");
    }
}
