//! Firecracker-style log lines and metrics output.
//!
//! Log lines look like Firecracker's: `<local time> [<instance id>:<thread>] <message>`, written
//! to stdout until `--log-path` or `PUT /logger` names a file or FIFO. Like Firecracker, the
//! target is opened with `O_CREAT | O_RDWR | O_NONBLOCK` (no truncation, no append) and `PUT
//! /logger` may be called again before boot to change it.
//!
//! Metrics are one JSON object per line, written on `FlushMetrics` and when the VMM stops, to the
//! file given by `--metrics-path` or `PUT /metrics` (once). The double writes a small subset of
//! Firecracker's metrics (`utc_timestamp_ms` and API request counters).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::config::LevelFilter;

/// Opens a log or metrics target the way Firecracker's `open_file_nonblock` does.
pub fn open_file_nonblock(path: &Path) -> io::Result<File> {
    OpenOptions::new().custom_flags(libc::O_NONBLOCK).create(true).read(true).write(true).open(path)
}

/// Severity of one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Error.
    Error,
    /// Warning.
    Warn,
    /// Information.
    Info,
    /// Debug detail.
    Debug,
}

impl Level {
    fn enabled_by(self, filter: LevelFilter) -> bool {
        let needed = match self {
            Level::Error => LevelFilter::Error,
            Level::Warn => LevelFilter::Warn,
            Level::Info => LevelFilter::Info,
            Level::Debug => LevelFilter::Debug,
        };
        filter >= needed
    }

    fn label(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

/// The process logger: instance id, level filter and target.
#[derive(Debug)]
pub struct Logger {
    instance_id: String,
    level: LevelFilter,
    show_level: bool,
    target: Option<File>,
}

/// The local time formatted as Firecracker's `LocalTime` (`YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`).
fn local_time() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() as libc::time_t;
    // SAFETY: localtime_r writes only into the tm we own; tm is plain data, zero is valid.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&secs, &mut tm);
        tm
    };
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        now.subsec_nanos()
    )
}

impl Logger {
    /// A logger writing to stdout at level Info.
    pub fn new(instance_id: &str) -> Self {
        Logger {
            instance_id: instance_id.to_string(),
            level: LevelFilter::Info,
            show_level: false,
            target: None,
        }
    }

    /// Applies a logger configuration (`--log-path`/`--level` or `PUT /logger`).
    pub fn update(
        &mut self,
        log_path: Option<&Path>,
        level: Option<LevelFilter>,
        show_level: Option<bool>,
    ) -> io::Result<()> {
        let file = log_path.map(open_file_nonblock).transpose()?;
        self.level = level.unwrap_or(LevelFilter::Info);
        if let Some(file) = file {
            self.target = Some(file);
        }
        if let Some(show) = show_level {
            self.show_level = show;
        }
        Ok(())
    }

    /// Writes one line from `thread` (Firecracker's thread names: `main`, `fc_api`, `fc_vmm`).
    pub fn log(&mut self, level: Level, thread: &str, message: &str) {
        if !level.enabled_by(self.level) {
            return;
        }
        let level_part = if self.show_level { format!(":{}", level.label()) } else { String::new() };
        let line = format!("{} [{}:{thread}{level_part}] {message}\n", local_time(), self.instance_id);
        // Like Firecracker, a failed log write is dropped silently.
        let _ = match &mut self.target {
            Some(f) => f.write_all(line.as_bytes()),
            None => io::stdout().write_all(line.as_bytes()),
        };
    }
}

/// Why metrics could not be initialised, worded as Firecracker's `MetricsConfigError`.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Already initialised once.
    #[error(
        "Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed."
    )]
    AlreadyInitialized,
    /// The target could not be opened.
    #[error("Cannot initialize the metrics system due to bad user input: {0}")]
    Open(io::Error),
}

/// Metrics output and the few counters the double keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    target: Option<File>,
    /// API requests served, by outcome.
    pub api_requests_ok: u64,
    /// API requests answered with an error.
    pub api_requests_failed: u64,
}

impl Metrics {
    /// Opens the metrics target; allowed once per process.
    pub fn init(&mut self, path: &Path) -> Result<(), MetricsError> {
        if self.target.is_some() {
            return Err(MetricsError::AlreadyInitialized);
        }
        self.target = Some(open_file_nonblock(path).map_err(MetricsError::Open)?);
        Ok(())
    }

    /// Writes one metrics line; a no-op (Ok) when metrics were never initialised.
    pub fn write(&mut self) -> io::Result<()> {
        let Some(f) = &mut self.target else { return Ok(()) };
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        let line = serde_json::json!({
            "utc_timestamp_ms": ms,
            "api_server": {"requests_ok": self.api_requests_ok, "requests_failed": self.api_requests_failed},
        });
        f.write_all(format!("{line}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn log_lines_go_to_the_target_with_level_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut l = Logger::new("vm1");
        l.update(Some(&path), Some(LevelFilter::Warn), Some(true)).unwrap();
        l.log(Level::Info, "main", "hidden");
        l.log(Level::Error, "fc_api", "shown");
        let mut s = String::new();
        File::open(&path).unwrap().read_to_string(&mut s).unwrap();
        assert!(s.ends_with(" [vm1:fc_api:ERROR] shown\n"), "{s:?}");
        assert!(!s.contains("hidden"));
    }

    #[test]
    fn metrics_init_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Metrics::default();
        m.write().unwrap();
        m.init(&dir.path().join("m")).unwrap();
        let again = m.init(&dir.path().join("m2")).unwrap_err();
        assert_eq!(
            again.to_string(),
            "Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed."
        );
        m.write().unwrap();
        let text = std::fs::read_to_string(dir.path().join("m")).unwrap();
        assert!(text.starts_with("{\"api_server\""), "{text}");
    }
}
