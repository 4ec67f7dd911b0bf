//! Showing where a long command is: on a terminal one line, redrawn, with the step, the bytes
//! done in it (a copy or a hash) and the time so far; otherwise one plain line per step (for
//! logs); nothing with `--json`. Progress goes to
//! standard error, so standard output keeps only the command's own answer.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not at all (`--json`).
    Quiet,
    /// One line per step.
    Plain,
    /// One line, redrawn.
    Terminal,
}

impl Mode {
    /// Quiet with `--json`, else redrawn on a terminal and plain lines when standard error is
    /// not one.
    pub fn detect(json: bool) -> Mode {
        match (json, std::io::stderr().is_terminal()) {
            (true, _) => Mode::Quiet,
            (false, true) => Mode::Terminal,
            (false, false) => Mode::Plain,
        }
    }
}

/// How often a terminal's line is redrawn.
pub const TICK: Duration = Duration::from_millis(100);

/// Shows the steps of one piece of work (`what`, e.g. `vm dev`) on `out`.
#[derive(Debug)]
pub struct Reporter<W: Write> {
    mode: Mode,
    out: W,
    what: String,
    began: Instant,
    step: Option<String>,
    /// The bytes done in the current step, and in all.
    bytes: Option<(u64, u64)>,
}

impl<W: Write> Reporter<W> {
    /// A reporter whose clock starts now.
    pub fn new(mode: Mode, out: W, what: impl Into<String>) -> Self {
        Reporter { mode, out, what: what.into(), began: Instant::now(), step: None, bytes: None }
    }

    /// Whether anything is shown.
    pub fn quiet(&self) -> bool {
        self.mode == Mode::Quiet
    }

    /// A step begins.
    pub fn step(&mut self, step: &str) {
        self.step = Some(step.to_owned());
        self.bytes = None;
        match self.mode {
            Mode::Quiet => {}
            Mode::Plain => {
                let secs = self.began.elapsed().as_secs_f32();
                let _ = writeln!(self.out, "{}: {step} ({secs:.1} s)", self.what);
            }
            Mode::Terminal => self.tick(),
        }
    }

    /// The current step is `done` bytes through `total`: shown on a terminal only (plain lines
    /// stay one per step).
    pub fn bytes(&mut self, done: u64, total: u64) {
        self.bytes = Some((done, total));
        self.tick();
    }

    /// Redraws a terminal's line with the bytes done and the time so far.
    pub fn tick(&mut self) {
        if let (Mode::Terminal, Some(step)) = (self.mode, &self.step) {
            let secs = self.began.elapsed().as_secs_f32();
            let bytes = match self.bytes {
                Some((done, total)) => {
                    let size = crate::size::format_size;
                    format!(": {} of {}", size(done), size(total))
                }
                None => String::new(),
            };
            let _ = write!(self.out, "\r\x1b[K{}: {step}{bytes} ({secs:.1} s)", self.what);
            let _ = self.out.flush();
        }
    }

    /// The work is over: a terminal's line is cleared.
    pub fn finish(&mut self) {
        if self.mode == Mode::Terminal && self.step.take().is_some() {
            let _ = write!(self.out, "\r\x1b[K");
            let _ = self.out.flush();
        }
    }

    /// The time since the reporter was made.
    pub fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }

    /// What was written (tests).
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_one_per_step_a_terminal_line_redrawn_and_nothing_when_quiet() {
        let mut plain = Reporter::new(Mode::Plain, Vec::new(), "vm dev");
        plain.step("setting up the network");
        plain.bytes(1 << 20, 4 << 20);
        plain.tick();
        plain.step("booting the guest");
        plain.finish();
        let text = String::from_utf8(plain.into_inner()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("vm dev: setting up the network (0.") && lines[0].ends_with(" s)"));
        assert!(lines[1].starts_with("vm dev: booting the guest ("), "{text}");
        assert!(!text.contains('\r') && !text.contains('\x1b'), "{text:?}");

        let mut term = Reporter::new(Mode::Terminal, Vec::new(), "vm dev");
        term.step("copying the root filesystem");
        term.bytes(1 << 20, 4 << 20);
        term.step("booting the guest");
        term.tick();
        term.finish();
        let text = String::from_utf8(term.into_inner()).unwrap();
        assert_eq!(
            text.matches("\r\x1b[Kvm dev: copying the root filesystem: 1 MiB of 4 MiB (").count(),
            1,
            "{text:?}"
        );
        assert_eq!(text.matches("\r\x1b[Kvm dev: booting the guest (").count(), 2, "{text:?}");
        assert!(text.ends_with("\r\x1b[K") && !text.contains('\n'), "{text:?}");

        let mut quiet = Reporter::new(Mode::Quiet, Vec::new(), "vm dev");
        quiet.step("booting the guest");
        quiet.bytes(1, 2);
        quiet.tick();
        quiet.finish();
        assert!(quiet.into_inner().is_empty());
    }
}
