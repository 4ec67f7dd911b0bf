//! The `images` table: one row per imported image.

use std::path::PathBuf;

use rusqlite::types::ValueRef;
use rusqlite::{Row, params};

use super::{Cols, Store, StoreError, is_constraint, opt_text, path_value, sql};
use crate::daemon::file_identity::FileIdentity;

const IMAGE_COLUMNS: &str = "name, kernel_path, rootfs_path, kernel_sha256, rootfs_sha256, size_bytes, \
     created_at, kernel_identity, rootfs_identity, initrd_path, initrd_sha256, initrd_identity";

/// An imported image: one row of `images`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// The name VMs refer to.
    pub name: String,
    /// The kernel (uncompressed ELF) in banger's image store.
    pub kernel_path: PathBuf,
    /// The root filesystem in banger's image store.
    pub rootfs_path: PathBuf,
    /// SHA-256 of the kernel, lowercase hex.
    pub kernel_sha256: String,
    /// SHA-256 of the rootfs, lowercase hex.
    pub rootfs_sha256: String,
    /// Bytes of both files together.
    pub size_bytes: u64,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// The kernel file's identity when its hash was last checked (`None`: never recorded, as for
    /// images imported by older releases; it is hashed at its next use).
    pub kernel_identity: Option<FileIdentity>,
    /// The rootfs file's identity when its hash was last checked.
    pub rootfs_identity: Option<FileIdentity>,
    /// The initrd the kernel boots with, if the image has one.
    pub initrd: Option<ImageInitrd>,
}

/// An image's initrd in banger's image store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInitrd {
    /// The file.
    pub path: PathBuf,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// Its identity when its hash was last checked.
    pub identity: Option<FileIdentity>,
}

impl Store {
    /// Adds an image.
    pub fn insert_image(&self, image: &ImageRecord) -> Result<(), StoreError> {
        let size = i64::try_from(image.size_bytes).map_err(|_| StoreError::Unstorable {
            what: format!("the size of image {:?}", image.name),
            detail: format!("{} bytes is out of range", image.size_bytes),
        })?;
        self.conn
            .execute(
                &format!("INSERT INTO images ({IMAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                params![
                    image.name,
                    path_value(&image.kernel_path),
                    path_value(&image.rootfs_path),
                    image.kernel_sha256,
                    image.rootfs_sha256,
                    size,
                    image.created_at,
                    opt_text(&image.kernel_identity),
                    opt_text(&image.rootfs_identity),
                    image.initrd.as_ref().map(|i| path_value(&i.path)),
                    image.initrd.as_ref().map(|i| i.sha256.clone()),
                    opt_text(&image.initrd.as_ref().and_then(|i| i.identity))
                ],
            )
            .map_err(|e| {
                if is_constraint(&e) {
                    StoreError::DuplicateImage { name: image.name.clone() }
                } else {
                    StoreError::Sqlite { op: "insert an image", source: e }
                }
            })?;
        Ok(())
    }

    /// The image with this name, if any.
    pub fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.query_images(&format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"), params![name])
            .map(|mut v| v.pop())
    }

    /// Every image, ordered by name.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.query_images(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"), [])
    }

    /// Records the identities of an image's files (after their hashes were checked); the
    /// initrd's only where the image has one.
    pub fn set_image_identity(
        &self,
        name: &str,
        kernel: Option<&FileIdentity>,
        rootfs: Option<&FileIdentity>,
        initrd: Option<&FileIdentity>,
    ) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE images SET kernel_identity = ?2, rootfs_identity = ?3, \
                 initrd_identity = CASE WHEN initrd_path IS NULL THEN NULL ELSE ?4 END WHERE name = ?1",
                params![
                    name,
                    kernel.map(ToString::to_string),
                    rootfs.map(ToString::to_string),
                    initrd.map(ToString::to_string)
                ],
            )
            .map_err(sql("record an image's file identities"))?;
        if n == 0 {
            return Err(StoreError::ImageNotFound { name: name.to_owned() });
        }
        Ok(())
    }

    /// Removes an image's row; refused while any VM uses it.
    pub fn delete_image(&self, name: &str) -> Result<(), StoreError> {
        // One statement: the foreign key from `vms.image` refuses the delete atomically while a
        // VM uses the image; the VMs are listed only to say which ones.
        match self.conn.execute("DELETE FROM images WHERE name = ?1", params![name]) {
            Ok(0) => Err(StoreError::ImageNotFound { name: name.to_owned() }),
            Ok(_) => Ok(()),
            Err(e) if is_constraint(&e) => {
                let mut stmt = self
                    .conn
                    .prepare("SELECT name FROM vms WHERE image = ?1 ORDER BY name")
                    .map_err(sql("list the vms of an image"))?;
                let vms = stmt
                    .query_map(params![name], |r| r.get(0))
                    .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
                    .map_err(sql("list the vms of an image"))?;
                Err(StoreError::ImageInUse { image: name.to_owned(), vms })
            }
            Err(source) => Err(StoreError::Sqlite { op: "delete an image", source }),
        }
    }

    fn query_images(&self, sql_text: &str, p: impl rusqlite::Params) -> Result<Vec<ImageRecord>, StoreError> {
        let mut stmt = self.conn.prepare(sql_text).map_err(sql("read images"))?;
        let mut rows = stmt.query(p).map_err(sql("read images"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql("read images"))? {
            out.push(image_from_row(row)?);
        }
        Ok(out)
    }
}

fn image_from_row(row: &Row<'_>) -> Result<ImageRecord, StoreError> {
    let key = match row.get_ref(0) {
        Ok(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        _ => "?".to_owned(),
    };
    let c = Cols { row, table: "images", key };
    let size = c.int(5, "size_bytes")?;
    Ok(ImageRecord {
        name: c.text(0, "name")?,
        kernel_path: c.path(1, "kernel_path")?,
        rootfs_path: c.path(2, "rootfs_path")?,
        kernel_sha256: c.text(3, "kernel_sha256")?,
        rootfs_sha256: c.text(4, "rootfs_sha256")?,
        size_bytes: u64::try_from(size)
            .map_err(|_| c.corrupt("size_bytes", format!("{size} is negative")))?,
        created_at: c.int(6, "created_at")?,
        kernel_identity: c.parsed(7, "kernel_identity")?,
        rootfs_identity: c.parsed(8, "rootfs_identity")?,
        initrd: match c.opt_path(9, "initrd_path")? {
            None => None,
            Some(path) => Some(ImageInitrd {
                path,
                sha256: c.text(10, "initrd_sha256")?,
                identity: c.parsed(11, "initrd_identity")?,
            }),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::store::testing::*;

    #[test]
    fn images_crud_and_in_use_refusal() {
        let s = store_with_image();
        s.insert_image(&image("alpine")).unwrap();
        let err = s.insert_image(&image("alpine")).unwrap_err();
        assert!(matches!(err, StoreError::DuplicateImage { .. }), "{err:?}");
        assert_eq!(s.get_image("alpine").unwrap().unwrap(), image("alpine"));
        assert_eq!(s.get_image("nope").unwrap(), None);
        let names: Vec<String> = s.list_images().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["alpine", "base"]);

        s.insert_vm(&vm("f1", "web")).unwrap();
        s.insert_vm(&vm("f2", "db")).unwrap();
        let err = s.delete_image("base").unwrap_err();
        match &err {
            StoreError::ImageInUse { image, vms } => {
                assert_eq!(image, "base");
                assert_eq!(vms, &["db", "web"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("db, web"), "{err}");
        assert!(s.get_image("base").unwrap().is_some());

        s.delete_image("alpine").unwrap();
        assert!(matches!(s.delete_image("alpine"), Err(StoreError::ImageNotFound { .. })));
    }

    #[test]
    fn file_identities_are_recorded_and_read_back() {
        let s = store_with_image();
        assert_eq!(s.get_image("base").unwrap().unwrap().rootfs_identity, image("base").rootfs_identity);
        let k = FileIdentity { dev: 1, ino: 2, size: 3, mtime_ns: 4, ctime_ns: 5 };
        let r = FileIdentity { dev: 1, ino: 9, size: 8 << 30, mtime_ns: 7, ctime_ns: 6 };
        s.set_image_identity("base", Some(&k), Some(&r), None).unwrap();
        let got = s.get_image("base").unwrap().unwrap();
        assert_eq!((got.kernel_identity, got.rootfs_identity), (Some(k), Some(r)));
        s.set_image_identity("base", None, None, None).unwrap();
        assert_eq!(s.get_image("base").unwrap().unwrap().kernel_identity, None);
        assert!(matches!(
            s.set_image_identity("nope", None, None, None),
            Err(StoreError::ImageNotFound { .. })
        ));
        s.conn.execute("UPDATE images SET rootfs_identity = 'x:y' WHERE name = 'base'", []).unwrap();
        let err = s.get_image("base").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { column: "rootfs_identity", .. }), "{err:?}");
    }

    #[test]
    fn an_initrd_is_recorded_with_its_identity() {
        let s = store_with_image();
        let mut i = image("withrd");
        let id = FileIdentity { dev: 1, ino: 3, size: 7, mtime_ns: 4, ctime_ns: 5 };
        i.initrd = Some(ImageInitrd {
            path: "/state/images/withrd/initrd.img".into(),
            sha256: "c".repeat(64),
            identity: None,
        });
        s.insert_image(&i).unwrap();
        assert_eq!(s.get_image("withrd").unwrap().unwrap(), i);
        s.set_image_identity("withrd", None, None, Some(&id)).unwrap();
        assert_eq!(s.get_image("withrd").unwrap().unwrap().initrd.unwrap().identity, Some(id));
        // An image without one keeps none.
        s.set_image_identity("base", None, None, Some(&id)).unwrap();
        assert_eq!(s.get_image("base").unwrap().unwrap().initrd, None);
    }

    #[test]
    fn image_sizes_beyond_sqlite_range_are_refused() {
        let s = Store::open_in_memory().unwrap();
        let mut i = image("huge");
        i.size_bytes = u64::MAX;
        assert!(matches!(s.insert_image(&i), Err(StoreError::Unstorable { .. })));
    }
}
