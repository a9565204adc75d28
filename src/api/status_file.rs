//! The status file: the `/is-leader` JSON kept on disk for apps that would
//! rather read a file (or a shared volume) than poll HTTP.

use super::status::LeaderStatus;
use super::wait::sleep_until_some;
use crate::leadership::LeaderState;
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Pause before retrying a write that failed (full disk, missing directory).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Spawns a task that keeps `path` equal to the `/is-leader` JSON of `state`,
/// rewriting it atomically (temp file, fsync, rename, fsync of the directory)
/// when the state changes and when a lease expires; stops when `shutdown`
/// resolves.
///
/// Publications that only extend the lease do not rewrite the file (a leader
/// renews its lease every heartbeat); `leaseRemainingMs` in the file is as of
/// the last write. A failed write is logged and retried every second.
pub fn spawn_status_file(
    path: PathBuf,
    state: watch::Receiver<LeaderState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(run(path, state, shutdown))
}

async fn run(
    path: PathBuf,
    mut rx: watch::Receiver<LeaderState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    let mut written: Option<LeaderStatus> = None;
    let mut closed = false;
    loop {
        let state = rx.borrow_and_update().clone();
        let now = Instant::now();
        let status = LeaderStatus::at(&state, now);
        let mut retry_at = None;
        if written.as_ref() != Some(&without_lease(&status)) {
            match write_status(&path, &status).await {
                Ok(()) => written = Some(without_lease(&status)),
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "cannot write the status file; retrying in 1s");
                    retry_at = Some(now + RETRY_AFTER_FAILURE);
                }
            }
        }
        let lease_expiry = state.lease_until.filter(|until| *until > now);
        tokio::select! {
            // The process is stopping.
            () = &mut shutdown => return,
            // A new state was published, or the runtime dropped its sender.
            changed = rx.changed(), if !closed => closed = changed.is_err(),
            // The lease runs out with nothing published: isLeader turns false.
            () = sleep_until_some(lease_expiry) => {}
            // The last write failed: try again.
            () = sleep_until_some(retry_at) => {}
        }
    }
}

/// Returns `status` with the ever-changing lease countdown zeroed, for
/// deciding whether the file needs rewriting.
fn without_lease(status: &LeaderStatus) -> LeaderStatus {
    LeaderStatus {
        lease_remaining_ms: 0,
        ..status.clone()
    }
}

async fn write_status(path: &Path, status: &LeaderStatus) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(status).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
        .await
        .map_err(io::Error::other)?
}

/// Replaces `path` with `bytes` so that readers see the old or the new file,
/// never a torn one.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the status file path has no file name",
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory entry is synced.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Role;
    use tokio::sync::oneshot;

    fn read(path: &Path) -> Option<LeaderStatus> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    async fn eventually(path: &Path, want: impl Fn(&LeaderStatus) -> bool) -> LeaderStatus {
        let give_up = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = read(path).filter(&want) {
                return status;
            }
            assert!(Instant::now() < give_up, "status file never matched");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn status_file_follows_changes_and_lease_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("status.json");
        let (tx, rx) = watch::channel(LeaderState::initial("a#1".into(), "a".into()));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = spawn_status_file(path.clone(), rx, async {
            let _ = stopped.await;
        });

        let first = eventually(&path, |s| s.node == "a").await;
        assert!(!first.is_leader);

        let mut leading = LeaderState::initial("a#1".into(), "a".into());
        leading.role = Role::Leader;
        leading.term = 2;
        leading.leader = Some("a".into());
        leading.lease_until = Some(Instant::now() + Duration::from_millis(150));
        tx.send_replace(leading);
        eventually(&path, |s| s.is_leader && s.term == 2).await;
        // Nothing is published: only the lease deadline can flip the file.
        let expired = eventually(&path, |s| !s.is_leader).await;
        assert_eq!((expired.term, expired.role.as_str()), (2, "leader"));

        let _ = stop.send(());
        task.await.expect("status file task ends cleanly");
        let tmp_left = std::fs::read_dir(dir.path())
            .expect("list dir")
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"));
        assert!(!tmp_left, "no temp file is left behind");
    }

    #[tokio::test]
    async fn status_file_task_survives_an_unwritable_path_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing-dir").join("status.json");
        let (_tx, rx) = watch::channel(LeaderState::initial("a#1".into(), "a".into()));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = spawn_status_file(path.clone(), rx, async {
            let _ = stopped.await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished());
        let _ = stop.send(());
        task.await.expect("status file task ends cleanly");
        assert!(!path.exists());
    }
}
