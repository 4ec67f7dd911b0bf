//! The test's network: a "host" namespace (where the helper, the daemons and the VMMs run) with a
//! veth to an "outside" namespace standing for the internet.
//!
//! ```text
//!   host ns  veh<sfx> 198.51.100.2/24, default via .1  ── veth ──  veo<sfx> 198.51.100.1/24  outside ns
//!            service on 0.0.0.0:8080 (guests must not reach it)      HTTP on 198.51.100.1:80
//! ```
//!
//! Both servers are threads of the test process: a thread enters the namespace with `setns`
//! (which moves only the calling thread), binds its listener there and serves from it. The socket
//! stays in that namespace whichever thread uses it.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::Context;
use nix::sched::{CloneFlags, setns};

use super::run::root;

/// The outside namespace's address (documentation range, RFC 5737).
pub const OUTSIDE_IP: &str = "198.51.100.1";
/// The host namespace's address on the veth.
pub const HOST_IP: &str = "198.51.100.2";
/// The port of the host service guests must not reach.
pub const HOST_SERVICE_PORT: u16 = 8080;

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name (`ip netns`).
    pub name: String,
}

impl Netns {
    /// Creates the namespace and brings its loopback up.
    pub fn create(name: &str) -> anyhow::Result<Netns> {
        root("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.to_owned() };
        root("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip -n <ns> args…` and fails unless it succeeds.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        Ok(root("ip", &full)?.stdout)
    }

    /// Runs a program inside the namespace as root.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<super::run::Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        super::run::root_unchecked("ip", &full)
    }

    /// The pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<u32> {
        super::run::root_unchecked("ip", &["netns", "pids", &self.name])
            .map(|o| o.stdout.split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Opens the namespace file, for `setns`.
    pub fn file(&self) -> anyhow::Result<File> {
        let path = format!("/run/netns/{}", self.name);
        File::open(&path).with_context(|| format!("cannot open {path}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = root("ip", &["netns", "delete", &self.name]) {
            eprintln!("e2e teardown: {e:#}");
        }
    }
}

/// A tiny HTTP/1.0 server answering every request with a fixed body followed by the line
/// `peer <client address>` (so a test sees whether NAT rewrote the source), stopped on drop.
#[derive(Debug)]
pub struct HttpServer {
    /// Where it listens (inside its namespace).
    pub addr: SocketAddr,
    /// The body it answers with.
    pub body: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Starts a server on `addr` inside network namespace `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, body: String) -> anyhow::Result<HttpServer> {
        let nsfile = ns.file()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let body = body.clone();
            thread::Builder::new().name(format!("http-{}", ns.name)).spawn(move || {
                let bound = setns(&nsfile, CloneFlags::CLONE_NEWNET)
                    .context("setns into the namespace")
                    .and_then(|()| TcpListener::bind(addr).with_context(|| format!("bind {addr}")))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l).context("nonblocking listener"));
                let listener = match bound {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, peer)) => answer(conn, &format!("{body}peer {}\n", peer.ip())),
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })?
        };
        rx.recv().context("the server thread died")??;
        Ok(HttpServer { addr, body, stop, thread: Some(thread) })
    }
}

fn answer(mut conn: TcpStream, body: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let reply = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(reply.as_bytes());
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The host and outside namespaces, the veth between them and both servers.
#[derive(Debug)]
pub struct Network {
    /// Servers first, so they stop before their namespaces go.
    pub outside_http: HttpServer,
    /// The service on every host address.
    pub host_service: HttpServer,
    /// Where the helper, daemons and VMMs run.
    pub host: Netns,
    /// The "internet".
    pub outside: Netns,
}

impl Network {
    /// Builds the two namespaces, links them, routes the host through the outside and starts the
    /// servers. `marker` goes into both servers' answers so a test knows whom it reached.
    pub fn create(
        host_ns: &str,
        outside_ns: &str,
        veth_host: &str,
        veth_outside: &str,
        marker: &str,
    ) -> anyhow::Result<Network> {
        let host = Netns::create(host_ns)?;
        let outside = Netns::create(outside_ns)?;
        host.ip(&[
            "link",
            "add",
            veth_host,
            "type",
            "veth",
            "peer",
            "name",
            veth_outside,
            "netns",
            outside_ns,
        ])?;
        host.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", veth_host])?;
        outside.ip(&["addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", veth_outside])?;
        host.ip(&["link", "set", veth_host, "up"])?;
        outside.ip(&["link", "set", veth_outside, "up"])?;
        host.ip(&["route", "add", "default", "via", OUTSIDE_IP])?;
        let outside_http =
            HttpServer::start(&outside, format!("{OUTSIDE_IP}:80").parse()?, format!("outside {marker}\n"))?;
        let host_service = HttpServer::start(
            &host,
            format!("0.0.0.0:{HOST_SERVICE_PORT}").parse()?,
            format!("host service {marker}\n"),
        )?;
        Ok(Network { outside_http, host_service, host, outside })
    }
}
