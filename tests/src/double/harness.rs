//! Helpers for tests that drive the double: start it as a process, talk HTTP/1.1 to its socket.
//!
//! ```no_run
//! use banger_tests::double::harness::{DoubleProcess, api_call};
//! let dir = tempfile::tempdir().unwrap();
//! // In an integration test of this crate: env!("CARGO_BIN_EXE_firecracker-double").
//! let bin = std::path::Path::new("target/debug/firecracker-double");
//! let double = DoubleProcess::spawn(bin, dir.path(), "vm-1").unwrap();
//! let (status, body) = api_call(double.socket(), "GET", "/", None).unwrap();
//! assert_eq!(status, 200);
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A response as seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header lines (`Name: value`), in order.
    pub headers: Vec<String>,
    /// Body (per `Content-Length`).
    pub body: String,
}

impl RawResponse {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|h| {
            let (n, v) = h.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends one request on a fresh connection and reads the response.
pub fn raw_call(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> io::Result<RawResponse> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    if let Some(b) = body {
        // The server may answer and close before reading an oversized body.
        let _ = stream.write_all(b);
    }
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        headers.push(h.to_string());
    }
    let mut resp = RawResponse { status, headers, body: String::new() };
    let len: usize = resp.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf)?;
    resp.body = String::from_utf8_lossy(&buf).into_owned();
    Ok(resp)
}

/// Sends one request with a string body; returns status and body.
pub fn api_call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> io::Result<(u16, String)> {
    let r = raw_call(socket, method, path, body.map(str::as_bytes))?;
    Ok((r.status, r.body))
}

/// Waits until the Unix socket at `path` accepts a connection (its file appears at `bind`, a
/// moment before the server listens).
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let accepts = || std::os::unix::net::UnixStream::connect(path).is_ok();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if accepts() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    accepts()
}

/// A running double, killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct DoubleProcess {
    child: Child,
    socket: PathBuf,
}

impl DoubleProcess {
    /// Starts `bin --api-sock <dir>/api.sock --id <id>` with stdout and stderr sent to
    /// `<dir>/console.log`, and waits until the socket accepts connections.
    pub fn spawn(bin: &Path, dir: &Path, id: &str) -> io::Result<DoubleProcess> {
        let socket = dir.join("api.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("--api-sock").arg(&socket).arg("--id").arg(id);
        Self::spawn_command(cmd, &socket, &dir.join("console.log"))
    }

    /// Starts a prepared command (for wrappers such as `ip netns exec` or `setpriv`) whose double
    /// serves `socket`; output goes to `console`.
    pub fn spawn_command(mut cmd: Command, socket: &Path, console: &Path) -> io::Result<DoubleProcess> {
        let log = std::fs::File::create(console)?;
        let child = cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
        let mut me = DoubleProcess { child, socket: socket.to_path_buf() };
        if !wait_for_socket(socket, Duration::from_secs(10)) {
            let status = me.child.try_wait()?;
            return Err(io::Error::other(format!(
                "the double did not serve {} (status {status:?})",
                socket.display()
            )));
        }
        Ok(me)
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DoubleProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every descendant of `pid` (through `pgrep -P`).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        let Ok(o) = Command::new("pgrep").args(["-P", &p.to_string()]).output() else { continue };
        for c in String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|c| c.parse().ok()) {
            out.push(c);
            queue.push(c);
        }
    }
    out
}
