//! Durable hard state: the [`HardStateStore`] trait, its file
//! implementation, and the [`Persister`] that runs saves off the runtime
//! thread.
//!
//! The file is written atomically (temp file, fsync, rename, fsync of the
//! directory) and carries a length and a CRC-32 so that a truncated or
//! corrupt file is refused with a clear error instead of being half-read.

use crate::raft::HardState;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Name of the state file inside `--state-dir`.
pub const STATE_FILE_NAME: &str = "raft-state.json";
const MAGIC: &str = "raft-elector-state v1";
/// Largest state file read (16 MiB): real hard state is a few KiB, so a
/// bigger file (or a device such as /dev/zero) is refused, not read.
pub const MAX_STATE_FILE_BYTES: u64 = 16 << 20;

/// Why hard state could not be loaded or saved.
#[derive(Debug, Error)]
pub enum StorageError {
    // The OS error is the source, not part of this text: printing the
    // error chain then shows it once.
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode hard state: {0}")]
    Encode(String),
    #[error("state file {path} is corrupt ({reason}); move it away to start as a new member")]
    Corrupt { path: PathBuf, reason: String },
    #[error("state file {path} is larger than 16 MiB, far more than any real state; check that --state-dir is this member's own directory and the file is a regular file, or move it away to start as a new member")]
    TooLarge { path: PathBuf },
    /// A save was abandoned or panicked before it finished; see [`Persister`].
    #[error("an earlier hard state save did not finish; no further save may race it")]
    Interrupted,
}

/// Where a node's hard state lives.
pub trait HardStateStore: Send {
    /// Returns the saved state, or None if nothing was ever saved.
    fn load(&self) -> Result<Option<HardState>, StorageError>;
    /// Saves `state` durably; when it returns Ok the state survives a crash.
    fn save(&mut self, state: &HardState) -> Result<(), StorageError>;
}

/// Runs a store's saves on tokio's blocking pool.
///
/// A save fsyncs twice, which a busy or throttled disk can stretch to
/// hundreds of milliseconds; on the node's single runtime thread that would
/// stall every other task for as long (the API answering `/is-leader`, the
/// peer connections' readers and writers). Here the node task alone waits:
/// it awaits [`Persister::save`] before it sends anything that depends on the
/// state, so the order "durable, then sent" holds as before, and it takes no
/// other input meanwhile.
///
/// Invariant: at most one save runs at a time, because the store travels
/// with it. A save whose future was dropped before it finished keeps the
/// store; every later save then fails with [`StorageError::Interrupted`]
/// (the node stops) rather than race the unfinished one, which could leave
/// an older state on disk last.
pub struct Persister {
    store: Option<Box<dyn HardStateStore>>,
}

impl Persister {
    /// Wraps `store`.
    pub fn new(store: Box<dyn HardStateStore>) -> Persister {
        Persister { store: Some(store) }
    }

    /// Saves `state` off the runtime thread; returns once it is durable.
    /// Not cancel-safe (see the type's docs): await it to the end.
    pub async fn save(&mut self, state: HardState) -> Result<(), StorageError> {
        let mut store = self.store.take().ok_or(StorageError::Interrupted)?;
        let (store, result) = tokio::task::spawn_blocking(move || {
            let result = store.save(&state);
            (store, result)
        })
        .await
        .map_err(|_| StorageError::Interrupted)?;
        self.store = Some(store);
        result
    }
}

/// Keeps hard state in memory (tests, and `--state-dir` left empty: every
/// restart is then a new incarnation).
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Option<HardState>,
}

impl HardStateStore for MemoryStore {
    fn load(&self) -> Result<Option<HardState>, StorageError> {
        Ok(self.state.clone())
    }

    fn save(&mut self, state: &HardState) -> Result<(), StorageError> {
        self.state = Some(state.clone());
        Ok(())
    }
}

/// Keeps hard state in one file, replaced atomically on each save.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    path: PathBuf,
}

impl FileStore {
    /// Opens (creating if needed) the state directory `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileStore, StorageError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| StorageError::Io {
            action: "create state directory",
            path: dir.clone(),
            source,
        })?;
        let path = dir.join(STATE_FILE_NAME);
        Ok(FileStore { dir, path })
    }

    /// Returns the path of the state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, reason: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }
}

/// Encodes hard state as the file's bytes: a header line, then JSON.
pub fn encode(state: &HardState) -> Result<Vec<u8>, StorageError> {
    let body = serde_json::to_vec(state).map_err(|e| StorageError::Encode(e.to_string()))?;
    let crc = crc32fast::hash(&body);
    let mut out = format!("{MAGIC} crc32={crc:08x} len={}\n", body.len()).into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes the file's bytes, refusing anything truncated or altered.
pub fn decode(bytes: &[u8]) -> Result<HardState, String> {
    let newline = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| "header is not UTF-8")?;
    let rest = header
        .strip_prefix(MAGIC)
        .ok_or_else(|| format!("unknown header {header:?}"))?;
    let mut crc = None;
    let mut len = None;
    for field in rest.split_whitespace() {
        if let Some(v) = field.strip_prefix("crc32=") {
            crc = u32::from_str_radix(v, 16).ok();
        } else if let Some(v) = field.strip_prefix("len=") {
            len = v.parse::<usize>().ok();
        }
    }
    let (crc, len) = match (crc, len) {
        (Some(c), Some(l)) => (c, l),
        _ => return Err(format!("malformed header {header:?}")),
    };
    let body = &bytes[newline + 1..];
    if body.len() != len {
        return Err(format!(
            "truncated: header says {len} bytes, file has {}",
            body.len()
        ));
    }
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))
}

impl HardStateStore for FileStore {
    fn load(&self) -> Result<Option<HardState>, StorageError> {
        let io = |source| StorageError::Io {
            action: "read",
            path: self.path.clone(),
            source,
        };
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io(source)),
        };
        // Bounded read: a wrong file (a device, a huge file) must not exhaust memory.
        let mut bytes = Vec::new();
        file.take(MAX_STATE_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_STATE_FILE_BYTES {
            return Err(StorageError::TooLarge {
                path: self.path.clone(),
            });
        }
        decode(&bytes).map(Some).map_err(|r| self.corrupt(r))
    }

    fn save(&mut self, state: &HardState) -> Result<(), StorageError> {
        let tmp = self.dir.join(format!("{STATE_FILE_NAME}.tmp"));
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StorageError::Io {
                action,
                path,
                source,
            }
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        let bytes = encode(state)?;
        f.write_all(&bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io("rename into place", &self.path))?;
        // The rename itself is durable only once the directory is synced.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory", &self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Configuration, Entry, NodeId, Payload, Snapshot, Term};

    fn sample() -> HardState {
        let id = NodeId::new("pod-a", 7);
        HardState {
            id: id.clone(),
            term: Term(4),
            voted_for: Some(id.clone()),
            snapshot: Snapshot {
                last_index: 1,
                last_term: Term(0),
                config: Configuration::with_voters([(id, "10.0.0.1:4041".to_string())]),
            },
            bootstrap_lock: None,
            entries: vec![Entry {
                index: 2,
                term: Term(4),
                payload: Payload::Noop,
            }],
        }
    }

    #[test]
    fn saved_state_loads_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::open(dir.path()).unwrap();
        assert!(
            store.load().unwrap().is_none(),
            "no file yet means no state"
        );
        store.save(&sample()).unwrap();
        assert_eq!(store.load().unwrap(), Some(sample()));
        assert!(!dir.path().join("raft-state.json.tmp").exists());
    }

    #[test]
    fn truncated_state_file_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::open(dir.path()).unwrap();
        store.save(&sample()).unwrap();
        let bytes = fs::read(store.path()).unwrap();
        fs::write(store.path(), &bytes[..bytes.len() - 5]).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        assert!(err.contains("move it away"), "{err}");
    }

    #[test]
    fn flipped_byte_in_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::open(dir.path()).unwrap();
        store.save(&sample()).unwrap();
        let mut bytes = fs::read(store.path()).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        fs::write(store.path(), &bytes).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn a_state_file_over_the_size_bound_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::open(dir.path()).unwrap();
        let at_bound = vec![b'x'; MAX_STATE_FILE_BYTES as usize];
        fs::write(store.path(), &at_bound).unwrap();
        assert!(
            matches!(store.load(), Err(StorageError::Corrupt { .. })),
            "a file at the bound is read (and found corrupt)"
        );
        let mut over = at_bound;
        over.push(b'x');
        fs::write(store.path(), &over).unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StorageError::TooLarge { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("larger than 16 MiB"), "{text}");
        assert!(text.contains("--state-dir"), "{text}");
        store.save(&sample()).unwrap();
        assert_eq!(store.load().unwrap(), Some(sample()));
        #[cfg(unix)]
        {
            fs::remove_file(store.path()).unwrap();
            std::os::unix::fs::symlink("/dev/zero", store.path()).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StorageError::TooLarge { .. }), "{err}");
        }
    }

    #[test]
    fn io_errors_name_the_os_error_once_in_the_error_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::open(dir.path()).unwrap();
        // A directory where the temp file goes: creating it fails.
        fs::create_dir(dir.path().join("raft-state.json.tmp")).unwrap();
        let err = anyhow::Error::new(store.save(&sample()).unwrap_err());
        let chain = format!("{err:#}");
        let os = err.root_cause().to_string();
        assert_eq!(chain.matches(&os).count(), 1, "{chain}");
        assert!(chain.starts_with("cannot create "), "{chain}");
    }

    #[test]
    fn garbage_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        fs::write(store.path(), b"hello world").unwrap();
        assert!(matches!(store.load(), Err(StorageError::Corrupt { .. })));
        fs::write(store.path(), b"").unwrap();
        assert!(matches!(store.load(), Err(StorageError::Corrupt { .. })));
    }
}
