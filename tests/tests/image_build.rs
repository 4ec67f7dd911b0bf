//! The default image (`banger image build`): built once per set of inputs, as the product builds
//! it (`banger::image_build::build`, mmdebstrap with this host's apt setup), into a cache under
//! the target directory, then
//! - its outputs checked: the kernel's ELF header, the initrd's modules, the root filesystem's
//!   files, modes and owners (read with debugfs, nothing mounted);
//! - booted under qemu with software emulation (the kernel tier's qemu; q35 and virtio-pci, not
//!   Firecracker's virtio-mmio, which stays unchecked here) with bangerd's kernel command line
//!   and a root personalized by bangerd's own code: the guest takes its address from `ip=`
//!   (qemu's user network, 10.0.2.0/24, SSH forwarded from 127.0.0.1), its hostname, runs sshd,
//!   and banger's kind of key logs in and runs a command.
//!
//! Where the Debian mirror cannot be reached through apt, both are skipped with the reason (also
//! under `CI=true`); where it can, they must pass (under `CI=true` a missing tool fails them).

use std::io::Read as _;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use banger::daemon::personalize::{Personalization, RootForm, personalize};
use banger::image_build::{self, Built, HostApt};
use banger_tests::kernel_tier;
use sha2::{Digest, Sha256};

/// The built image, or why there is none (a skip), shared by the tests of this binary.
fn built() -> Option<&'static Built> {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    match BUILT.get_or_init(build_or_reuse) {
        Ok(b) => Some(b),
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            None
        }
    }
}

/// Fails under CI, else returns the reason to skip.
fn missing(reason: String) -> Result<Built, String> {
    assert!(!kernel_tier::under_ci(), "{reason}, and CI=true");
    Err(reason)
}

fn build_or_reuse() -> Result<Built, String> {
    if Command::new("mmdebstrap").arg("--version").output().is_err() {
        return missing("mmdebstrap is not installed (apt-get install mmdebstrap uidmap)".into());
    }
    let apt = match HostApt::read() {
        Ok(apt) => apt,
        Err(e) => return missing(format!("this host's apt setup cannot be used: {e}")),
    };
    if let Err(why) = mirror_reachable() {
        // Not a failure even under CI: the build needs the mirror, which this machine lacks.
        return Err(format!("the Debian mirror is not reachable through apt: {why}"));
    }
    let exe = std::env::current_exe().ok();
    let cache = kernel_tier::target_dir(exe.as_deref()).join("image-build");
    let dir = cache.join(inputs_key(&apt));
    let ready = dir.join("ready");
    if !ready.is_file() {
        // Images of other inputs are stale: only one is kept (each takes about 1 GB).
        for entry in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        std::fs::create_dir_all(&dir).unwrap();
        let log = cache.join("mmdebstrap.log");
        eprintln!("building the default image into {} (log: {})", dir.display(), log.display());
        let started = Instant::now();
        image_build::build(&apt, &dir, &log, &mut |_| {}).unwrap_or_else(|e| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(40).collect();
            panic!("image build failed: {e}\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
        });
        eprintln!("built in {:.0?}", started.elapsed());
        std::fs::write(&ready, "").unwrap();
    }
    Ok(Built::in_dir(&dir))
}

/// Whether apt reaches the mirror: `apt-get download` of a tiny package.
fn mirror_reachable() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = Command::new("apt-get")
        .args(["download", "-q", "netbase"])
        .current_dir(dir.path())
        .output()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()) }
}

/// The build's inputs: hooks, packages, the host's release, sources and options.
fn inputs_key(apt: &HostApt) -> String {
    let mut h = Sha256::new();
    for part in [image_build::ESSENTIAL_HOOK, image_build::CUSTOMIZE_HOOK, &image_build::PACKAGES.join(",")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(apt.suite.as_bytes());
    for s in &apt.sources {
        h.update(std::fs::read(s).unwrap_or_default());
    }
    h.update(apt.options.join("\n").as_bytes());
    h.update(image_build::ROOTFS_SIZE.as_bytes());
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn debugfs(image: &Path, request: &str) -> String {
    let out =
        Command::new("debugfs").args(["-R", request]).arg(image).stderr(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "debugfs -R {request:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (mode, uid, gid, type) of a path in the image, from `debugfs stat`.
fn stat(image: &Path, path: &str) -> Option<(u32, u32, u32, String)> {
    let out = debugfs(image, &format!("stat {path}"));
    let word_after = |key: &str| out.split_whitespace().skip_while(|w| *w != key).nth(1).map(str::to_owned);
    Some((
        u32::from_str_radix(&word_after("Mode:")?, 8).ok()?,
        word_after("User:")?.parse().ok()?,
        word_after("Group:")?.parse().ok()?,
        word_after("Type:")?,
    ))
}

/// The file names of a newc cpio archive.
fn cpio_names(mut data: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let hex = |b: &[u8]| usize::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
    let pad = |n: usize| (4 - n % 4) % 4;
    while data.len() >= 110 && &data[..6] == b"070701" {
        let (filesize, namesize) = (hex(&data[54..62]), hex(&data[94..102]));
        let name = String::from_utf8_lossy(&data[110..110 + namesize - 1]).into_owned();
        let header = 110 + namesize;
        let next = header + pad(header) + filesize + pad(filesize);
        if name == "TRAILER!!!" {
            break;
        }
        names.push(name);
        data = &data[next.min(data.len())..];
    }
    names
}

#[test]
fn the_built_image_has_an_elf_kernel_an_initrd_with_the_guest_modules_and_a_root_owned_rootfs() {
    let Some(b) = built() else { return };

    // The kernel: a 64-bit little-endian x86_64 ELF executable.
    let mut head = [0u8; 20];
    std::fs::File::open(&b.vmlinux).unwrap().read_exact(&mut head).unwrap();
    assert_eq!(&head[..4], b"\x7fELF");
    assert_eq!((head[4], head[5]), (2, 1), "ELF64, little-endian");
    assert_eq!(u16::from_le_bytes([head[16], head[17]]), 2, "ET_EXEC");
    assert_eq!(u16::from_le_bytes([head[18], head[19]]), 62, "EM_X86_64");

    // The initrd: every module the guest needs, and the list the initrd loads at boot.
    let out = Command::new("gzip").arg("-dc").arg(&b.initrd).output().unwrap();
    assert!(out.status.success(), "the initrd is not gzip");
    let names = cpio_names(&out.stdout);
    for module in image_build::INITRD_MODULES {
        assert!(
            names.iter().any(|n| n
                .rsplit('/')
                .next()
                .is_some_and(|f| f.split('.').next() == Some(module) && f.contains(".ko"))),
            "{module}.ko not in the initrd"
        );
    }
    assert!(names.iter().any(|n| n == "conf/modules"), "no conf/modules");

    // The root filesystem: root-owned files with their packaged owners and modes, and nothing
    // host-specific.
    let r = &b.rootfs;
    assert_eq!(stat(r, "/usr/sbin/sshd").map(|s| (s.1, s.2, s.3)), Some((0, 0, "regular".into())));
    assert_eq!(stat(r, "/root").map(|s| (s.0, s.1, s.2)), Some((0o700, 0, 0)));
    assert_eq!(stat(r, "/tmp").map(|s| (s.0, s.1)), Some((0o1777, 0)));
    let shadow = stat(r, "/etc/shadow").unwrap();
    assert_eq!((shadow.0, shadow.1), (0o640, 0), "{shadow:?}");
    assert_ne!(shadow.2, 0, "/etc/shadow keeps its group (shadow): {shadow:?}");
    assert_eq!(stat(r, "/usr/bin/passwd").map(|s| s.0 & 0o4000), Some(0o4000), "setuid kept");
    let ssh = debugfs(r, "ls /etc/ssh");
    assert!(ssh.contains("sshd_config") && !ssh.contains("ssh_host_"), "host keys baked in: {ssh}");
    assert!(debugfs(r, "cat /etc/machine-id").trim().is_empty(), "a machine-id is baked in");
    assert!(stat(r, "/etc/resolv.conf").is_none(), "the host's resolv.conf is baked in");
    assert_eq!(debugfs(r, "cat /etc/hostname").trim(), "localhost");
    for unit in ["systemd-networkd.service", "ssh.service"] {
        let wants = debugfs(r, "ls /etc/systemd/system/multi-user.target.wants");
        assert!(wants.contains(unit), "{unit} not enabled: {wants}");
    }
    let sysinit = debugfs(r, "ls /etc/systemd/system/sysinit.target.wants");
    assert!(sysinit.contains("systemd-network-generator.service"), "{sysinit}");
    assert!(
        !debugfs(r, "ls /etc/apt/sources.list.d").trim().is_empty(),
        "the host's sources are the guest's"
    );
    assert!(stat(r, "/boot/vmlinuz").is_none());
    let size = std::fs::metadata(r).unwrap().len();
    assert_eq!(size, 2 << 30, "grown to {}", image_build::ROOTFS_SIZE);
}

/// Kills qemu when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_built_image_boots_under_qemu_with_bangerd_s_command_line_and_accepts_the_key() {
    let Some(b) = built() else { return };
    let exe = std::env::current_exe().ok();
    let cache = kernel_tier::default_cache_dir(exe.as_deref());
    let prepared = match kernel_tier::prepare(&cache, false) {
        Ok((prepared, _lock)) => prepared,
        Err(kernel_tier::prepare::PrepareError::Unavailable(u)) => {
            assert!(!kernel_tier::under_ci(), "the kernel tier's qemu is unavailable: {u}, and CI=true");
            eprintln!("SKIPPED: the kernel tier's qemu is unavailable: {u}");
            return;
        }
        Err(e) => panic!("kernel tier cache: {e}"),
    };

    // The VM's root: a sparse copy of the image, personalized by bangerd's code.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root.ext4");
    let status = Command::new("cp").arg("--sparse=always").arg(&b.rootfs).arg(&root).status().unwrap();
    assert!(status.success());
    let key = tmp.path().join("id_ed25519");
    let public = banger::ssh::generate_keypair(&key, "banger").unwrap();
    let resolv = "nameserver 10.0.2.3\n";
    let vm_host_key =
        banger::ssh::ensure_host_key(&tmp.path().join("ssh_host_ed25519_key"), "imgboot").unwrap();
    let host_key = personalize(
        &root,
        &Personalization {
            hostname: "imgboot",
            authorized_keys: &[public],
            work_disk: false,
            form: RootForm::File,
            scratch: tmp.path(),
            resolv_conf: Some(resolv),
            host_key: &vm_host_key,
        },
    )
    .unwrap();

    // bangerd's command line for qemu's user network (10.0.2.0/24, gateway 10.0.2.2), without
    // `pci=off` (here the devices are on PCI), with the root Firecracker appends.
    let cmdline = banger::daemon::lifecycle::boot_args(
        "imgboot",
        Ipv4Addr::new(10, 0, 2, 15),
        Ipv4Addr::new(10, 0, 2, 2),
        24,
    );
    assert!(cmdline.contains(" pci=off"), "{cmdline}");
    let cmdline = format!("{} root=/dev/vda rw", cmdline.replace(" pci=off", ""));

    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let console = tmp.path().join("console.log");
    let install = prepared.qemu();
    let mut cmd = install.command();
    for dir in &install.data_dirs {
        cmd.arg("-L").arg(dir);
    }
    cmd.args(["-accel", "tcg", "-cpu", "max", "-M", "q35", "-m", "1G", "-smp", "2"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&b.vmlinux)
        .arg("-initrd")
        .arg(&b.initrd)
        .args(["-append", &cmdline])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", root.display()))
        .args(["-netdev", &format!("user,id=n0,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{port}-:22")])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let qemu = Qemu(cmd.spawn().unwrap());

    // banger pins the host key it wrote: the guest must present exactly that one.
    let known = tmp.path().join("known_hosts");
    std::fs::write(&known, format!("[127.0.0.1]:{port} {host_key}\n")).unwrap();
    let remote = "hostname; ip -4 -o addr show dev eth0; ip route show default; cat /etc/resolv.conf; echo ran-as-$(id -u)";
    let started = Instant::now();
    let output = loop {
        let out = Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "ConnectTimeout=20",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .arg("-i")
            .arg(&key)
            .args(["-p", &port.to_string(), "root@127.0.0.1", remote])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        let console_text = std::fs::read_to_string(&console).unwrap_or_default();
        if started.elapsed() > Duration::from_secs(420) {
            let tail: Vec<&str> = console_text.lines().rev().take(60).collect();
            panic!(
                "no SSH login within 420 s; last ssh error: {}\nconsole:\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    };
    eprintln!("logged in after {:.0?}:\n{output}", started.elapsed());
    drop(qemu);
    let mut lines = output.lines();
    assert_eq!(lines.next(), Some("imgboot"), "{output}");
    assert!(output.contains("inet 10.0.2.15/24"), "the address from ip=: {output}");
    assert!(output.contains("default via 10.0.2.2"), "the gateway from ip=: {output}");
    assert!(output.contains(resolv.trim()), "the resolvers written by bangerd: {output}");
    assert!(output.contains("ran-as-0"), "{output}");
}
