//! Cross-crate integration and end-to-end tests of banger, and the Firecracker test double.

pub mod double;
pub mod e2e;
