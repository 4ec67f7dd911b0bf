//! The guest kernel command line: the checks Firecracker applies at `PUT /boot-source`, the
//! arguments it appends at `InstanceStart`, and the kernel's `ip=` parameter that the emulated
//! guest applies to its network.
//!
//! `ip=` follows Documentation/admin-guide/nfs/nfsroot.rst:
//! `ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:...`.
//! Only the static form (`autoconf` `off`/`none`/`static`/empty) is emulated; `ip=off` and
//! `ip=none` turn autoconfiguration off; any DHCP/BOOTP/RARP form is reported as not emulated.

use std::net::Ipv4Addr;

/// Firecracker's default command line when `boot_args` is absent.
pub const DEFAULT_KERNEL_CMDLINE: &str =
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";
/// Largest command line (with its NUL) a Firecracker x86_64 guest accepts.
pub const CMDLINE_MAX_SIZE: usize = 2048;
const INIT_ARGS_SEPARATOR: &str = " -- ";

/// Why boot arguments were refused, worded as linux-loader's `Cmdline` words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    /// A character outside printable ASCII.
    #[error("String contains a non-printable ASCII character.")]
    InvalidAscii,
    /// Longer than [`CMDLINE_MAX_SIZE`].
    #[error("Inserting string would make command line too long.")]
    TooLarge,
}

/// Checks `boot_args` as Firecracker does at `PUT /boot-source` and returns the command line the
/// guest will get before devices are added (the default one when `boot_args` is `None`).
pub fn validate(boot_args: Option<&str>) -> Result<String, CmdlineError> {
    let raw = boot_args.unwrap_or(DEFAULT_KERNEL_CMDLINE);
    let (boot, init) = match raw.find(INIT_ARGS_SEPARATOR) {
        Some(i) => (&raw[..i], &raw[i + INIT_ARGS_SEPARATOR.len()..]),
        None => (raw, ""),
    };
    let (boot, init) = (boot.trim(), init.trim());
    let mut size = boot.len() + 1;
    if !init.is_empty() {
        size += INIT_ARGS_SEPARATOR.len() + init.len();
    }
    if size > CMDLINE_MAX_SIZE {
        return Err(CmdlineError::TooLarge);
    }
    if !raw.chars().all(|c| matches!(c, ' '..='~')) {
        return Err(CmdlineError::InvalidAscii);
    }
    Ok(if init.is_empty() { boot.to_string() } else { format!("{boot}{INIT_ARGS_SEPARATOR}{init}") })
}

/// The command line the guest kernel receives: Firecracker appends `pci=off` (no `--enable-pci`)
/// and, for a root block device, `root=/dev/vda` (or `root=PARTUUID=...`) and `ro`/`rw`.
pub fn guest_cmdline(base: &str, root: Option<(Option<&str>, bool)>) -> String {
    let (boot, init) = match base.find(INIT_ARGS_SEPARATOR) {
        Some(i) => (&base[..i], Some(&base[i + INIT_ARGS_SEPARATOR.len()..])),
        None => (base, None),
    };
    let mut line = boot.to_string();
    let mut push = |s: &str| {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(s);
    };
    push("pci=off");
    if let Some((partuuid, read_only)) = root {
        match partuuid {
            Some(p) => push(&format!("root=PARTUUID={p}")),
            None => push("root=/dev/vda"),
        }
        push(if read_only { "ro" } else { "rw" });
    }
    match init {
        Some(init) => format!("{line}{INIT_ARGS_SEPARATOR}{init}"),
        None => line,
    }
}

/// A static address configuration taken from `ip=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticIp {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// The default gateway, if given.
    pub gateway: Option<Ipv4Addr>,
    /// The netmask (given, or the class default as the kernel derives it).
    pub netmask: Ipv4Addr,
    /// The host name to set, if given.
    pub hostname: Option<String>,
    /// The device to configure; `None` means the first device.
    pub device: Option<String>,
}

impl StaticIp {
    /// The prefix length of [`StaticIp::netmask`].
    pub fn prefix_len(&self) -> u32 {
        u32::from(self.netmask).count_ones()
    }
}

/// What the guest does with its network according to `ip=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpParam {
    /// No `ip=` parameter, or `ip=off`/`ip=none`: the kernel configures nothing.
    Off,
    /// A static configuration.
    Static(StaticIp),
    /// A dynamic form (`dhcp`, `bootp`, `rarp`, `on`, `any`), which the double does not emulate.
    Dynamic(String),
    /// A malformed parameter; the kernel ignores it.
    Invalid(String),
}

fn parse_addr(s: &str) -> Option<Ipv4Addr> {
    if s.is_empty() { None } else { s.parse().ok() }
}

/// The class-based netmask the kernel derives when `ip=` gives none.
fn default_netmask(addr: Ipv4Addr) -> Ipv4Addr {
    match addr.octets()[0] {
        0..=127 => Ipv4Addr::new(255, 0, 0, 0),
        128..=191 => Ipv4Addr::new(255, 255, 0, 0),
        _ => Ipv4Addr::new(255, 255, 255, 0),
    }
}

/// Reads the last `ip=` parameter of a kernel command line (the kernel keeps the last one).
pub fn ip_param(cmdline: &str) -> IpParam {
    let boot = cmdline.split(INIT_ARGS_SEPARATOR).next().unwrap_or("");
    let Some(value) = boot.split_whitespace().rev().find_map(|a| a.strip_prefix("ip=")) else {
        return IpParam::Off;
    };
    match value {
        "off" | "none" => return IpParam::Off,
        "on" | "any" | "dhcp" | "bootp" | "rarp" | "both" => return IpParam::Dynamic(value.to_string()),
        _ => {}
    }
    let fields: Vec<&str> = value.split(':').collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or("");
    match field(6) {
        "" | "off" | "none" | "static" => {}
        other => return IpParam::Dynamic(other.to_string()),
    }
    let Some(address) = parse_addr(field(0)) else {
        return IpParam::Invalid(value.to_string());
    };
    let gateway = parse_addr(field(2));
    let netmask = parse_addr(field(3)).unwrap_or_else(|| default_netmask(address));
    if u32::from(netmask).leading_ones() != u32::from(netmask).count_ones() {
        return IpParam::Invalid(value.to_string());
    }
    let hostname = Some(field(4)).filter(|h| !h.is_empty()).map(|h| h.chars().take(64).collect());
    let device = Some(field(5)).filter(|d| !d.is_empty()).map(str::to_string);
    IpParam::Static(StaticIp { address, gateway, netmask, hostname, device })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_custom_boot_args() {
        assert_eq!(validate(None).unwrap(), DEFAULT_KERNEL_CMDLINE);
        assert_eq!(validate(Some("  console=ttyS0 reboot=k ")).unwrap(), "console=ttyS0 reboot=k");
        assert_eq!(validate(Some("a -- init")).unwrap(), "a -- init");
        assert_eq!(validate(Some("bad\u{7}char")), Err(CmdlineError::InvalidAscii));
        assert_eq!(validate(Some(&"x".repeat(2047))).unwrap().len(), 2047);
        assert_eq!(validate(Some(&"x".repeat(2048))), Err(CmdlineError::TooLarge));
    }

    #[test]
    fn firecracker_appends_pci_and_root() {
        assert_eq!(guest_cmdline("console=ttyS0", None), "console=ttyS0 pci=off");
        assert_eq!(guest_cmdline("a", Some((None, false))), "a pci=off root=/dev/vda rw");
        assert_eq!(
            guest_cmdline("a -- x", Some((Some("ab-01"), true))),
            "a pci=off root=PARTUUID=ab-01 ro -- x"
        );
    }

    #[test]
    fn static_ip_is_parsed() {
        let line = "console=ttyS0 ip=172.16.0.2::172.16.0.1:255.255.255.252:dev:eth0:off";
        assert_eq!(
            ip_param(line),
            IpParam::Static(StaticIp {
                address: Ipv4Addr::new(172, 16, 0, 2),
                gateway: Some(Ipv4Addr::new(172, 16, 0, 1)),
                netmask: Ipv4Addr::new(255, 255, 255, 252),
                hostname: Some("dev".into()),
                device: Some("eth0".into()),
            })
        );
        let IpParam::Static(s) = ip_param("ip=10.1.2.3") else { panic!("static expected") };
        assert_eq!(
            (s.netmask, s.prefix_len(), s.gateway, s.device),
            (Ipv4Addr::new(255, 0, 0, 0), 8, None, None)
        );
    }

    #[test]
    fn other_ip_forms() {
        assert_eq!(ip_param("console=ttyS0"), IpParam::Off);
        assert_eq!(ip_param("ip=1.2.3.4 ip=off"), IpParam::Off);
        assert_eq!(ip_param("ip=dhcp"), IpParam::Dynamic("dhcp".into()));
        assert_eq!(ip_param("ip=:::::eth0:dhcp"), IpParam::Dynamic("dhcp".into()));
        assert_eq!(ip_param("ip=nonsense"), IpParam::Invalid("nonsense".into()));
        assert_eq!(
            ip_param("ip=1.2.3.4::1.2.3.1:255.0.255.0::eth0:off"),
            IpParam::Invalid("1.2.3.4::1.2.3.1:255.0.255.0::eth0:off".into())
        );
        assert_eq!(ip_param("x -- ip=1.2.3.4"), IpParam::Off);
    }
}
