//! `firecracker-double`: stands in for Firecracker where guests cannot boot (tests only).
//!
//! Usage: `firecracker-double --api-sock PATH [--id ID] [--level L] [--log-path P] ...`; see
//! `banger_tests::double` and `tests/README.md`.

fn main() -> std::process::ExitCode {
    banger_tests::double::run(std::env::args_os().skip(1))
}
