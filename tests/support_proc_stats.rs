//! The benchmarks' process CPU and memory readings (`support::proc_stats`):
//! a thread other than the main one is counted, a gone process reads as none.

mod support;

use support::proc_stats::{cpu_nanos, rss_mib};

#[test]
fn a_busy_thread_that_is_not_the_main_thread_is_counted() {
    let pid = std::process::id();
    let before = cpu_nanos(pid).expect("own CPU clock");
    // Burn ~50 ms of CPU on a second thread, which then exits.
    std::thread::spawn(|| {
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    })
    .join()
    .expect("burner thread");
    let used = cpu_nanos(pid).expect("own CPU clock") - before;
    assert!(used >= 40_000_000, "only {used} ns counted");
    assert!(rss_mib(pid).expect("own RSS") > 0.0);
}

#[test]
fn a_process_that_is_gone_reads_as_none() {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait true");
    assert_eq!(rss_mib(pid), None);
    assert_eq!(cpu_nanos(pid), None);
}
