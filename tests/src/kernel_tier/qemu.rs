//! Booting the guest: qemu's command line (always software emulation: anything that picks KVM
//! hangs on this kind of machine), and one boot with a time limit, its console streamed to the
//! caller and kept in a log, and the lines the guest's init prints noted with the time they came.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// qemu as unpacked from Debian's packages.
#[derive(Debug, Clone)]
pub struct QemuInstall {
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// Directories of the shared libraries unpacked beside it (`LD_LIBRARY_PATH`).
    pub lib_dirs: Vec<PathBuf>,
    /// Firmware directories (`-L`): qemu's own data, SeaBIOS.
    pub data_dirs: Vec<PathBuf>,
}

impl QemuInstall {
    /// A command running this qemu with its libraries.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        let mut path = OsString::new();
        for (i, dir) in self.lib_dirs.iter().enumerate() {
            if i > 0 {
                path.push(":");
            }
            path.push(dir);
        }
        cmd.env("LD_LIBRARY_PATH", path);
        cmd
    }
}

/// What one boot runs.
#[derive(Debug)]
pub struct Machine<'a> {
    /// The ELF kernel.
    pub kernel: &'a Path,
    /// The initramfs.
    pub initramfs: &'a Path,
    /// The kernel's command line.
    pub cmdline: &'a str,
    /// The host directory shared read-only as the guest's root (9p tag `hostroot`).
    pub root: &'a Path,
    /// The run's directory, shared writable (9p tag `out`).
    pub out: &'a Path,
    /// The guest's memory, in MiB.
    pub memory_mib: u32,
}

/// The guest's memory unless a run asks for more: room for two end-to-end worlds side by side.
pub const DEFAULT_MEMORY_MIB: u32 = 1024;

/// The I/O port of qemu's `isa-debug-exit` device; the guest writes its exit code there.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The kernel's command line: serial console, the initramfs's `/init`, reboot (so qemu ends,
/// given `-no-reboot`) at once on panic; no self-tests or mitigations, which only cost time under
/// emulation. `verbose` shows every kernel message, otherwise warnings and worse.
pub fn cmdline(verbose: bool) -> String {
    let level = if verbose { 7 } else { 4 };
    format!("console=ttyS0 rdinit=/init panic=-1 loglevel={level} mitigations=off cryptomgr.notests")
}

/// qemu's arguments for `machine`.
pub fn args(install: &QemuInstall, machine: &Machine) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    for dir in &install.data_dirs {
        push(&["-L", &dir.to_string_lossy()]);
    }
    let memory = format!("{}M", machine.memory_mib);
    push(&["-accel", "tcg", "-cpu", "max", "-M", "q35", "-m", &memory, "-smp", "2"]);
    push(&["-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"]);
    push(&["-kernel", &machine.kernel.to_string_lossy(), "-initrd", &machine.initramfs.to_string_lossy()]);
    push(&["-append", machine.cmdline]);
    let share = |id: &str, path: &Path, readonly: bool| {
        let ro = if readonly { ",readonly=on" } else { "" };
        format!("local,id={id},path={},security_model=none,multidevs=remap{ro}", path.to_string_lossy())
    };
    push(&["-fsdev", &share("hostroot", machine.root, true)]);
    push(&["-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"]);
    push(&["-fsdev", &share("out", machine.out, false)]);
    push(&["-device", "virtio-9p-pci,fsdev=out,mount_tag=out"]);
    push(&["-device", &format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04")]);
    args
}

/// How a boot ended.
#[derive(Debug)]
pub struct Boot {
    /// qemu's exit status, or `None` if it was killed at the time limit.
    pub status: Option<ExitStatus>,
    /// When qemu was started.
    pub started: Instant,
    /// The lines starting with `kernel-tier:` the guest printed, with when they arrived.
    pub marks: Vec<(Instant, String)>,
}

impl Boot {
    /// The code the guest wrote to `isa-debug-exit` (qemu exits with `(code << 1) | 1`), if qemu
    /// ended that way.
    pub fn guest_code(&self) -> Option<i32> {
        let code = self.status?.code()?;
        (code & 1 == 1).then_some(code >> 1)
    }

    /// How qemu ended, for messages.
    pub fn describe_end(&self) -> String {
        match self.status {
            None => "qemu was killed at the time limit".into(),
            Some(s) => match (s.code(), s.signal()) {
                (Some(0), _) => "the guest ended without reporting (kernel panic or power-off)".into(),
                (Some(c), _) if c & 1 == 1 => format!("the guest reported code {}", c >> 1),
                (Some(c), _) => format!("qemu failed with exit status {c}"),
                (None, Some(sig)) => format!("qemu was killed by signal {sig}"),
                (None, None) => format!("qemu ended: {s}"),
            },
        }
    }
}

/// Runs `cmd` (qemu) for at most `timeout`, its standard output (the serial console) copied to
/// this process's standard output without carriage returns and to `log`.
pub fn boot(mut cmd: Command, timeout: Duration, log: File) -> std::io::Result<Boot> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    // SAFETY: the closure runs between fork and exec and calls only prctl, which is
    // async-signal-safe; it allocates nothing. The spawning thread (the caller's) lives until
    // qemu has been waited for below, so the death signal fires only if this process dies.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let marks = Arc::new(Mutex::new(Vec::new()));
    let copier = {
        let marks = Arc::clone(&marks);
        std::thread::spawn(move || copy_console(&mut stdout, log, &marks))
    };
    let deadline = started + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = copier.join();
    let marks = std::mem::take(&mut *marks.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Boot { status, started, marks })
}

fn copy_console(from: &mut impl std::io::Read, mut log: File, marks: &Mutex<Vec<(Instant, String)>>) {
    let mut buf = [0u8; 8192];
    let mut line = Vec::new();
    let stdout = std::io::stdout();
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        let chunk: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != b'\r').collect();
        let _ = log.write_all(&chunk);
        {
            let mut out = stdout.lock();
            let _ = out.write_all(&chunk);
            let _ = out.flush();
        }
        for &b in &chunk {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            if line.starts_with(b"kernel-tier: ") {
                let text = String::from_utf8_lossy(&line).into_owned();
                marks.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), text));
            }
            line.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_use_software_emulation_and_never_kvm() {
        let install = QemuInstall {
            binary: "/q/qemu-system-x86_64".into(),
            lib_dirs: vec![],
            data_dirs: vec!["/q/share/qemu".into(), "/q/share/seabios".into()],
        };
        let machine = Machine {
            kernel: Path::new("/c/vmlinux"),
            initramfs: Path::new("/r/initramfs.cpio"),
            cmdline: "console=ttyS0",
            root: Path::new("/"),
            out: Path::new("/r"),
            memory_mib: DEFAULT_MEMORY_MIB,
        };
        let args: Vec<String> =
            args(&install, &machine).into_iter().map(|a| a.into_string().unwrap()).collect();
        let joined = args.join(" ");
        for expected in [
            "-L /q/share/qemu -L /q/share/seabios",
            "-accel tcg -cpu max -M q35 -m 1024M -smp 2",
            "-nodefaults -display none -serial stdio -no-reboot",
            "-kernel /c/vmlinux -initrd /r/initramfs.cpio -append console=ttyS0",
            "-fsdev local,id=hostroot,path=/,security_model=none,multidevs=remap,readonly=on",
            "-fsdev local,id=out,path=/r,security_model=none,multidevs=remap -device",
            "-device isa-debug-exit,iobase=0xf4,iosize=0x04",
        ] {
            assert!(joined.contains(expected), "{expected:?} not in {joined}");
        }
        assert!(!joined.to_lowercase().contains("kvm"), "{joined}");
        assert!(!args.iter().any(|a| a == "-enable-kvm" || a.starts_with("accel=")));
    }

    #[test]
    fn the_guest_code_comes_only_from_odd_exit_statuses() {
        let boot = |raw: Option<i32>| Boot {
            status: raw.map(ExitStatus::from_raw),
            started: Instant::now(),
            marks: vec![],
        };
        // Raw wait statuses: exit code in the second byte.
        assert_eq!(boot(Some(1 << 8)).guest_code(), Some(0));
        assert_eq!(boot(Some(((101 << 1) | 1) << 8)).guest_code(), Some(101));
        assert_eq!(boot(Some(0)).guest_code(), None);
        assert_eq!(boot(Some(2 << 8)).guest_code(), None);
        assert_eq!(boot(Some(9)).guest_code(), None); // killed by SIGKILL
        assert_eq!(boot(None).guest_code(), None);
        assert!(boot(None).describe_end().contains("time limit"));
    }

    #[test]
    fn the_console_is_copied_without_carriage_returns_and_marks_are_noted() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let marks = Mutex::new(Vec::new());
        let mut input: &[u8] = b"[ 0.1] boot\r\nkernel-tier: guest ready\r\nnoise kernel-tier: no\r\nkernel-tier: job 1 starts\r\n";
        copy_console(&mut input, File::create(&log).unwrap(), &marks);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "[ 0.1] boot\nkernel-tier: guest ready\nnoise kernel-tier: no\nkernel-tier: job 1 starts\n"
        );
        let marks: Vec<String> = marks.into_inner().unwrap().into_iter().map(|(_, l)| l).collect();
        assert_eq!(marks, ["kernel-tier: guest ready", "kernel-tier: job 1 starts"]);
    }
}
