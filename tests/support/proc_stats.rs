//! CPU time and memory of a running process, for the idle measurements of
//! the benchmarks.
//!
//! CPU time is the kernel's exact count for the whole process: the CPU-time
//! clock of its thread group (`clock_getcpuclockid`), which sums every
//! thread, including threads that have already exited. Reading
//! `/proc/<pid>/schedstat` instead counts the main thread only (a Go
//! program, whose work runs on other threads, reads as zero), and
//! `/proc/<pid>/stat` rounds to 10 ms ticks, a whole millicore over a
//! 10 s window.
#![allow(dead_code)]

use nix::time::{clock_getcpuclockid, clock_gettime};
use nix::unistd::Pid;

/// Returns the CPU time all of `pid`'s threads have run, in nanoseconds,
/// or `None` once the process is gone.
pub fn cpu_nanos(pid: u32) -> Option<u64> {
    let clock = clock_getcpuclockid(Pid::from_raw(pid as i32)).ok()?;
    let t = clock_gettime(clock).ok()?;
    Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// Returns `pid`'s resident memory (VmRSS) in MiB, or `None` once the
/// process is gone.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
