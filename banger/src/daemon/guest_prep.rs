//! The steps of a start that run host tools on the VM's files, behind one seam ([`GuestPrep`],
//! given to the daemon like the helper and the VMM): making the VM's writable root from its
//! image ([`crate::daemon::storage`]), the user's SSH key (`ssh-keygen`, [`crate::ssh`]) and
//! writing hostname, keys and a new host key into the root (e2fsprogs' `debugfs`, `ssh-keygen`,
//! [`crate::daemon::personalize`]). [`HostTools`] runs the real ones; tests of the lifecycle use
//! a recording fake and need none of those tools.
//!
//! Every method blocks (copies, child processes): the daemon calls them on a blocking thread.

use std::path::Path;

use crate::daemon::personalize::{self, Personalization, PersonalizeError};
use crate::daemon::storage::{self, StorageError, StorageStrategy};
use crate::model::StorageKind;
use crate::ssh::{self, KeyPair, SshError};

/// Preparing a VM's files before its VMM starts.
pub trait GuestPrep: Send + Sync {
    /// Makes `dest`, the VM's writable root, from the image's rootfs; returns how it was made.
    fn prepare_root(&self, image_rootfs: &Path, dest: &Path) -> Result<StorageKind, StorageError>;

    /// The user's banger key pair at `private_key`, generated on first use.
    fn user_key(&self, private_key: &Path) -> Result<KeyPair, SshError>;

    /// Writes hostname, authorized keys and a new SSH host key into the ext4 image `root`;
    /// returns the host's public key, to be pinned.
    fn personalize(&self, root: &Path, p: &Personalization<'_>) -> Result<String, PersonalizeError>;
}

/// [`GuestPrep`] with the host's tools.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostTools {
    /// How roots are made.
    pub strategy: StorageStrategy,
}

impl GuestPrep for HostTools {
    fn prepare_root(&self, image_rootfs: &Path, dest: &Path) -> Result<StorageKind, StorageError> {
        storage::prepare_root(self.strategy, image_rootfs, dest)
    }

    fn user_key(&self, private_key: &Path) -> Result<KeyPair, SshError> {
        ssh::ensure_user_key(private_key)
    }

    fn personalize(&self, root: &Path, p: &Personalization<'_>) -> Result<String, PersonalizeError> {
        personalize::personalize(root, p)
    }
}

/// A recording [`GuestPrep`] for tests: roots are empty files, keys fixed strings.
#[cfg(test)]
pub(crate) mod fake {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;

    /// The user's public key the fake hands out.
    pub const USER_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeUserKeyForTests banger";
    /// The host key the fake "writes" into every root.
    pub const HOST_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyForTests root@vm";

    /// One call the fake received.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum PrepCall {
        /// [`GuestPrep::prepare_root`] with the destination.
        PrepareRoot(PathBuf),
        /// [`GuestPrep::user_key`].
        UserKey,
        /// [`GuestPrep::personalize`] with the root, hostname and keys.
        Personalize(PathBuf, String, Vec<String>),
    }

    /// Which call fails.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum PrepOp {
        /// [`GuestPrep::prepare_root`].
        PrepareRoot,
        /// [`GuestPrep::personalize`].
        Personalize,
    }

    /// The fake.
    #[derive(Debug, Default)]
    pub struct FakePrep {
        /// Guards the record of calls and the configured failure.
        state: Mutex<(Vec<PrepCall>, Option<PrepOp>)>,
    }

    impl FakePrep {
        /// Every call so far, in order.
        pub fn calls(&self) -> Vec<PrepCall> {
            self.state.lock().unwrap().0.clone()
        }

        /// Makes `op` fail (`None`: nothing fails).
        pub fn fail(&self, op: Option<PrepOp>) {
            self.state.lock().unwrap().1 = op;
        }

        fn enter(&self, call: PrepCall, op: Option<PrepOp>) -> bool {
            let mut s = self.state.lock().unwrap();
            s.0.push(call);
            op.is_some() && s.1 == op
        }
    }

    impl GuestPrep for FakePrep {
        fn prepare_root(&self, _image_rootfs: &Path, dest: &Path) -> Result<StorageKind, StorageError> {
            if self.enter(PrepCall::PrepareRoot(dest.to_owned()), Some(PrepOp::PrepareRoot)) {
                return Err(StorageError::Exists { path: dest.to_owned() });
            }
            std::fs::write(dest, b"")
                .map_err(|source| StorageError::Remove { path: dest.to_owned(), source })?;
            Ok(StorageKind::SparseCopy)
        }

        fn user_key(&self, private_key: &Path) -> Result<KeyPair, SshError> {
            self.enter(PrepCall::UserKey, None);
            Ok(KeyPair { private_key: private_key.to_owned(), public_key: USER_KEY.into() })
        }

        fn personalize(&self, root: &Path, p: &Personalization<'_>) -> Result<String, PersonalizeError> {
            let call = PrepCall::Personalize(root.to_owned(), p.hostname.into(), p.authorized_keys.to_vec());
            if self.enter(call, Some(PrepOp::Personalize)) {
                return Err(PersonalizeError::NotExt { path: root.to_owned() });
            }
            Ok(HOST_KEY.into())
        }
    }
}
