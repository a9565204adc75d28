//! Quiet connections: an idle leader reads its followers' answers once per
//! heartbeat round instead of waking for each one.
//!
//! A leader sends a heartbeat round every `heartbeat_interval` and every
//! follower answers it at once. Were each answer to wake the leader's
//! process, a 5-node leader would wake five times a round where once does,
//! and on a small VM each wakeup is a good part of the idle CPU. So while the
//! node task says the connections may be *quiet* ([`Quiet::set`]), a
//! connection whose socket was read empty raises its receive low-water mark
//! (`SO_RCVLOWAT`) to [`QUIET_LOWAT`] bytes: the kernel then does not report
//! the few hundred bytes of an answer as readable, so nothing wakes. At its
//! next round the node calls [`Quiet::collect`], which lowers to one byte
//! the mark of every socket holding bytes (`FIONREAD`); lowering it makes
//! the kernel report at once what arrived, and the reader tasks read it all
//! in the wakeup the round already cost. Empty sockets keep their marks up,
//! so the answers to the round the node is about to send wait for the next
//! one.
//!
//! ```text
//!   reader reads the socket empty ──(quiet)──► mark = QUIET_LOWAT: arrivals wake nobody
//!          ▲                                          │
//!          └── reactor reports the held bytes ◄── collect() / set(false): mark = 1
//! ```
//!
//! Invariants (the node task's side is in `runtime::node`):
//! 1. **Nothing is stranded.** A mark is raised only after a read found the
//!    socket empty, so what arrived before was reported; while quiet, the
//!    node calls [`Quiet::collect`] at every timer wakeup, which it has at
//!    least once per heartbeat interval, and a collection lowers every mark
//!    whose socket holds a byte; leaving quiet ([`Quiet::set`] with `false`)
//!    lowers every mark at once. A frame therefore waits at most one
//!    heartbeat interval, and only while the node is quiet.
//! 2. **Ends are never held.** The kernel wakes readers for a FIN, a reset
//!    or a `TCP_USER_TIMEOUT` whatever the mark, so a crash is reported as
//!    promptly as without it. A connection closing on purpose that is no
//!    longer registered (the loser of a double dial) is read in full when
//!    its FIN arrives.
//! 3. **Bounded.** A raised mark is small ([`QUIET_LOWAT`]): a peer sending
//!    more than a trickle is read as soon as that much is queued.
//! 4. **The lease does not change.** The core counts a round toward the lease
//!    by when the leader *sent* it (the round each answer carries), never by
//!    when the answer was read, so reading answers one round late only
//!    computes the same lease later: at each round the lease has
//!    `lease − 2 × heartbeat_interval` left (48.5 ms at the defaults) instead
//!    of `lease − heartbeat_interval`. The node is quiet only while more
//!    than `runtime::node`'s margin (30 ms) is left, and wakes when it is
//!    down to it, so an answer lost or late is read as it arrives before the
//!    lease could lapse for want of it. What quiet does cost: a leader whose
//!    thread is held up by more than 48.5 ms at a round (not 98.5) loses its
//!    lease until the answers are read.
//! 5. **Marks serialize.** Raising and lowering a mark happen under one lock,
//!    and the quiet flag is read under it, so a mark is never left raised
//!    after [`Quiet::set`] turned quiet off, whatever the threads.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tracing::debug;

/// Receive low-water mark of a quiet connection, in bytes: about fifty
/// heartbeat answers, far more than a round brings.
pub const QUIET_LOWAT: i32 = 16 * 1024;

/// The quiet switch of one transport and the marks of its connections;
/// cheap to clone.
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
pub struct Mark {
    /// A duplicate of the connection's socket, for `setsockopt` only.
    socket: OwnedFd,
    /// Whether the mark is at [`QUIET_LOWAT`].
    raised: Mutex<bool>,
    shared: Arc<Shared>,
}

impl Quiet {
    /// Creates the switch, off.
    pub fn new() -> Quiet {
        Quiet::default()
    }

    /// Returns whether connections are quiet.
    pub fn is_quiet(&self) -> bool {
        self.inner.quiet.load(Ordering::SeqCst)
    }

    /// Turns quiet on or off. Off lowers every mark: held frames are
    /// reported at once, and every later one as it arrives.
    pub fn set(&self, quiet: bool) {
        self.inner.quiet.store(quiet, Ordering::SeqCst);
        if !quiet {
            for mark in self.live() {
                mark.lower();
            }
        }
    }

    /// Has what arrived since the last collection read now: lowers the
    /// raised marks of the sockets holding bytes (the reader raises each
    /// again once it has read the socket empty). An empty socket keeps its
    /// mark up, so what arrives next waits for the next collection.
    pub fn collect(&self) {
        for mark in self.live() {
            mark.collect();
        }
    }

    /// Returns the marks of live connections; upgraded outside the lock,
    /// since the last reference to one may go with the returned list.
    fn live(&self) -> Vec<Arc<Mark>> {
        self.marks().iter().filter_map(Weak::upgrade).collect()
    }

    /// Returns how many connections' marks are raised.
    #[cfg(test)]
    pub fn raised(&self) -> usize {
        self.live().iter().filter(|m| *lock(&m.raised)).count()
    }

    /// Returns the marks' list, without those of ended connections.
    fn marks(&self) -> MutexGuard<'_, Vec<Weak<Mark>>> {
        let mut marks = lock(&self.inner.marks);
        marks.retain(|m| m.strong_count() > 0);
        marks
    }

    /// Wraps a connection's read half and registers its mark. Where the
    /// socket cannot be duplicated (out of descriptors), the connection is
    /// never quiet.
    pub fn reader(&self, half: OwnedReadHalf) -> QuietRead {
        let mark = match half.as_ref().as_fd().try_clone_to_owned() {
            Ok(socket) => {
                let mark = Arc::new(Mark {
                    socket,
                    raised: Mutex::new(false),
                    shared: self.inner.clone(),
                });
                self.marks().push(Arc::downgrade(&mark));
                Some(mark)
            }
            Err(e) => {
                debug!(error = %e, "cannot duplicate a peer socket; it is never quiet");
                None
            }
        };
        QuietRead { half, mark }
    }
}

impl Mark {
    /// Raises the mark if connections are quiet; called when a read found
    /// the socket empty.
    fn socket_empty(&self) {
        let mut raised = lock(&self.raised);
        if !*raised && self.shared.quiet.load(Ordering::SeqCst) {
            *raised = set_rcvlowat(self.socket.as_fd(), QUIET_LOWAT).is_ok();
        }
    }

    /// Lowers a raised mark to one byte; the kernel then reports what is
    /// queued (`tcp_set_rcvlowat` checks for readable data at once).
    fn lower(&self) {
        let mut raised = lock(&self.raised);
        if *raised {
            lower_locked(&self.socket, &mut raised);
        }
    }

    /// Lowers a raised mark if the socket holds bytes (or cannot tell).
    fn collect(&self) {
        let mut raised = lock(&self.raised);
        if *raised && !matches!(bytes_queued(self.socket.as_fd()), Ok(0)) {
            lower_locked(&self.socket, &mut raised);
        }
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
            // The read found the socket empty and the reactor will report
            // the next arrival; from here on, only a collection does.
            mark.socket_empty();
        }
        polled
    }
}

/// Lowers the mark of `socket`, whose `raised` flag is locked.
fn lower_locked(socket: &OwnedFd, raised: &mut bool) {
    if let Err(e) = set_rcvlowat(socket.as_fd(), 1) {
        debug!(error = %e, "cannot lower a peer socket's receive mark");
    }
    *raised = false;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Returns how many received bytes wait to be read (`FIONREAD`).
fn bytes_queued(socket: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut n: libc::c_int = 0;
    // SAFETY: `socket` is open for the borrow's lifetime, and FIONREAD
    // writes one `c_int` through the pointer, which points at `n`.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        Ok(n)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `SO_RCVLOWAT` (not in nix).
fn set_rcvlowat(socket: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    // SAFETY: `socket` is an open descriptor for the borrow's lifetime, and
    // the pointer and length describe one live `c_int`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
