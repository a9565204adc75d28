//! `raft-elector run` refuses bad flags with exit code 2 and a message that
//! names what is wrong.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_raft-elector");
const SECRET: &str = "integration-test-secret-32-bytes";

/// Flags of a valid `run` command line, each with its value.
const VALID: [(&str, &str); 5] = [
    ("--id", "node-0"),
    ("--http-listen", "127.0.0.1:0"),
    ("--peer-listen", "127.0.0.1:0"),
    ("--advertise", "127.0.0.1:4041"),
    ("--peers", "127.0.0.1:4041"),
];

/// Runs `raft-elector run` with the [`VALID`] flags, `overrides` replacing
/// or adding flags (`(flag, "")` adds a bare flag); kills it after 10 s.
fn run(overrides: &[(&str, &str)], secret: Option<&str>) -> Output {
    let mut flags: Vec<(&str, &str)> = VALID.to_vec();
    for &(flag, value) in overrides {
        match flags.iter_mut().find(|(f, _)| *f == flag) {
            Some(entry) => entry.1 = value,
            None => flags.push((flag, value)),
        }
    }
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--no-kubernetes"]);
    for (flag, value) in &flags {
        cmd.arg(flag);
        if !value.is_empty() {
            cmd.arg(value);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars() {
        if key.starts_with("RAFT_ELECTOR_") || key.starts_with("POD_") {
            cmd.env_remove(key);
        }
    }
    if let Some(secret) = secret {
        cmd.env("RAFT_ELECTOR_SECRET", secret);
    }
    let mut child = cmd.spawn().expect("start raft-elector");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("poll the child").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "raft-elector ran on with {overrides:?} instead of refusing; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("collect output")
}

fn assert_refused(out: &Output, mentions: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains(mentions),
        "stderr does not mention {mentions:?}:\n{stderr}"
    );
}

#[test]
fn an_election_timeout_min_above_the_max_exits_2_naming_both_flags() {
    let out = run(
        &[
            ("--election-timeout-min", "300ms"),
            ("--election-timeout-max", "150ms"),
        ],
        Some(SECRET),
    );
    assert_refused(&out, "--election-timeout-min");
    assert_refused(&out, "--election-timeout-max");
}

#[test]
fn a_missing_secret_exits_2_and_says_how_to_provide_one() {
    let out = run(&[], None);
    assert_refused(&out, "RAFT_ELECTOR_SECRET");
    assert_refused(&out, "--secret-file");
}

#[test]
fn a_bad_listen_address_exits_2_naming_the_flag() {
    let out = run(&[("--http-listen", "localhost:http")], Some(SECRET));
    assert_refused(&out, "--http-listen");
}

#[test]
fn an_unknown_flag_exits_2() {
    let out = run(&[("--no-such-flag", "")], Some(SECRET));
    assert_refused(&out, "--no-such-flag");
}

#[test]
fn text_logs_written_to_a_file_carry_no_escape_sequences() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).expect("create the log file");
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--no-kubernetes", "--log-format", "text"]);
    for (flag, value) in VALID {
        cmd.args([flag, value]);
    }
    // A terminal-looking environment must not matter: stderr is a file.
    cmd.env("RAFT_ELECTOR_SECRET", SECRET)
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut child = cmd.spawn().expect("start raft-elector");
    let text_path = log_path.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&text_path).unwrap_or_default();
        if text.contains("starting raft-elector") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("starting raft-elector"),
        "the node logged nothing within 10 s:\n{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "the log file holds ANSI escape sequences:\n{text:?}"
    );
}
