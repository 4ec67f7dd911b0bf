//! The jailer's command line, parsed as Firecracker's own `utils::arg_parser` parses it.
//!
//! Rules (each one reproduced because callers can trip over it):
//! - Everything after the first `--` goes, untouched, to the jailed binary.
//! - `--help` or `-h` anywhere before it prints the help; otherwise `--version` prints the version;
//!   neither looks at the other arguments.
//! - Every other word must be `--NAME` of a known argument (`--name=value` is not understood),
//!   followed by its value when it takes one; a value may not start with `--`. Only `--cgroup`
//!   and `--resource-limit` may be repeated.
//! - After the words are read, required arguments are checked in the order of their names.

use std::collections::BTreeMap;

/// The jailer's version, as `--version` prints it.
pub const JAILER_VERSION: &str = "1.16.1";

/// Argument errors, worded (and named, for their `Debug` form) as `UtilsArgParserError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgParseError {
    /// A required argument is missing.
    #[error("Argument '{0}' required, but not found.")]
    MissingArgument(String),
    /// An argument that takes a value has none.
    #[error("The argument '{0}' requires a value, but none was supplied.")]
    MissingValue(String),
    /// An unknown argument, or a word that is not an argument.
    #[error("Found argument '{0}' which wasn't expected, or isn't valid in this context.")]
    UnexpectedArgument(String),
    /// An argument given twice that may be given once.
    #[error("The argument '{0}' was provided more than once.")]
    DuplicateArgument(String),
}

/// How an argument is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `--name` alone.
    Flag,
    /// `--name VALUE`, once.
    Single,
    /// `--name VALUE`, any number of times.
    Multiple,
}

/// One argument the jailer knows.
#[derive(Debug, Clone, Copy)]
struct Spec {
    name: &'static str,
    kind: Kind,
    required: bool,
    default: Option<&'static str>,
    help: &'static str,
}

/// The jailer's arguments (its `build_arg_parser`), with their help texts.
const SPECS: &[Spec] = &[
    Spec { name: "id", kind: Kind::Single, required: true, default: None, help: "Jail ID." },
    Spec {
        name: "exec-file",
        kind: Kind::Single,
        required: true,
        default: None,
        help: "File path to exec into.",
    },
    Spec {
        name: "uid",
        kind: Kind::Single,
        required: true,
        default: None,
        help: "The user identifier the jailer switches to after exec.",
    },
    Spec {
        name: "gid",
        kind: Kind::Single,
        required: true,
        default: None,
        help: "The group identifier the jailer switches to after exec.",
    },
    Spec {
        name: "chroot-base-dir",
        kind: Kind::Single,
        required: false,
        default: Some("/srv/jailer"),
        help: "The base folder where chroot jails are located.",
    },
    Spec {
        name: "netns",
        kind: Kind::Single,
        required: false,
        default: None,
        help: "Path to the network namespace this microVM should join.",
    },
    Spec {
        name: "daemonize",
        kind: Kind::Flag,
        required: false,
        default: None,
        help: "Daemonize the jailer before exec, by invoking setsid(), and redirecting the standard \
               I/O file descriptors to /dev/null.",
    },
    Spec {
        name: "new-pid-ns",
        kind: Kind::Flag,
        required: false,
        default: None,
        help: "Exec into a new PID namespace.",
    },
    Spec {
        name: "cgroup",
        kind: Kind::Multiple,
        required: false,
        default: None,
        help: "Cgroup and value to be set by the jailer. It must follow this format: \
               <cgroup_file>=<value> (e.g cpu.shares=10). This argument can be used multiple times \
               to add multiple cgroups.",
    },
    Spec {
        name: "resource-limit",
        kind: Kind::Multiple,
        required: false,
        default: None,
        help: "Resource limit values to be set by the jailer. It must follow this format: \
               <resource>=<value> (e.g no-file=1024). This argument can be used multiple times to \
               add multiple resource limits. Current available resource values are:\n\t\tfsize: The \
               maximum size in bytes for files created by the process.\n\t\tno-file: Specifies a \
               value one greater than the maximum file descriptor number that can be opened by this \
               process.",
    },
    Spec {
        name: "cgroup-version",
        kind: Kind::Single,
        required: false,
        default: Some("1"),
        help: "Select the cgroup version used by the jailer.",
    },
    Spec {
        name: "parent-cgroup",
        kind: Kind::Single,
        required: false,
        default: None,
        help: "Parent cgroup in which the cgroup of this microvm will be placed.",
    },
    Spec {
        name: "version",
        kind: Kind::Flag,
        required: false,
        default: None,
        help: "Print the binary version number.",
    },
];

/// The argument `--help` adds to the list when it is given (shown among the optional ones).
const HELP_SPEC: Spec =
    Spec { name: "help", kind: Kind::Flag, required: false, default: None, help: "Show the help message." };

/// A value given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Given {
    Flag,
    Single(String),
    Multiple(Vec<String>),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print the help (`--help`, `-h`).
    Help,
    /// Print the version (`--version`).
    Version,
    /// Build a jail and exec into it.
    Jail(Arguments),
}

/// The parsed arguments of a jail request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arguments {
    given: BTreeMap<&'static str, Given>,
    extra: Vec<String>,
}

impl Arguments {
    /// The value of a single-valued argument, or its default.
    pub fn single(&self, name: &str) -> Option<&str> {
        match self.given.get(name) {
            Some(Given::Single(v)) => Some(v),
            Some(_) => None,
            None => spec(name).and_then(|s| s.default),
        }
    }

    /// Whether flag `name` was given.
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.given.get(name), Some(Given::Flag))
    }

    /// The values of a repeatable argument, in order (`None` when never given).
    pub fn multiple(&self, name: &str) -> Option<&[String]> {
        match self.given.get(name) {
            Some(Given::Multiple(v)) => Some(v),
            _ => None,
        }
    }

    /// The words after `--`, for the jailed binary.
    pub fn extra(&self) -> &[String] {
        &self.extra
    }
}

fn spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

/// Parses the words after the program name.
pub fn parse(words: &[String]) -> Result<Command, ArgParseError> {
    let (own, extra) = match words.iter().position(|w| w == "--") {
        Some(i) => (&words[..i], &words[i + 1..]),
        None => (words, &[][..]),
    };
    if own.iter().any(|w| w == "--help" || w == "-h") {
        return Ok(Command::Help);
    }
    if own.iter().any(|w| w == "--version") {
        return Ok(Command::Version);
    }
    let mut given: BTreeMap<&'static str, Given> = BTreeMap::new();
    let mut words = own.iter();
    while let Some(word) = words.next() {
        let Some(name) = word.strip_prefix("--") else {
            return Err(ArgParseError::UnexpectedArgument(word.clone()));
        };
        let spec = spec(name).ok_or_else(|| ArgParseError::UnexpectedArgument(name.to_string()))?;
        if spec.kind != Kind::Multiple && given.contains_key(spec.name) {
            return Err(ArgParseError::DuplicateArgument(name.to_string()));
        }
        let value = match spec.kind {
            Kind::Flag => Given::Flag,
            Kind::Single | Kind::Multiple => {
                let v = words
                    .next()
                    .filter(|v| !v.starts_with("--"))
                    .ok_or_else(|| ArgParseError::MissingValue(spec.name.to_string()))?
                    .clone();
                match (spec.kind, given.remove(spec.name)) {
                    (Kind::Multiple, Some(Given::Multiple(mut all))) => {
                        all.push(v);
                        Given::Multiple(all)
                    }
                    (Kind::Multiple, _) => Given::Multiple(vec![v]),
                    _ => Given::Single(v),
                }
            }
        };
        given.insert(spec.name, value);
    }
    let mut by_name: Vec<&Spec> = SPECS.iter().collect();
    by_name.sort_by_key(|s| s.name);
    if let Some(missing) = by_name.iter().find(|s| s.required && !given.contains_key(s.name)) {
        return Err(ArgParseError::MissingArgument(missing.name.to_string()));
    }
    Ok(Command::Jail(Arguments { given, extra: extra.to_vec() }))
}

/// One line of the help: the name column padded to `width`, three spaces, the help.
fn help_line(s: &Spec, width: usize) -> String {
    let default = s.default.map(|d| format!(" [default: \"{d}\"]")).unwrap_or_default();
    format!("{:<width$}   {}{default}", name_column(s), s.help)
}

fn name_column(s: &Spec) -> String {
    match s.kind {
        Kind::Flag => format!("  --{}", s.name),
        Kind::Single | Kind::Multiple => format!("  --{name} <{name}>", name = s.name),
    }
}

/// The text `--help` prints (with the trailing blank lines the jailer prints).
pub fn help_text() -> String {
    let mut all: Vec<&Spec> = SPECS.iter().chain(std::iter::once(&HELP_SPEC)).collect();
    all.sort_by_key(|s| s.name);
    let group = |required: bool| -> String {
        let specs: Vec<&&Spec> = all.iter().filter(|s| s.required == required).collect();
        let width = specs.iter().map(|s| name_column(s).len()).max().unwrap_or(0);
        specs.iter().map(|s| help_line(s, width)).collect::<Vec<_>>().join("\n")
    };
    format!(
        "Jailer v{JAILER_VERSION}\n\nrequired arguments:\n{}\n\noptional arguments:\n{}\n\n\
         Any arguments after the -- separator will be supplied to the jailed binary.\n\n",
        group(true),
        group(false)
    )
}

/// The text `--version` prints.
pub fn version_text() -> String {
    format!("Jailer v{JAILER_VERSION}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(words: &[&str]) -> Result<Command, ArgParseError> {
        parse(&words.iter().map(|w| w.to_string()).collect::<Vec<_>>())
    }

    fn jail(words: &[&str]) -> Arguments {
        match p(words).unwrap() {
            Command::Jail(a) => a,
            other => panic!("{other:?}"),
        }
    }

    const BASE: [&str; 8] = ["--id", "a", "--exec-file", "/bin/x", "--uid", "1", "--gid", "2"];

    #[test]
    fn values_defaults_and_extra_words() {
        let mut w = BASE.to_vec();
        w.extend(["--cgroup", "cpu.shares=1", "--daemonize", "--cgroup", "memory.max=2", "--", "--id", "x"]);
        let a = jail(&w);
        assert_eq!(a.single("id"), Some("a"));
        assert_eq!(a.single("chroot-base-dir"), Some("/srv/jailer"));
        assert_eq!(a.single("cgroup-version"), Some("1"));
        assert_eq!(a.single("netns"), None);
        assert!(a.flag("daemonize") && !a.flag("new-pid-ns"));
        assert_eq!(a.multiple("cgroup").unwrap(), ["cpu.shares=1", "memory.max=2"]);
        assert_eq!(a.multiple("resource-limit"), None);
        assert_eq!(a.extra(), ["--id", "x"]);
    }

    #[test]
    fn help_and_version_win_over_everything_before_the_separator() {
        assert_eq!(p(&["--bogus", "-h"]).unwrap(), Command::Help);
        assert_eq!(p(&["--version", "--help"]).unwrap(), Command::Help);
        assert_eq!(p(&["--id", "--version"]).unwrap(), Command::Version);
        assert!(matches!(p(&["--id", "a", "--", "--help"]), Err(ArgParseError::MissingArgument(_))));
    }

    #[test]
    fn errors_as_the_jailer_reports_them() {
        assert_eq!(p(&[]), Err(ArgParseError::MissingArgument("exec-file".into())));
        assert_eq!(p(&["--id", "a"]), Err(ArgParseError::MissingArgument("exec-file".into())));
        assert_eq!(
            p(&["--exec-file", "x", "--id", "a", "--uid", "1"]),
            Err(ArgParseError::MissingArgument("gid".into()))
        );
        assert_eq!(p(&["id"]), Err(ArgParseError::UnexpectedArgument("id".into())));
        assert_eq!(p(&["--bogus"]), Err(ArgParseError::UnexpectedArgument("bogus".into())));
        assert_eq!(p(&["--id=a"]), Err(ArgParseError::UnexpectedArgument("id=a".into())));
        assert_eq!(p(&["--id"]), Err(ArgParseError::MissingValue("id".into())));
        assert_eq!(p(&["--id", "--uid", "1"]), Err(ArgParseError::MissingValue("id".into())));
        assert_eq!(p(&["--id", "a", "--id", "b"]), Err(ArgParseError::DuplicateArgument("id".into())));
        assert_eq!(
            p(&["--daemonize", "--daemonize"]),
            Err(ArgParseError::DuplicateArgument("daemonize".into()))
        );
        assert_eq!(
            ArgParseError::MissingArgument("exec-file".into()).to_string(),
            "Argument 'exec-file' required, but not found."
        );
        assert_eq!(
            format!("{:?}", ArgParseError::MissingArgument("exec-file".into())),
            "MissingArgument(\"exec-file\")"
        );
    }

    #[test]
    fn help_lists_arguments_by_name_with_defaults() {
        let h = help_text();
        assert!(
            h.starts_with("Jailer v1.16.1\n\nrequired arguments:\n  --exec-file <exec-file>   File path")
        );
        assert!(h.contains("\n  --id <id>                 Jail ID.\n"));
        assert!(h.contains(
            "  --chroot-base-dir <chroot-base-dir>   The base folder where chroot jails are located. \
             [default: \"/srv/jailer\"]\n"
        ));
        assert!(h.contains("\n  --help                                Show the help message.\n"));
        assert!(h.ends_with(
            "\n\nAny arguments after the -- separator will be supplied to the jailed binary.\n\n"
        ));
        assert_eq!(version_text(), "Jailer v1.16.1\n\n");
    }
}
