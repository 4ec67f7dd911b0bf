//! The end-to-end harness: a whole banger installation made for one test and torn down after it.
//!
//! A [`World`] is built per test (tests run in parallel, so every name carries a suffix unique to
//! the test, see [`names`]) and holds:
//!
//! 1. a group allowed by the helper's policy and three system users: A and B in that group, C not
//!    ([`users`]), each with a private `BANGER_HOME`;
//! 2. a "host" network namespace with a veth to an "outside" namespace that serves HTTP on
//!    198.51.100.1, a default route through it (so the helper's `auto` uplink is the veth) and a
//!    service on every host address that guests must not reach ([`netns`]);
//! 3. the binaries of the workspace linked or copied where the test users can execute them, a
//!    test kernel and an ext4 root filesystem ([`fixtures`]);
//! 4. the real `banger-helper` running as root in the host namespace with a test policy
//!    ([`helper`]), which tests can also talk to directly as any user, from a forked child;
//! 5. a way to run `banger` as a test user inside the host namespace with a private
//!    `/dev/net/tun` node of mode 0666, so the machine's own node is never changed ([`cli`]);
//! 6. a leak check scoped to the test's own objects ([`leaks`]);
//! 7. in a [`World::jailed`] one, the policy's `[jailer]`: the jailer double and the static
//!    Firecracker double as its binaries, a chroot base, jail uids and a cgroup parent of the
//!    world's own ([`jails`]).
//!
//! Dropping the world (also while a test panics) prints diagnostics if the test failed, then kills
//! every process of the test, stops the helper, deletes the namespaces, users, group and files.

pub mod cli;
pub mod fixtures;
pub mod helper;
pub mod jails;
pub mod leaks;
pub mod names;
pub mod netns;
pub mod proc;
pub mod run;
pub mod users;
pub mod world;

pub use cli::{Cli, VmView};
pub use run::Output;
pub use users::Who;
pub use world::World;
