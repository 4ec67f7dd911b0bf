//! The audit log: one JSON line per record — when, who (uid, pid, install), which operation, the
//! kernel names the helper derived for it, and how it ended.
//!
//! Every change and every refusal has a record of its own. Routine successes (requests that read
//! and change nothing, [`routine`]) are summarised per connection and operation
//! ([`Summaries`]): the first one is recorded, the ones after it are counted, and the count is
//! written as one summary record at most every interval and when the connection closes. So a
//! peer repeating cheap requests cannot flood the log (and make a rate-limiting journal drop
//! other users' records), and nothing it did goes uncounted.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use banger_policy::{AuditTarget, Peer};
use banger_protocol::{HelperError, InstallId, Request};
use serde::Serialize;

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open audit log {path}; fix [audit] in the policy or the file's directory")]
pub struct AuditOpenError {
    /// The file.
    pub path: String,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// The operation of a record about a connection rather than a request: refused over a cap, or
/// closed without a `Hello` in time.
pub const OP_CONNECT: &str = "connect";

/// The operation of a record about a frame that could not be read as a request: oversized,
/// undecodable, or carrying too many descriptors.
pub const OP_FRAME: &str = "frame";

/// Where records go. Writes are serialized so lines never interleave.
pub struct AuditLog {
    /// The sink; one record is one `write_all` of one line under this lock.
    sink: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Record {
    /// RFC 3339 UTC time with milliseconds.
    pub time: String,
    /// The peer's uid.
    pub uid: u32,
    /// The peer's pid at connect time.
    pub pid: i32,
    /// The connection's install, once known.
    pub install: Option<String>,
    /// The operation ([`banger_protocol::Request::op_name`]).
    pub op: String,
    /// Kernel names the helper derived (TAP, device, rule tag, sysctl key).
    pub names: Vec<String>,
    /// `ok` or `error`.
    pub result: String,
    /// The error's stable code (`E004`), on error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The error message, on error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On a summary: how many more successes of this operation the connection had since `since`
    /// that have no record of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// On a summary: the time of the first success it counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

impl Record {
    /// A record stamped now.
    pub fn new(
        uid: u32,
        pid: i32,
        install: Option<&str>,
        op: &str,
        names: Vec<String>,
        outcome: Result<(), &HelperError>,
    ) -> Record {
        let (result, code, error) = match outcome {
            Ok(()) => ("ok", None, None),
            Err(e) => ("error", Some(e.code().to_string()), Some(e.to_string())),
        };
        Record {
            time: rfc3339(SystemTime::now()),
            uid,
            pid,
            install: install.map(str::to_owned),
            op: op.to_owned(),
            names,
            result: result.to_owned(),
            code,
            error,
            count: None,
            since: None,
        }
    }

    /// The record of a refusal made before the request reached the operations (connection caps,
    /// the handshake, an unreadable frame), stamped now.
    pub fn refusal(peer: &Peer, op: &str, error: &HelperError) -> Record {
        let install = peer.install.as_ref().map(InstallId::as_str);
        Record::new(peer.uid, peer.pid, install, op, vec![], Err(error))
    }
}

impl AuditLog {
    /// Records go to `w`.
    pub fn to_writer(w: Box<dyn Write + Send>) -> AuditLog {
        AuditLog { sink: Mutex::new(w) }
    }

    /// Opens the policy's target: a file (appended to, created 0600) or standard error.
    pub fn open(target: &AuditTarget) -> Result<AuditLog, AuditOpenError> {
        match target {
            AuditTarget::Stderr => Ok(Self::to_writer(Box::new(io::stderr()))),
            AuditTarget::File(path) => Ok(Self::to_writer(Box::new(open_append(path)?))),
        }
    }

    /// Writes one record. A failing log is reported on stderr and never fails the request.
    pub fn write(&self, record: &Record) {
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot encode audit record: {e}");
                return;
            }
        };
        line.push(b'\n');
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = sink.write_all(&line).and_then(|()| sink.flush()) {
            tracing::error!("cannot write audit record: {e}");
        }
    }
}

/// Whether a success of `request` is routine: it reads or answers and changes nothing, so its
/// successes may be summarised. Anything that changes the kernel or the ledger, and the handshake,
/// always has a record of its own (and so does every refusal, whatever the request).
pub fn routine(request: &Request) -> bool {
    match request {
        Request::Ping | Request::ListOwned => true,
        Request::Hello { .. }
        | Request::TapCreate { .. }
        | Request::NatUp { .. }
        | Request::LoopAttach { .. }
        | Request::TeardownVms { .. }
        | Request::DmCreate { .. }
        | Request::JailLaunch { .. }
        | Request::JailKill { .. } => false,
    }
}

/// One connection's routine successes not yet written, per operation.
#[derive(Debug)]
struct Tally {
    /// The record of the first success (who, which operation).
    first: Record,
    /// When the last record of this operation was written.
    written: Instant,
    /// Successes counted since then.
    count: u64,
    /// The time of the first of them.
    since: String,
}

/// The audit of one connection: writes each record, except routine successes after the first of
/// their operation, which it counts and writes as one summary (a record with `count` and
/// `since`) once `every` has passed since that operation's last record, and at
/// [`Summaries::flush`] when the connection ends.
#[derive(Debug)]
pub struct Summaries {
    every: Duration,
    /// One per routine operation seen on the connection (at most one per [`routine`] request).
    tallies: Vec<Tally>,
}

impl Summaries {
    /// Summaries written at most every `every` per operation.
    pub fn new(every: Duration) -> Summaries {
        Summaries { every, tallies: Vec::new() }
    }

    /// Writes `record` to `log`, unless it is a routine success (`routine`: [`routine`] of its
    /// request) of an operation already recorded on this connection: that one is counted.
    pub fn record(&mut self, log: &AuditLog, record: Record, routine: bool, now: Instant) {
        if !routine || record.result != "ok" {
            log.write(&record);
            return;
        }
        match self.tallies.iter_mut().find(|t| t.first.op == record.op) {
            None => {
                log.write(&record);
                self.tallies.push(Tally { first: record, written: now, count: 0, since: String::new() });
            }
            Some(t) => {
                if t.count == 0 {
                    t.since = record.time;
                }
                t.count += 1;
            }
        }
        self.flush_due(log, now);
    }

    /// When the next summary is due, if any success is counted.
    pub fn due(&self) -> Option<Instant> {
        self.tallies.iter().filter(|t| t.count > 0).map(|t| t.written + self.every).min()
    }

    /// Writes the summaries due at `now`.
    pub fn flush_due(&mut self, log: &AuditLog, now: Instant) {
        self.write_summaries(log, now, false);
    }

    /// Writes every count still pending (the connection is closing).
    pub fn flush(&mut self, log: &AuditLog) {
        self.write_summaries(log, Instant::now(), true);
    }

    /// Writes a summary of each operation with successes counted, if due at `now` or `all`.
    fn write_summaries(&mut self, log: &AuditLog, now: Instant, all: bool) {
        for t in self.tallies.iter_mut().filter(|t| t.count > 0 && (all || now >= t.written + self.every)) {
            let first = &t.first;
            let mut summary =
                Record::new(first.uid, first.pid, first.install.as_deref(), &first.op, vec![], Ok(()));
            summary.count = Some(t.count);
            summary.since = Some(std::mem::take(&mut t.since));
            log.write(&summary);
            t.count = 0;
            t.written = now;
        }
    }
}

fn open_append(path: &Path) -> Result<std::fs::File, AuditOpenError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| AuditOpenError { path: path.display().to_string(), source })
}

/// Formats a time as RFC 3339 UTC with milliseconds, e.g. `2026-01-02T03:04:05.678Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod memory {
    use std::io::{self, Write};
    use std::sync::{Arc, Mutex};

    use super::AuditLog;

    impl AuditLog {
        /// A log that keeps records in memory, and the buffer to read them from.
        pub fn memory() -> (AuditLog, Arc<Mutex<Vec<u8>>>) {
            let buf = Arc::new(Mutex::new(Vec::new()));
            (Self::to_writer(Box::new(Shared(buf.clone()))), buf)
        }
    }

    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn formats_time() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_123);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn one_json_line_per_record() {
        let (log, buf) = AuditLog::memory();
        log.write(&Record::new(1000, 42, Some("home"), "tap-create", vec!["bg0123".into()], Ok(())));
        let err = HelperError::QuotaExceeded { resource: "taps".into(), limit: 2 };
        log.write(&Record::new(1000, 42, None, "loop-attach", vec![], Err(&err)));
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let lines: Vec<Record> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].result, "ok");
        assert_eq!(lines[0].names, vec!["bg0123".to_owned()]);
        assert_eq!(lines[1].code.as_deref(), Some("E004"));
        assert!(lines[1].error.as_deref().unwrap().contains("taps"));
    }

    fn ok(op: &str) -> Record {
        Record::new(1000, 42, Some("home"), op, vec![], Ok(()))
    }

    fn lines(buf: &Mutex<Vec<u8>>) -> Vec<Record> {
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// (op, result, count) of each record.
    fn kept(buf: &Mutex<Vec<u8>>) -> Vec<(String, String, Option<u64>)> {
        lines(buf).into_iter().map(|r| (r.op, r.result, r.count)).collect()
    }

    fn k(op: &str, result: &str, count: Option<u64>) -> (String, String, Option<u64>) {
        (op.to_owned(), result.to_owned(), count)
    }

    #[test]
    fn routine_successes_are_counted_changes_and_refusals_recorded() {
        let (log, buf) = AuditLog::memory();
        let mut s = Summaries::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let denied = HelperError::Denied { rule: "access".into(), reason: "no".into() };
        for i in 0..1000 {
            s.record(&log, ok("ping"), true, t0 + Duration::from_millis(i));
        }
        s.record(&log, ok("tap-create"), false, t0);
        s.record(&log, ok("tap-create"), false, t0);
        s.record(&log, Record::new(1000, 42, Some("home"), "ping", vec![], Err(&denied)), true, t0);
        s.record(&log, Record::new(1000, 42, Some("home"), "ping", vec![], Err(&denied)), true, t0);
        s.record(&log, ok("list-owned"), true, t0);
        s.record(&log, ok("list-owned"), true, t0);
        assert_eq!(
            kept(&buf),
            [
                k("ping", "ok", None),
                k("tap-create", "ok", None),
                k("tap-create", "ok", None),
                k("ping", "error", None),
                k("ping", "error", None),
                k("list-owned", "ok", None),
            ]
        );
        assert_eq!(s.due(), Some(t0 + Duration::from_secs(60)));
        s.flush(&log);
        let all = lines(&buf);
        assert_eq!(all.len(), 8);
        let (ping, list) = (&all[6], &all[7]);
        assert_eq!((ping.op.as_str(), ping.result.as_str(), ping.count), ("ping", "ok", Some(999)));
        assert_eq!((ping.uid, ping.pid, ping.install.as_deref()), (1000, 42, Some("home")));
        assert!(ping.since.as_deref().is_some_and(|t| t <= ping.time.as_str()), "{ping:?}");
        assert_eq!((list.op.as_str(), list.count), ("list-owned", Some(1)));
        // Nothing left to write.
        s.flush(&log);
        assert_eq!(s.due(), None);
        assert_eq!(lines(&buf).len(), 8);
    }

    #[test]
    fn a_summary_at_most_every_interval() {
        let (log, buf) = AuditLog::memory();
        let every = Duration::from_secs(10);
        let mut s = Summaries::new(every);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        // One ping a second for 25 s: the first recorded, then one summary each 10 s.
        for sec in 0..25 {
            s.record(&log, ok("ping"), true, at(sec));
        }
        assert_eq!(kept(&buf), [k("ping", "ok", None), k("ping", "ok", Some(10)), k("ping", "ok", Some(10))]);
        assert_eq!(s.due(), Some(at(30)));
        // A summary falls due while the connection is quiet.
        s.flush_due(&log, at(29));
        assert_eq!(lines(&buf).len(), 3);
        s.flush_due(&log, at(30));
        assert_eq!(lines(&buf).last().unwrap().count, Some(4));
        assert_eq!(s.due(), None);
        // After a quiet interval the next success is written at once, as a summary of one.
        s.record(&log, ok("ping"), true, at(100));
        assert_eq!(lines(&buf).len(), 5);
        assert_eq!(lines(&buf).last().unwrap().count, Some(1));
        s.record(&log, ok("ping"), true, at(101));
        s.flush(&log);
        assert_eq!(kept(&buf)[5..], [k("ping", "ok", Some(1))]);
    }

    #[test]
    fn only_reads_are_routine() {
        let vm = banger_protocol::VmId::new("v").unwrap();
        assert!(routine(&Request::Ping) && routine(&Request::ListOwned));
        for r in [
            Request::Hello { version: 2, install_id: banger_protocol::InstallId::new("i").unwrap() },
            Request::TapCreate { vm: vm.clone() },
            Request::NatUp { vm: vm.clone() },
            Request::TeardownVms { vms: vec![vm] },
        ] {
            assert!(!routine(&r), "{r:?}");
        }
    }

    #[test]
    fn file_target_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        for _ in 0..2 {
            let log = AuditLog::open(&AuditTarget::File(path.clone())).unwrap();
            log.write(&Record::new(1, 2, None, "ping", vec![], Ok(())));
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
