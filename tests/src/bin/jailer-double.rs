//! `jailer-double`: stands in for Firecracker's jailer 1.16.1 where it is not installed (tests
//! only). Same arguments, jail, cgroups, messages and exit status; see `banger_tests::jailer` and
//! tests/README.md.

fn main() -> std::process::ExitCode {
    banger_tests::jailer::main()
}
