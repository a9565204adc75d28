//! `raft-elector demo` end to end: the real binary starts real nodes on
//! 127.0.0.1, kills leaders, reports failovers, and leaves no process behind
//! on any way out (duration, Ctrl-C, even `kill -9` of the demo itself).

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_raft-elector");
/// Longest any demo run here may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// Returns a base port with `2 × nodes` free ports from it, or panics.
fn free_ports(nodes: u16) -> u16 {
    // Spread tests over the range by process id so parallel runs rarely meet.
    let start = 21000 + (std::process::id() % 400) as u16 * 20;
    (0..200)
        .map(|i| start + i * 2 * nodes)
        .find(|&base| (base..base + 2 * nodes).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()))
        .expect("a free port range")
}

fn demo(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Waits for `child` to end within [`RUN_LIMIT`], killing it otherwise.
fn finish(mut child: Child) -> Output {
    let deadline = Instant::now() + RUN_LIMIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not end within {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// Returns the node processes still running with `--http-listen 127.0.0.1:<port>`
/// for a port of this demo.
fn nodes_left(base_port: u16, nodes: u16) -> Vec<String> {
    let listens: Vec<String> = (0..nodes)
        .map(|i| format!("127.0.0.1:{}", base_port + 2 * i))
        .collect();
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_node = args.iter().any(|a| a == "run")
            && args
                .windows(2)
                .any(|w| w[0] == "--http-listen" && listens.contains(&w[1]));
        if is_node {
            left.push(args.join(" "));
        }
    }
    left
}

/// Polls `nodes_left` for a moment: a process SIGKILLed by the kernel may
/// take a few milliseconds to disappear.
fn assert_no_nodes_left(base_port: u16, nodes: u16) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = nodes_left(base_port, nodes);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "nodes left behind: {left:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `child`'s stdout lines on a thread; returns a receiver of them.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits until a line containing `needle` arrives; returns every line so far.
fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no line with {needle:?} in: {seen:#?}");
}

#[test]
fn the_demo_kills_leaders_reports_failover_times_and_cleans_up() {
    let base = free_ports(3);
    let child = demo(&[
        "--nodes",
        "3",
        "--no-tui",
        "--duration",
        "9s",
        "--kill-every",
        "2s",
        "--base-port",
        &base.to_string(),
    ])
    .spawn()
    .expect("start the demo");
    let output = finish(child);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{stderr}",
        output.status
    );

    let has = |needle: &str| stdout.lines().any(|l| l.contains(needle));
    assert!(has("] leader node-"), "a first leader: {stdout}");
    assert!(has("] all 3 nodes joined"), "{stdout}");
    assert!(
        has("] killed node-") && has("(kill -9)"),
        "a kill: {stdout}"
    );
    let failover = stdout
        .lines()
        .find(|l| l.contains("] new leader node-") && l.ends_with(" ms"))
        .unwrap_or_else(|| panic!("a failover with its time: {stdout}"));
    let millis: u64 = failover
        .rsplit(' ')
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a time in {failover:?}"));
    assert!((1..2000).contains(&millis), "{failover}");
    assert!(has("raft-elector demo: ran "), "a summary: {stdout}");
    assert!(has("never two leaders"), "{stdout}");
    assert!(!has("!!"), "no alarm: {stdout}");
    assert_no_nodes_left(base, 3);
}

#[test]
fn ctrl_c_ends_the_demo_with_a_summary_and_no_nodes_left() {
    let base = free_ports(1);
    let mut child = demo(&["--nodes", "1", "--no-tui", "--base-port", &base.to_string()])
        .spawn()
        .expect("start the demo");
    let lines = lines_of(&mut child);
    wait_for_line(&lines, "] leader node-1");
    assert_eq!(nodes_left(base, 1).len(), 1, "the node runs");
    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGINT).expect("SIGINT");
    let output = finish(child);
    assert!(output.status.success(), "{}", output.status);
    let rest: Vec<String> = lines.iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("(interrupted)")),
        "summary says why: {rest:#?}"
    );
    assert_no_nodes_left(base, 1);
}

#[test]
fn nodes_die_with_a_demo_killed_by_sigkill() {
    let base = free_ports(1);
    let mut child = demo(&["--nodes", "1", "--no-tui", "--base-port", &base.to_string()])
        .spawn()
        .expect("start the demo");
    let lines = lines_of(&mut child);
    let seen = wait_for_line(&lines, "] started node-1");
    child.kill().expect("kill -9 the demo");
    let _ = child.wait();
    assert_no_nodes_left(base, 1);
    // A killed demo cannot remove its directory; the first line names it.
    let workdir = seen[0].rsplit("logs: ").next().expect("the logs directory");
    assert!(workdir.contains("raft-elector-demo-"), "{}", seen[0]);
    std::fs::remove_dir_all(workdir).expect("remove the demo's directory");
}

#[test]
fn a_taken_port_is_refused_before_any_node_starts() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let child = demo(&["--nodes", "1", "--no-tui", "--base-port", &port.to_string()])
        .spawn()
        .expect("start the demo");
    let output = finish(child);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("port {port}")) && stderr.contains("--base-port"),
        "{stderr}"
    );
    assert_no_nodes_left(port, 1);
}
