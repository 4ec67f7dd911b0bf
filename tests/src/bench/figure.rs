//! A figure of `bench` made from raw samples: its median, p90 and, where it has one, the median of
//! a baseline measured in the same run; printed in `bench`'s table and as one JSON line. Also the
//! small readers the figures share: a command's wall time, a process's resident set, the phases
//! of a start as the daemon logs them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// One figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Its name, as printed.
    pub name: String,
    /// The unit of the samples.
    pub unit: &'static str,
    /// One sample per measured round.
    pub samples: Vec<f64>,
    /// The baseline's samples, measured in the same run, when the figure has one.
    pub baseline: Option<Vec<f64>>,
}

/// The `p`th percentile of `v` (nearest rank; `v` sorted).
fn pct(v: &[f64], p: usize) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// `x` to three decimals.
pub fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Figure {
    /// A figure without a baseline.
    pub fn new(name: impl Into<String>, unit: &'static str, samples: Vec<f64>) -> Figure {
        Figure { name: name.into(), unit, samples, baseline: None }
    }

    /// The same figure against `baseline`'s samples.
    pub fn against(mut self, baseline: Vec<f64>) -> Figure {
        self.baseline = Some(baseline);
        self
    }

    /// The median sample.
    pub fn median(&self) -> f64 {
        pct(&sorted(&self.samples), 50)
    }

    /// The 90th percentile.
    pub fn p90(&self) -> f64 {
        pct(&sorted(&self.samples), 90)
    }

    /// The baseline's median.
    pub fn baseline(&self) -> Option<f64> {
        self.baseline.as_ref().map(|b| pct(&sorted(b), 50))
    }

    /// The JSON line: `{"metric","value","unit","baseline","ratio","n","p90"}`.
    pub fn json(&self) -> serde_json::Value {
        let (value, baseline) = (self.median(), self.baseline());
        serde_json::json!({
            "metric": self.name,
            "value": round(value),
            "unit": self.unit,
            "baseline": baseline.map(round),
            "ratio": baseline.map(|b| round(value / b.max(1e-9))),
            "n": self.samples.len(),
            "p90": round(self.p90()),
        })
    }
}

/// The phases of one start, as the daemon logged them (`phase=MICROS,…`), and its total.
#[derive(Debug, Default)]
pub struct StartTimings {
    /// From the request received to the row saying `running`, in µs.
    pub total_us: f64,
    /// Each phase's name (spaces for underscores) and µs, in order.
    pub phases: Vec<(String, f64)>,
}

/// Every `start timings` line of a daemon log, in order.
pub fn start_timings(log: &Path) -> anyhow::Result<Vec<StartTimings>> {
    let text = std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    text.lines()
        .filter(|l| l.contains("start timings"))
        .map(|l| parse_timings(l).with_context(|| format!("cannot parse {l:?}")))
        .collect()
}

/// The last `start timings` line of a daemon log.
pub fn last_start_timings(log: &Path) -> anyhow::Result<StartTimings> {
    start_timings(log)?.pop().with_context(|| format!("no `start timings` line in {}", log.display()))
}

/// One `start timings` line read back.
pub fn parse_timings(line: &str) -> Option<StartTimings> {
    let mut t = StartTimings::default();
    for word in line.split_whitespace() {
        if let Some(v) = word.strip_prefix("total_us=") {
            t.total_us = v.parse().ok()?;
        } else if let Some(v) = word.strip_prefix("phases=") {
            for part in v.split(',') {
                let (name, us) = part.split_once('=')?;
                t.phases.push((name.replace('_', " "), us.parse().ok()?));
            }
        }
    }
    (t.total_us > 0.0).then_some(t)
}

/// Per-phase samples in milliseconds, in the order the phases first appear.
#[derive(Debug, Default)]
pub struct Phases(pub Vec<(String, Vec<f64>)>);

impl Phases {
    /// Adds one start's phases.
    pub fn add(&mut self, t: &StartTimings) {
        for (name, us) in &t.phases {
            match self.0.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => v.push(us / 1e3),
                None => self.0.push((name.clone(), vec![us / 1e3])),
            }
        }
    }

    /// One figure per phase, named `prefix: phase`.
    pub fn figures(self, prefix: &str) -> Vec<Figure> {
        self.0.into_iter().map(|(name, v)| Figure::new(format!("{prefix}: {name}"), "ms", v)).collect()
    }
}

/// How long a command [`time_ms`] runs may take before it is killed, with its process group.
const TIMED_LIMIT: Duration = Duration::from_secs(120);

/// Runs `cmd` to completion, quietly, in a process group of its own (killed after
/// [`TIMED_LIMIT`]); its wall time in milliseconds.
pub fn time_ms(mut cmd: Command) -> anyhow::Result<f64> {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).process_group(0);
    let at = Instant::now();
    let child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let (ended, ended_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let late = ended_rx.recv_timeout(TIMED_LIMIT) == Err(std::sync::mpsc::RecvTimeoutError::Timeout);
        if late {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
        late
    });
    let out = child.wait_with_output();
    let took = at.elapsed().as_secs_f64() * 1e3;
    let _ = ended.send(());
    let killed = watchdog.join().unwrap_or(false);
    let out = out.with_context(|| format!("cannot wait for {cmd:?}"))?;
    if killed {
        bail!("{cmd:?} did not end within {} s: killed", TIMED_LIMIT.as_secs());
    }
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

/// The resident set of `pid` in MiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_rss_mib(&text).with_context(|| format!("no VmRSS line in {path}"))
}

/// `VmRSS` of a `/proc/PID/status` text, in MiB.
pub fn parse_rss_mib(status: &str) -> Option<f64> {
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_timings_line_is_read_back() {
        let line = "2026-12-07T22:00:00.000Z  INFO banger::daemon::lifecycle::start: start timings vm=bench total_us=5321 phases=row_starting=120,image=40,helper=900,vmm_spawn_to_api_socket=2100";
        let t = parse_timings(line).unwrap();
        assert_eq!(t.total_us, 5321.0);
        assert_eq!(t.phases[0], ("row starting".to_owned(), 120.0));
        assert_eq!(t.phases[3], ("vmm spawn to api socket".to_owned(), 2100.0));
        assert!(parse_timings("start timings vm=x").is_none());
        let mut phases = Phases::default();
        phases.add(&t);
        phases.add(&t);
        let figures = phases.figures("x");
        assert_eq!(figures[2].name, "x: helper");
        assert_eq!(figures[2].samples, vec![0.9, 0.9]);
    }

    #[test]
    fn the_resident_set_is_read_from_proc_status() {
        let status = "Name:\tbangerd\nVmPeak:\t  20000 kB\nVmRSS:\t    6144 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_mib(status), Some(6.0));
        assert_eq!(parse_rss_mib("Name:\tx\n"), None);
        let mine = rss_mib(std::process::id()).unwrap();
        assert!(mine > 0.5 && mine < 4096.0, "{mine} MiB");
    }

    #[test]
    fn medians_and_ratios() {
        let m = Figure::new("x", "ms", vec![5.0, 1.0, 3.0, 2.0, 4.0]).against(vec![2.0, 2.0, 1.0]);
        assert_eq!((m.median(), m.p90(), m.baseline()), (3.0, 5.0, Some(2.0)));
        let j = m.json();
        assert_eq!(j["ratio"], 1.5);
        assert_eq!(j["n"], 5);
    }
}
