//! Running a command with a deadline and capturing what it printed.
//!
//! Every command is started in its own process group; on timeout the whole group is killed with
//! SIGKILL. Output is read by two threads into shared buffers, so a daemon that inherited the pipes
//! cannot make the caller wait forever: once the command exited, the readers get a short grace
//! period and whatever arrived is returned, with a note.

use std::fmt;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long the output readers may lag behind the command's exit.
const READER_GRACE: Duration = Duration::from_secs(3);

/// What a finished (or killed) command did.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, shell-quoted, for reports.
    pub command: String,
    /// The exit code; `None` when the command was killed by a signal.
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// Whether the deadline passed and the harness killed it.
    pub timed_out: bool,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
    /// Set when a reader did not reach end of file after the command exited (a descendant kept
    /// the pipe open).
    pub pipes_held_open: bool,
}

impl Output {
    /// Exit code 0 and not timed out.
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// Panics with the full report unless the command succeeded; returns `self` for chaining.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        if !self.success() {
            panic!("command failed:\n{self}");
        }
        self
    }

    /// Panics with the full report unless the command failed (non-zero exit, not a timeout).
    #[track_caller]
    pub fn failed(&self) -> &Self {
        if self.success() || self.timed_out || self.code.is_none() {
            panic!("command was expected to fail with an error:\n{self}");
        }
        self
    }

    /// Panics unless stdout+stderr mention at least one of `words` (case-insensitive).
    #[track_caller]
    pub fn mentions_any(&self, words: &[&str]) -> &Self {
        let text = self.text_lower();
        if !words.iter().any(|w| text.contains(&w.to_lowercase())) {
            panic!("output mentions none of {words:?}:\n{self}");
        }
        self
    }

    /// Standard output and standard error together, lowercased, for matching key words.
    pub fn text_lower(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr).to_lowercase()
    }

    /// Panics unless stdout+stderr mention every word of `words` (case-insensitive).
    #[track_caller]
    pub fn mentions(&self, words: &[&str]) -> &Self {
        let text = self.text_lower();
        let missing: Vec<&&str> = words.iter().filter(|w| !text.contains(&w.to_lowercase())).collect();
        if !missing.is_empty() {
            panic!("output does not mention {missing:?}:\n{self}");
        }
        self
    }
}

fn indent(text: &str) -> String {
    if text.is_empty() {
        return "    (empty)\n".to_owned();
    }
    text.lines().map(|l| format!("    {l}\n")).collect()
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  $ {}", self.command)?;
        let how = match (self.timed_out, self.code, self.signal) {
            (true, _, _) => "timed out and was killed".to_owned(),
            (false, Some(c), _) => format!("exit code {c}"),
            (false, None, Some(s)) => format!("killed by signal {s}"),
            (false, None, None) => "unknown status".to_owned(),
        };
        writeln!(f, "  -> {how} after {:.2}s", self.elapsed.as_secs_f64())?;
        if self.pipes_held_open {
            writeln!(f, "  (a descendant process still held stdout/stderr open after the command exited)")?;
        }
        write!(f, "  stdout:\n{}  stderr:\n{}", indent(&self.stdout), indent(&self.stderr))
    }
}

/// Quotes one word for a shell, only when needed.
pub fn shell_quote(word: &str) -> String {
    let plain =
        !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain { word.to_owned() } else { format!("'{}'", word.replace('\'', "'\\''")) }
}

/// The command line of `cmd`, shell-quoted.
pub fn describe(cmd: &Command) -> String {
    let mut words = vec![shell_quote(&cmd.get_program().to_string_lossy())];
    words.extend(cmd.get_args().map(|a| shell_quote(&a.to_string_lossy())));
    words.join(" ")
}

fn reader(mut src: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match src.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// Runs `cmd` (stdin closed, output captured) in its own process group, killing the group after
/// `timeout`. Fails only when the command cannot be started.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let command = describe(cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot start {command}"))?;
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        reader(child.stdout.take().expect("piped stdout"), out.clone()),
        reader(child.stderr.take().expect("piped stderr"), err.clone()),
    ];
    let pgid = Pid::from_raw(child.id() as i32);
    let mut timed_out = false;
    let mut pause = Duration::from_millis(2);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() >= timeout {
            timed_out = true;
            let _ = killpg(pgid, Signal::SIGKILL);
            break child.wait()?;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(25));
    };
    let elapsed = start.elapsed();
    let grace = Instant::now();
    while readers.iter().any(|r| !r.is_finished()) && grace.elapsed() < READER_GRACE {
        thread::sleep(Duration::from_millis(5));
    }
    let pipes_held_open = readers.iter().any(|r| !r.is_finished());
    for r in readers {
        if r.is_finished() {
            let _ = r.join();
        }
    }
    let take = |b: &Arc<Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&b.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    };
    Ok(Output {
        command,
        code: status.code(),
        signal: status.signal(),
        timed_out,
        stdout: take(&out),
        stderr: take(&err),
        elapsed,
        pipes_held_open,
    })
}

/// Runs a root command of the harness (`ip`, `iptables-save`, `useradd` …) with a 60 s deadline
/// and fails unless it exits 0.
pub fn root(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = root_unchecked(program, args)?;
    if !out.success() {
        bail!("command failed:\n{out}");
    }
    Ok(out)
}

/// Like [`root`] but returns the output whatever the exit code.
pub fn root_unchecked(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(60))
}

/// Polls `probe` every `every` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, every: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_exit_code() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10)).unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        assert!(!out.timed_out);
        assert!(out.command.starts_with("sh -c 'echo out;"), "{}", out.command);
    }

    #[test]
    fn kills_the_whole_group_on_timeout() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30; echo never"]);
        let out = run_with_timeout(&mut cmd, Duration::from_millis(300)).unwrap();
        assert!(out.timed_out);
        assert!(!out.success());
        assert!(out.elapsed < Duration::from_secs(5), "{out}");
        assert!(!out.pipes_held_open, "the background sleep was not killed: {out}");
    }

    #[test]
    fn a_detached_descendant_holding_the_pipe_does_not_block() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "setsid sleep 20 & echo $!"]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10)).unwrap();
        // The detached sleep is ours: end it by its pid.
        let pid: i32 = out.stdout.trim().parse().unwrap();
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        assert!(out.success(), "{out}");
        assert!(out.pipes_held_open);
        assert!(out.elapsed < Duration::from_secs(10));
    }

    #[test]
    fn quoting_round_trips_through_sh() {
        for word in ["plain", "with space", "it's", "", "$HOME", "a\"b"] {
            let out = Command::new("sh")
                .args(["-c", &format!("printf %s {}", shell_quote(word))])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), word);
        }
    }

    #[test]
    fn wait_for_returns_the_first_value_or_gives_up() {
        let mut n = 0;
        assert_eq!(
            wait_for(Duration::from_secs(5), Duration::from_millis(1), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            Some(3)
        );
        assert_eq!(wait_for(Duration::from_millis(20), Duration::from_millis(5), || None::<()>), None);
    }
}
