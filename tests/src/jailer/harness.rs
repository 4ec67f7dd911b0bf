//! Helpers for tests that run the jailer double.
