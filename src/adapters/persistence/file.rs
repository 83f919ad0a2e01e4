//! The SQLite file under the stores, and the check that it is still the
//! one they opened.
//!
//! SQLite keeps writing to a file deleted under it (the open descriptor
//! holds the inode) and every write then "succeeds" and vanishes at the next
//! start, so each store operation first checks that the file is still there.
//! A stat per operation costs about a microsecond, nothing beside the
//! statement it guards.

use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A database file and the inode it had.
#[derive(Debug, Clone)]
pub(super) struct DatabaseFile {
    path: PathBuf,
    identity: FileIdentity,
}

/// Device and inode: what tells the file apart from another one created
/// later at the same path.
type FileIdentity = (u64, u64);

fn identity(path: &Path) -> Option<FileIdentity> {
    let metadata = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((metadata.dev(), metadata.ino()))
    }
    #[cfg(not(unix))]
    {
        // Existence only: deletion is what happens in practice.
        let _ = metadata;
        Some((0, 0))
    }
}

impl DatabaseFile {
    /// The file behind a `sqlite:` URL, when there is one on disk now
    /// (in-memory databases and PostgreSQL have none).
    pub(super) fn of(url: &str) -> Option<Self> {
        if !url.starts_with("sqlite:") {
            return None;
        }
        let options = sea_orm::sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
        let path = options.get_filename().to_path_buf();
        let identity = identity(&path)?;
        Some(Self { path, identity })
    }

    /// Why the store must not be used, when the file was deleted or
    /// replaced. Each store wraps the text in its own error.
    pub(super) fn check(&self) -> Result<(), String> {
        if identity(&self.path) == Some(self.identity) {
            Ok(())
        } else {
            Err(format!(
                "the SQLite database {} was deleted or replaced while the server ran; \
                 restore it and restart the server",
                self.path.display()
            ))
        }
    }
}

/// [`DatabaseFile::check`] for a store that may have no file.
pub(super) fn check(file: Option<&DatabaseFile>) -> Result<(), String> {
    file.map_or(Ok(()), DatabaseFile::check)
}
