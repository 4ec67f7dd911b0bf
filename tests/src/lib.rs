//! Cross-crate integration and end-to-end tests of banger, the Firecracker and jailer test
//! doubles, and the kernel tier (test binaries run in a real kernel under qemu).

pub mod bench;
pub mod double;
pub mod e2e;
pub mod jailer;
pub mod kernel_tier;
