//! The steps of a VM's create and start that run host tools on the VM's files, behind one seam
//! ([`GuestPrep`], given to the daemon like the helper and the VMM): making the VM's root as a
//! file of its own from its image ([`crate::daemon::storage`]), its work disk (`mkfs.ext4`,
//! [`crate::daemon::work_disk`]), the user's SSH key and the VM's host key (`ssh-keygen` the
//! first time, [`crate::ssh`]) and writing hostname, keys, the host key and the work disk's
//! mount into the root (e2fsprogs' `debugfs`, [`crate::daemon::personalize`]). [`HostTools`] runs the real ones;
//! tests of the lifecycle use a recording fake and need none of those tools.
//!
//! Every method blocks (copies, child processes): the daemon calls them on a blocking thread.

use std::path::Path;

use crate::daemon::personalize::{self, Personalization, PersonalizeError};
use crate::daemon::storage::{self, StorageError, StorageStrategy};
use crate::daemon::work_disk::{self, WorkDiskError};
use crate::model::StorageKind;
use crate::ssh::{self, HostKey, KeyPair, SshError};

/// Preparing a VM's files before its VMM starts.
pub trait GuestPrep: Send + Sync {
    /// Makes `dest`, the VM's root file, from the image's rootfs with `strategy`; returns how it
    /// was made.
    fn prepare_root(
        &self,
        strategy: StorageStrategy,
        image_rootfs: &Path,
        dest: &Path,
    ) -> Result<StorageKind, StorageError>;

    /// Makes `path`, a work disk of `bytes` (a new sparse ext4 file).
    fn make_work_disk(&self, path: &Path, bytes: u64) -> Result<(), WorkDiskError>;

    /// The user's banger key pair at `private_key`, generated on first use.
    fn user_key(&self, private_key: &Path) -> Result<KeyPair, SshError>;

    /// The VM's host key at `private_key`, generated (with `comment`) the first time.
    fn host_key(&self, private_key: &Path, comment: &str) -> Result<HostKey, SshError>;

    /// Writes hostname, authorized keys, the VM's SSH host key and the work disk's mount into
    /// the ext4 filesystem `root` (a file or a block device); returns the host's public key, to
    /// be pinned.
    fn personalize(&self, root: &Path, p: &Personalization<'_>) -> Result<String, PersonalizeError>;
}

/// [`GuestPrep`] with the host's tools.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostTools;

impl GuestPrep for HostTools {
    fn prepare_root(
        &self,
        strategy: StorageStrategy,
        image_rootfs: &Path,
        dest: &Path,
    ) -> Result<StorageKind, StorageError> {
        storage::prepare_root(strategy, image_rootfs, dest)
    }

    fn make_work_disk(&self, path: &Path, bytes: u64) -> Result<(), WorkDiskError> {
        work_disk::make(path, bytes)
    }

    fn user_key(&self, private_key: &Path) -> Result<KeyPair, SshError> {
        ssh::ensure_user_key(private_key)
    }

    fn host_key(&self, private_key: &Path, comment: &str) -> Result<HostKey, SshError> {
        ssh::ensure_host_key(private_key, comment)
    }

    fn personalize(&self, root: &Path, p: &Personalization<'_>) -> Result<String, PersonalizeError> {
        personalize::personalize(root, p)
    }
}

/// A recording [`GuestPrep`] for tests: roots and work disks are empty sparse files, keys fixed
/// strings. Its "filesystem" clones only when told to ([`FakePrep::set_reflink`]).
#[cfg(test)]
pub(crate) mod fake {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;
    use crate::daemon::personalize::RootForm;

    /// The user's public key the fake hands out.
    pub const USER_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeUserKeyForTests banger";
    /// The host key the fake "writes" into every root.
    pub const HOST_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyForTests root@vm";

    /// One call the fake received.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum PrepCall {
        /// [`GuestPrep::prepare_root`] with the strategy and the destination.
        PrepareRoot(StorageStrategy, PathBuf),
        /// [`GuestPrep::make_work_disk`] with the file and its size.
        WorkDisk(PathBuf, u64),
        /// [`GuestPrep::user_key`].
        UserKey,
        /// [`GuestPrep::host_key`] with the private key's file.
        HostKey(PathBuf),
        /// [`GuestPrep::personalize`] with the root and what was written.
        Personalize(PathBuf, Written),
    }

    /// What [`GuestPrep::personalize`] was asked to write, and into what.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Written {
        /// The hostname.
        pub hostname: String,
        /// The authorized keys.
        pub keys: Vec<String>,
        /// Whether a work disk's mount was written.
        pub work_disk: bool,
        /// What the root had to be.
        pub form: RootForm,
    }

    /// Which call fails.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum PrepOp {
        /// [`GuestPrep::prepare_root`].
        PrepareRoot,
        /// [`GuestPrep::make_work_disk`].
        WorkDisk,
        /// [`GuestPrep::personalize`].
        Personalize,
    }

    #[derive(Debug, Default)]
    struct State {
        calls: Vec<PrepCall>,
        failing: Option<PrepOp>,
        reflink: bool,
    }

    /// The fake.
    #[derive(Debug, Default)]
    pub struct FakePrep {
        /// Guards the record of calls, the configured failure and whether reflinks work.
        state: Mutex<State>,
    }

    impl FakePrep {
        /// Every call so far, in order.
        pub fn calls(&self) -> Vec<PrepCall> {
            self.state.lock().unwrap().calls.clone()
        }

        /// Makes `op` fail (`None`: nothing fails).
        pub fn fail(&self, op: Option<PrepOp>) {
            self.state.lock().unwrap().failing = op;
        }

        /// Whether the fake's filesystem can clone files.
        pub fn set_reflink(&self, on: bool) {
            self.state.lock().unwrap().reflink = on;
        }

        fn enter(&self, call: PrepCall, op: Option<PrepOp>) -> bool {
            let mut s = self.state.lock().unwrap();
            s.calls.push(call);
            op.is_some() && s.failing == op
        }

        fn reflink(&self) -> bool {
            self.state.lock().unwrap().reflink
        }
    }

    /// Makes an empty sparse file (`bytes` long) where the real tools would write one.
    fn sparse(path: &Path, bytes: u64) -> std::io::Result<()> {
        std::fs::OpenOptions::new().write(true).create_new(true).open(path)?.set_len(bytes)
    }

    impl GuestPrep for FakePrep {
        fn prepare_root(
            &self,
            strategy: StorageStrategy,
            image_rootfs: &Path,
            dest: &Path,
        ) -> Result<StorageKind, StorageError> {
            if self.enter(PrepCall::PrepareRoot(strategy, dest.to_owned()), Some(PrepOp::PrepareRoot)) {
                return Err(StorageError::Exists { path: dest.to_owned() });
            }
            let kind = match (strategy, self.reflink()) {
                (StorageStrategy::Reflink | StorageStrategy::CloneOrCopy, true) => StorageKind::Reflink,
                (StorageStrategy::Reflink, false) => {
                    return Err(StorageError::NoReflink {
                        dest: dest.to_owned(),
                        source: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
                    });
                }
                (StorageStrategy::CloneOrCopy | StorageStrategy::SparseCopy, _) => StorageKind::SparseCopy,
            };
            let len = std::fs::metadata(image_rootfs).map(|m| m.len()).unwrap_or(0);
            sparse(dest, len).map_err(|source| StorageError::Copy {
                src: image_rootfs.to_owned(),
                dest: dest.to_owned(),
                source,
            })?;
            Ok(kind)
        }

        fn make_work_disk(&self, path: &Path, bytes: u64) -> Result<(), WorkDiskError> {
            if self.enter(PrepCall::WorkDisk(path.to_owned(), bytes), Some(PrepOp::WorkDisk)) {
                return Err(WorkDiskError::ToolMissing);
            }
            work_disk::check_size(bytes)?;
            sparse(path, bytes).map_err(|source| WorkDiskError::Create { path: path.to_owned(), source })
        }

        fn user_key(&self, private_key: &Path) -> Result<KeyPair, SshError> {
            self.enter(PrepCall::UserKey, None);
            Ok(KeyPair { private_key: private_key.to_owned(), public_key: USER_KEY.into() })
        }

        fn host_key(&self, private_key: &Path, _comment: &str) -> Result<HostKey, SshError> {
            self.enter(PrepCall::HostKey(private_key.to_owned()), None);
            Ok(HostKey { private: b"fake private key".to_vec(), public: HOST_KEY.into() })
        }

        fn personalize(&self, root: &Path, p: &Personalization<'_>) -> Result<String, PersonalizeError> {
            let written = Written {
                hostname: p.hostname.into(),
                keys: p.authorized_keys.to_vec(),
                work_disk: p.work_disk,
                form: p.form,
            };
            if self.enter(PrepCall::Personalize(root.to_owned(), written), Some(PrepOp::Personalize)) {
                return Err(PersonalizeError::NotExt { path: root.to_owned() });
            }
            Ok(HOST_KEY.into())
        }
    }
}
