//! Images: a kernel and a root filesystem a VM boots from, imported into the user's state.
//!
//! `banger image import NAME --kernel FILE --rootfs FILE [--initrd FILE]` ([`import`]):
//! 1. the name must be a DNS label (it names a directory) and not taken;
//! 2. the kernel must be an uncompressed kernel Firecracker can boot (an ELF `vmlinux` for this
//!    machine's architecture on x86_64; the arm64 `Image` format on aarch64); a compressed
//!    `bzImage` gets a message saying how to extract the `vmlinux`;
//! 3. the rootfs must be a regular file holding an ext2/3/4 filesystem, since every VM's copy is
//!    personalized with debugfs ([`crate::daemon::personalize`]);
//! 4. an initrd, when given, must be a regular file; Firecracker hands it to the kernel at boot;
//! 5. the files are copied (reflink where possible, sparse otherwise, see [`crate::daemon::storage`]) into a
//!    private staging directory inside `images/`, read-only (0444), and hashed (SHA-256) as
//!    stored; each file's identity ([`FileIdentity`]: device, inode, size, mtime, ctime) is
//!    recorded with its hash;
//! 6. the row is inserted into the store (the unique name is the guard against two imports of
//!    one name), then the staging directory is renamed to `images/<name>/` (holding `vmlinux`,
//!    `rootfs.ext4` and, with an initrd, `initrd.img`). If the rename fails the row is deleted again; any earlier failure
//!    removes the staging directory, so nothing is left behind.
//!
//! The copy and the hashing take the longest and do not need the store: the daemon can run
//! [`stage`] without holding the store's lock and [`StagedImage::commit`] with it.
//!
//! [`remove`] deletes the row first (the store refuses while a VM uses the image, naming those
//! VMs) and the files after; a directory left by a crash between the two is replaced by the next
//! import of that name.
//!
//! An imported image never changes: a dm-snapshot reads its origin at every start, and an origin
//! that changes under it corrupts every VM built on it. Before a VM uses an image, [`verify`]
//! checks each of its files: an identity equal to the recorded one is trusted without reading the file
//! (a write, a chmod or a replacement always changes it, and nobody but root can set a ctime); a
//! changed (or never recorded) identity makes the file read-only again and hashes it: the same
//! digest means the file is intact and its new identity is to be recorded, another digest
//! refuses the start, naming the image and what to do.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::daemon::file_identity::FileIdentity;
use crate::daemon::storage::{self, StorageError, StorageStrategy};
use crate::daemon::store::{ImageInitrd, ImageRecord, Store, StoreError, unix_now};
use crate::ids::validate_name;
use crate::paths::Paths;

/// The kernel's file name inside an image's directory.
pub const KERNEL_FILE: &str = "vmlinux";
/// The rootfs's file name inside an image's directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// The initrd's file name inside an image's directory.
pub const INITRD_FILE: &str = "initrd.img";
/// The mode of an image's files: read-only for everyone, the owner included.
pub const IMAGE_FILE_MODE: u32 = 0o444;
/// How to import an image, for error messages.
pub const IMPORT_HINT: &str = "import one with `banger image import NAME --kernel FILE --rootfs FILE`";

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The name is not a DNS label.
    #[error(
        "invalid image name {0:?}: use 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'"
    )]
    InvalidName(String),
    /// The name is taken.
    #[error("image {0:?} already exists: remove it first with `banger image rm {0}`, or choose another name")]
    Exists(String),
    /// No image has this name.
    #[error("unknown image {name:?}: {}; {IMPORT_HINT}", available_text(.available))]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names that exist.
        available: Vec<String>,
    },
    /// No image was named and none is configured.
    #[error(
        "no image given: pass --image NAME or set default_image in config.toml ({})",
        available_text(.available)
    )]
    NoneChosen {
        /// The names that exist.
        available: Vec<String>,
    },
    /// The kernel file is unusable.
    #[error("kernel {path} {problem}")]
    Kernel {
        /// The file given.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The initrd file is unusable.
    #[error("initrd {path} is not a regular file")]
    Initrd {
        /// The file given.
        path: PathBuf,
    },
    /// The rootfs file is unusable.
    #[error("rootfs {path} {problem}")]
    Rootfs {
        /// The file given.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be copied into the image store.
    #[error("cannot copy into the image store")]
    Copy(#[source] StorageError),
    /// The staging or image directory could not be made, moved or removed.
    #[error("cannot {action} {path}")]
    Dir {
        /// What was being done.
        action: &'static str,
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An image file's content is not what was imported.
    #[error(
        "image {image:?} has changed since it was imported: {path} has sha256 {found}, not {expected}. \
         An imported image must never change (the disks of its vms are built on it): put the original \
         file back, or delete the vms that use it, then the image (`banger image rm {image}`), and \
         import it again"
    )]
    Changed {
        /// The image.
        image: String,
        /// The file.
        path: PathBuf,
        /// The digest recorded at import.
        expected: String,
        /// The digest now.
        found: String,
    },
    /// An image file changed while it was being hashed.
    #[error(
        "image {image:?} is being changed: {path} changed while its hash was checked; stop whatever writes to it and try again"
    )]
    Changing {
        /// The image.
        image: String,
        /// The file.
        path: PathBuf,
    },
    /// An image file could not be made read-only again.
    #[error("cannot make {path} read-only")]
    Protect {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The store refused or failed (an image in use says which VMs use it).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How an [`ImageError`] is best reported (e.g. as an HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageErrorKind {
    /// The image does not exist.
    NotFound,
    /// The name is taken, or the image is in use.
    Conflict,
    /// The request is wrong (name, files).
    Invalid,
    /// Something failed on the host.
    Failed,
}

impl ImageError {
    /// How this error is best reported.
    pub fn kind(&self) -> ImageErrorKind {
        match self {
            ImageError::Unknown { .. } | ImageError::Store(StoreError::ImageNotFound { .. }) => {
                ImageErrorKind::NotFound
            }
            ImageError::Exists(_)
            | ImageError::Changed { .. }
            | ImageError::Changing { .. }
            | ImageError::Store(StoreError::DuplicateImage { .. } | StoreError::ImageInUse { .. }) => {
                ImageErrorKind::Conflict
            }
            ImageError::InvalidName(_)
            | ImageError::NoneChosen { .. }
            | ImageError::Kernel { .. }
            | ImageError::Initrd { .. }
            | ImageError::Rootfs { .. }
            | ImageError::Read { .. } => ImageErrorKind::Invalid,
            ImageError::Copy(_)
            | ImageError::Dir { .. }
            | ImageError::Protect { .. }
            | ImageError::Store(_) => ImageErrorKind::Failed,
        }
    }
}

fn available_text(available: &[String]) -> String {
    if available.is_empty() {
        "no images are imported yet".to_owned()
    } else {
        format!("available images: {}", available.join(", "))
    }
}

/// The first bytes of a kernel file, enough for the checks below.
const KERNEL_HEADER: usize = 0x210;

/// Checks that `path` is a kernel Firecracker boots on this architecture.
pub(crate) fn check_kernel(path: &Path) -> Result<(), ImageError> {
    let problem = |p: &str| ImageError::Kernel { path: path.to_owned(), problem: p.to_owned() };
    let mut file = File::open(path).map_err(|source| ImageError::Read { path: path.to_owned(), source })?;
    if !file.metadata().map_err(|source| ImageError::Read { path: path.to_owned(), source })?.is_file() {
        return Err(problem("is not a regular file"));
    }
    let mut head = Vec::with_capacity(KERNEL_HEADER);
    (&mut file)
        .take(KERNEL_HEADER as u64)
        .read_to_end(&mut head)
        .map_err(|source| ImageError::Read { path: path.to_owned(), source })?;
    if head.get(0x202..0x206) == Some(b"HdrS") {
        return Err(problem(
            "is a compressed bzImage: Firecracker boots an uncompressed vmlinux (extract it with the kernel's scripts/extract-vmlinux)",
        ));
    }
    kernel_format_ok(&head).map_err(|p| problem(&p))
}

#[cfg(target_arch = "x86_64")]
fn kernel_format_ok(head: &[u8]) -> Result<(), String> {
    const EM_X86_64: u16 = 62;
    if !head.starts_with(b"\x7fELF") {
        return Err("is not an uncompressed kernel (an ELF vmlinux)".into());
    }
    // 64-bit, little-endian, e_machine at offset 18.
    let machine = head.get(18..20).map(|m| u16::from_le_bytes([m[0], m[1]]));
    if head.get(4) != Some(&2) || head.get(5) != Some(&1) || machine != Some(EM_X86_64) {
        return Err("is an ELF file but not a 64-bit x86_64 kernel".into());
    }
    Ok(())
}

#[cfg(target_arch = "aarch64")]
fn kernel_format_ok(head: &[u8]) -> Result<(), String> {
    // The arm64 Image header carries "ARM\x64" at offset 56.
    if head.get(56..60) == Some(b"ARM\x64") { Ok(()) } else { Err("is not an arm64 kernel Image".into()) }
}

/// Checks that `path` is a regular file holding an ext2/3/4 filesystem.
fn check_rootfs(path: &Path) -> Result<(), ImageError> {
    let read = |source| ImageError::Read { path: path.to_owned(), source };
    if !fs::metadata(path).map_err(read)?.is_file() {
        return Err(ImageError::Rootfs { path: path.to_owned(), problem: "is not a regular file".into() });
    }
    if !crate::daemon::personalize::is_ext_filesystem(path).map_err(read)? {
        return Err(ImageError::Rootfs {
            path: path.to_owned(),
            problem: "is not an ext2/3/4 filesystem image: banger writes each VM's hostname and keys into it with debugfs (build it with mkfs.ext4)".into(),
        });
    }
    Ok(())
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    sha256_file_reporting(path, &mut |_| {})
}

/// SHA-256 of a file, lowercase hex, telling `progress` the bytes read so far.
fn sha256_file_reporting(path: &Path, progress: &mut dyn FnMut(u64)) -> Result<String, ImageError> {
    let read = |source| ImageError::Read { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(read)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(read)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// An image copied and hashed in a staging directory, not yet in the store. Dropping it
/// removes the staging directory.
#[derive(Debug)]
pub struct StagedImage {
    name: String,
    staging: tempfile::TempDir,
    kernel_sha256: String,
    rootfs_sha256: String,
    kernel_identity: FileIdentity,
    rootfs_identity: FileIdentity,
    /// The initrd's hash and identity, if the image has one.
    initrd: Option<(String, FileIdentity)>,
    size_bytes: u64,
}

/// The files an image is made of, as given to an import.
#[derive(Debug, Clone, Copy)]
pub struct ImageFiles<'a> {
    /// The uncompressed kernel.
    pub kernel: &'a Path,
    /// The ext4 root filesystem.
    pub rootfs: &'a Path,
    /// An initrd, if the kernel needs one.
    pub initrd: Option<&'a Path>,
}

/// One file of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFile {
    /// The kernel.
    Kernel,
    /// The root filesystem.
    Rootfs,
    /// The initrd.
    Initrd,
}

impl std::fmt::Display for ImageFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFile::Kernel => "kernel",
            ImageFile::Rootfs => "root filesystem",
            ImageFile::Initrd => "initrd",
        })
    }
}

/// A step of an import ([`stage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportStep {
    /// The file is checked (kernel format, ext filesystem, regular file).
    Check(ImageFile),
    /// The file, of this many bytes, is copied into the staging directory.
    Copy(ImageFile, u64),
    /// The stored copy, of this many bytes, is hashed.
    Hash(ImageFile, u64),
}

impl std::fmt::Display for ImportStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = |bytes: u64| crate::size::format_size(bytes);
        match self {
            ImportStep::Check(file) => write!(f, "checking the {file}"),
            ImportStep::Copy(file, bytes) => write!(f, "copying the {file} ({})", size(*bytes)),
            ImportStep::Hash(file, bytes) => write!(f, "hashing the {file} ({})", size(*bytes)),
        }
    }
}

/// What an import tells as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportProgress {
    /// A step begins.
    Step(ImportStep),
    /// The current copy or hash is `done` bytes through the file's `total`; told at most every
    /// [`BYTES_EVERY`] bytes, and at the end.
    Bytes {
        /// Bytes done.
        done: u64,
        /// The file's size.
        total: u64,
    },
}

/// How many bytes a copy or hash goes between two [`ImportProgress::Bytes`].
pub const BYTES_EVERY: u64 = 64 << 20;

/// Tells `progress` of bytes done, at most every [`BYTES_EVERY`] and once at `total`.
fn bytes_told(progress: &mut dyn FnMut(ImportProgress), total: u64) -> impl FnMut(u64) + '_ {
    let mut told: Option<u64> = None;
    move |done| {
        let due = match told {
            None => true,
            Some(last) => done >= last.saturating_add(BYTES_EVERY) || (done >= total && last < total),
        };
        if due {
            told = Some(done);
            progress(ImportProgress::Bytes { done, total });
        }
    }
}

/// Checks the name and the files and copies them into a staging directory under the images
/// directory (steps 1 to 5 of the module docs, except the "not taken" check), telling
/// `progress` each step (check, then copy and hash, of the kernel, the root filesystem and the
/// initrd in that order) and the bytes done.
pub fn stage(
    paths: &Paths,
    name: &str,
    files: ImageFiles<'_>,
    progress: &mut dyn FnMut(ImportProgress),
) -> Result<StagedImage, ImageError> {
    let ImageFiles { kernel, rootfs, initrd } = files;
    validate_name(name).map_err(|_| ImageError::InvalidName(name.to_owned()))?;
    progress(ImportProgress::Step(ImportStep::Check(ImageFile::Kernel)));
    check_kernel(kernel)?;
    progress(ImportProgress::Step(ImportStep::Check(ImageFile::Rootfs)));
    check_rootfs(rootfs)?;
    if let Some(initrd) = initrd {
        progress(ImportProgress::Step(ImportStep::Check(ImageFile::Initrd)));
        let meta =
            fs::metadata(initrd).map_err(|source| ImageError::Read { path: initrd.to_owned(), source })?;
        if !meta.is_file() {
            return Err(ImageError::Initrd { path: initrd.to_owned() });
        }
    }
    let images = paths.images_dir();
    let staging = tempfile::Builder::new().prefix(".import-").tempdir_in(&images).map_err(|source| {
        ImageError::Dir { action: "create a staging directory in", path: images.clone(), source }
    })?;
    let mut size_bytes = 0;
    let mut stored = Vec::new();
    let mut sources =
        vec![(kernel, KERNEL_FILE, ImageFile::Kernel), (rootfs, ROOTFS_FILE, ImageFile::Rootfs)];
    sources.extend(initrd.map(|i| (i, INITRD_FILE, ImageFile::Initrd)));
    for (src, file, what) in sources {
        let dest = staging.path().join(file);
        let total =
            fs::metadata(src).map_err(|source| ImageError::Read { path: src.to_owned(), source })?.len();
        progress(ImportProgress::Step(ImportStep::Copy(what, total)));
        storage::copy_file(
            StorageStrategy::CloneOrCopy,
            src,
            &dest,
            IMAGE_FILE_MODE,
            &mut bytes_told(progress, total),
        )
        .map_err(ImageError::Copy)?;
        let total =
            fs::metadata(&dest).map_err(|source| ImageError::Read { path: dest.clone(), source })?.len();
        progress(ImportProgress::Step(ImportStep::Hash(what, total)));
        let sha256 = sha256_file_reporting(&dest, &mut bytes_told(progress, total))?;
        // Read after everything that touches the file (the copy's rename moves its ctime); the
        // staging directory's rename at commit does not change it.
        let identity =
            FileIdentity::read(&dest).map_err(|source| ImageError::Read { path: dest.clone(), source })?;
        size_bytes += identity.size;
        stored.push((sha256, identity));
    }
    let initrd = if initrd.is_some() { stored.pop() } else { None };
    let (rootfs_sha256, rootfs_identity) = stored.pop().expect("two files were stored");
    let (kernel_sha256, kernel_identity) = stored.pop().expect("two files were stored");
    Ok(StagedImage {
        name: name.to_owned(),
        staging,
        kernel_sha256,
        rootfs_sha256,
        kernel_identity,
        rootfs_identity,
        initrd,
        size_bytes,
    })
}

impl StagedImage {
    /// The image's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Records the image in the store and moves its files into place (step 5 of the module
    /// docs).
    pub fn commit(self, store: &Store, paths: &Paths) -> Result<ImageRecord, ImageError> {
        let dir = paths.images_dir().join(&self.name);
        let record = ImageRecord {
            name: self.name.clone(),
            kernel_path: dir.join(KERNEL_FILE),
            rootfs_path: dir.join(ROOTFS_FILE),
            kernel_sha256: self.kernel_sha256.clone(),
            rootfs_sha256: self.rootfs_sha256.clone(),
            size_bytes: self.size_bytes,
            created_at: unix_now(),
            kernel_identity: Some(self.kernel_identity),
            rootfs_identity: Some(self.rootfs_identity),
            initrd: self.initrd.clone().map(|(sha256, identity)| ImageInitrd {
                path: dir.join(INITRD_FILE),
                sha256,
                identity: Some(identity),
            }),
        };
        store.insert_image(&record).map_err(|e| match e {
            StoreError::DuplicateImage { name } => ImageError::Exists(name),
            e => ImageError::Store(e),
        })?;
        if let Err(e) = self.move_into_place(&dir) {
            if let Err(undo) = store.delete_image(&record.name) {
                tracing::warn!(image = %record.name, error = %undo, "cannot forget the image after a failed import");
            }
            return Err(e);
        }
        Ok(record)
    }

    fn move_into_place(self, dir: &Path) -> Result<(), ImageError> {
        // A directory left by a crash (its row is gone, and the row just inserted is this one).
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(ImageError::Dir {
                    action: "replace the leftover directory",
                    path: dir.to_owned(),
                    source: e,
                });
            }
            _ => {}
        }
        let staged = self.staging.path().to_owned();
        fs::rename(&staged, dir).map_err(|source| ImageError::Dir {
            action: "move the image to",
            path: dir.to_owned(),
            source,
        })?;
        let _ = self.staging.keep();
        let parent = dir.parent().unwrap_or(Path::new("/"));
        File::open(parent).and_then(|d| d.sync_all()).map_err(|source| ImageError::Dir {
            action: "sync",
            path: parent.to_owned(),
            source,
        })
    }
}

/// How one file of an image was found before a VM used it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCheck {
    /// Its identity is the recorded one: trusted without reading it.
    Unchanged,
    /// Its identity changed (or was never recorded): it was hashed again, its digest is the
    /// imported one, and this is its identity now, to be recorded.
    Rehashed(FileIdentity),
}

/// How the files of an image were found ([`verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    /// The kernel.
    pub kernel: FileCheck,
    /// The root filesystem.
    pub rootfs: FileCheck,
    /// The initrd, if the image has one.
    pub initrd: Option<FileCheck>,
}

impl Verification {
    /// Puts the identities of files hashed again into `image`; returns whether any changed (and
    /// so should be recorded in the store).
    pub fn apply(&self, image: &mut ImageRecord) -> bool {
        let mut changed = false;
        for (check, identity) in
            [(self.kernel, &mut image.kernel_identity), (self.rootfs, &mut image.rootfs_identity)]
        {
            if let FileCheck::Rehashed(now) = check {
                *identity = Some(now);
                changed = true;
            }
        }
        if let (Some(FileCheck::Rehashed(now)), Some(initrd)) = (self.initrd, image.initrd.as_mut()) {
            initrd.identity = Some(now);
            changed = true;
        }
        changed
    }
}

/// Checks that the files of `image` are as imported (see the module docs). Blocks while a file
/// is hashed.
pub fn verify(image: &ImageRecord) -> Result<Verification, ImageError> {
    Ok(Verification {
        kernel: check_file(
            &image.name,
            &image.kernel_path,
            image.kernel_identity.as_ref(),
            &image.kernel_sha256,
        )?,
        rootfs: check_file(
            &image.name,
            &image.rootfs_path,
            image.rootfs_identity.as_ref(),
            &image.rootfs_sha256,
        )?,
        initrd: match &image.initrd {
            None => None,
            Some(i) => Some(check_file(&image.name, &i.path, i.identity.as_ref(), &i.sha256)?),
        },
    })
}

fn check_file(
    image: &str,
    path: &Path,
    recorded: Option<&FileIdentity>,
    sha256: &str,
) -> Result<FileCheck, ImageError> {
    let read = |source| ImageError::Read { path: path.to_owned(), source };
    let meta = fs::metadata(path).map_err(read)?;
    if recorded == Some(&FileIdentity::of(&meta)) {
        return Ok(FileCheck::Unchanged);
    }
    // Read-only again first (a chmod may be what moved the identity), so that the identity
    // recorded below is the one of a read-only file.
    if meta.permissions().mode() & 0o7777 != IMAGE_FILE_MODE {
        fs::set_permissions(path, fs::Permissions::from_mode(IMAGE_FILE_MODE))
            .map_err(|source| ImageError::Protect { path: path.to_owned(), source })?;
    }
    let before = FileIdentity::read(path).map_err(read)?;
    let found = sha256_file(path)?;
    let after = FileIdentity::read(path).map_err(read)?;
    if before != after {
        return Err(ImageError::Changing { image: image.to_owned(), path: path.to_owned() });
    }
    if found != sha256 {
        return Err(ImageError::Changed {
            image: image.to_owned(),
            path: path.to_owned(),
            expected: sha256.to_owned(),
            found,
        });
    }
    tracing::info!(image, path = %path.display(), "an image file's identity changed but its content did not; recording its new identity");
    Ok(FileCheck::Rehashed(after))
}

/// Removes what imports left when the daemon stopped in the middle of them: the staging
/// directories (`.import-*`) in the images directory. Run at start-up, under the daemon's lock,
/// when no import can be running. Returns what it removed; what it could not remove is logged.
pub fn sweep_staging(paths: &Paths) -> Vec<PathBuf> {
    let images = paths.images_dir();
    let Ok(entries) = fs::read_dir(&images) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let staging = entry.file_name().to_string_lossy().starts_with(".import-");
        if !staging || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        // Stored files are read-only, and so may the directory be: open it up first.
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o700));
        match fs::remove_dir_all(&path) {
            Ok(()) => removed.push(path),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an interrupted import's files")
            }
        }
    }
    removed
}
/// Imports an image: [`stage`] then [`StagedImage::commit`], refusing a taken name before
/// copying anything.
pub fn import(
    store: &Store,
    paths: &Paths,
    name: &str,
    files: ImageFiles<'_>,
) -> Result<ImageRecord, ImageError> {
    validate_name(name).map_err(|_| ImageError::InvalidName(name.to_owned()))?;
    if store.get_image(name)?.is_some() {
        return Err(ImageError::Exists(name.to_owned()));
    }
    stage(paths, name, files, &mut |_| {})?.commit(store, paths)
}

/// Every image, ordered by name.
pub fn list(store: &Store) -> Result<Vec<ImageRecord>, ImageError> {
    Ok(store.list_images()?)
}

fn unknown(store: &Store, name: &str) -> ImageError {
    let available = store.list_images().map(|v| v.into_iter().map(|i| i.name).collect()).unwrap_or_default();
    ImageError::Unknown { name: name.to_owned(), available }
}

/// The image named `name`; an unknown name is an error listing the available ones.
pub fn get(store: &Store, name: &str) -> Result<ImageRecord, ImageError> {
    store.get_image(name)?.ok_or_else(|| unknown(store, name))
}

/// The image a new VM uses: the one asked for, else the configured default, else the only
/// image there is.
pub fn select(
    store: &Store,
    requested: Option<&str>,
    default: Option<&str>,
) -> Result<ImageRecord, ImageError> {
    if let Some(name) = requested.or(default) {
        return get(store, name);
    }
    let mut all = store.list_images()?;
    if all.len() == 1 {
        return Ok(all.remove(0));
    }
    Err(ImageError::NoneChosen { available: all.into_iter().map(|i| i.name).collect() })
}

/// Removes an image: its row (refused while a VM uses it), then its directory.
pub fn remove(store: &Store, paths: &Paths, name: &str) -> Result<(), ImageError> {
    store.delete_image(name).map_err(|e| match e {
        StoreError::ImageNotFound { .. } => unknown(store, name),
        e => ImageError::Store(e),
    })?;
    let dir = paths.images_dir().join(name);
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(ImageError::Dir { action: "remove the files of the removed image in", path: dir, source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    use super::*;
    use crate::model::VmRuntime;

    fn files<'a>(kernel: &'a Path, rootfs: &'a Path) -> ImageFiles<'a> {
        ImageFiles { kernel, rootfs, initrd: None }
    }

    struct Env {
        _tmp: tempfile::TempDir,
        paths: Paths,
        store: Store,
        kernel: PathBuf,
        rootfs: PathBuf,
    }

    /// A minimal ELF header for this machine's architecture, padded.
    fn fake_kernel() -> Vec<u8> {
        let mut k = vec![0u8; 4096];
        k[..4].copy_from_slice(b"\x7fELF");
        k[4] = 2; // 64-bit
        k[5] = 1; // little-endian
        k[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        k[4000..4010].copy_from_slice(b"kernelbody");
        k
    }

    fn env() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::under(&tmp.path().join("home"), nix::unistd::getuid().as_raw()).unwrap();
        paths.ensure_dirs().unwrap();
        let store = Store::open(&paths.db()).unwrap();
        let kernel = tmp.path().join("vmlinux");
        fs::write(&kernel, fake_kernel()).unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(tree.join("etc/hostname"), "image\n").unwrap();
        let rootfs = tmp.path().join("rootfs.ext4");
        let out = Command::new(crate::daemon::personalize::find_tool("mkfs.ext4").unwrap())
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&rootfs)
            .arg("16M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Env { _tmp: tmp, paths, store, kernel, rootfs }
    }

    fn vm_using(e: &Env, name: &str, image: &str) -> VmRuntime {
        let id = crate::ids::new_vm_id();
        VmRuntime::new_created(&e.paths, id, name, image, 1, 128, 0)
    }

    /// Entries of the images directory.
    fn image_dir_entries(e: &Env) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(e.paths.images_dir())
            .unwrap()
            .map(|d| d.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_interrupted_import_s_staging_is_swept_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::under(tmp.path(), nix::unistd::getuid().as_raw()).unwrap();
        paths.ensure_dirs().unwrap();
        let images = paths.images_dir();
        let staging = images.join(".import-AbC123");
        fs::create_dir_all(&staging).unwrap();
        fs::write(staging.join("rootfs.ext4"), b"half").unwrap();
        fs::set_permissions(staging.join("rootfs.ext4"), fs::Permissions::from_mode(0o444)).unwrap();
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o555)).unwrap();
        let kept = images.join("debian");
        fs::create_dir_all(&kept).unwrap();
        fs::write(images.join(".import-note"), b"a file, not a staging directory").unwrap();
        assert_eq!(sweep_staging(&paths), vec![staging.clone()]);
        assert!(!staging.exists() && kept.is_dir() && images.join(".import-note").is_file());
        assert!(sweep_staging(&paths).is_empty());
    }

    #[test]
    fn import_copies_hashes_and_records() {
        let e = env();
        let img = import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap();
        let dir = e.paths.images_dir().join("debian");
        assert_eq!(img.kernel_path, dir.join("vmlinux"));
        assert_eq!(img.rootfs_path, dir.join("rootfs.ext4"));
        assert_eq!(fs::read(&img.kernel_path).unwrap(), fs::read(&e.kernel).unwrap());
        assert_eq!(fs::read(&img.rootfs_path).unwrap(), fs::read(&e.rootfs).unwrap());
        // Independent hashes of the originals, from coreutils.
        let sum = |p: &Path| {
            let out = Command::new("sha256sum").arg(p).output().unwrap();
            String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
        };
        assert_eq!(img.kernel_sha256, sum(&e.kernel));
        assert_eq!(img.rootfs_sha256, sum(&e.rootfs));
        assert_eq!(img.size_bytes, 4096 + 16 * 1024 * 1024);
        for f in [&img.kernel_path, &img.rootfs_path] {
            assert_eq!(fs::metadata(f).unwrap().permissions().mode() & 0o7777, 0o444, "{}", f.display());
        }
        assert_eq!(img.kernel_identity, Some(FileIdentity::read(&img.kernel_path).unwrap()));
        assert_eq!(img.rootfs_identity, Some(FileIdentity::read(&img.rootfs_path).unwrap()));
        assert_eq!(list(&e.store).unwrap(), vec![img.clone()]);
        assert_eq!(get(&e.store, "debian").unwrap(), img);
        // No staging directory is left.
        assert_eq!(image_dir_entries(&e), ["debian"]);
    }

    #[test]
    fn an_import_tells_each_step_then_the_bytes_done_up_to_each_file_size() {
        let e = env();
        let initrd = e.paths.state_dir().join("initrd.src");
        fs::write(&initrd, b"rd").unwrap();
        let mut seen = Vec::new();
        let with_initrd = ImageFiles { kernel: &e.kernel, rootfs: &e.rootfs, initrd: Some(&initrd) };
        stage(&e.paths, "debian", with_initrd, &mut |p| seen.push(p)).unwrap();
        let steps: Vec<String> = seen
            .iter()
            .filter_map(|p| match p {
                ImportProgress::Step(s) => Some(s.to_string()),
                ImportProgress::Bytes { .. } => None,
            })
            .collect();
        assert_eq!(
            steps,
            [
                "checking the kernel",
                "checking the root filesystem",
                "checking the initrd",
                "copying the kernel (4 KiB)",
                "hashing the kernel (4 KiB)",
                "copying the root filesystem (16 MiB)",
                "hashing the root filesystem (16 MiB)",
                "copying the initrd (2 B)",
                "hashing the initrd (2 B)",
            ]
        );
        // Each copy and hash is followed by its bytes, growing, ending at the file's size.
        let mut current: Option<(u64, Vec<u64>)> = None;
        let mut finished = 0;
        for p in seen.iter().chain([&ImportProgress::Step(ImportStep::Check(ImageFile::Kernel))]) {
            match *p {
                ImportProgress::Step(step) => {
                    if let Some((total, done)) = current.take() {
                        assert!(done.windows(2).all(|w| w[0] < w[1]), "{step}: {done:?}");
                        assert_eq!(done.last(), Some(&total), "{step}: {done:?}");
                        finished += 1;
                    }
                    if let ImportStep::Copy(_, total) | ImportStep::Hash(_, total) = step {
                        current = Some((total, Vec::new()));
                    }
                }
                ImportProgress::Bytes { done, total } => {
                    let (want, seen) = current.as_mut().expect("bytes only within a copy or hash");
                    assert_eq!(total, *want);
                    seen.push(done);
                }
            }
        }
        assert_eq!(finished, 6);

        // A file that fails its check ends the import there.
        let mut seen = Vec::new();
        let err = stage(&e.paths, "other", files(&e.kernel, &e.kernel), &mut |p| seen.push(p)).unwrap_err();
        assert!(matches!(err, ImageError::Rootfs { .. }), "{err}");
        assert_eq!(seen.last(), Some(&ImportProgress::Step(ImportStep::Check(ImageFile::Rootfs))));
    }

    #[test]
    fn an_unchanged_image_is_trusted_without_hashing() {
        let e = env();
        let img = import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap();
        let v = verify(&img).unwrap();
        assert_eq!(
            v,
            Verification { kernel: FileCheck::Unchanged, rootfs: FileCheck::Unchanged, initrd: None }
        );
        let mut same = img.clone();
        assert!(!v.apply(&mut same));
        assert_eq!(same, img);
    }

    #[test]
    fn a_changed_identity_with_the_same_content_is_rehashed_protected_and_recorded() {
        let e = env();
        let mut img = import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap();
        let old = img.rootfs_identity.unwrap();
        // The user makes it writable and writes the same bytes back: ctime and mtime move.
        fs::set_permissions(&img.rootfs_path, fs::Permissions::from_mode(0o644)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&img.rootfs_path, fs::read(&e.rootfs).unwrap()).unwrap();

        let v = verify(&img).unwrap();
        assert_eq!(v.kernel, FileCheck::Unchanged);
        let FileCheck::Rehashed(now) = v.rootfs else { panic!("{v:?}") };
        assert_ne!(now, old);
        assert_eq!(now, FileIdentity::read(&img.rootfs_path).unwrap());
        assert_eq!(fs::metadata(&img.rootfs_path).unwrap().permissions().mode() & 0o7777, 0o444);
        assert!(v.apply(&mut img));
        assert_eq!(img.rootfs_identity, Some(now));
        // Once recorded, it is trusted again.
        assert_eq!(verify(&img).unwrap().rootfs, FileCheck::Unchanged);

        // An image imported by an older release has no identity: hashed once.
        img.kernel_identity = None;
        assert!(matches!(verify(&img).unwrap().kernel, FileCheck::Rehashed(_)));
    }

    #[test]
    fn a_changed_image_refuses_and_says_what_to_do() {
        let e = env();
        let img = import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap();
        fs::set_permissions(&img.rootfs_path, fs::Permissions::from_mode(0o644)).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&img.rootfs_path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"guest data", 8 << 20).unwrap();
        drop(f);

        let err = verify(&img).unwrap_err();
        assert!(matches!(&err, ImageError::Changed { image, .. } if image == "debian"), "{err:?}");
        assert_eq!(err.kind(), ImageErrorKind::Conflict);
        let msg = err.to_string();
        assert!(msg.contains(&img.rootfs_path.display().to_string()), "{msg}");
        assert!(msg.contains(&img.rootfs_sha256) && msg.contains("banger image rm debian"), "{msg}");
        // Refused again at every try: nothing was recorded.
        assert!(matches!(verify(&img), Err(ImageError::Changed { .. })));

        fs::remove_file(&img.kernel_path).unwrap();
        let err = verify(&img).unwrap_err();
        assert!(matches!(err, ImageError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("vmlinux"), "{err}");
    }

    #[test]
    fn duplicate_and_invalid_imports_change_nothing() {
        let e = env();
        import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap();
        let err = import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap_err();
        assert!(matches!(err, ImageError::Exists(_)), "{err}");
        assert!(err.to_string().contains("banger image rm debian"), "{err}");

        // A duplicate found only at commit (a racing import) is refused the same way.
        let staged = stage(&e.paths, "debian", files(&e.kernel, &e.rootfs), &mut |_| {}).unwrap();
        let err = staged.commit(&e.store, &e.paths).unwrap_err();
        assert!(matches!(err, ImageError::Exists(_)), "{err}");

        let err = import(&e.store, &e.paths, "Bad_Name", files(&e.kernel, &e.rootfs)).unwrap_err();
        assert!(matches!(err, ImageError::InvalidName(_)), "{err}");
        let err = import(&e.store, &e.paths, "x", files(&e.rootfs, &e.rootfs)).unwrap_err();
        assert!(matches!(err, ImageError::Kernel { .. }), "{err}");
        assert!(err.to_string().contains("ELF vmlinux"), "{err}");
        let err = import(&e.store, &e.paths, "x", files(&e.kernel, &e.kernel)).unwrap_err();
        assert!(matches!(err, ImageError::Rootfs { .. }), "{err}");
        assert!(err.to_string().contains("mkfs.ext4"), "{err}");
        let missing = e.paths.state_dir().join("nope");
        let err = import(&e.store, &e.paths, "x", files(&missing, &e.rootfs)).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = import(&e.store, &e.paths, "x", files(&e.kernel, e.paths.state_dir())).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");

        assert_eq!(list(&e.store).unwrap().len(), 1);
        assert_eq!(image_dir_entries(&e), ["debian"]);
    }

    #[test]
    fn compressed_and_foreign_kernels_are_explained() {
        let e = env();
        let bz = e.paths.state_dir().join("bzImage");
        let mut head = vec![0u8; 0x400];
        head[0x202..0x206].copy_from_slice(b"HdrS");
        fs::write(&bz, &head).unwrap();
        let err = import(&e.store, &e.paths, "x", files(&bz, &e.rootfs)).unwrap_err().to_string();
        assert!(err.contains("bzImage") && err.contains("extract-vmlinux"), "{err}");

        let mut arm = fake_kernel();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        let arm_path = e.paths.state_dir().join("arm-vmlinux");
        fs::write(&arm_path, arm).unwrap();
        let err = import(&e.store, &e.paths, "x", files(&arm_path, &e.rootfs)).unwrap_err().to_string();
        assert!(err.contains("not a 64-bit x86_64 kernel"), "{err}");
    }

    #[test]
    fn unknown_images_list_what_exists() {
        let e = env();
        let err = get(&e.store, "nope").unwrap_err().to_string();
        assert!(err.contains("no images are imported yet") && err.contains("banger image import"), "{err}");
        import(&e.store, &e.paths, "alpine", files(&e.kernel, &e.rootfs)).unwrap();
        import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap();
        let err = get(&e.store, "nope").unwrap_err().to_string();
        assert!(err.contains("available images: alpine, debian"), "{err}");
    }

    #[test]
    fn errors_say_how_to_report_them() {
        let e = env();
        import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap();
        let kind = |r: Result<ImageRecord, ImageError>| r.unwrap_err().kind();
        let kind_of_remove = |r: Result<(), ImageError>| r.unwrap_err().kind();
        assert_eq!(kind(get(&e.store, "nope")), ImageErrorKind::NotFound);
        assert_eq!(
            kind(import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs))),
            ImageErrorKind::Conflict
        );
        assert_eq!(
            kind(import(&e.store, &e.paths, "-x", files(&e.kernel, &e.rootfs))),
            ImageErrorKind::Invalid
        );
        assert_eq!(
            kind(import(&e.store, &e.paths, "x", files(&e.rootfs, &e.rootfs))),
            ImageErrorKind::Invalid
        );
        e.store.insert_vm(&vm_using(&e, "dev", "debian")).unwrap();
        assert_eq!(kind_of_remove(remove(&e.store, &e.paths, "debian")), ImageErrorKind::Conflict);
        assert_eq!(kind_of_remove(remove(&e.store, &e.paths, "nope")), ImageErrorKind::NotFound);
    }

    #[test]
    fn select_prefers_the_request_then_the_default_then_the_only_image() {
        let e = env();
        assert!(matches!(select(&e.store, None, None).unwrap_err(), ImageError::NoneChosen { .. }));
        import(&e.store, &e.paths, "alpine", files(&e.kernel, &e.rootfs)).unwrap();
        assert_eq!(select(&e.store, None, None).unwrap().name, "alpine");
        import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap();
        let err = select(&e.store, None, None).unwrap_err().to_string();
        assert!(err.contains("--image") && err.contains("alpine, debian"), "{err}");
        assert_eq!(select(&e.store, None, Some("debian")).unwrap().name, "debian");
        assert_eq!(select(&e.store, Some("alpine"), Some("debian")).unwrap().name, "alpine");
        assert!(matches!(select(&e.store, Some("gone"), None).unwrap_err(), ImageError::Unknown { .. }));
    }

    #[test]
    fn remove_is_refused_while_a_vm_uses_the_image() {
        let e = env();
        import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap();
        let vm = vm_using(&e, "dev", "debian");
        e.store.insert_vm(&vm).unwrap();

        let err = remove(&e.store, &e.paths, "debian").unwrap_err();
        assert!(matches!(err, ImageError::Store(StoreError::ImageInUse { .. })), "{err}");
        assert!(err.to_string().contains("dev"), "{err}");
        assert!(e.paths.images_dir().join("debian/rootfs.ext4").exists());

        e.store.delete_vm(&vm.id).unwrap();
        remove(&e.store, &e.paths, "debian").unwrap();
        assert!(list(&e.store).unwrap().is_empty());
        assert!(image_dir_entries(&e).is_empty());
        let err = remove(&e.store, &e.paths, "debian").unwrap_err();
        assert!(matches!(err, ImageError::Unknown { .. }), "{err}");
    }

    #[test]
    fn a_leftover_directory_is_replaced_and_a_failed_move_forgets_the_row() {
        let e = env();
        let leftover = e.paths.images_dir().join("debian");
        fs::create_dir(&leftover).unwrap();
        fs::write(leftover.join("junk"), "x").unwrap();
        let img = import(&e.store, &e.paths, "debian", files(&e.kernel, &e.rootfs)).unwrap();
        assert!(!leftover.join("junk").exists());
        assert_eq!(fs::read(&img.kernel_path).unwrap(), fs::read(&e.kernel).unwrap());
        remove(&e.store, &e.paths, "debian").unwrap();

        // The image's directory cannot be put in place (its path runs through a file, which
        // stops root as well as users): the move fails and the row is deleted again.
        let staged = stage(&e.paths, "other", files(&e.kernel, &e.rootfs), &mut |_| {}).unwrap();
        let moved = e.paths.images_dir().join("other");
        fs::write(&moved, "a file in the way").unwrap();
        let blocked = Paths::under(&moved.join("x"), e.paths.uid()).unwrap();
        let err = staged.commit(&e.store, &blocked).unwrap_err();
        assert!(matches!(err, ImageError::Dir { .. }), "{err}");
        assert!(e.store.get_image("other").unwrap().is_none());
        assert_eq!(image_dir_entries(&e), ["other"]);
    }

    #[test]
    fn an_initrd_is_imported_read_only_hashed_and_verified() {
        let e = env();
        let initrd = e.paths.state_dir().join("initrd.src");
        fs::write(&initrd, b"\x1f\x8b not really gzip").unwrap();
        let files = ImageFiles { kernel: &e.kernel, rootfs: &e.rootfs, initrd: Some(&initrd) };
        let img = import(&e.store, &e.paths, "withrd", files).unwrap();
        let rd = img.initrd.clone().unwrap();
        assert_eq!(rd.path, e.paths.images_dir().join("withrd").join(INITRD_FILE));
        assert_eq!(rd.sha256, sha256_file(&initrd).unwrap());
        assert_eq!(fs::metadata(&rd.path).unwrap().permissions().mode() & 0o7777, IMAGE_FILE_MODE);
        assert_eq!(e.store.get_image("withrd").unwrap().unwrap(), img);
        assert_eq!(verify(&img).unwrap().initrd, Some(FileCheck::Unchanged));
        // A changed initrd refuses the start like any image file.
        fs::set_permissions(&rd.path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&rd.path, b"other").unwrap();
        assert!(matches!(verify(&img), Err(ImageError::Changed { .. })));
        // A directory is not an initrd.
        let files = ImageFiles { kernel: &e.kernel, rootfs: &e.rootfs, initrd: Some(e.paths.state_dir()) };
        let err = import(&e.store, &e.paths, "bad", files).unwrap_err();
        assert!(matches!(err, ImageError::Initrd { .. }), "{err}");
    }
}
