//! Command-line arguments, as Firecracker 1.16 takes them (`--name value`; `--name=value` is
//! accepted too). Flags the double does not emulate (seccomp, timing, MMDS, payload sizes, and
//! any unknown flag such as those a jailer passes) are accepted and ignored; an unknown flag's
//! following word is taken as its value when it does not start with `--`.

use std::ffi::OsString;
use std::path::PathBuf;

/// Firecracker's default API socket.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
/// Firecracker's default instance id.
pub const DEFAULT_INSTANCE_ID: &str = "anonymous-instance";

/// Parsed arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// `--api-sock`.
    pub api_sock: PathBuf,
    /// `--id`.
    pub id: String,
    /// `--log-path`.
    pub log_path: Option<PathBuf>,
    /// `--level`.
    pub level: Option<String>,
    /// `--show-level`.
    pub show_level: bool,
    /// `--metrics-path`.
    pub metrics_path: Option<PathBuf>,
    /// `--config-file`.
    pub config_file: Option<PathBuf>,
    /// `--no-api`.
    pub no_api: bool,
    /// `--version`.
    pub version: bool,
    /// `--help`.
    pub help: bool,
    /// `--enable-pci` (accepted; hotplug is still refused, see the README).
    pub enable_pci: bool,
    /// Flags accepted but not emulated, for the log.
    pub ignored: Vec<String>,
}

/// Flags that take a value and are ignored.
const IGNORED_WITH_VALUE: &[&str] = &[
    "seccomp-filter",
    "seccomp-level",
    "start-time-us",
    "start-time-cpu-us",
    "parent-cpu-time-us",
    "metadata",
    "module",
    "describe-snapshot",
    "http-api-max-payload-size",
    "mmds-size-limit",
];
/// Flags without a value that are ignored.
const IGNORED_SWITCHES: &[&str] = &["no-seccomp", "boot-timer", "show-log-origin", "snapshot-version"];

fn take_value(args: &[String], i: &mut usize, inline: &Option<String>, name: &str) -> Result<String, String> {
    if let Some(v) = inline {
        return Ok(v.clone());
    }
    let v = args
        .get(*i)
        .cloned()
        .ok_or_else(|| format!("The argument '--{name}' requires a value, but none was supplied"))?;
    *i += 1;
    Ok(v)
}

/// Parses `args` (without the program name).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    let mut out = Args {
        api_sock: PathBuf::from(DEFAULT_API_SOCK),
        id: DEFAULT_INSTANCE_ID.to_string(),
        log_path: None,
        level: None,
        show_level: false,
        metrics_path: None,
        config_file: None,
        no_api: false,
        version: false,
        help: false,
        enable_pci: false,
        ignored: Vec::new(),
    };
    let args: Vec<String> = args.into_iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut seen = std::collections::HashSet::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(format!(
                "Found argument '{arg}' which wasn't expected, or isn't valid in this context."
            ));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        // Firecracker takes each of its own flags once (a jailer already passes `--id` and the
        // timing flags); flags it does not know are the double's to ignore.
        if is_firecracker_flag(name) && !seen.insert(name.to_string()) {
            return Err(format!("The argument '{name}' was provided more than once."));
        }
        let next_is_value = args.get(i).is_some_and(|next| !next.starts_with("--"));
        let mut value = |name: &str| take_value(&args, &mut i, &inline, name);
        match name {
            "api-sock" => out.api_sock = value(name)?.into(),
            "id" => out.id = value(name)?,
            "log-path" => out.log_path = Some(value(name)?.into()),
            "level" => out.level = Some(value(name)?),
            "metrics-path" => out.metrics_path = Some(value(name)?.into()),
            "config-file" => out.config_file = Some(value(name)?.into()),
            "show-level" => out.show_level = true,
            "no-api" => out.no_api = true,
            "version" => out.version = true,
            "help" => out.help = true,
            "enable-pci" => out.enable_pci = true,
            n if IGNORED_WITH_VALUE.contains(&n) => {
                let v = value(n)?;
                out.ignored.push(format!("--{n} {v}"));
            }
            n if IGNORED_SWITCHES.contains(&n) => out.ignored.push(format!("--{n}")),
            n => {
                if inline.is_some() || next_is_value {
                    let v = value(n)?;
                    out.ignored.push(format!("--{n} {v}"));
                } else {
                    out.ignored.push(format!("--{n}"));
                }
            }
        }
    }
    if out.no_api && out.config_file.is_none() {
        return Err("Argument 'no-api' requires the argument 'config-file' to be present.".into());
    }
    Ok(out)
}

/// Flags the double handles.
const OWN_FLAGS: &[&str] = &[
    "api-sock",
    "id",
    "log-path",
    "level",
    "metrics-path",
    "config-file",
    "show-level",
    "no-api",
    "version",
    "help",
    "enable-pci",
];

/// Whether `name` is one of Firecracker 1.16's flags (which its parser allows once each).
fn is_firecracker_flag(name: &str) -> bool {
    OWN_FLAGS.contains(&name) || IGNORED_WITH_VALUE.contains(&name) || IGNORED_SWITCHES.contains(&name)
}

/// Firecracker's instance id rule: 1 to 64 characters, alphanumerics and `-`.
pub fn valid_instance_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults_and_known_flags() {
        let a = p(&[]).unwrap();
        assert_eq!(a.api_sock, PathBuf::from(DEFAULT_API_SOCK));
        assert_eq!(a.id, DEFAULT_INSTANCE_ID);
        let a = p(&["--api-sock", "/tmp/s", "--id", "vm-1", "--level=Debug", "--boot-timer", "--no-seccomp"])
            .unwrap();
        assert_eq!(
            (a.api_sock, a.id, a.level),
            (PathBuf::from("/tmp/s"), "vm-1".to_string(), Some("Debug".to_string()))
        );
        assert_eq!(a.ignored, vec!["--boot-timer", "--no-seccomp"]);
    }

    #[test]
    fn unknown_and_jailer_flags_are_ignored() {
        let a = p(&[
            "--start-time-us",
            "12",
            "--seccomp-level",
            "0",
            "--future-flag",
            "x",
            "--other",
            "--api-sock",
            "s",
        ])
        .unwrap();
        assert_eq!(a.api_sock, PathBuf::from("s"));
        assert_eq!(a.ignored, vec!["--start-time-us 12", "--seccomp-level 0", "--future-flag x", "--other"]);
    }

    #[test]
    fn errors() {
        assert!(p(&["--api-sock"]).is_err());
        assert!(p(&["stray"]).is_err());
        assert!(p(&["--no-api"]).is_err());
        assert_eq!(
            p(&["--id", "a", "--start-time-us", "1", "--api-sock", "s", "--id", "b"]),
            Err("The argument 'id' was provided more than once.".to_string()),
            "a jailer passes --id: passing it again after -- fails, as in Firecracker"
        );
        assert_eq!(
            p(&["--start-time-us", "1", "--start-time-us", "2"]),
            Err("The argument 'start-time-us' was provided more than once.".to_string())
        );
        assert!(p(&["--future-flag", "1", "--future-flag", "2"]).is_ok());
        assert!(valid_instance_id("vm-1"));
        assert!(!valid_instance_id("vm_1"));
        assert!(!valid_instance_id(""));
    }
}
