//! For tests that need the kernel tier (device-mapper above all): whether they run inside it.
//!
//! Such a test lives in a module named `in_kernel_tier` (so `--skip in_kernel_tier::` keeps it
//! out of the host's run and the tier's manifest selects it), is marked
//! `#[ignore = "needs device-mapper: runs in the kernel tier"]`, and starts with
//! `if !inside_or_skip() { return; }`.

use super::MARKER_ENV;

/// True inside the tier's guest (`BANGER_KERNEL_TIER=1`).
pub fn inside() -> bool {
    std::env::var(MARKER_ENV).is_ok_and(|v| v == "1")
}

/// True inside the tier. Outside it, fails under `CI=true` (the test would otherwise pass without
/// having run) and otherwise says that the test is skipped and why.
pub fn inside_or_skip() -> bool {
    decide(inside(), super::under_ci())
}

fn decide(inside: bool, ci: bool) -> bool {
    if inside {
        return true;
    }
    let why = "needs device-mapper and a real kernel: runs in the kernel tier \
               (tests/run, or `cargo run -p banger-tests --bin kernel-tier -- suite`)";
    assert!(!ci, "{why}, and CI=true: not run outside the tier");
    eprintln!("SKIPPED: {why}");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_inside_skips_outside_and_fails_outside_under_ci() {
        assert!(decide(true, true));
        assert!(decide(true, false));
        assert!(!decide(false, false));
        let under_ci = std::panic::catch_unwind(|| decide(false, true));
        assert!(under_ci.is_err());
    }
}
