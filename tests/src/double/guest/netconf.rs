//! Configuring the guest's interfaces with the kernel's own ioctls (as its `ip=`
//! autoconfiguration does), so no `ip` program is needed: that also works in a jail, which has
//! none. Every call runs in the guest's network namespace, where its PID 1 holds
//! `CAP_NET_ADMIN` (it created the namespace's user namespace).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// `struct rtentry` (`<linux/route.h>`), which the libc crate has only for musl.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// An IPv4 `sockaddr` (port 0).
fn inet(addr: Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr is a plain C struct of integers; all-zero is a valid value.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::AF_INET as libc::sa_family_t;
    for (dst, src) in sa.sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as libc::c_char;
    }
    sa
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(mac: &str) -> io::Result<[u8; 6]> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad MAC address {mac}"));
    let bytes: Vec<u8> =
        mac.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>().map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// A socket to configure interfaces through.
#[derive(Debug)]
pub struct NetConf {
    sock: OwnedFd,
}

impl NetConf {
    /// Opens the configuration socket (in the caller's network namespace).
    pub fn open() -> io::Result<NetConf> {
        let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
        Ok(NetConf { sock })
    }

    fn request(name: &str) -> io::Result<libc::ifreq> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {name} is too long"),
            ));
        }
        // SAFETY: ifreq is a plain C struct (a name array and a union of integers and sockaddrs);
        // all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        // SAFETY: every request passed here (SIOC[GS]IF*, SIOCADDRT) reads or writes exactly one
        // `T` of the type the kernel expects for it (ifreq or rtentry), which outlives the call.
        let r = unsafe { libc::ioctl(self.sock.as_raw_fd(), request, arg as *mut T) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Brings `name` up.
    pub fn up(&self, name: &str) -> io::Result<()> {
        let mut req = Self::request(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS just filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    /// Sets the MAC address of `name` (`aa:bb:cc:dd:ee:ff`).
    pub fn set_mac(&self, name: &str, mac: &str) -> io::Result<()> {
        let bytes = parse_mac(mac)?;
        let mut req = Self::request(name)?;
        // SAFETY: sockaddr is a plain C struct of integers; all-zero is a valid value.
        let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
        hw.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in hw.sa_data.iter_mut().zip(bytes) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = hw;
        self.ioctl(libc::SIOCSIFHWADDR, &mut req)
    }

    /// The MAC address of `name`.
    pub fn mac(&self, name: &str) -> io::Result<String> {
        let mut req = Self::request(name)?;
        self.ioctl(libc::SIOCGIFHWADDR, &mut req)?;
        // SAFETY: SIOCGIFHWADDR just filled the hwaddr member of the union.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        Ok(hw.sa_data[..6].iter().map(|b| format!("{:02x}", *b as u8)).collect::<Vec<_>>().join(":"))
    }

    /// Sets the MTU of `name`.
    pub fn set_mtu(&self, name: &str, mtu: u16) -> io::Result<()> {
        let mut req = Self::request(name)?;
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        self.ioctl(libc::SIOCSIFMTU, &mut req)
    }

    /// Gives `name` the address `addr` with `netmask` (the kernel adds the subnet's route).
    pub fn set_address(&self, name: &str, addr: Ipv4Addr, netmask: Ipv4Addr) -> io::Result<()> {
        let mut req = Self::request(name)?;
        req.ifr_ifru.ifru_addr = inet(addr);
        self.ioctl(libc::SIOCSIFADDR, &mut req)?;
        let mut req = Self::request(name)?;
        req.ifr_ifru.ifru_netmask = inet(netmask);
        self.ioctl(libc::SIOCSIFNETMASK, &mut req)
    }

    /// Adds a default route through `gateway` on `dev`.
    pub fn add_default_route(&self, gateway: Ipv4Addr, dev: &str) -> io::Result<()> {
        let mut name = Self::request(dev)?.ifr_name;
        let mut route = RtEntry {
            rt_pad1: 0,
            rt_dst: inet(Ipv4Addr::UNSPECIFIED),
            rt_gateway: inet(gateway),
            rt_genmask: inet(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: name.as_mut_ptr(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // `name` (NUL-terminated, in scope) outlives the call that reads it through rt_dev.
        self.ioctl(libc::SIOCADDRT, &mut route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_macs_are_encoded_as_the_kernel_reads_them() {
        let sa = inet(Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(sa.sa_data[..6].iter().map(|b| *b as u8).collect::<Vec<_>>(), [0, 0, 172, 16, 0, 2]);
        assert_eq!(parse_mac("06:00:ac:10:00:02").unwrap(), [6, 0, 0xac, 0x10, 0, 2]);
        assert!(parse_mac("06:00").is_err());
        assert!(parse_mac("zz:00:00:00:00:00").is_err());
        assert_eq!(std::mem::size_of::<RtEntry>(), 120, "struct rtentry on x86_64");
    }
}
