//! The emulated virtio-net device: frames copied between the host TAP Firecracker opened (with a
//! 12-byte virtio-net header) and the guest's `ethN` TAP (plain Ethernet frames).
//!
//! Host to guest: read header + frame from the host TAP, drop the header, write the frame.
//! Guest to host: read a frame, prepend 12 zero bytes (no checksum offload, no GSO: the guest
//! acked no offloads, see [`super::super::tap`]), write it. A frame that cannot be written at once
//! is dropped, as a full virtio queue would drop it. While the VM is paused nothing is read, so
//! frames queue in the kernel (up to the TAP's `txqueuelen`) exactly as with a paused Firecracker.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::double::tap::VNET_HDR_LEN;

const MAX_FRAME: usize = 65536;

#[derive(Clone, Copy)]
enum Direction {
    HostToGuest,
    GuestToHost,
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    fcntl(fd, FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK))
        .map_err(io::Error::from)?;
    Ok(())
}

async fn wait_running(paused: &mut watch::Receiver<bool>) -> bool {
    while *paused.borrow_and_update() {
        if paused.changed().await.is_err() {
            return false;
        }
    }
    true
}

async fn pump(
    from: Arc<AsyncFd<OwnedFd>>,
    to: Arc<AsyncFd<OwnedFd>>,
    dir: Direction,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME];
    // Guest frames are read after a header-sized gap so the header can be prepended in place.
    let read_at = match dir {
        Direction::HostToGuest => 0,
        Direction::GuestToHost => VNET_HDR_LEN,
    };
    loop {
        if !wait_running(&mut paused).await {
            return;
        }
        let mut guard = tokio::select! {
            g = from.readable() => match g { Ok(g) => g, Err(_) => return },
            _ = paused.changed() => continue,
        };
        let n = match guard
            .try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf[read_at..]).map_err(io::Error::from))
        {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        };
        let frame = match dir {
            Direction::HostToGuest if n <= VNET_HDR_LEN => continue,
            Direction::HostToGuest => &buf[VNET_HDR_LEN..n],
            Direction::GuestToHost => {
                buf[..VNET_HDR_LEN].fill(0);
                &buf[..VNET_HDR_LEN + n]
            }
        };
        // A frame that cannot be written whole right now is dropped.
        let _ = nix::unistd::write(to.get_ref(), frame);
    }
}

/// Starts copying frames between `host` (vnet header) and `guest` (no header) until either side
/// closes or the tasks are aborted.
pub fn start(
    host: OwnedFd,
    guest: OwnedFd,
    paused: watch::Receiver<bool>,
) -> io::Result<Vec<JoinHandle<()>>> {
    set_nonblocking(&host)?;
    set_nonblocking(&guest)?;
    debug_assert!(host.as_raw_fd() != guest.as_raw_fd());
    let host = Arc::new(super::sys::async_fd(host)?);
    let guest = Arc::new(super::sys::async_fd(guest)?);
    Ok(vec![
        tokio::spawn(pump(host.clone(), guest.clone(), Direction::HostToGuest, paused.clone())),
        tokio::spawn(pump(guest, host, Direction::GuestToHost, paused)),
    ])
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    /// Two datagram socket pairs stand in for the TAPs: one datagram per frame, as a TAP reads.
    #[tokio::test]
    async fn frames_cross_with_header_stripped_and_prepended() {
        let (host_dev, host_end) = UnixDatagram::pair().unwrap();
        let (guest_dev, guest_end) = UnixDatagram::pair().unwrap();
        let (pause_tx, pause_rx) = watch::channel(false);
        let tasks = start(OwnedFd::from(host_end), OwnedFd::from(guest_end), pause_rx).unwrap();

        let mut from_host = vec![0u8; VNET_HDR_LEN];
        from_host.extend_from_slice(b"frame-to-guest");
        host_dev.send(&from_host).unwrap();
        let mut buf = [0u8; 128];
        let n = tokio::task::spawn_blocking(move || {
            let n = guest_dev.recv(&mut buf).unwrap();
            guest_dev.send(b"frame-to-host").unwrap();
            (buf[..n].to_vec(), guest_dev)
        })
        .await
        .unwrap();
        assert_eq!(n.0, b"frame-to-guest");
        let got = tokio::task::spawn_blocking(move || {
            let mut buf = [0u8; 128];
            let k = host_dev.recv(&mut buf).unwrap();
            buf[..k].to_vec()
        })
        .await
        .unwrap();
        assert_eq!(&got[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
        assert_eq!(&got[VNET_HDR_LEN..], b"frame-to-host");
        drop(pause_tx);
        for t in tasks {
            t.abort();
        }
    }
}
