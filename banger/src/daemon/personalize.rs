//! Per-VM personalization, written unprivileged into the VM's own root filesystem before it
//! boots. Root never mounts a user's filesystem: the user edits their own root with e2fsprogs'
//! `debugfs -w`: the VM's root file, or the node of its dm-snapshot (a block device the helper
//! gave the user), whose writes land in the VM's copy-on-write file, never in the image.
//!
//! What [`personalize`] writes (all owned by root, uid and gid 0):
//!
//! | path | mode | content |
//! | --- | --- | --- |
//! | `/etc/hostname` | 0644 | the VM's name |
//! | `/etc/hosts` | 0644 | the existing file with `127.0.1.1 <name>` (any older `127.0.1.1` line replaced; a localhost line added if missing) |
//! | `/root/.ssh/` | 0700 | (forced even if it existed, as sshd's `StrictModes` wants) |
//! | `/root/.ssh/authorized_keys` | 0600 | the user's banger public key |
//! | `/etc/ssh/ssh_host_ed25519_key` | 0600 | the VM's ed25519 host key (made once, when the VM is created, and kept in its directory, see [`crate::ssh::ensure_host_key`]) |
//! | `/etc/ssh/ssh_host_ed25519_key.pub` | 0644 | its public half |
//! | `/etc/resolv.conf` | 0644 | (when the host has resolvers a guest can reach) the host's upstream resolvers ([`crate::daemon::resolvers`]) |
//! | `/work/` | 0755 | (with a work disk: its mount point, created if missing) |
//! | `/etc/fstab` | 0644 | (with a work disk) the existing file with `/dev/vdb /work ext4 defaults,nofail 0 2` (any older `/work` line replaced) |
//!
//! The work disk is the VM's second drive, so the guest sees it as `/dev/vdb`; `nofail` lets
//! the guest boot even if it is missing.
//!
//! Missing directories (`/etc`, `/etc/ssh`, `/root`) are created (0755, `/root` 0700); existing
//! ones keep their mode. Running it again rewrites everything with the same host key, which the
//! caller pins (see [`crate::ssh::pin_host_key`]). The daemon runs it at a VM's first start and
//! again only when something written changes or the root is made again ([`stamp`]): between
//! those, the guest's own changes to these files stay.
//!
//! Steps:
//! 1. check the inputs (hostname a DNS label, keys one-line OpenSSH keys), that the root is a
//!    writable regular file or block device, as the caller expects ([`RootForm`]; a path that
//!    should be a device node and is a file is refused), with an ext2/3/4 superblock;
//! 2. if the superblock says the journal needs recovery (the guest was killed), replay it with
//!    `e2fsck -E journal_only` first; otherwise the guest's own replay at mount time could write
//!    stale blocks over what is written here;
//! 3. look at what exists, in one read-only `debugfs -f -` session (a `stat` of the root and of
//!    every directory and file written, and `dump`s of `/etc/hosts` and `/etc/fstab`, whose
//!    lines are kept), and stage every file in a private temporary directory in the VM's
//!    directory;
//! 4. run one `debugfs -w -f <script>` session. Its `mkdir`, `rm` and `write` take a name
//!    relative to the current directory (an absolute top-level path is resolved against the
//!    current directory in debugfs 1.47), so the script `cd`s into each parent first; `write`
//!    copies the local file's owner, so `sif` (set_inode_field) sets mode, uid and gid after;
//! 5. debugfs reports most failures on stderr and still exits 0, so every file and directory
//!    is read back (`stat`, `dump`, in one more read-only session) and compared; any
//!    difference is an error that carries what debugfs printed.
//!
//! Three `debugfs` processes in all, whatever the number of files.
//!
//! debugfs and e2fsck live in `/usr/sbin` or `/sbin`, often not on a user's `PATH`; they are
//! looked up on `PATH` and then there.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::ids::validate_name;
use crate::ssh::{HostKey, SshError, check_public_key};

/// Where tools missing from `PATH` are also looked for.
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];
/// The ext2/3/4 superblock: offset in the image, magic offset and value, incompat features.
const SUPERBLOCK_OFFSET: u64 = 1024;
const MAGIC_OFFSET: usize = 56;
const EXT_MAGIC: u16 = 0xEF53;
const INCOMPAT_OFFSET: usize = 96;
const INCOMPAT_RECOVER: u32 = 0x4;
/// The most of an existing `/etc/hosts` or `/etc/fstab` that is kept.
const HOSTS_LIMIT: usize = 64 * 1024;
/// Where the guest mounts the work disk.
pub const WORK_DISK_MOUNT: &str = "/work";
/// The work disk as the guest sees it: the second drive.
pub const WORK_DISK_DEVICE: &str = "/dev/vdb";

/// Why a VM's root could not be personalized.
#[derive(Debug, thiserror::Error)]
pub enum PersonalizeError {
    /// The record of the last personalization cannot be removed.
    #[error("cannot remove {path}, the record of the vm root's last personalization: remove it by hand")]
    Stamp {
        /// The record.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The hostname is not a DNS label.
    #[error("invalid hostname {0:?}: use a vm name (lowercase letters, digits and '-')")]
    Hostname(String),
    /// A key to install is malformed.
    #[error("cannot install an authorized key")]
    Key(#[source] SshError),
    /// The image cannot be opened for writing.
    #[error("cannot open vm root {path} for writing")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The root is not the kind of file the caller expected.
    #[error("vm root {path} is not a {expected}")]
    NotExpectedKind {
        /// The root.
        path: PathBuf,
        /// What it should have been.
        expected: &'static str,
    },
    /// The image holds no ext2/3/4 filesystem.
    #[error(
        "{path} is not an ext2/3/4 filesystem image: banger writes the hostname and keys into it with debugfs (build images with mkfs.ext4)"
    )]
    NotExt {
        /// The image.
        path: PathBuf,
    },
    /// A tool is not installed.
    #[error("{tool} not found on PATH, in /usr/sbin or in /sbin: install e2fsprogs")]
    ToolMissing {
        /// The tool.
        tool: &'static str,
    },
    /// A tool ran and failed.
    #[error("{tool} failed on {path} ({status}): {stderr}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// The image.
        path: PathBuf,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// A tool could not be started.
    #[error("cannot run {tool}")]
    Spawn {
        /// The tool.
        tool: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The journal still needs recovery after e2fsck.
    #[error("{path} still needs journal recovery: run `e2fsck -f {path}` and try again")]
    Journal {
        /// The image.
        path: PathBuf,
    },
    /// debugfs cannot read the filesystem.
    #[error("debugfs cannot read the filesystem in {path}: {stderr}")]
    Unreadable {
        /// The image.
        path: PathBuf,
        /// What debugfs printed.
        stderr: String,
    },
    /// Something that must be a directory is not.
    #[error("{dir} in {root} is not a directory: the image's layout is not usable")]
    NotADirectory {
        /// The image.
        root: PathBuf,
        /// The path inside the image.
        dir: &'static str,
    },
    /// A write did not take effect.
    #[error("writing {path} into {root} did not take effect ({problem}); debugfs said: {stderr}")]
    Verify {
        /// The image.
        root: PathBuf,
        /// The path inside the image.
        path: &'static str,
        /// What differs.
        problem: String,
        /// What the write session printed on stderr.
        stderr: String,
    },
    /// The host key's public half is malformed.
    #[error("the vm's ssh host key is not usable")]
    HostKey(#[source] SshError),
    /// The staging directory could not be made or written.
    #[error("cannot stage files in {dir}")]
    Stage {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What a VM's root is on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootForm {
    /// A file of the VM's own (reflink clone or sparse copy).
    File,
    /// A block device node (a dm-snapshot's).
    BlockDevice,
}

impl RootForm {
    fn name(self) -> &'static str {
        match self {
            RootForm::File => "regular file",
            RootForm::BlockDevice => "block device",
        }
    }
}

/// What to write into a VM's root.
#[derive(Debug, Clone, Copy)]
pub struct Personalization<'a> {
    /// The guest's hostname (the VM's name).
    pub hostname: &'a str,
    /// The keys allowed to log in as root: OpenSSH public key lines (the user's banger key).
    pub authorized_keys: &'a [String],
    /// Whether the VM has a work disk (its mount point and fstab line are written).
    pub work_disk: bool,
    /// What the root must be.
    pub form: RootForm,
    /// A directory of the user's where files are staged (the VM's directory).
    pub scratch: &'a Path,
    /// The guest's `/etc/resolv.conf`, if one is to be written.
    pub resolv_conf: Option<&'a str>,
    /// The VM's SSH host key, made once when the VM was created and kept in its directory.
    pub host_key: &'a HostKey,
}

/// The file in a VM's directory that records what its root was last personalized with
/// ([`stamp`]).
pub const STAMP_FILE: &str = "personalized";

/// What personalizing the root whose own part is `overlay` with `p` comes to, as a digest of
/// everything written and of that file's identity (device, inode and birth time: a root made
/// again is another file). A start whose stamp equals the one recorded after the last
/// personalization leaves the root alone, as the guest left it. `None` where the file's birth
/// time cannot be read: every start then personalizes.
pub fn stamp(overlay: &Path, p: &Personalization<'_>) -> Option<String> {
    use std::os::unix::fs::MetadataExt;

    use sha2::{Digest, Sha256};
    let meta = fs::metadata(overlay).ok()?;
    let born = meta.created().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(b"personalization 1");
    field(format!("{} {} {} {:?}", meta.dev(), meta.ino(), born.as_nanos(), p.form).as_bytes());
    field(p.hostname.as_bytes());
    for key in p.authorized_keys {
        field(key.as_bytes());
    }
    field(if p.work_disk { b"work disk" } else { b"no work disk" });
    field(p.resolv_conf.unwrap_or("(none)").as_bytes());
    field(&p.host_key.private);
    field(p.host_key.public.as_bytes());
    Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Forgets the last personalization of the VM whose directory is `vm_dir` (its root is made
/// again, or is about to be written): the next start personalizes. A stamp that cannot be
/// removed is an error: it could let a later start skip a root that needs writing.
pub fn forget_stamp(vm_dir: &Path) -> Result<(), PersonalizeError> {
    let path = vm_dir.join(STAMP_FILE);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PersonalizeError::Stamp { path, source: e }),
        _ => Ok(()),
    }
}

/// Whether the file at `path` starts with an ext2/3/4 superblock.
pub fn is_ext_filesystem(path: &Path) -> io::Result<bool> {
    Ok(read_superblock(&mut File::open(path)?)?.is_some_and(|sb| magic(&sb) == EXT_MAGIC))
}

fn read_superblock(file: &mut File) -> io::Result<Option<[u8; 128]>> {
    let mut sb = [0u8; 128];
    file.seek(SeekFrom::Start(SUPERBLOCK_OFFSET))?;
    match file.read_exact(&mut sb) {
        Ok(()) => Ok(Some(sb)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

fn magic(sb: &[u8; 128]) -> u16 {
    u16::from_le_bytes([sb[MAGIC_OFFSET], sb[MAGIC_OFFSET + 1]])
}

fn needs_recovery(sb: &[u8; 128]) -> bool {
    let f = &sb[INCOMPAT_OFFSET..INCOMPAT_OFFSET + 4];
    u32::from_le_bytes([f[0], f[1], f[2], f[3]]) & INCOMPAT_RECOVER != 0
}

/// Finds an e2fsprogs tool on `PATH`, then in the sbin directories.
pub(crate) fn find_tool(tool: &'static str) -> Result<PathBuf, PersonalizeError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .filter(|d| d.is_absolute())
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or(PersonalizeError::ToolMissing { tool })
}

/// A file type as debugfs names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regular,
    Directory,
    Other,
}

/// What `debugfs stat` says about an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InodeInfo {
    kind: Kind,
    /// Permission bits (including setuid/setgid/sticky).
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Parses `debugfs stat` output; `None` when it holds no inode (the path does not exist).
fn parse_stat(out: &str) -> Option<InodeInfo> {
    let mut kind = None;
    let (mut mode, mut uid, mut gid) = (None, None, None);
    for line in out.lines() {
        let mut words = line.split_whitespace().peekable();
        while let Some(word) = words.next() {
            let next = words.peek().copied();
            match (word, next) {
                ("Type:", Some(t)) => {
                    kind = Some(match t {
                        "regular" => Kind::Regular,
                        "directory" => Kind::Directory,
                        _ => Kind::Other,
                    })
                }
                ("Mode:", Some(m)) => mode = u32::from_str_radix(m, 8).ok(),
                ("User:", Some(u)) => uid = u.parse().ok(),
                ("Group:", Some(g)) => gid = g.parse().ok(),
                _ => {}
            }
        }
    }
    Some(InodeInfo { kind: kind?, mode: mode?, uid: uid?, gid: gid? })
}

/// Runs debugfs on the image.
struct Debugfs {
    program: PathBuf,
    image: PathBuf,
}

impl Debugfs {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.env("DEBUGFS_PAGER", "__none__").env("PAGER", "__none__").env("LC_ALL", "C").stdin(Stdio::null());
        cmd
    }

    /// Runs read-only `requests` in one session (`debugfs -f -`, the image opened read-only)
    /// in `cwd`, where `dump` writes; returns what each printed on stdout, in order, and what
    /// the session printed on stderr. Each request's output follows its echo (`debugfs: …`).
    fn session(&self, requests: &[String], cwd: &Path) -> Result<(Vec<String>, String), PersonalizeError> {
        let mut child = self
            .command()
            .arg("-f")
            .arg("-")
            .arg(&self.image)
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| PersonalizeError::Spawn { tool: "debugfs", source })?;
        let mut script = requests.join("\n");
        script.push('\n');
        let mut stdin = child.stdin.take().expect("piped");
        let fed = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
        let out =
            child.wait_with_output().map_err(|source| PersonalizeError::Spawn { tool: "debugfs", source })?;
        // A debugfs that exits early closes its end: its status and stderr say why.
        let _ = fed.join();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if !out.status.success() {
            return Err(PersonalizeError::Tool {
                tool: "debugfs",
                path: self.image.clone(),
                status: out.status,
                stderr,
            });
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut outputs: Vec<String> = Vec::with_capacity(requests.len());
        for line in stdout.lines() {
            if line.starts_with("debugfs: ") {
                outputs.push(String::new());
            } else if let Some(current) = outputs.last_mut() {
                current.push_str(line);
                current.push('\n');
            }
        }
        if outputs.len() != requests.len() {
            return Err(PersonalizeError::Unreadable { path: self.image.clone(), stderr });
        }
        Ok((outputs, stderr))
    }

    /// Runs a write session from a script file; returns what it printed on stderr.
    fn run_script(&self, script: &Path, cwd: &Path) -> Result<String, PersonalizeError> {
        let out = self
            .command()
            .arg("-w")
            .arg("-f")
            .arg(script)
            .arg(&self.image)
            .current_dir(cwd)
            .output()
            .map_err(|source| PersonalizeError::Spawn { tool: "debugfs", source })?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if !out.status.success() {
            return Err(PersonalizeError::Tool {
                tool: "debugfs",
                path: self.image.clone(),
                status: out.status,
                stderr,
            });
        }
        Ok(stderr)
    }
}

/// `/etc/hosts` with `127.0.1.1 <hostname>`: older `127.0.1.1` lines dropped, a localhost line
/// added when none is there.
fn hosts_file(existing: Option<&str>, hostname: &str) -> String {
    let first = |l: &str| l.split_whitespace().next().map(str::to_owned);
    let kept: Vec<&str> =
        existing.unwrap_or_default().lines().filter(|l| first(l).as_deref() != Some("127.0.1.1")).collect();
    let mut out = String::new();
    if !kept.iter().any(|l| first(l).as_deref() == Some("127.0.0.1")) {
        out.push_str("127.0.0.1\tlocalhost\n");
        if existing.is_none() {
            out.push_str("::1\tlocalhost ip6-localhost ip6-loopback\n");
        }
    }
    for line in kept {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    out
}

/// A directory the script may create.
#[derive(Clone, Copy)]
struct DirSpec {
    path: &'static str,
    parent: &'static str,
    name: &'static str,
    mode: u32,
    /// Set mode and owner even when it exists.
    force: bool,
}

/// A file the script writes.
struct FileSpec {
    path: &'static str,
    parent: &'static str,
    name: &'static str,
    mode: u32,
    content: Vec<u8>,
}

const DIRS: [DirSpec; 4] = [
    DirSpec { path: "/etc", parent: "/", name: "etc", mode: 0o755, force: false },
    DirSpec { path: "/etc/ssh", parent: "/etc", name: "ssh", mode: 0o755, force: false },
    DirSpec { path: "/root", parent: "/", name: "root", mode: 0o700, force: false },
    DirSpec { path: "/root/.ssh", parent: "/root", name: ".ssh", mode: 0o700, force: true },
];

/// The work disk's mount point.
const WORK_DIR: DirSpec =
    DirSpec { path: WORK_DISK_MOUNT, parent: "/", name: "work", mode: 0o755, force: false };

/// The fstab line that mounts the work disk.
fn work_disk_line() -> String {
    format!("{WORK_DISK_DEVICE}\t{WORK_DISK_MOUNT}\text4\tdefaults,nofail\t0\t2")
}

/// `/etc/fstab` with the work disk's line: older lines for its mount point dropped.
fn fstab_file(existing: Option<&str>) -> String {
    let mut out = String::new();
    for line in existing.unwrap_or_default().lines() {
        let mut fields = line.split_whitespace();
        let comment = fields.clone().next().is_some_and(|f| f.starts_with('#'));
        if !comment && fields.nth(1) == Some(WORK_DISK_MOUNT) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&work_disk_line());
    out.push('\n');
    out
}

/// Writes hostname, hosts, authorized keys, a new SSH host key and, with a work disk, its mount
/// point and fstab line into the ext4 filesystem `root` (see the module docs). Returns the
/// host's public key line, to be pinned.
pub fn personalize(root: &Path, p: &Personalization<'_>) -> Result<String, PersonalizeError> {
    validate_name(p.hostname).map_err(|_| PersonalizeError::Hostname(p.hostname.to_owned()))?;
    let mut authorized = String::new();
    for key in p.authorized_keys {
        authorized.push_str(&check_public_key(key).map_err(PersonalizeError::Key)?);
        authorized.push('\n');
    }

    let open_err = |source| PersonalizeError::Open { path: root.to_owned(), source };
    let mut image = OpenOptions::new().read(true).write(true).open(root).map_err(open_err)?;
    let file_type = image.metadata().map_err(open_err)?.file_type();
    let expected = match p.form {
        RootForm::File => file_type.is_file(),
        RootForm::BlockDevice => std::os::unix::fs::FileTypeExt::is_block_device(&file_type),
    };
    if !expected {
        return Err(PersonalizeError::NotExpectedKind { path: root.to_owned(), expected: p.form.name() });
    }
    let sb = read_superblock(&mut image)
        .map_err(open_err)?
        .filter(|sb| magic(sb) == EXT_MAGIC)
        .ok_or_else(|| PersonalizeError::NotExt { path: root.to_owned() })?;
    if needs_recovery(&sb) {
        replay_journal(root)?;
        let sb = read_superblock(&mut image).map_err(open_err)?;
        if sb.is_none_or(|sb| needs_recovery(&sb)) {
            return Err(PersonalizeError::Journal { path: root.to_owned() });
        }
    }
    drop(image);

    let debugfs = Debugfs { program: find_tool("debugfs")?, image: root.to_owned() };
    let dir = p.scratch;
    let stage_err = |source| PersonalizeError::Stage { dir: dir.to_owned(), source };
    let stage = tempfile::Builder::new().prefix(".personalize-").tempdir_in(dir).map_err(stage_err)?;
    let host_private = p.host_key.private.clone();
    let host_public = check_public_key(&p.host_key.public).map_err(PersonalizeError::HostKey)?;

    let mut dirs = DIRS.to_vec();
    if p.work_disk {
        dirs.push(WORK_DIR);
    }
    let mut files = vec![
        FileSpec {
            path: "/etc/hostname",
            parent: "/etc",
            name: "hostname",
            mode: 0o644,
            content: format!("{}\n", p.hostname).into_bytes(),
        },
        FileSpec { path: "/etc/hosts", parent: "/etc", name: "hosts", mode: 0o644, content: Vec::new() },
        FileSpec {
            path: "/root/.ssh/authorized_keys",
            parent: "/root/.ssh",
            name: "authorized_keys",
            mode: 0o600,
            content: authorized.into_bytes(),
        },
        FileSpec {
            path: "/etc/ssh/ssh_host_ed25519_key",
            parent: "/etc/ssh",
            name: "ssh_host_ed25519_key",
            mode: 0o600,
            content: host_private,
        },
        FileSpec {
            path: "/etc/ssh/ssh_host_ed25519_key.pub",
            parent: "/etc/ssh",
            name: "ssh_host_ed25519_key.pub",
            mode: 0o644,
            content: format!("{host_public}\n").into_bytes(),
        },
    ];
    if let Some(resolv) = p.resolv_conf {
        files.push(FileSpec {
            path: "/etc/resolv.conf",
            parent: "/etc",
            name: "resolv.conf",
            mode: 0o644,
            content: resolv.as_bytes().to_vec(),
        });
    }
    if p.work_disk {
        files.push(FileSpec {
            path: "/etc/fstab",
            parent: "/etc",
            name: "fstab",
            mode: 0o644,
            content: Vec::new(),
        });
    }

    // One read-only session: the root, every directory and file, and the files whose content is
    // kept (`/etc/hosts`, `/etc/fstab`) dumped into the stage.
    let mut reads = vec!["stat /".to_owned()];
    reads.extend(dirs.iter().map(|d| format!("stat {}", d.path)));
    reads.extend(files.iter().map(|f| format!("stat {}", f.path)));
    let kept: Vec<usize> = files
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f.name, "hosts" | "fstab"))
        .map(|(i, _)| i)
        .collect();
    reads.extend(kept.iter().map(|i| format!("dump {} r{i}", files[*i].path)));
    let (outs, stderr) = debugfs.session(&reads, stage.path())?;
    let stats: Vec<Option<InodeInfo>> = outs.iter().map(|o| parse_stat(o)).collect();
    if stats[0].is_none_or(|i| i.kind != Kind::Directory) {
        return Err(PersonalizeError::Unreadable { path: root.to_owned(), stderr });
    }
    let (dir_stats, file_stats) = stats[1..].split_at(dirs.len());
    let file_stats = &file_stats[..files.len()];
    let existing = |i: usize| -> Result<Option<String>, PersonalizeError> {
        if file_stats[i].is_none_or(|info| info.kind != Kind::Regular) {
            return Ok(None);
        }
        let dumped = stage.path().join(format!("r{i}"));
        let mut bytes = Vec::new();
        File::open(&dumped)
            .and_then(|f| f.take(HOSTS_LIMIT as u64).read_to_end(&mut bytes))
            .map_err(|_| PersonalizeError::Unreadable { path: root.to_owned(), stderr: stderr.clone() })?;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    };
    for i in kept {
        let content = match files[i].name {
            "hosts" => hosts_file(existing(i)?.as_deref(), p.hostname),
            _ => fstab_file(existing(i)?.as_deref()),
        };
        files[i].content = content.into_bytes();
    }

    // The script: directories first (parents before children), then files.
    let mut script = String::new();
    let mut created = Vec::new();
    for (d, stat) in dirs.iter().zip(dir_stats) {
        let exists = match stat {
            Some(info) if info.kind == Kind::Directory => true,
            Some(_) => return Err(PersonalizeError::NotADirectory { root: root.to_owned(), dir: d.path }),
            None => false,
        };
        if exists && !d.force {
            continue;
        }
        script.push_str(&format!("cd {}\n", d.parent));
        if !exists {
            script.push_str(&format!("mkdir {}\n", d.name));
            created.push(d.path);
        }
        set_inode(&mut script, d.name, 0o040000 | d.mode);
        script.push_str("cd /\n");
    }
    for (i, (f, stat)) in files.iter().zip(file_stats).enumerate() {
        let local = format!("f{i}");
        fs::write(stage.path().join(&local), &f.content).map_err(stage_err)?;
        script.push_str(&format!("cd {}\n", f.parent));
        if stat.is_some() {
            script.push_str(&format!("rm {}\n", f.name));
        }
        script.push_str(&format!("write {local} {}\n", f.name));
        set_inode(&mut script, f.name, 0o100000 | f.mode);
        script.push_str("cd /\n");
    }
    let script_path = stage.path().join("script");
    fs::write(&script_path, &script).map_err(stage_err)?;
    let stderr = debugfs.run_script(&script_path, stage.path())?;

    // Read everything back, in one more session: debugfs exits 0 on most failures.
    let mut reads: Vec<String> = dirs.iter().map(|d| format!("stat {}", d.path)).collect();
    reads.extend(files.iter().map(|f| format!("stat {}", f.path)));
    reads.extend(files.iter().enumerate().map(|(i, f)| format!("dump {} v{i}", f.path)));
    let (outs, _) = debugfs.session(&reads, stage.path())?;
    let fail = |path, problem: String| PersonalizeError::Verify {
        root: root.to_owned(),
        path,
        problem,
        stderr: stderr.clone(),
    };
    for (d, out) in dirs.iter().zip(&outs) {
        let want_mode = d.force || created.contains(&d.path);
        match parse_stat(out) {
            Some(i) if i.kind != Kind::Directory => return Err(fail(d.path, "not a directory".into())),
            Some(i) if want_mode && (i.mode != d.mode || i.uid != 0 || i.gid != 0) => {
                return Err(fail(d.path, format!("mode {:04o} owner {}:{}", i.mode, i.uid, i.gid)));
            }
            Some(_) => {}
            None => return Err(fail(d.path, "missing".into())),
        }
    }
    for (i, (f, out)) in files.iter().zip(&outs[dirs.len()..]).enumerate() {
        match parse_stat(out) {
            Some(i) if i.kind == Kind::Regular && i.mode == f.mode && i.uid == 0 && i.gid == 0 => {}
            Some(i) => {
                return Err(fail(
                    f.path,
                    format!("{:?} mode {:04o} owner {}:{}", i.kind, i.mode, i.uid, i.gid),
                ));
            }
            None => return Err(fail(f.path, "missing".into())),
        }
        if fs::read(stage.path().join(format!("v{i}"))).ok().as_deref() != Some(&f.content[..]) {
            return Err(fail(f.path, "content differs".into()));
        }
    }
    Ok(host_public)
}

/// Appends the `sif` lines that give `name` (in the current directory) `mode` and root
/// ownership.
fn set_inode(script: &mut String, name: &str, mode: u32) {
    script.push_str(&format!("sif {name} mode 0{mode:o}\nsif {name} uid 0\nsif {name} gid 0\n"));
}

/// Replays a pending journal with `e2fsck -E journal_only`.
fn replay_journal(root: &Path) -> Result<(), PersonalizeError> {
    let out = Command::new(find_tool("e2fsck")?)
        .args(["-E", "journal_only", "-p"])
        .arg(root)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PersonalizeError::Spawn { tool: "e2fsck", source })?;
    // 0: nothing to fix, 1: fixed (the journal was replayed).
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(PersonalizeError::Tool {
            tool: "e2fsck",
            path: root.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER_KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJhbmdlci10ZXN0LWtleS1ub3QtcmVhbC0wMDAwMDAw user@host";

    /// Makes a 16 MiB ext4 image from `dir` with `mkfs.ext4 -d`.
    fn mkfs(dir: &Path, image: &Path, extra: &[&str]) {
        let out = Command::new(find_tool("mkfs.ext4").unwrap())
            .args(["-q", "-F"])
            .args(extra)
            .arg("-d")
            .arg(dir)
            .arg(image)
            .arg("16M")
            .output()
            .unwrap();
        assert!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Reads a file back with a debugfs of the test's own.
    fn read_back(image: &Path, path: &str) -> String {
        let out = Command::new(find_tool("debugfs").unwrap())
            .arg("-R")
            .arg(format!("cat {path}"))
            .arg(image)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    /// `ls -l` of a directory in the image: name -> (octal mode with type, uid, gid).
    fn listing(image: &Path, dir: &str) -> std::collections::HashMap<String, (String, String, String)> {
        let out = Command::new(find_tool("debugfs").unwrap())
            .env("DEBUGFS_PAGER", "__none__")
            .arg("-R")
            .arg(format!("ls -l {dir}"))
            .arg(image)
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| {
                // "  14  100600 (1)      0      0      81 28-Nov-2026 00:52 authorized_keys"
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.len() >= 9)
                    .then(|| (w[w.len() - 1].to_owned(), (w[1].to_owned(), w[3].to_owned(), w[4].to_owned())))
            })
            .collect()
    }

    /// `e2fsck -fn`: the filesystem is consistent.
    fn assert_clean(image: &Path) {
        let out = Command::new(find_tool("e2fsck").unwrap()).arg("-fn").arg(image).output().unwrap();
        assert!(
            out.status.success(),
            "e2fsck found problems:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn keys() -> Vec<String> {
        vec![USER_KEY.to_owned()]
    }

    /// What to write into an image file, staged in `scratch`, without a work disk.
    /// A host key for the tests only (it protects nothing).
    const HOST_PRIVATE: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACBmkR6x9yWus2cQYbtWwi07FqZF5rf8v5b4cibgUGfflgAAAJCrg9fhq4PX
4QAAAAtzc2gtZWQyNTUxOQAAACBmkR6x9yWus2cQYbtWwi07FqZF5rf8v5b4cibgUGfflg
AAAEBffEDtkzs2mfuquvY3y5kkoLD8HnTKd4maTfXWz0ZUTmaRHrH3Ja6zZxBhu1bCLTsW
pkXmt/y/lvhyJuBQZ9+WAAAACXJvb3RAdGVzdAECAwQ=
-----END OPENSSH PRIVATE KEY-----
";
    const HOST_PUBLIC: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGaRHrH3Ja6zZxBhu1bCLTsWpkXmt/y/lvhyJuBQZ9+W root@test";

    fn host_key() -> &'static HostKey {
        static KEY: std::sync::OnceLock<HostKey> = std::sync::OnceLock::new();
        KEY.get_or_init(|| HostKey { private: HOST_PRIVATE.as_bytes().to_vec(), public: HOST_PUBLIC.into() })
    }

    fn pers<'a>(hostname: &'a str, keys: &'a [String], scratch: &'a Path) -> Personalization<'a> {
        Personalization {
            hostname,
            authorized_keys: keys,
            work_disk: false,
            form: RootForm::File,
            scratch,
            resolv_conf: None,
            host_key: host_key(),
        }
    }

    #[test]
    fn writes_hostname_keys_and_host_key_into_an_existing_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("etc/ssh")).unwrap();
        fs::write(tree.join("etc/hostname"), "template\n").unwrap();
        fs::write(tree.join("etc/hosts"), "127.0.0.1 localhost\n127.0.1.1 template\n10.0.0.1 db\n").unwrap();
        let image = tmp.path().join("root.ext4");
        mkfs(&tree, &image, &[]);

        let host_pub = personalize(&image, &pers("handles-test", &keys(), tmp.path())).unwrap();
        assert_eq!(host_pub, HOST_PUBLIC);
        // Nothing staged is left beside the image.
        let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");

        assert_eq!(read_back(&image, "/etc/hostname"), "handles-test\n");
        assert_eq!(
            read_back(&image, "/etc/hosts"),
            "127.0.0.1 localhost\n10.0.0.1 db\n127.0.1.1\thandles-test\n"
        );
        assert_eq!(read_back(&image, "/root/.ssh/authorized_keys"), format!("{USER_KEY}\n"));
        assert_eq!(read_back(&image, "/etc/ssh/ssh_host_ed25519_key.pub"), format!("{host_pub}\n"));
        let private = read_back(&image, "/etc/ssh/ssh_host_ed25519_key");
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"), "{private}");

        // The private key in the image is the pair of the returned public key.
        let key_file = tmp.path().join("check_key");
        fs::write(&key_file, &private).unwrap();
        fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let derived = Command::new("ssh-keygen").arg("-y").arg("-f").arg(&key_file).output().unwrap();
        let derived = String::from_utf8(derived.stdout).unwrap();
        assert_eq!(derived.split_whitespace().nth(1), host_pub.split_whitespace().nth(1));

        let root = listing(&image, "/");
        assert_eq!(root["root"], ("40700".into(), "0".into(), "0".into()));
        let dot_ssh = listing(&image, "/root");
        assert_eq!(dot_ssh[".ssh"], ("40700".into(), "0".into(), "0".into()));
        let ssh_dir = listing(&image, "/root/.ssh");
        assert_eq!(ssh_dir["authorized_keys"], ("100600".into(), "0".into(), "0".into()));
        let etc_ssh = listing(&image, "/etc/ssh");
        assert_eq!(etc_ssh["ssh_host_ed25519_key"], ("100600".into(), "0".into(), "0".into()));
        assert_eq!(etc_ssh["ssh_host_ed25519_key.pub"], ("100644".into(), "0".into(), "0".into()));
        let etc = listing(&image, "/etc");
        assert_eq!(etc["hostname"], ("100644".into(), "0".into(), "0".into()));
        assert_clean(&image);
    }

    #[test]
    fn creates_missing_directories_and_runs_again() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir(&tree).unwrap();
        let image = tmp.path().join("root.ext4");
        mkfs(&tree, &image, &[]);

        let first = personalize(&image, &pers("one", &keys(), tmp.path())).unwrap();
        assert_eq!(read_back(&image, "/etc/hostname"), "one\n");
        let hosts = read_back(&image, "/etc/hosts");
        assert!(
            hosts.starts_with("127.0.0.1\tlocalhost\n") && hosts.ends_with("127.0.1.1\tone\n"),
            "{hosts}"
        );
        let root = listing(&image, "/");
        assert_eq!(root["etc"].0, "40755");
        assert_eq!(root["root"].0, "40700");
        assert_eq!(listing(&image, "/etc")["ssh"].0, "40755");

        // Again, renamed: everything replaced, one hosts line, the same host key.
        let two_keys =
            vec![USER_KEY.to_owned(), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHNlY29uZC1rZXk".to_owned()];
        let second = personalize(&image, &pers("two", &two_keys, tmp.path())).unwrap();
        assert_eq!(first, second);
        assert_eq!(read_back(&image, "/etc/hostname"), "two\n");
        let hosts = read_back(&image, "/etc/hosts");
        assert_eq!(hosts.matches("127.0.1.1").count(), 1, "{hosts}");
        assert!(hosts.ends_with("127.0.1.1\ttwo\n"));
        assert_eq!(read_back(&image, "/root/.ssh/authorized_keys").lines().count(), 2);
        assert_clean(&image);
    }

    #[test]
    fn replays_a_pending_journal_first() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir(&tree).unwrap();
        let image = tmp.path().join("root.ext4");
        mkfs(&tree, &image, &[]);
        let st = Command::new(find_tool("debugfs").unwrap())
            .args(["-w", "-R", "feature needs_recovery"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(st.status.success());
        let sb = read_superblock(&mut File::open(&image).unwrap()).unwrap().unwrap();
        assert!(needs_recovery(&sb), "the test image should need recovery");

        personalize(&image, &pers("after-crash", &keys(), tmp.path())).unwrap();
        let sb = read_superblock(&mut File::open(&image).unwrap()).unwrap().unwrap();
        assert!(!needs_recovery(&sb));
        assert_eq!(read_back(&image, "/etc/hostname"), "after-crash\n");
        assert_clean(&image);
    }

    #[test]
    fn failed_writes_are_detected_by_reading_back() {
        // No free inode: every create fails, while debugfs still exits 0.
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        for i in 0..4 {
            fs::write(tree.join(format!("f{i}")), "x").unwrap();
        }
        let image = tmp.path().join("root.ext4");
        mkfs(&tree, &image, &["-N", "16"]);
        let err = personalize(&image, &pers("full", &keys(), tmp.path())).unwrap_err();
        let PersonalizeError::Verify { stderr, .. } = &err else { panic!("{err}") };
        assert!(stderr.contains("allocate"), "{err}");
    }

    #[test]
    fn bad_inputs_change_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(tree.join("etc/hostname"), "template\n").unwrap();
        let image = tmp.path().join("root.ext4");
        mkfs(&tree, &image, &[]);
        let before = fs::read(&image).unwrap();

        let err = personalize(&image, &pers("Bad Name", &keys(), tmp.path())).unwrap_err();
        assert!(matches!(err, PersonalizeError::Hostname(_)), "{err}");
        let bad_key = vec!["not a key; rm -rf /".to_owned()];
        let err = personalize(&image, &pers("ok", &bad_key, tmp.path())).unwrap_err();
        assert!(matches!(err, PersonalizeError::Key(_)), "{err}");
        assert!(fs::read(&image).unwrap() == before, "the image changed");

        let not_ext = tmp.path().join("zeros.img");
        File::create(&not_ext).unwrap().set_len(4 << 20).unwrap();
        let err = personalize(&not_ext, &pers("ok", &keys(), tmp.path())).unwrap_err();
        assert!(matches!(err, PersonalizeError::NotExt { .. }), "{err}");
        assert!(!is_ext_filesystem(&not_ext).unwrap());
        assert!(is_ext_filesystem(&image).unwrap());

        let err = personalize(&tmp.path().join("missing"), &pers("ok", &keys(), tmp.path())).unwrap_err();
        assert!(matches!(err, PersonalizeError::Open { .. }), "{err}");
    }

    #[test]
    fn a_file_where_a_directory_belongs_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir(&tree).unwrap();
        fs::write(tree.join("root"), "not a dir").unwrap();
        let image = tmp.path().join("root.ext4");
        mkfs(&tree, &image, &[]);
        let err = personalize(&image, &pers("ok", &keys(), tmp.path())).unwrap_err();
        assert!(matches!(err, PersonalizeError::NotADirectory { dir: "/root", .. }), "{err}");
    }

    #[test]
    fn a_work_disk_gets_its_mount_point_and_one_fstab_line() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(
            tree.join("etc/fstab"),
            "# <fs> <mount> <type>\n/dev/vda / ext4 defaults 0 1\n/dev/vdc /work xfs defaults 0 0\n",
        )
        .unwrap();
        let image = tmp.path().join("root.ext4");
        mkfs(&tree, &image, &[]);
        let keys = keys();
        let with_disk = Personalization { work_disk: true, ..pers("w", &keys, tmp.path()) };
        personalize(&image, &with_disk).unwrap();
        personalize(&image, &with_disk).unwrap();
        assert_eq!(
            read_back(&image, "/etc/fstab"),
            "# <fs> <mount> <type>\n/dev/vda / ext4 defaults 0 1\n/dev/vdb\t/work\text4\tdefaults,nofail\t0\t2\n"
        );
        assert_eq!(listing(&image, "/")["work"], ("40755".into(), "0".into(), "0".into()));
        assert_eq!(listing(&image, "/etc")["fstab"], ("100644".into(), "0".into(), "0".into()));
        assert_clean(&image);

        // Without a work disk neither is touched.
        let tree = tmp.path().join("tree2");
        fs::create_dir_all(tree.join("etc")).unwrap();
        let plain = tmp.path().join("plain.ext4");
        mkfs(&tree, &plain, &[]);
        personalize(&plain, &pers("p", &keys, tmp.path())).unwrap();
        assert!(!listing(&plain, "/").contains_key("work"));
        assert!(!listing(&plain, "/etc").contains_key("fstab"));
    }

    #[test]
    fn fstab_composition() {
        let line = "/dev/vdb\t/work\text4\tdefaults,nofail\t0\t2\n";
        assert_eq!(fstab_file(None), line);
        assert_eq!(
            fstab_file(Some("# /work is ours\nproc /proc proc defaults 0 0")),
            format!("# /work is ours\nproc /proc proc defaults 0 0\n{line}")
        );
        assert_eq!(fstab_file(Some(line)), line);
        assert_eq!(
            fstab_file(Some("LABEL=w   /work  ext4 rw 0 2\n/dev/vdb /work2 ext4 rw 0 2\n")),
            format!("/dev/vdb /work2 ext4 rw 0 2\n{line}")
        );
    }

    #[test]
    fn a_root_of_the_wrong_kind_is_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir(&tree).unwrap();
        let image = tmp.path().join("root.ext4");
        mkfs(&tree, &image, &[]);
        let before = fs::read(&image).unwrap();
        let keys = keys();
        let as_device = Personalization { form: RootForm::BlockDevice, ..pers("d", &keys, tmp.path()) };
        let err = personalize(&image, &as_device).unwrap_err();
        assert!(matches!(err, PersonalizeError::NotExpectedKind { expected: "block device", .. }), "{err}");
        assert!(fs::read(&image).unwrap() == before, "the image changed");
    }

    #[test]
    #[ignore = "needs root: attaches a loop device to personalize through a block device node"]
    fn personalizes_through_a_block_device() {
        assert!(nix::unistd::geteuid().is_root(), "this test needs root");
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        let image = tmp.path().join("root.ext4");
        mkfs(&tree, &image, &[]);
        let out = Command::new("losetup").args(["--find", "--show"]).arg(&image).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        struct Detach(String);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = Command::new("losetup").args(["-d", &self.0]).status();
            }
        }
        let dev = Detach(String::from_utf8(out.stdout).unwrap().trim().to_owned());
        let node = Path::new(&dev.0);

        let keys = keys();
        let p = Personalization {
            form: RootForm::BlockDevice,
            work_disk: true,
            resolv_conf: Some("nameserver 192.0.2.53\n"),
            ..pers("dev", &keys, tmp.path())
        };
        let host_pub = personalize(node, &p).unwrap();
        // Staged files went to the scratch directory, not the device's: nothing is left there.
        let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        // As a file, it is not accepted for a device.
        let err = personalize(node, &pers("dev", &keys, tmp.path())).unwrap_err();
        assert!(matches!(err, PersonalizeError::NotExpectedKind { expected: "regular file", .. }), "{err}");
        drop(dev);
        assert_eq!(read_back(&image, "/etc/hostname"), "dev\n");
        assert_eq!(read_back(&image, "/etc/resolv.conf"), "nameserver 192.0.2.53\n");
        assert_eq!(read_back(&image, "/etc/ssh/ssh_host_ed25519_key.pub"), format!("{host_pub}\n"));
        assert!(read_back(&image, "/etc/fstab").contains("/dev/vdb\t/work"));
        assert_clean(&image);
    }

    #[test]
    fn stat_output_is_parsed() {
        let out = "Inode: 13   Type: regular    Mode:  0600   Flags: 0x80000\nGeneration: 0    Version: 0x00000000:00000000\nUser:     0   Group:    42   Project:     0   Size: 9\n";
        assert_eq!(parse_stat(out), Some(InodeInfo { kind: Kind::Regular, mode: 0o600, uid: 0, gid: 42 }));
        let out = "Inode: 2   Type: directory    Mode:  1777   Flags: 0x0\nUser:  1000   Group:  1000   Size: 1024\n";
        assert_eq!(
            parse_stat(out),
            Some(InodeInfo { kind: Kind::Directory, mode: 0o1777, uid: 1000, gid: 1000 })
        );
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn hosts_file_composition() {
        assert_eq!(
            hosts_file(None, "vm"),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tvm\n"
        );
        assert_eq!(
            hosts_file(Some("# only a comment\n"), "vm"),
            "127.0.0.1\tlocalhost\n# only a comment\n127.0.1.1\tvm\n"
        );
        assert_eq!(
            hosts_file(Some("127.0.0.1 localhost\n127.0.1.1   old old.example\n"), "vm"),
            "127.0.0.1 localhost\n127.0.1.1\tvm\n"
        );
    }
}
