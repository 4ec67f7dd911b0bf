//! The tier's manifest (`tests/kernel-tier.list`: which test binaries run in the tier, with which
//! filter) and building those binaries with cargo.
//!
//! A manifest line is what follows `cargo test` to run those tests, e.g.
//! `-p banger-tests --test kernel_tier -- --include-ignored in_kernel_tier::`: the words before
//! `--` select the binaries, the words after it are given to each binary. `#` starts a comment.
//!
//! The binaries are built with `cargo test --no-run --workspace` and the line's target options
//! (`--lib`, `--test NAME`, ...), then only the named packages' binaries are kept (their paths
//! read from cargo's JSON messages). Building for the whole workspace resolves features as the
//! main run does (`cargo test --workspace`), so its binaries are reused: `cargo test -p X` alone
//! would resolve them for X and rebuild X and its dependencies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::jobs::{Job, quote};

/// One manifest line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The packages (`-p`, `--package`); none means every package of the workspace.
    pub packages: Vec<String>,
    /// The other arguments to `cargo test` (target options such as `--lib`, `--test NAME`).
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
    /// A selection names a package the workspace does not have.
    #[error("package {0} is not in the workspace (cargo metadata)")]
    UnknownPackage(String),
    /// `cargo metadata`'s answer could not be read.
    #[error("reading `cargo metadata`'s answer")]
    Metadata(#[source] serde_json::Error),
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
        let (packages, cargo_args) = split_packages(&words[..dashes]).ok_or_else(bad)?;
        selections.push(Selection { packages, cargo_args, test_args: words[dashes + 1..].to_vec() });
    }
    Ok(selections)
}

/// Separates `-p NAME`, `-pNAME`, `--package NAME` and `--package=NAME` from the other
/// arguments; `None` when a `-p` lacks its name.
fn split_packages(args: &[String]) -> Option<(Vec<String>, Vec<String>)> {
    let (mut packages, mut rest) = (Vec::new(), Vec::new());
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "-p" || word == "--package" {
            packages.push(words.next()?.clone());
        } else if let Some(name) = word.strip_prefix("--package=").or_else(|| word.strip_prefix("-p")) {
            packages.push(name.to_string());
        } else {
            rest.push(word.clone());
        }
    }
    Some((packages, rest))
}

/// Reads the manifest at `path`.
pub fn read_manifest(path: &Path) -> Result<Vec<Selection>, CargoError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| CargoError::Read { path: path.into(), source })?;
    parse_manifest(&text, path)
}

/// The workspace's packages and their manifests, from `cargo metadata --no-deps`'s JSON.
pub fn parse_metadata(json: &str) -> Result<BTreeMap<String, PathBuf>, CargoError> {
    let metadata: serde_json::Value = serde_json::from_str(json).map_err(CargoError::Metadata)?;
    let packages = metadata["packages"].as_array().map(Vec::as_slice).unwrap_or_default();
    Ok(packages
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?.to_string(), PathBuf::from(p["manifest_path"].as_str()?))))
        .collect())
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

fn cargo(args: &[String]) -> Result<String, CargoError> {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(CargoError::Spawn)?;
    if !out.status.success() {
        return Err(CargoError::Build { args: args.join(" "), status: out.status.to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace's packages and their manifests.
pub fn workspace_packages() -> Result<BTreeMap<String, PathBuf>, CargoError> {
    let args = ["metadata", "--no-deps", "--format-version", "1"].map(String::from);
    parse_metadata(&cargo(&args)?)
}

/// Builds the binaries `selection` names (`cargo test --no-run --workspace`, diagnostics on
/// stderr) and returns those of its packages; `packages` are the workspace's.
pub fn build(
    selection: &Selection,
    packages: &BTreeMap<String, PathBuf>,
) -> Result<Vec<TestBinary>, CargoError> {
    let mut dirs = Vec::new();
    for name in &selection.packages {
        let manifest = packages.get(name).ok_or_else(|| CargoError::UnknownPackage(name.clone()))?;
        dirs.push(manifest.parent().unwrap_or(manifest).to_path_buf());
    }
    let mut args = ["test", "--no-run", "--workspace", "--message-format=json-render-diagnostics"]
        .map(String::from)
        .to_vec();
    args.extend(selection.cargo_args.iter().cloned());
    let binaries: Vec<TestBinary> = test_binaries(&cargo(&args)?)
        .into_iter()
        .filter(|b| dirs.is_empty() || dirs.contains(&b.package_dir))
        .collect();
    if binaries.is_empty() {
        let mut words: Vec<String> = selection.packages.iter().map(|p| format!("-p {p}")).collect();
        words.extend(selection.cargo_args.iter().cloned());
        return Err(CargoError::NoBinary { args: words.join(" ") });
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
        assert_eq!(selections[0].packages, ["banger-tests"]);
        assert_eq!(selections[0].cargo_args, ["--test", "kernel_tier"]);
        assert_eq!(selections[0].test_args, ["--include-ignored", "in_kernel_tier::"]);
        assert_eq!(selections[1].packages, ["banger-helper"]);
        assert_eq!(selections[1].cargo_args, ["--lib"]);
        assert!(selections[1].test_args.is_empty());
    }

    #[test]
    fn every_spelling_of_a_package_is_taken_out_of_the_cargo_arguments() {
        let words: Vec<String> =
            ["-p", "a", "-pb", "--package", "c", "--package=d", "--test", "t"].map(String::from).to_vec();
        let (packages, rest) = split_packages(&words).unwrap();
        assert_eq!(packages, ["a", "b", "c", "d"]);
        assert_eq!(rest, ["--test", "t"]);
        assert!(split_packages(&["--lib".to_string(), "-p".to_string()]).is_none());
    }

    #[test]
    fn metadata_maps_packages_to_manifests() {
        let json = r#"{"packages":[{"name":"banger-tests","manifest_path":"/w/tests/Cargo.toml"},
            {"name":"banger-helper","manifest_path":"/w/banger-helper/Cargo.toml"}],"workspace_root":"/w"}"#;
        let packages = parse_metadata(json).unwrap();
        assert_eq!(packages["banger-tests"], Path::new("/w/tests/Cargo.toml"));
        assert_eq!(packages.len(), 2);
        assert!(parse_metadata("not json").is_err());
    }

    #[test]
    fn manifest_lines_without_a_selection_are_refused() {
        for bad in ["-p banger-tests --test kernel_tier", "-- in_kernel_tier::", "--lib -p -- x"] {
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
