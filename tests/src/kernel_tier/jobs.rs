//! The jobs of a run: each is a shell script in the run's directory, which the guest's init runs
//! in turn as root inside the shared root (`/bin/sh` of this machine), with an empty environment
//! but for the variables the script exports, in the caller's working directory.

use std::path::Path;

/// What a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// A program and its arguments, run as they are (no shell expansion).
    Argv(Vec<String>),
    /// A shell command line, as `sh -c` would read it.
    Shell(String),
}

/// The variables every job gets from the caller's environment when they are set there.
pub const PASSED_ENV: &[&str] = &["CI", "RUST_BACKTRACE", "PATH", "RUST_LOG", "RUST_TEST_THREADS"];

/// Why a job could not be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    /// An `--env` argument is not `NAME=VALUE` with a shell variable name.
    #[error("invalid environment setting {0:?}: expected NAME=VALUE, NAME made of letters, digits and _")]
    BadEnv(String),
    /// An empty program list.
    #[error("a job needs a program to run")]
    Empty,
}

/// Parses `NAME=VALUE`.
pub fn parse_env(setting: &str) -> Result<(String, String), JobError> {
    let bad = || JobError::BadEnv(setting.to_string());
    let (name, value) = setting.split_once('=').ok_or_else(bad)?;
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad());
    }
    Ok((name.to_string(), value.to_string()))
}

/// Quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script of one job: exports `env` (later settings of a name win), changes to `cwd`, runs
/// the job; its exit status is the job's.
pub fn script(job: &Job, env: &[(String, String)], cwd: &Path) -> Result<String, JobError> {
    let mut out = String::from("# a kernel-tier job\n");
    for (name, value) in env {
        out.push_str(&format!("export {name}={}\n", quote(value)));
    }
    out.push_str(&format!("cd {} || exit 125\n", quote(&cwd.to_string_lossy())));
    match job {
        Job::Argv(argv) if argv.is_empty() => return Err(JobError::Empty),
        Job::Argv(argv) => {
            let words: Vec<String> = argv.iter().map(|a| quote(a)).collect();
            out.push_str(&format!("exec {}\n", words.join(" ")));
        }
        Job::Shell(line) if line.trim().is_empty() => return Err(JobError::Empty),
        Job::Shell(line) => {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// What a job is, for messages.
pub fn describe(job: &Job) -> String {
    match job {
        Job::Argv(argv) => argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "),
        Job::Shell(line) => line.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(script: &str) -> (i32, String) {
        let out = Command::new("sh").arg("-c").arg(script).env_clear().output().unwrap();
        (out.status.code().unwrap(), String::from_utf8(out.stdout).unwrap())
    }

    #[test]
    fn env_settings_are_checked() {
        assert_eq!(parse_env("CI=true"), Ok(("CI".into(), "true".into())));
        assert_eq!(parse_env("A_1=x=y"), Ok(("A_1".into(), "x=y".into())));
        assert_eq!(parse_env("EMPTY="), Ok(("EMPTY".into(), "".into())));
        for bad in ["NOEQUALS", "=v", "1A=v", "A-B=v", "A B=v"] {
            assert_eq!(parse_env(bad), Err(JobError::BadEnv(bad.into())), "{bad}");
        }
    }

    #[test]
    fn argv_jobs_run_their_words_unchanged() {
        let odd = "it's a $HOME `x` \"q\" \\ *";
        let job = Job::Argv(vec!["printf".into(), "%s|%s|%s".into(), odd.into(), String::new()]);
        let env = [("GREETING".to_string(), "héllo 'there'".to_string())];
        let script = script(&job, &env, Path::new("/")).unwrap();
        assert_eq!(sh(&script), (0, format!("{odd}||")));
    }

    #[test]
    fn shell_jobs_see_the_environment_and_directory_and_give_their_status() {
        let dir = tempfile::tempdir().unwrap();
        let env = [("A".to_string(), "1".to_string()), ("A".to_string(), "2 3".to_string())];
        let job = Job::Shell("echo \"$A $(pwd)\"; exit 7".into());
        let script = script(&job, &env, dir.path()).unwrap();
        let (code, out) = sh(&script);
        assert_eq!(code, 7);
        assert_eq!(out, format!("2 3 {}\n", dir.path().canonicalize().unwrap().display()));
    }

    #[test]
    fn a_missing_directory_is_status_125_and_empty_jobs_are_refused() {
        let script = script(&Job::Shell("true".into()), &[], Path::new("/nonexistent/dir")).unwrap();
        assert_eq!(sh(&script).0, 125);
        assert_eq!(script_err(Job::Argv(vec![])), JobError::Empty);
        assert_eq!(script_err(Job::Shell("  ".into())), JobError::Empty);
    }

    fn script_err(job: Job) -> JobError {
        script(&job, &[], Path::new("/")).unwrap_err()
    }
}
