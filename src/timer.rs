//! The wakeup timer of the node task and of the transport's quiet reads:
//! a kernel timer (timerfd) that the reactor watches like a socket.
//!
//! tokio's timer wheel moves a pending timer down a level whenever it crosses
//! a 64 ms boundary, waking the runtime to do so, and it writes the driver's
//! eventfd whenever a new timer is earlier than the wakeup it planned. A
//! 50 ms heartbeat round scheduled with `tokio::time::sleep_until` therefore
//! costs up to three wakeups where one would do, and every wakeup is idle
//! CPU. A timerfd wakes epoll exactly once, at the deadline; re-arming it for
//! an unchanged deadline costs nothing.

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

/// A one-shot deadline timer for one task; see the module docs.
pub struct DeadlineTimer {
    /// `None` where no timerfd could be made: tokio's timer is used instead.
    fd: Option<AsyncFd<Fd>>,
    /// The deadline the kernel timer is set for.
    armed: Option<Instant>,
}

/// The timerfd, in the form `AsyncFd` takes.
struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl DeadlineTimer {
    /// Creates the timer; MUST be called inside a tokio runtime. Falls back
    /// to tokio's timer (with a log line) where the kernel has no timerfd.
    pub fn new() -> DeadlineTimer {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(std::io::Error::from)
        .and_then(|fd| {
            // SAFETY: `Fd` owns the timerfd and stays inside the `AsyncFd`
            // until it is dropped, and `as_raw_fd` always returns that fd.
            let registered = unsafe { AsyncFd::register_with_interest(Fd(fd), Interest::READABLE) };
            registered.map_err(std::io::Error::from)
        });
        match fd {
            Ok(fd) => DeadlineTimer {
                fd: Some(fd),
                armed: None,
            },
            Err(err) => {
                tracing::warn!(%err, "no timerfd; the node uses tokio's timer (more idle wakeups)");
                DeadlineTimer {
                    fd: None,
                    armed: None,
                }
            }
        }
    }

    /// Waits until `deadline`. Cancel-safe: dropping the future leaves the
    /// timer armed, and the next call re-arms it only for another deadline.
    pub async fn sleep_until(&mut self, deadline: Instant) {
        let Some(fd) = &self.fd else {
            return tokio::time::sleep_until(deadline).await;
        };
        loop {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            if self.armed != Some(deadline) {
                // Relative to `now`, rounded up to a microsecond so the
                // timer never fires before the deadline it stands for.
                let left = deadline - now;
                let left = std::time::Duration::from_micros(left.as_micros() as u64 + 1);
                let set = fd.get_ref().0.set(
                    Expiration::OneShot(TimeSpec::from_duration(left)),
                    TimerSetTimeFlags::empty(),
                );
                if let Err(err) = set {
                    tracing::warn!(%err, "cannot arm the timerfd; using tokio's timer");
                    self.fd = None;
                    return tokio::time::sleep_until(deadline).await;
                }
                self.armed = Some(deadline);
            }
            let Ok(mut ready) = fd.readable().await else {
                // The reactor is gone (runtime shutting down).
                return tokio::time::sleep_until(deadline).await;
            };
            // The expiration count is never read (one syscall less per
            // wakeup): re-arming resets it, and the clock decides whether
            // this readiness is the deadline or a stale expiry.
            ready.clear_ready();
        }
    }
}

/// Returns the first instant after now that is a whole number of `period`s
/// after a process-wide epoch: loops that repeat with the same period keep
/// a fixed order within a period (discovery looks up on the tick, the hello
/// probes go out shortly after it) instead of drifting through each other.
pub fn next_tick(period: Duration) -> Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let epoch = Instant::from_std(*EPOCH.get_or_init(std::time::Instant::now));
    tick_after(epoch, Instant::now(), period)
}

/// The first `epoch + k × period` (k ≥ 1) after `now`; a period too long
/// for the clock (an absurd flag value) gives a tick a year from now.
fn tick_after(epoch: Instant, now: Instant, period: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
    let period_ns = period.as_nanos().max(1);
    let ticks = now.saturating_duration_since(epoch).as_nanos() / period_ns + 1;
    u64::try_from(ticks.saturating_mul(period_ns))
        .ok()
        .and_then(|offset| epoch.checked_add(Duration::from_nanos(offset)))
        .unwrap_or(now + FAR)
}

impl Default for DeadlineTimer {
    fn default() -> DeadlineTimer {
        DeadlineTimer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_whole_periods_after_the_epoch() {
        let epoch = Instant::now();
        let ms = Duration::from_millis;
        let period = ms(2000);
        assert_eq!(tick_after(epoch, epoch, period), epoch + ms(2000));
        assert_eq!(
            tick_after(epoch, epoch + ms(1999), period),
            epoch + ms(2000)
        );
        assert_eq!(
            tick_after(epoch, epoch + ms(2000), period),
            epoch + ms(4000)
        );
        assert_eq!(
            tick_after(epoch, epoch + ms(5100), period),
            epoch + ms(6000)
        );
        // Two loops, one with twice the other's period: every tick of the
        // slower one is a tick of the faster one.
        let now = epoch + ms(4100);
        assert_eq!(tick_after(epoch, now, ms(4000)), epoch + ms(8000));
        assert_eq!(
            tick_after(epoch, epoch + ms(7999), period),
            epoch + ms(8000)
        );
        // A zero period cannot divide by zero, nor can a huge one overflow.
        assert!(tick_after(epoch, now, Duration::ZERO) > now);
        assert!(tick_after(epoch, now, Duration::MAX) > now);
        assert!(tick_after(epoch, now, Duration::from_secs(u64::MAX / 4)) > now);
    }

    #[tokio::test]
    async fn wakes_at_the_deadline_not_before() {
        let mut timer = DeadlineTimer::new();
        assert!(timer.fd.is_some(), "Linux has timerfd");
        for ms in [1u64, 5, 20] {
            let start = Instant::now();
            let deadline = start + Duration::from_millis(ms);
            timer.sleep_until(deadline).await;
            let woke = Instant::now();
            assert!(woke >= deadline, "woke {:?} early", deadline - woke);
            assert!(
                woke - start < Duration::from_millis(ms + 200),
                "woke {:?} late",
                woke - deadline
            );
        }
    }

    #[tokio::test]
    async fn a_cancelled_wait_does_not_cut_the_next_one_short() {
        let mut timer = DeadlineTimer::new();
        let soon = Instant::now() + Duration::from_millis(5);
        // Cancel a wait for `soon`, let it fire unobserved, then wait longer.
        let _ = tokio::time::timeout(Duration::from_millis(1), timer.sleep_until(soon)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        let later = Instant::now() + Duration::from_millis(30);
        timer.sleep_until(later).await;
        assert!(
            Instant::now() >= later,
            "the stale expiry woke the new wait"
        );
    }

    #[tokio::test]
    async fn a_past_deadline_returns_at_once() {
        let mut timer = DeadlineTimer::new();
        let start = Instant::now();
        timer.sleep_until(start - Duration::from_millis(1)).await;
        timer.sleep_until(start).await;
        assert!(start.elapsed() < Duration::from_millis(50));
    }
}
