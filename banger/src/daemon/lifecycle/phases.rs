//! Where a start's time went: each phase's duration, recorded as the start runs and logged in
//! one line when it succeeds (`start timings`), for the benchmark (`tests/src/bin/bench.rs`) and
//! for anyone reading the daemon log.
//!
//! A phase is a start step, or a named part of one: the personalize step is split into `keys`
//! (the user's key and the VM's host key, made once at create and read at start) and
//! `personalization` (what `debugfs` writes into the root), the spawn step is `vmm spawn to api
//! socket`, the configure step is the VMM's API calls before `InstanceStart` (`api calls`, and
//! each request within it as `api calls: PUT <path>`).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// The phases of one start, in the order they ran.
#[derive(Debug)]
pub struct Phases {
    began: Instant,
    done: Vec<(String, Duration)>,
}

impl Phases {
    /// Begins counting now (the request received).
    pub fn begin() -> Self {
        Phases { began: Instant::now(), done: Vec::new() }
    }

    /// Records that `phase` took `took` (added to what it took before, if it ran twice).
    pub fn record(&mut self, phase: impl Into<String>, took: Duration) {
        let phase = phase.into();
        match self.done.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, total)) => *total += took,
            None => self.done.push((phase, took)),
        }
    }

    /// The time since [`Phases::begin`].
    pub fn total(&self) -> Duration {
        self.began.elapsed()
    }

    /// `phase=MICROS,phase=MICROS,…` (spaces in a phase's name as `_`), the form the log line
    /// carries.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (phase, took) in &self.done {
            if !out.is_empty() {
                out.push(',');
            }
            let _ = write!(out, "{}={}", phase.replace(' ', "_"), took.as_micros());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_in_order() {
        let mut p = Phases::begin();
        p.record("helper", Duration::from_micros(300));
        p.record("vmm spawn", Duration::from_micros(1200));
        p.record("helper", Duration::from_micros(200));
        assert_eq!(p.render(), "helper=500,vmm_spawn=1200");
        assert!(p.total() < Duration::from_secs(5));
    }
}
