//! The SQLite file under the stores, and the check that it is still the
//! one they opened.
//!
//! SQLite keeps writing to a file deleted under it (the open descriptor
//! holds the inode) and every write then "succeeds" and vanishes at the next
//! start, so each store operation first checks that the file is still there.
//! A stat per operation costs about a microsecond, nothing beside the
//! statement it guards.
//!
//! The file also has the process's **write gate**. SQLite takes one writer
//! at a time; a connection that finds the write lock taken sleeps and
//! retries (1, 2, 5, 10 ms...), and the benchmark's `strace` of the server
//! showed those sleeps. Every store on the file takes the gate around its
//! writes, so writers queue here, woken the moment the one before them is
//! done, and never sleep on SQLite's lock (a lock held by another process
//! still makes a writer wait up to the busy timeout); reads take no gate
//! and run beside the writer (WAL). What bounds SQLite chat throughput after
//! that is the cost of each statement through the driver, one after the
//! other behind the gate (BENCHMARKS.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// The write gate of each SQLite file this process opened.
fn gates() -> &'static Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>> {
    static GATES: OnceLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    GATES.get_or_init(Mutex::default)
}

/// A database file and the inode it had.
#[derive(Debug, Clone)]
pub(super) struct DatabaseFile {
    path: PathBuf,
    identity: FileIdentity,
    gate: Arc<tokio::sync::Mutex<()>>,
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
        let gate = Arc::clone(
            gates()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(path.clone())
                .or_default(),
        );
        Some(Self {
            path,
            identity,
            gate,
        })
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

/// Waits for the file's write gate: hold the guard for the whole write
/// (statement or transaction). `None` without a file (PostgreSQL, whose
/// row locks need no gate; SQLite in memory, private to one connection).
pub(super) async fn write_gate(
    file: Option<&DatabaseFile>,
) -> Option<tokio::sync::OwnedMutexGuard<()>> {
    match file {
        Some(file) => Some(Arc::clone(&file.gate).lock_owned().await),
        None => None,
    }
}

/// [`DatabaseFile::check`] for a store that may have no file.
pub(super) fn check(file: Option<&DatabaseFile>) -> Result<(), String> {
    file.map_or(Ok(()), DatabaseFile::check)
}
