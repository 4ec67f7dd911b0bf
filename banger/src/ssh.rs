//! SSH into guests with OpenSSH: the user's banger key, a known_hosts file banger manages, and
//! waiting until a guest's SSH server answers.
//!
//! - The user's key ([`ensure_user_key`]) is an ed25519 key without passphrase in banger's keys
//!   directory, made with `ssh-keygen` on first use. It is generated in a temporary directory
//!   and hard-linked into place, so two commands racing on first use end up with one key.
//! - Host keys are pinned by VM id, not by address: each VM's entry in banger's known_hosts is
//!   `<vm-id> <type> <base64>` and ssh is told `HostKeyAlias=<vm-id>`, so a guest address reused
//!   by a later VM never meets a stale key, and a VM's key is checked strictly
//!   (`StrictHostKeyChecking=yes`). Updates take an exclusive lock on `known_hosts.lock` and
//!   replace the file atomically, so VMs starting in parallel do not lose each other's pins.
//! - [`ssh_command`] builds the `ssh` command line. It ignores the user's own ssh config
//!   (`-F /dev/null`) and agent identities, so nothing outside banger changes how a guest is
//!   reached. The remote command is sent as one string in which every argument is quoted for a
//!   POSIX shell: `banger vm ssh dev -- ls "my file"` lists the file named `my file`, and shell
//!   syntax in an argument is never interpreted. Use `-- sh -c '...'` for pipelines.
//! - ssh does not connect by itself: its `ProxyCommand` is `banger ssh-dial ADDR`
//!   ([`dial_for_ssh`]), which connects with Nagle's algorithm off and hands the socket back
//!   (`ProxyUseFdpass`). OpenSSH turns Nagle off only for sessions with a terminal; with it on,
//!   each small message of the key exchange that follows another waits for the guest's delayed
//!   acknowledgement (40 ms on Linux). ssh runs the command with `$SHELL -c`: banger gives it
//!   `/bin/sh` whatever the user's login shell (whose startup files could write where the socket
//!   is expected), and the dialer's path in `BANGER_SSH_DIALER`, so no path is ever quoted.
//! - [`wait_for_ssh`] retries a TCP connect and reads the server's identification line
//!   (`SSH-2.0-...`, possibly after other lines, as RFC 4253 allows) until it arrives or the
//!   deadline passes; the error says what the last attempt saw.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_protocol::VmId;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;

use crate::paths::Paths;

/// How long one connection attempt of [`wait_for_ssh`] may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the first attempt waits for the guest to answer its connection; each unanswered
/// attempt doubles it, up to [`ATTEMPT_TIMEOUT`]. A connection to a guest whose network is not up
/// yet gets no answer, and the kernel sends its SYN again only after a second; a guest on its TAP
/// answers within microseconds, so `vm run` on a guest that just came up waits at most this long
/// for nothing, and a guest that takes a second sees about seven SYNs.
const FIRST_CONNECT_WAIT: Duration = Duration::from_millis(10);
/// The pause between attempts of [`wait_for_ssh`] that failed at once (refused, closed): short,
/// since `vm run` waits up to this long beyond the moment the guest's sshd listens, and a refused
/// connection costs next to nothing (a guest whose init takes a second to start sshd sees about
/// 200). A guest whose network is not up yet makes the attempt itself wait (see
/// [`FIRST_CONNECT_WAIT`]), not this pause.
const RETRY_PAUSE: Duration = Duration::from_millis(5);
/// How much a server may send before its identification line.
const BANNER_LIMIT: u64 = 8192;
/// How long [`dial_for_ssh`] waits for the guest to accept the connection (ssh does not time a
/// proxy's connect), and ssh's `ConnectTimeout` for the banner exchange after it.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// The environment variable that carries the dialer's path to ssh's `ProxyCommand`.
const DIALER_ENV: &str = "BANGER_SSH_DIALER";

/// Why an SSH-related step failed.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// `ssh-keygen` could not be run.
    #[error("cannot run ssh-keygen for {path}: install openssh-client")]
    KeygenMissing {
        /// The key being made or read.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `ssh-keygen` ran and failed.
    #[error("ssh-keygen failed for {path} ({status}): {stderr}")]
    Keygen {
        /// The key being made or read.
        path: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// A key or known_hosts file could not be read or written.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A public key is not in OpenSSH's one-line format.
    #[error("invalid ssh public key {key:?}: expected `TYPE BASE64 [COMMENT]` on one line")]
    BadPublicKey {
        /// The refused text (shortened).
        key: String,
    },
    /// A private key file is not an OpenSSH private key.
    #[error("{path} is not an OpenSSH private key: delete it (and its .pub) and a new one is made")]
    BadPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The guest's SSH server did not answer in time.
    #[error(
        "ssh on {addr} did not answer within {} s: {}; the last attempt saw {last}",
        timeout.as_secs_f32(),
        if *.connected { "tcp connections were accepted, but no ssh banner came" } else { "no tcp connection was ever accepted" }
    )]
    NotReady {
        /// The address tried.
        addr: SocketAddr,
        /// How long it was tried (the timeout asked for).
        timeout: Duration,
        /// Whether any attempt got a TCP connection.
        connected: bool,
        /// What the last attempt saw.
        last: String,
    },
    /// `banger ssh-dial` could not connect to the guest's SSH server.
    #[error(
        "the guest's ssh server at {addr} does not accept connections: see what the guest printed with `banger vm logs NAME`"
    )]
    Dial {
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `banger ssh-dial` could not hand its connection to ssh.
    #[error(
        "cannot hand the connection to ssh over standard output: ssh gave up, or this was not run \
         by ssh as its ProxyCommand with ProxyUseFdpass"
    )]
    Pass {
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SshError + use<> {
    let path = path.to_owned();
    move |source| SshError::Io { action, path, source }
}

/// An SSH key pair on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// The private key file.
    pub private_key: PathBuf,
    /// The public key, one line (`ssh-ed25519 AAAA... comment`), without newline.
    pub public_key: String,
}

/// A VM's SSH host key, both halves, as personalization writes them into its root.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    /// The private key file's content.
    pub private: Vec<u8>,
    /// The public key, one line, without newline.
    pub public: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey").field("public", &self.public).finish_non_exhaustive()
    }
}

/// The public key path OpenSSH pairs with `private_key`.
pub fn public_key_path(private_key: &Path) -> PathBuf {
    let mut name = private_key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

fn run_keygen(path: &Path, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, SshError> {
    let out = Command::new("ssh-keygen")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SshError::KeygenMissing { path: path.to_owned(), source })?;
    if !out.status.success() {
        return Err(SshError::Keygen {
            path: path.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// Generates a new ed25519 key pair without passphrase at `private_key` (which must not exist)
/// and `<private_key>.pub`. Returns the public key line.
pub fn generate_keypair(private_key: &Path, comment: &str) -> Result<String, SshError> {
    run_keygen(
        private_key,
        &["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"]
            .map(std::ffi::OsStr::new)
            .into_iter()
            .chain([private_key.as_os_str()])
            .collect::<Vec<_>>(),
    )?;
    let public = public_key_path(private_key);
    let line = fs::read_to_string(&public).map_err(io_err("read", &public))?;
    check_public_key(line.trim())
}

/// Checks that `key` is one `TYPE BASE64 [COMMENT]` line; returns it trimmed.
pub fn check_public_key(key: &str) -> Result<String, SshError> {
    let key = key.trim();
    let bad = || SshError::BadPublicKey { key: key.chars().take(80).collect() };
    if key.contains(['\n', '\r']) {
        return Err(bad());
    }
    let mut fields = key.split_ascii_whitespace();
    let kind = fields.next().ok_or_else(bad)?;
    let blob = fields.next().ok_or_else(bad)?;
    let kind_ok = !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b"-@.".contains(&b));
    let blob_ok = blob.len() >= 16 && blob.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    if !kind_ok || !blob_ok {
        return Err(bad());
    }
    Ok(key.to_owned())
}

/// The user's banger key at `private_key` (with its `.pub` beside it), generated on first use.
pub fn ensure_user_key(private_key: &Path) -> Result<KeyPair, SshError> {
    ensure_key_pair(private_key, "banger")
}

/// A VM's host key at `private_key` (in the VM's directory), made with `ssh-keygen` the first
/// time (at create, or at the first start of a VM made before host keys were kept) and read
/// afterwards: the key a guest presents stays the same across its starts.
pub fn ensure_host_key(private_key: &Path, comment: &str) -> Result<HostKey, SshError> {
    let pair = ensure_key_pair(private_key, comment)?;
    let private = fs::read(private_key).map_err(io_err("read", private_key))?;
    // A damaged key would reach the guest's sshd, which then has no host key: every start
    // would end at the ssh timeout without saying why.
    let text = String::from_utf8_lossy(&private);
    let text = text.trim();
    let framed = text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n")
        && text.ends_with("\n-----END OPENSSH PRIVATE KEY-----")
        && text.len() > 100;
    if !framed {
        return Err(SshError::BadPrivateKey { path: private_key.to_owned() });
    }
    Ok(HostKey { private, public: pair.public_key })
}

/// The key pair at `private_key`, generated (with `comment`) if it is not there; see
/// [`ensure_user_key`].
fn ensure_key_pair(private_key: &Path, comment: &str) -> Result<KeyPair, SshError> {
    let public = public_key_path(private_key);
    if fs::symlink_metadata(private_key).is_err() {
        let dir = private_key.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".keygen-")
            .tempdir_in(dir)
            .map_err(io_err("create a key in", dir))?;
        let tmp_key = tmp.path().join("key");
        generate_keypair(&tmp_key, comment)?;
        match fs::hard_link(&tmp_key, private_key) {
            Ok(()) => fs::rename(public_key_path(&tmp_key), &public).map_err(io_err("write", &public))?,
            // Another command made the key first: use that one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("write", private_key)(e)),
        }
    }
    let public_key = match fs::read_to_string(&public).ok().and_then(|s| check_public_key(&s).ok()) {
        Some(key) => key,
        None => {
            // The public half is missing or damaged: derive it again from the private key.
            let out = run_keygen(private_key, &["-y".as_ref(), "-f".as_ref(), private_key.as_os_str()])?;
            let key = check_public_key(&String::from_utf8_lossy(&out))?;
            write_atomically(&public, format!("{key}\n").as_bytes(), 0o644)?;
            key
        }
    };
    Ok(KeyPair { private_key: private_key.to_owned(), public_key })
}

/// Replaces `path` with `contents` (see [`crate::atomic_file`]).
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), SshError> {
    crate::atomic_file::write(path, contents, mode).map_err(io_err("write", path))
}

/// Holds the exclusive lock on `<known_hosts>.lock` while a pin is changed.
fn lock_known_hosts(known_hosts: &Path) -> Result<Flock<File>, SshError> {
    let mut lock = known_hosts.as_os_str().to_owned();
    lock.push(".lock");
    let lock = PathBuf::from(lock);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock)
        .map_err(io_err("open", &lock))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io_err("lock", &lock)(errno.into()))
}

fn read_known_hosts(known_hosts: &Path) -> Result<String, SshError> {
    match fs::read_to_string(known_hosts) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(io_err("read", known_hosts)(e)),
    }
}

/// Whether a known_hosts line is an entry for exactly `alias`.
fn is_entry_for(line: &str, alias: &str) -> bool {
    line.split_ascii_whitespace().next() == Some(alias)
}

/// Rewrites known_hosts without `vm`'s entries, plus `new_entry` if given.
fn rewrite_known_hosts(known_hosts: &Path, vm: &VmId, new_entry: Option<String>) -> Result<bool, SshError> {
    let _lock = lock_known_hosts(known_hosts)?;
    let text = read_known_hosts(known_hosts)?;
    let mut removed = false;
    let mut out = String::with_capacity(text.len() + 128);
    for line in text.lines() {
        if is_entry_for(line, vm.as_str()) {
            removed = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some(entry) = new_entry {
        out.push_str(&entry);
        out.push('\n');
    }
    write_atomically(known_hosts, out.as_bytes(), 0o600)?;
    Ok(removed)
}

/// Pins `host_public_key` (one OpenSSH public key line) as `vm`'s only host key in banger's
/// known_hosts, replacing any earlier pin of that VM.
pub fn pin_host_key(known_hosts: &Path, vm: &VmId, host_public_key: &str) -> Result<(), SshError> {
    let key = check_public_key(host_public_key)?;
    let mut fields = key.split_ascii_whitespace();
    let (kind, blob) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
    rewrite_known_hosts(known_hosts, vm, Some(format!("{vm} {kind} {blob}"))).map(|_| ())
}

/// Removes `vm`'s pin (on delete). Returns whether there was one.
pub fn unpin_host_key(known_hosts: &Path, vm: &VmId) -> Result<bool, SshError> {
    rewrite_known_hosts(known_hosts, vm, None)
}

/// The key pinned for `vm` (`TYPE BASE64`), if any.
pub fn pinned_host_key(known_hosts: &Path, vm: &VmId) -> Result<Option<String>, SshError> {
    let text = read_known_hosts(known_hosts)?;
    Ok(text.lines().find(|l| is_entry_for(l, vm.as_str())).map(|l| {
        let mut fields = l.split_ascii_whitespace().skip(1);
        format!("{} {}", fields.next().unwrap_or_default(), fields.next().unwrap_or_default())
    }))
}

/// Quotes `arg` for a POSIX shell; plain words are left as they are.
pub fn shell_quote(arg: &str) -> String {
    let plain =
        !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-./=:,+@%".contains(&b));
    if plain { arg.to_owned() } else { format!("'{}'", arg.replace('\'', r"'\''")) }
}

/// Whether ssh should allocate a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tty {
    /// ssh decides: a terminal for an interactive login, none when a command is given.
    Auto,
    /// Always a terminal (`-t`), for interactive commands.
    Force,
}

/// The `ssh` command that logs into `vm` as root at `guest_ip` with the user's banger key and
/// banger's known_hosts, running `remote` (each argument quoted for the remote shell) or, when
/// `remote` is empty, a login shell. `dialer` is the `banger` executable whose `ssh-dial` makes
/// the connection; without one (its path unknown) ssh connects by itself, Nagle's algorithm on.
pub fn ssh_command(
    paths: &Paths,
    vm: &VmId,
    guest_ip: Ipv4Addr,
    remote: &[String],
    tty: Tty,
    dialer: Option<&Path>,
) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.arg("-F").arg("/dev/null").arg("-i").arg(paths.ssh_key());
    let mut known = std::ffi::OsString::from("UserKnownHostsFile=");
    known.push(paths.known_hosts());
    cmd.arg("-o").arg(known);
    for opt in [
        "GlobalKnownHostsFile=/dev/null".to_owned(),
        "StrictHostKeyChecking=yes".to_owned(),
        format!("HostKeyAlias={vm}"),
        "CheckHostIP=no".to_owned(),
        "UpdateHostKeys=no".to_owned(),
        "IdentitiesOnly=yes".to_owned(),
        "BatchMode=yes".to_owned(),
        "LogLevel=ERROR".to_owned(),
        format!("ConnectTimeout={}", DIAL_TIMEOUT.as_secs()),
    ] {
        cmd.arg("-o").arg(opt);
    }
    if let Some(dialer) = dialer {
        cmd.env("SHELL", "/bin/sh").env(DIALER_ENV, dialer);
        let addr = SocketAddr::from((guest_ip, 22));
        cmd.arg("-o").arg(format!("ProxyCommand=\"${DIALER_ENV}\" ssh-dial {addr}"));
        cmd.arg("-o").arg("ProxyUseFdpass=yes");
    }
    if tty == Tty::Force {
        cmd.arg("-t");
    }
    cmd.arg("--").arg(format!("root@{guest_ip}"));
    if !remote.is_empty() {
        cmd.arg(remote.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "));
    }
    cmd
}

/// Connects to `addr` with Nagle's algorithm off and hands the socket to the `ssh` that runs this
/// process as its `ProxyCommand` with `ProxyUseFdpass=yes`: one byte on `to_ssh` (a Unix socket,
/// the proxy's standard output) carrying the descriptor.
pub fn dial_for_ssh(addr: SocketAddr, to_ssh: BorrowedFd<'_>) -> Result<(), SshError> {
    let dial = |source| SshError::Dial { addr, source };
    let stream = std::net::TcpStream::connect_timeout(&addr, DIAL_TIMEOUT).map_err(dial)?;
    stream.set_nodelay(true).map_err(dial)?;
    let fds = [stream.as_raw_fd()];
    sendmsg::<()>(
        to_ssh.as_raw_fd(),
        &[IoSlice::new(&[0])],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| SshError::Pass { source: e.into() })?;
    Ok(())
}

/// Reads lines until the SSH identification line.
async fn read_banner(stream: TcpStream) -> Result<String, String> {
    let mut reader = BufReader::new(stream.take(BANNER_LIMIT));
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before an ssh banner".into());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if text.starts_with("SSH-2.0-") || text.starts_with("SSH-1.99-") {
            return Ok(text);
        }
        if text.starts_with("SSH-") {
            return Err(format!("unsupported ssh version {text:?}"));
        }
    }
}

/// Waits until an SSH server answers at `addr` with its identification line, trying again
/// until `timeout` has passed. Returns that line.
pub async fn wait_for_ssh(addr: SocketAddr, timeout: Duration) -> Result<String, SshError> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("nothing (not tried)");
    let mut connected = false;
    let mut connect_wait = FIRST_CONNECT_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SshError::NotReady { addr, timeout, connected, last });
        }
        match tokio::time::timeout(left.min(connect_wait), TcpStream::connect(addr)).await {
            Err(_) => {
                // Unanswered: a new connection sends a new SYN at once, where the kernel would
                // wait a second before sending this one's again.
                last = "no tcp connection in time".into();
                connect_wait = (connect_wait * 2).min(ATTEMPT_TIMEOUT);
                continue;
            }
            Ok(Err(e)) => last = format!("connect: {e}"),
            Ok(Ok(stream)) => {
                connected = true;
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left.min(ATTEMPT_TIMEOUT), read_banner(stream)).await {
                    Ok(Ok(banner)) => return Ok(banner),
                    Ok(Err(why)) => last = why,
                    Err(_) => last = "no ssh banner in time".into(),
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(RETRY_PAUSE)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    fn vm(id: &str) -> VmId {
        VmId::new(id).unwrap()
    }

    #[test]
    fn user_key_is_generated_once() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("id_ed25519");
        let first = ensure_user_key(&key).unwrap();
        assert!(first.public_key.starts_with("ssh-ed25519 "), "{}", first.public_key);
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let private = fs::read(&key).unwrap();

        let second = ensure_user_key(&key).unwrap();
        assert_eq!(first, second);
        assert_eq!(fs::read(&key).unwrap(), private);

        // A lost public half is derived again from the private key.
        fs::remove_file(public_key_path(&key)).unwrap();
        let third = ensure_user_key(&key).unwrap();
        let fields = |k: &str| k.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        assert_eq!(fields(&third.public_key), fields(&first.public_key));
        assert!(public_key_path(&key).exists());
        // Only the key pair is left in the directory.
        let mut names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["id_ed25519", "id_ed25519.pub"]);
    }

    #[test]
    fn a_host_key_is_made_once_and_read_after() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("ssh_host_ed25519_key");
        let first = ensure_host_key(&key, "root@dev").unwrap();
        assert!(first.public.starts_with("ssh-ed25519 ") && first.public.ends_with(" root@dev"), "{first:?}");
        assert!(String::from_utf8_lossy(&first.private).starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(ensure_host_key(&key, "root@dev").unwrap(), first);
        // The private half never shows in a debug print.
        assert!(!format!("{first:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_damaged_host_key_is_refused_naming_the_file_and_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("ssh_host_ed25519_key");
        let good = ensure_host_key(&key, "root@dev").unwrap();
        // Cut short (a full disk, a crash mid-copy): the .pub is still fine.
        fs::write(&key, &good.private[..good.private.len() / 2]).unwrap();
        let err = ensure_host_key(&key, "root@dev").unwrap_err();
        assert!(matches!(&err, SshError::BadPrivateKey { path } if *path == key), "{err:?}");
        assert!(err.to_string().contains("delete it (and its .pub) and a new one is made"), "{err}");
        // Deleted as told: a new key is made.
        fs::remove_file(&key).unwrap();
        fs::remove_file(public_key_path(&key)).unwrap();
        assert_ne!(ensure_host_key(&key, "root@dev").unwrap(), good);
    }

    #[test]
    fn concurrent_first_use_agrees_on_one_key() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("id_ed25519");
        let keys: Vec<KeyPair> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4).map(|_| s.spawn(|| ensure_user_key(&key).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let on_disk = fs::read_to_string(public_key_path(&key)).unwrap();
        for k in &keys {
            assert_eq!(k.public_key, on_disk.trim());
        }
    }

    #[test]
    fn public_keys_are_checked() {
        check_public_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOv0 user@host\n").unwrap();
        for bad in ["", "ssh-ed25519", "ssh-ed25519 short", "ssh-ed25519 AAAA$(rm -rf)AAAAAAAA", "a b\nc d"] {
            assert!(check_public_key(bad).is_err(), "{bad:?}");
        }
    }

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA root@a";
    const KEY_B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";

    #[test]
    fn host_keys_are_pinned_and_unpinned_by_vm_id() {
        let tmp = tempfile::tempdir().unwrap();
        let kh = tmp.path().join("known_hosts");
        fs::write(&kh, "# kept comment\nother-host ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAB\n").unwrap();
        let (a, b) = (vm("aaaa"), vm("aaaa-2"));

        pin_host_key(&kh, &a, KEY_A).unwrap();
        pin_host_key(&kh, &b, KEY_B).unwrap();
        let key_a = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert_eq!(pinned_host_key(&kh, &a).unwrap().as_deref(), Some(key_a));
        // Re-pinning replaces, never duplicates.
        pin_host_key(&kh, &a, KEY_B).unwrap();
        let text = fs::read_to_string(&kh).unwrap();
        assert_eq!(text.lines().filter(|l| l.starts_with("aaaa ")).count(), 1, "{text}");
        assert_eq!(pinned_host_key(&kh, &a).unwrap().as_deref(), Some(KEY_B));
        assert_eq!(fs::metadata(&kh).unwrap().permissions().mode() & 0o777, 0o600);

        assert!(unpin_host_key(&kh, &a).unwrap());
        assert!(!unpin_host_key(&kh, &a).unwrap());
        assert_eq!(pinned_host_key(&kh, &a).unwrap(), None);
        // A VM whose id has the other as a prefix keeps its pin; foreign lines are kept.
        assert_eq!(pinned_host_key(&kh, &b).unwrap().as_deref(), Some(KEY_B));
        let text = fs::read_to_string(&kh).unwrap();
        assert!(text.starts_with("# kept comment\nother-host ssh-rsa"), "{text}");

        assert!(pin_host_key(&kh, &a, "not a key").is_err());
        // Missing file: nothing pinned, unpin is a no-op.
        let none = tmp.path().join("absent");
        assert_eq!(pinned_host_key(&none, &a).unwrap(), None);
        assert!(!unpin_host_key(&none, &a).unwrap());
    }

    #[test]
    fn parallel_pins_are_not_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let kh = tmp.path().join("known_hosts");
        std::thread::scope(|s| {
            for i in 0..8 {
                let kh = &kh;
                s.spawn(move || pin_host_key(kh, &vm(&format!("vm{i}")), KEY_A).unwrap());
            }
        });
        for i in 0..8 {
            assert!(pinned_host_key(&kh, &vm(&format!("vm{i}"))).unwrap().is_some(), "vm{i}");
        }
    }

    #[test]
    fn ssh_command_has_the_pinning_options_and_quotes_remote_args() {
        let paths = Paths::under(Path::new("/b"), 1000).unwrap();
        let id = vm("0123456789abcdef");
        let remote: Vec<String> =
            ["printf", "%s\\n", "two words", "it's", "$(touch /tmp/pwned)", ";", "`id`", "", "a\nb", "-v"]
                .map(String::from)
                .to_vec();
        let cmd = ssh_command(&paths, &id, Ipv4Addr::new(172, 30, 0, 2), &remote, Tty::Auto, None);
        assert_eq!(cmd.get_program(), "ssh");
        let args: Vec<String> = cmd.get_args().map(|a| a.to_str().unwrap().to_owned()).collect();
        let expected_prefix = [
            "-F",
            "/dev/null",
            "-i",
            "/b/keys/id_ed25519",
            "-o",
            "UserKnownHostsFile=/b/keys/known_hosts",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "HostKeyAlias=0123456789abcdef",
            "-o",
            "CheckHostIP=no",
            "-o",
            "UpdateHostKeys=no",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "--",
            "root@172.30.0.2",
        ];
        assert_eq!(&args[..expected_prefix.len()], &expected_prefix);
        assert_eq!(args.len(), expected_prefix.len() + 1, "the remote command is one argument");

        // The remote shell gets back exactly the arguments given, and runs nothing else.
        let remote_line = args.last().unwrap();
        let out = Command::new("sh").arg("-c").arg(remote_line).output().unwrap();
        assert!(out.status.success());
        let printed = String::from_utf8(out.stdout).unwrap();
        let expected: String = remote[2..].iter().map(|a| format!("{a}\n")).collect();
        assert_eq!(printed, expected);
        assert!(!Path::new("/tmp/pwned").exists());

        // No remote command: a login shell; Tty::Force adds -t.
        let cmd = ssh_command(&paths, &id, Ipv4Addr::new(172, 30, 0, 2), &[], Tty::Force, None);
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(&args[args.len() - 3..], ["-t", "--", "root@172.30.0.2"]);

        // With a dialer, ssh runs it through /bin/sh, its path from the environment, and takes
        // the socket it passes back.
        let dialer = Path::new("/opt/my 'banger'%h\\/banger");
        let cmd = ssh_command(&paths, &id, Ipv4Addr::new(172, 30, 0, 2), &[], Tty::Auto, Some(dialer));
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        let proxy = args.iter().position(|a| a.starts_with("ProxyCommand=")).expect("a ProxyCommand");
        assert_eq!(args[proxy], "ProxyCommand=\"$BANGER_SSH_DIALER\" ssh-dial 172.30.0.2:22");
        assert_eq!(args[proxy + 1..proxy + 3], ["-o", "ProxyUseFdpass=yes"]);
        let envs: Vec<_> = cmd.get_envs().collect();
        assert!(envs.contains(&(std::ffi::OsStr::new("SHELL"), Some(std::ffi::OsStr::new("/bin/sh")))));
        assert!(envs.contains(&(std::ffi::OsStr::new("BANGER_SSH_DIALER"), Some(dialer.as_os_str()))));

        // OpenSSH itself accepts every option and resolves them as intended (`-G` prints the
        // effective configuration without connecting). It drops an identity file that does not
        // exist, so give it one.
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::under(tmp.path(), 1000).unwrap();
        fs::create_dir(paths.keys_dir()).unwrap();
        fs::write(paths.ssh_key(), "").unwrap();
        let cmd = ssh_command(&paths, &id, Ipv4Addr::new(172, 30, 0, 2), &[], Tty::Force, Some(dialer));
        let out = Command::new("ssh").arg("-G").args(cmd.get_args()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let effective = String::from_utf8(out.stdout).unwrap();
        let key = paths.ssh_key();
        let known_hosts = paths.known_hosts();
        let identity = format!("identityfile {}", key.display());
        let user_known = format!("userknownhostsfile {}", known_hosts.display());
        for line in [
            "user root",
            "hostname 172.30.0.2",
            "hostkeyalias 0123456789abcdef",
            "stricthostkeychecking true",
            &user_known,
            "globalknownhostsfile /dev/null",
            &identity,
            "identitiesonly yes",
            "batchmode yes",
            "checkhostip no",
            "updatehostkeys false",
            "requesttty true",
            "proxycommand \"$BANGER_SSH_DIALER\" ssh-dial 172.30.0.2:22",
            "proxyusefdpass yes",
        ] {
            assert!(effective.lines().any(|l| l == line), "missing {line:?} in:\n{effective}");
        }
        // Only banger's key is offered, never the user's default identities.
        assert_eq!(effective.lines().filter(|l| l.starts_with("identityfile ")).count(), 1, "{effective}");
    }

    #[test]
    fn ssh_runs_the_dialer_whatever_its_path() {
        // A dialer in a directory whose name a shell or ssh would have to quote; it writes down
        // its arguments and passes nothing back, so ssh then gives up.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("my 'banger'%h\\ $HOME");
        fs::create_dir(&dir).unwrap();
        let dialer = dir.join("banger");
        let seen = tmp.path().join("seen");
        fs::write(&dialer, format!("#!/bin/sh\necho \"$@\" > '{}'\n", seen.display())).unwrap();
        fs::set_permissions(&dialer, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let paths = Paths::under(tmp.path(), 1000).unwrap();
        let mut cmd = ssh_command(
            &paths,
            &vm("0123456789abcdef"),
            Ipv4Addr::new(172, 30, 0, 2),
            &[],
            Tty::Auto,
            Some(&dialer),
        );
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        assert!(!out.status.success());
        let args = fs::read_to_string(&seen).unwrap_or_else(|e| {
            panic!("the dialer never ran ({e}): {}", String::from_utf8_lossy(&out.stderr))
        });
        assert_eq!(args, "ssh-dial 172.30.0.2:22\n");
    }

    #[test]
    fn dial_for_ssh_passes_a_connected_socket_without_nagle() {
        use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (ssh_end, dialer_end) = std::os::unix::net::UnixStream::pair().unwrap();
        dial_for_ssh(addr, dialer_end.as_fd()).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();

        let mut byte = [0u8; 1];
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<()>(
            ssh_end.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        assert_eq!(msg.bytes, 1, "OpenSSH reads one byte with the descriptor");
        let fds: Vec<RawFd> = msg
            .cmsgs()
            .unwrap()
            .flat_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds,
                other => panic!("unexpected control message {other:?}"),
            })
            .collect();
        assert_eq!(fds.len(), 1);
        // SAFETY: the descriptor was just received, so this process owns it and nothing else
        // closes it.
        let passed = std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(fds[0]) });
        assert!(passed.nodelay().unwrap(), "Nagle's algorithm must be off");
        assert_eq!(passed.peer_addr().unwrap(), addr);
        use std::io::{Read, Write};
        (&passed).write_all(b"SSH-2.0-client\r\n").unwrap();
        let mut got = [0u8; 16];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"SSH-2.0-client\r\n");

        // Nothing listening: the error names the address.
        drop(listener);
        let err = dial_for_ssh(addr, dialer_end.as_fd()).unwrap_err();
        assert!(matches!(err, SshError::Dial { addr: a, .. } if a == addr), "{err:?}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        // Run by hand, standard output is no socket.
        let file = tempfile::tempfile().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = dial_for_ssh(listener.local_addr().unwrap(), file.as_fd()).unwrap_err();
        assert!(matches!(err, SshError::Pass { .. }), "{err:?}");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("cat"), "cat");
        assert_eq!(shell_quote("/etc/hostname"), "/etc/hostname");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[tokio::test]
    async fn wait_for_ssh_reads_the_banner() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // Other lines may come before the identification line.
            s.write_all(b"hello there\r\nSSH-2.0-test\r\n").await.unwrap();
        });
        let banner = wait_for_ssh(addr, Duration::from_secs(5)).await.unwrap();
        assert_eq!(banner, "SSH-2.0-test");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn wait_for_ssh_retries_until_the_server_is_up() {
        // Reserve a port, close it, and open it again after a while.
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let listener = TcpListener::bind(addr).await.unwrap();
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"SSH-2.0-late\r\n").await.unwrap();
        });
        let started = Instant::now();
        let banner = wait_for_ssh(addr, Duration::from_secs(10)).await.unwrap();
        assert_eq!(banner, "SSH-2.0-late");
        assert!(started.elapsed() >= Duration::from_millis(500));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn wait_for_ssh_tries_again_soon_after_a_failed_attempt() {
        // A server that closes every connection without a banner: each accept is one attempt.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut at = Vec::new();
            while at.len() < 6 {
                drop(listener.accept().await.unwrap());
                at.push(Instant::now());
            }
            at
        });
        let _ =
            tokio::time::timeout(Duration::from_secs(5), wait_for_ssh(addr, Duration::from_secs(10))).await;
        let at = server.await.unwrap();
        let shortest = at.windows(2).map(|w| w[1] - w[0]).min().unwrap();
        assert!(shortest < Duration::from_millis(100), "attempts {shortest:?} apart at the closest");
    }

    /// A SYN that gets no answer (here: the listener's accept queue is full, so the kernel drops
    /// it) is followed by a new connection within a fraction of a second, not by the kernel's
    /// retransmission a second later.
    #[tokio::test]
    async fn wait_for_ssh_connects_again_soon_when_a_syn_gets_no_answer() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let listener = socket.listen(0).unwrap();
        // A backlog of 0 holds one connection; until it is accepted, SYNs are dropped.
        let filler = TcpStream::connect(addr).await.unwrap();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            drop(listener.accept().await.unwrap());
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"SSH-2.0-queued\r\n").await.unwrap();
            s
        });
        let started = Instant::now();
        let banner = wait_for_ssh(addr, Duration::from_secs(10)).await.unwrap();
        let took = started.elapsed();
        assert_eq!(banner, "SSH-2.0-queued");
        assert!(
            took < Duration::from_millis(800),
            "banner after {took:?}: waited for the SYN's retransmission"
        );
        drop((filler, server.await.unwrap()));
    }

    #[tokio::test]
    async fn wait_for_ssh_times_out_on_a_silent_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (s, _) = listener.accept().await.unwrap();
                held.push(s);
            }
        });
        let started = Instant::now();
        let err = wait_for_ssh(addr, Duration::from_millis(1200)).await.unwrap_err();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(1200) && waited < Duration::from_secs(3), "{waited:?}");
        let msg = err.to_string();
        assert!(msg.contains(&addr.to_string()) && msg.contains("no ssh banner"), "{msg}");
        assert!(msg.contains("within 1.2 s") && msg.contains("tcp connections were accepted"), "{msg}");
        assert_eq!(msg.matches("within").count(), 1, "one duration: {msg}");
        server.abort();
    }

    #[tokio::test]
    async fn wait_for_ssh_reports_refused_connections_and_non_ssh_servers() {
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let err = wait_for_ssh(addr, Duration::from_millis(300)).await.unwrap_err().to_string();
        assert!(err.contains("connect") && err.contains("no tcp connection was ever accepted"), "{err}");

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let err = wait_for_ssh(addr, Duration::from_millis(300)).await.unwrap_err().to_string();
        assert!(err.contains("closed before an ssh banner"), "{err}");
        server.abort();
    }
}
