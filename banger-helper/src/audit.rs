//! The audit log: one JSON line per request — when, who (uid, pid, install), which operation, the
//! kernel names the helper derived for it, and how it ended.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use banger_policy::{AuditTarget, Peer};
use banger_protocol::{HelperError, InstallId};
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
        }
    }
}

impl Record {
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

    /// A log that keeps records in memory, and the buffer to read them from (for tests and
    /// benchmarks).
    pub fn memory() -> (AuditLog, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (Self::to_writer(Box::new(Shared(buf.clone()))), buf)
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

fn open_append(path: &Path) -> Result<std::fs::File, AuditOpenError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| AuditOpenError { path: path.display().to_string(), source })
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
