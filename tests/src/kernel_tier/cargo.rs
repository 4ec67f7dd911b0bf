//! The tier's manifest (`tests/kernel-tier.list`: which test binaries run in the tier, with which
//! filter) and building those binaries with cargo.
//!
//! A manifest line is what follows `cargo test` to run those tests, e.g.
//! `-p banger-tests --test kernel_tier -- --include-ignored in_kernel_tier::`: the words before
//! `--` select the binaries (built with `cargo test --no-run`, their paths read from cargo's
//! JSON messages), the words after it are given to each binary. `#` starts a comment.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::jobs::{Job, quote};

/// One manifest line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Arguments to `cargo test` choosing the binaries.
    pub cargo_args: Vec<String>,
    /// Arguments to each binary.
    pub test_args: Vec<String>,
}

/// A test binary built by cargo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    /// The executable.
    pub executable: PathBuf,
    /// Its package's directory (cargo runs tests there).
    pub package_dir: PathBuf,
}

/// Why the manifest's binaries could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CargoError {
    /// The manifest could not be read.
    #[error("reading the manifest {path}")]
    Read {
        /// The manifest.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line selects nothing.
    #[error(
        "{path}:{line}: expected `CARGO-TEST-ARGS -- TEST-BINARY-ARGS`, e.g. `-p banger-tests --test kernel_tier -- --include-ignored in_kernel_tier::`"
    )]
    BadLine {
        /// The manifest.
        path: PathBuf,
        /// The line number.
        line: usize,
    },
    /// cargo failed.
    #[error("`cargo {args}` failed ({status})")]
    Build {
        /// cargo's arguments.
        args: String,
        /// Its status.
        status: String,
    },
    /// cargo could not be started.
    #[error("running cargo")]
    Spawn(#[source] std::io::Error),
    /// A selection built no test binary.
    #[error("`cargo test {args}` selects no test binary")]
    NoBinary {
        /// The selection.
        args: String,
    },
}

/// Parses a manifest's text (`path` only names it in errors).
pub fn parse_manifest(text: &str, path: &Path) -> Result<Vec<Selection>, CargoError> {
    let mut selections = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        let bad = || CargoError::BadLine { path: path.to_path_buf(), line: i + 1 };
        let dashes = words.iter().position(|w| w == "--").ok_or_else(bad)?;
        if dashes == 0 {
            return Err(bad());
        }
        selections.push(Selection {
            cargo_args: words[..dashes].to_vec(),
            test_args: words[dashes + 1..].to_vec(),
        });
    }
    Ok(selections)
}

/// Reads the manifest at `path`.
pub fn read_manifest(path: &Path) -> Result<Vec<Selection>, CargoError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| CargoError::Read { path: path.into(), source })?;
    parse_manifest(&text, path)
}

/// The test binaries in cargo's JSON messages (one object per line).
pub fn test_binaries(messages: &str) -> Vec<TestBinary> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| {
            let executable = PathBuf::from(m["executable"].as_str()?);
            let package_dir = Path::new(m["manifest_path"].as_str()?).parent()?.to_path_buf();
            Some(TestBinary { executable, package_dir })
        })
        .collect()
}

/// Builds the binaries `selection` names (`cargo test --no-run`, diagnostics on stderr).
pub fn build(selection: &Selection) -> Result<Vec<TestBinary>, CargoError> {
    let mut args =
        vec!["test".to_string(), "--no-run".into(), "--message-format=json-render-diagnostics".into()];
    args.extend(selection.cargo_args.iter().cloned());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(CargoError::Spawn)?;
    if !out.status.success() {
        return Err(CargoError::Build { args: args.join(" "), status: out.status.to_string() });
    }
    let binaries = test_binaries(&String::from_utf8_lossy(&out.stdout));
    if binaries.is_empty() {
        return Err(CargoError::NoBinary { args: selection.cargo_args.join(" ") });
    }
    Ok(binaries)
}

/// The job running `binary` with `test_args` as cargo would: in its package's directory.
pub fn job(binary: &TestBinary, test_args: &[String]) -> Job {
    let dir = quote(&binary.package_dir.to_string_lossy());
    let mut words = vec![quote(&binary.executable.to_string_lossy())];
    words.extend(test_args.iter().map(|a| quote(a)));
    Job::Shell(format!("cd {dir} && CARGO_MANIFEST_DIR={dir} exec {}", words.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_lines_split_at_the_dashes() {
        let text = "# comment\n\n-p banger-tests --test kernel_tier -- --include-ignored in_kernel_tier:: # why\n\
                    -p banger-helper --lib --\n";
        let selections = parse_manifest(text, Path::new("m")).unwrap();
        assert_eq!(selections.len(), 2);
        assert_eq!(selections[0].cargo_args, ["-p", "banger-tests", "--test", "kernel_tier"]);
        assert_eq!(selections[0].test_args, ["--include-ignored", "in_kernel_tier::"]);
        assert_eq!(selections[1].cargo_args, ["-p", "banger-helper", "--lib"]);
        assert!(selections[1].test_args.is_empty());
    }

    #[test]
    fn manifest_lines_without_a_selection_are_refused() {
        for bad in ["-p banger-tests --test kernel_tier", "-- in_kernel_tier::"] {
            let err = parse_manifest(bad, Path::new("tests/kernel-tier.list")).unwrap_err();
            assert!(err.to_string().starts_with("tests/kernel-tier.list:1: expected"), "{err}");
        }
    }

    #[test]
    fn test_binaries_come_from_test_artifacts_with_an_executable() {
        let messages = r#"{"reason":"compiler-artifact","profile":{"test":false},"executable":"/t/debug/kernel-tier","manifest_path":"/w/tests/Cargo.toml"}
{"reason":"compiler-artifact","profile":{"test":true},"executable":"/t/debug/deps/kernel_tier-abc","manifest_path":"/w/tests/Cargo.toml"}
{"reason":"compiler-artifact","profile":{"test":true},"executable":null,"manifest_path":"/w/tests/Cargo.toml"}
{"reason":"build-finished","success":true}
not json"#;
        assert_eq!(
            test_binaries(messages),
            [TestBinary {
                executable: "/t/debug/deps/kernel_tier-abc".into(),
                package_dir: "/w/tests".into()
            }]
        );
    }

    #[test]
    fn a_binary_runs_in_its_package_directory() {
        let binary = TestBinary { executable: "/t/deps/kt-1".into(), package_dir: "/w/my tests".into() };
        let job = job(&binary, &["--include-ignored".into(), "in_kernel_tier::".into()]);
        assert_eq!(
            job,
            Job::Shell(
                "cd '/w/my tests' && CARGO_MANIFEST_DIR='/w/my tests' exec /t/deps/kt-1 --include-ignored in_kernel_tier::"
                    .into()
            )
        );
    }
}
