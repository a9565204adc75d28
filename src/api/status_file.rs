//! The status file: the `/is-leader` JSON kept on disk for apps that would
//! rather read a file (or a shared volume) than poll HTTP.
//!
//! Invariant: the file is either the last successfully written status or
//! absent. When a write fails (full disk, a directory squatting on the temp
//! name `.<name>.tmp`), the old file is removed rather than left behind, so a
//! stale `"isLeader":true` never outlives the leadership it reports. Readers
//! MUST treat a missing file as "not leader" (as they would a file saying
//! `"isLeader":false`).

use super::status::LeaderStatus;
use super::wait::sleep_until_some;
use crate::leadership::LeaderState;
use crate::metrics::Metrics;
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
/// the last write. A failed write is logged, counted in
/// `metrics.status_file_errors`, removes the old file (see the module doc)
/// and is retried every second.
pub fn spawn_status_file(
    path: PathBuf,
    state: watch::Receiver<LeaderState>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(run(path, state, metrics, shutdown))
}

async fn run(
    path: PathBuf,
    mut rx: watch::Receiver<LeaderState>,
    metrics: Metrics,
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
                    metrics.status_file_errors.inc();
                    tracing::warn!(path = %path.display(), error = %err, "cannot write the status file; removing it (a missing file means not leader) and retrying in 1s");
                    remove_stale(&path).await;
                    // The file no longer holds any status: the next round
                    // rewrites it whatever the state is then.
                    written = None;
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

/// Removes the status file after a failed write, so that it cannot go on
/// claiming a leadership this node may have lost; best effort, a failure
/// other than "already gone" is logged.
async fn remove_stale(path: &Path) {
    let owned = path.to_path_buf();
    let removed = tokio::task::spawn_blocking(move || std::fs::remove_file(owned))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
    match removed {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the stale status file either; it may still report an old leadership")
        }
    }
}

/// Checks at startup, without writing anything, that `path` can serve as
/// the status file: it has a file name, is not a directory, its temp name
/// (`.<name>.tmp`) is not a directory, and its parent directory exists and
/// is a directory. Permissions and free space are not checked (a write that
/// fails later is handled as the module doc says).
pub fn check_status_file(path: &Path) -> io::Result<()> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    if path.file_name().is_none() {
        return Err(invalid(format!(
            "status file {} has no file name",
            path.display()
        )));
    }
    if path.is_dir() {
        return Err(invalid(format!(
            "status file {} is a directory",
            path.display()
        )));
    }
    let tmp = temp_path(path)?;
    if tmp.is_dir() {
        return Err(invalid(format!(
            "the status file's temp name {} is a directory; remove it",
            tmp.display()
        )));
    }
    let dir = parent_dir(path);
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(invalid(format!(
            "the status file's parent {} is not a directory",
            dir.display()
        ))),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!(
                "the status file's directory {} is not usable: {e}",
                dir.display()
            ),
        )),
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The temp file written before the rename: `.<name>.tmp` next to `path`.
fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the status file path has no file name",
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(".tmp");
    Ok(parent_dir(path).join(tmp_name))
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
    let tmp = temp_path(path)?;
    let dir = parent_dir(path);
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
        let task = spawn_status_file(path.clone(), rx, Metrics::new(), async {
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
    async fn a_failed_write_after_leading_leaves_no_file_claiming_leadership() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("status.json");
        let mut leading = LeaderState::initial("a#1".into(), "a".into());
        leading.role = Role::Leader;
        leading.term = 2;
        leading.leader = Some("a".into());
        leading.lease_until = Some(Instant::now() + Duration::from_secs(60));
        let (tx, rx) = watch::channel(leading);
        let (stop, stopped) = oneshot::channel::<()>();
        let metrics = Metrics::new();
        let task = spawn_status_file(path.clone(), rx, metrics.clone(), async {
            let _ = stopped.await;
        });
        eventually(&path, |s| s.is_leader).await;

        // A directory on the temp name makes every further write fail.
        let tmp = dir.path().join(".status.json.tmp");
        std::fs::create_dir(&tmp).expect("squat the temp name");
        let mut follower = LeaderState::initial("a#1".into(), "a".into());
        follower.term = 3;
        tx.send_replace(follower);
        let give_up = Instant::now() + Duration::from_secs(5);
        while path.exists() {
            assert!(Instant::now() < give_up, "the stale file was never removed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(metrics.status_file_errors.get() >= 1);

        // Once writes work again, the retry brings the file back.
        std::fs::remove_dir(&tmp).expect("free the temp name");
        let back = eventually(&path, |s| s.term == 3).await;
        assert!(!back.is_leader);

        let _ = stop.send(());
        task.await.expect("status file task ends cleanly");
    }

    #[test]
    fn check_status_file_accepts_a_normal_path_and_refuses_unusable_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("status.json");
        check_status_file(&path).expect("a new file in an existing directory");
        std::fs::write(&path, "{}").expect("write");
        check_status_file(&path).expect("an existing file");

        assert!(check_status_file(dir.path()).is_err(), "a directory");
        let missing = dir.path().join("missing-dir").join("status.json");
        assert!(check_status_file(&missing).is_err(), "a missing parent");
        let under_file = path.join("status.json");
        assert!(check_status_file(&under_file).is_err(), "a file as parent");
        std::fs::create_dir(dir.path().join(".other.json.tmp")).expect("mkdir");
        let squatted = dir.path().join("other.json");
        assert!(
            check_status_file(&squatted).is_err(),
            "a squatted temp name"
        );
    }

    #[tokio::test]
    async fn status_file_task_survives_an_unwritable_path_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing-dir").join("status.json");
        let (_tx, rx) = watch::channel(LeaderState::initial("a#1".into(), "a".into()));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = spawn_status_file(path.clone(), rx, Metrics::new(), async {
            let _ = stopped.await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished());
        let _ = stop.send(());
        task.await.expect("status file task ends cleanly");
        assert!(!path.exists());
    }
}
