//! Quiet connections: an idle leader reads its followers' answers once per
//! heartbeat round instead of waking for each one.
//!
//! While the node task says connections may be *quiet* ([`Quiet::set`]), a
//! connection whose socket was read empty raises its receive low-water mark
//! (`SO_RCVLOWAT`) to [`QUIET_LOWAT`]: the kernel then does not report an
//! answer's few hundred bytes as readable, and nothing wakes. At its next
//! round the node calls [`Quiet::collect`], which lowers to one byte the mark
//! of every socket holding bytes (`FIONREAD`); the kernel reports them at
//! once and the readers read them in the wakeup the round already cost.
//! Empty sockets keep their marks up, so the answers to the round about to
//! be sent wait for the next one.
//!
//! Invariants (the node task's side is in `runtime::node`, "Quiet rounds"):
//! 1. **Nothing is stranded.** A mark goes up only after a read found the
//!    socket empty, so what arrived before was reported. While quiet, the
//!    node collects at every timer wakeup (at least once per heartbeat
//!    interval); leaving quiet lowers every mark. A frame waits at most one
//!    heartbeat interval, and only while the node is quiet.
//! 2. **Ends are never held.** The kernel wakes readers for a FIN, a reset
//!    or a `TCP_USER_TIMEOUT` whatever the mark, so a crash is reported as
//!    promptly as without it.
//! 3. **Bounded.** A peer sending more than [`QUIET_LOWAT`] bytes is read as
//!    soon as that much is queued.
//! 4. **The lease does not change.** The core counts a round toward it by
//!    when the leader *sent* it (each answer carries that), so answers read
//!    a round late give the same lease later: `lease − 2 × heartbeat` left
//!    at each round (48.5 ms at the defaults) instead of `lease − heartbeat`.
//!    The node is quiet only while more than 30 ms of lease is left and
//!    wakes when it is down to that, so a late answer is read as it arrives
//!    before the lease could lapse for want of it. The cost: a leader thread
//!    held up by more than 48.5 ms (not 98.5) at a round lapses its lease.
//! 5. **Marks serialize.** A mark is raised and lowered under its lock, and
//!    the quiet flag is read under it, so no mark stays up after quiet ends.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tracing::debug;

/// Receive low-water mark of a quiet connection: ~50 heartbeat answers.
pub const QUIET_LOWAT: i32 = 16 * 1024;

/// The quiet switch of one transport and its connections' marks.
#[derive(Clone, Default)]
pub struct Quiet {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    quiet: AtomicBool,
    marks: Mutex<Vec<Weak<Mark>>>,
}

/// The receive low-water mark of one connection's socket.
struct Mark {
    /// A duplicate of the connection's socket, for `setsockopt` only.
    socket: OwnedFd,
    /// Whether the mark is at [`QUIET_LOWAT`].
    raised: Mutex<bool>,
    shared: Arc<Shared>,
}

impl Quiet {
    /// Turns quiet on or off. Off lowers every mark: held frames are read
    /// at once, and every later one as it arrives.
    pub fn set(&self, quiet: bool) {
        self.inner.quiet.store(quiet, Ordering::SeqCst);
        if !quiet {
            self.live().iter().for_each(|m| m.lower(false));
        }
    }

    /// Has what arrived since the last collection read now (see the module
    /// docs).
    pub fn collect(&self) {
        self.live().iter().for_each(|m| m.lower(true));
    }

    /// Returns the marks of live connections (upgraded outside the lock:
    /// the last reference to one may go with the returned list).
    fn live(&self) -> Vec<Arc<Mark>> {
        let mut marks = lock(&self.inner.marks);
        marks.retain(|m| m.strong_count() > 0);
        marks.iter().filter_map(Weak::upgrade).collect()
    }

    /// Returns how many connections' marks are raised.
    #[cfg(test)]
    pub fn raised(&self) -> usize {
        self.live().iter().filter(|m| *lock(&m.raised)).count()
    }

    /// Wraps a connection's read half and registers its mark. A socket that
    /// cannot be duplicated (out of descriptors) is never quiet.
    pub fn reader(&self, half: OwnedReadHalf) -> QuietRead {
        let socket = half.as_ref().as_fd().try_clone_to_owned();
        let socket = socket.inspect_err(|e| debug!(error = %e, "a peer socket is never quiet"));
        let mark = socket.ok().map(|socket| {
            let shared = self.inner.clone();
            let mark = Arc::new(Mark {
                socket,
                raised: Mutex::new(false),
                shared,
            });
            lock(&self.inner.marks).push(Arc::downgrade(&mark));
            mark
        });
        QuietRead { half, mark }
    }
}

impl Mark {
    /// Raises the mark if connections are quiet; called when a read found
    /// the socket empty.
    fn socket_empty(&self) {
        let mut raised = lock(&self.raised);
        if !*raised && self.shared.quiet.load(Ordering::SeqCst) {
            let fd = self.socket.as_fd();
            *raised = set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, QUIET_LOWAT).is_ok();
        }
    }

    /// Lowers a raised mark to one byte (with `if_holding`, only where the
    /// socket holds bytes or cannot tell); the kernel then reports what is
    /// queued at once (`tcp_set_rcvlowat` checks).
    fn lower(&self, if_holding: bool) {
        let mut raised = lock(&self.raised);
        let fd = self.socket.as_fd();
        if !*raised || (if_holding && matches!(bytes_queued(fd), Ok(0))) {
            return;
        }
        if let Err(e) = set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1) {
            debug!(error = %e, "cannot lower a peer socket's receive mark");
        }
        *raised = false;
    }
}

/// A connection's read half that raises its mark when read empty.
pub struct QuietRead {
    half: OwnedReadHalf,
    mark: Option<Arc<Mark>>,
}

impl AsyncRead for QuietRead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.half).poll_read(cx, buf);
        if let (Poll::Pending, Some(mark)) = (&polled, &this.mark) {
            // Read empty: the reactor reports the next arrival, after this
            // only a collection does.
            mark.socket_empty();
        }
        polled
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Returns how many received bytes wait to be read (`FIONREAD`).
fn bytes_queued(socket: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut n: libc::c_int = 0;
    // SAFETY: `socket` is open for the borrow, and FIONREAD writes one
    // `c_int` through the pointer, which points at `n`.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) };
    (rc == 0).then_some(n).ok_or_else(io::Error::last_os_error)
}

/// Sets an integer socket option (for those nix does not have).
pub fn set_int_option(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `socket` is open for the borrow, and the pointer and length
    // describe one live `c_int`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    (rc == 0).then_some(()).ok_or_else(io::Error::last_os_error)
}
