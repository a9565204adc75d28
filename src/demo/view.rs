//! What the demo shows: the live screen, the plain event lines of
//! `--no-tui`, and the summary at exit. Pure functions from state to text, so
//! they are tested without a terminal.

use super::cluster::{Life, FAULT_LENGTH};
use super::timeline::{human, Event, Failover, FaultKind, Observation, Reply, Severity, Violation};
use std::fmt::Write as _;
use std::time::Duration;
use tokio::time::Instant;

const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const CYAN: &str = "\x1b[36m";
const INVERSE_GREEN: &str = "\x1b[1;30;42m";
const ALARM: &str = "\x1b[1;97;41m";

/// Failovers drawn as bars under the stats (the newest).
const MAX_CHART_ROWS: usize = 5;
/// Time one cell of a failover bar stands for.
const CHART_CELL: Duration = Duration::from_millis(20);
/// Longest failover bar; longer failovers end in an arrow.
const MAX_CHART_CELLS: usize = 40;
/// Cells of the lease bar.
const LEASE_CELLS: usize = 6;

/// An event with the time it happened, counted from the demo's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    /// Since the demo started.
    pub at: Duration,
    /// What happened.
    pub event: Event,
}

/// One row of the node table.
#[derive(Clone, Debug)]
pub struct NodeRow {
    /// Member name.
    pub name: String,
    /// Process id while it has a process.
    pub pid: Option<u32>,
    /// What the process is going through.
    pub life: Life,
    /// The newest poll of the node.
    pub latest: Option<Observation>,
}

/// Everything one frame of the live screen shows.
#[derive(Clone, Debug)]
pub struct Frame<'a> {
    /// The node table.
    pub nodes: &'a [NodeRow],
    /// Index of the node that leads now.
    pub leader: Option<usize>,
    /// When the frame is drawn.
    pub now: Instant,
    /// Since the demo started.
    pub uptime: Duration,
    /// Completed failovers.
    pub failovers: &'a [Failover],
    /// Median and longest failover.
    pub stats: Option<(Duration, Duration)>,
    /// A fault still waiting for a new leader.
    pub pending: Option<(FaultKind, Instant)>,
    /// Two-leader violations seen.
    pub violations: &'a [Violation],
    /// The event log, oldest first; the newest that fit are shown.
    pub events: &'a [Logged],
    /// A line under the title (how to try the API, where the logs are).
    pub hint: &'a str,
    /// Timers, e.g. `kill -9 every 10 s`; empty when none.
    pub schedule: &'a str,
    /// Length of a full lease, for the lease bar.
    pub lease: Duration,
    /// Terminal size in columns and rows.
    pub size: (u16, u16),
}

/// Renders `frame` as the lines of the screen (with ANSI colors, no newlines),
/// exactly as many as the terminal has rows (at least the fixed part).
pub fn render(frame: &Frame<'_>) -> Vec<String> {
    let (width, height) = (usize::from(frame.size.0), usize::from(frame.size.1));
    let mut lines = vec![title(frame), paint(DIM, &format!(" {}", frame.hint))];
    for violation in frame.violations.iter().take(2) {
        lines.push(paint(ALARM, &fit(&format!(" !! {violation} "), width)));
    }
    lines.push(String::new());
    lines.push(paint(
        DIM,
        &format!(
            "   {:<8} {:<7} {:<20} {:<17} {:>4}  {:<8} {}",
            "NODE", "PID", "PROCESS", "ROLE", "TERM", "LEADER", "LEASE"
        ),
    ));
    for (index, row) in frame.nodes.iter().enumerate() {
        lines.push(node_line(row, frame.leader == Some(index), frame));
    }
    lines.push(String::new());
    lines.push(stats_line(frame));
    let recent = frame.failovers.len().saturating_sub(MAX_CHART_ROWS);
    for failover in &frame.failovers[recent..] {
        lines.push(chart_line(failover));
    }
    lines.push(String::new());
    lines.push(paint(BOLD, " events"));

    let bottom = [paint(DIM, &format!(" {}", frame.schedule)), keys_line()];
    let room = height.saturating_sub(lines.len() + bottom.len()).max(1);
    let shown = frame.events.len().saturating_sub(room);
    for logged in &frame.events[shown..] {
        lines.push(event_line(logged, width));
    }
    while lines.len() + bottom.len() < height {
        lines.push(String::new());
    }
    lines.extend(bottom);
    lines.iter().map(|line| fit_painted(line, width)).collect()
}

/// Draws one failover as a bar, one cell per [`CHART_CELL`].
fn chart_line(failover: &Failover) -> String {
    let cells = (failover.took.as_millis() / CHART_CELL.as_millis()) as usize;
    let bar = "█".repeat(cells.clamp(1, MAX_CHART_CELLS));
    let more = if cells > MAX_CHART_CELLS { "▶" } else { "" };
    format!(
        "   {:<8} {:>7} → {:<7} {:>7}  {}",
        failover.kind.short(),
        failover.from,
        failover.to,
        human(failover.took),
        paint(GREEN, &format!("{bar}{more}"))
    )
}

fn title(frame: &Frame<'_>) -> String {
    let secs = frame.uptime.as_secs();
    let verdict = if frame.violations.is_empty() {
        paint(GREEN, "never two leaders")
    } else {
        paint(ALARM, " TWO LEADERS SEEN ")
    };
    let about = format!(
        " {} nodes on 127.0.0.1 · up {}m {:02}s · ",
        frame.nodes.len(),
        secs / 60,
        secs % 60
    );
    format!(
        "{} {}{verdict}",
        paint(INVERSE_GREEN, " raft-elector demo "),
        paint(DIM, &about),
    )
}

fn node_line(row: &NodeRow, is_leader: bool, frame: &Frame<'_>) -> String {
    let now = frame.now;
    let pid = row.pid.map_or("-".to_string(), |pid| pid.to_string());
    let (process, process_color) = process_text(row.life, now);
    let (role, term, leader, lease, role_color) = match row.latest.as_ref().map(|o| &o.reply) {
        Some(Reply::Answered { leading, status }) => {
            let role = match (leading, status.role.as_str()) {
                (true, _) => "LEADER".to_string(),
                (false, "leader") => "leader (no lease)".to_string(),
                (false, role) => role.to_string(),
            };
            let lease = if *leading {
                lease_bar(status.lease_remaining_ms, frame.lease)
            } else {
                String::new()
            };
            let color = match status.role.as_str() {
                _ if *leading => GREEN,
                "follower" => "",
                _ => YELLOW,
            };
            let leader = status.leader.clone().unwrap_or_else(|| "-".into());
            (role, status.term.to_string(), leader, lease, color)
        }
        Some(Reply::NoAnswer { reason }) if row.life == Life::Running => (
            reason.clone(),
            String::new(),
            String::new(),
            String::new(),
            YELLOW,
        ),
        _ => Default::default(),
    };
    let marker = if is_leader { "▶" } else { " " };
    let name = format!("{:<8}", row.name);
    let name = if is_leader {
        paint(INVERSE_GREEN, &name)
    } else {
        paint(BOLD, &name)
    };
    format!(
        " {} {} {:<7} {} {} {:>4}  {:<8} {}",
        paint(GREEN, marker),
        name,
        pid,
        paint(process_color, &format!("{process:<20}")),
        paint(role_color, &format!("{:<17}", fit(&role, 17))),
        term,
        fit(&leader, 8),
        lease
    )
}

/// Draws the lease left as a bar of the full lease, then in milliseconds.
fn lease_bar(remaining_ms: u64, full: Duration) -> String {
    let full_ms = full.as_millis().max(1);
    let filled = (u128::from(remaining_ms) * LEASE_CELLS as u128).div_ceil(full_ms);
    let filled = usize::try_from(filled)
        .unwrap_or(LEASE_CELLS)
        .min(LEASE_CELLS);
    format!(
        "{}{} {remaining_ms:>3} ms",
        paint(GREEN, &"▰".repeat(filled)),
        paint(DIM, &"▱".repeat(LEASE_CELLS - filled))
    )
}

/// Describes a node's process and picks its color.
fn process_text(life: Life, now: Instant) -> (String, &'static str) {
    let left = |at: Instant| human_short(at.saturating_duration_since(now));
    match life {
        Life::Running => ("running".into(), ""),
        Life::Frozen { thaw_at, .. } => (format!("frozen, {} left", left(thaw_at)), CYAN),
        Life::Killed { restart_at } => (format!("killed, back in {}", left(restart_at)), RED),
        Life::Stopping { restart_at, .. } => {
            (format!("SIGTERM, back in {}", left(restart_at)), RED)
        }
        Life::Exited => ("exited (see log)".into(), RED),
    }
}

/// Formats a short countdown: `1.4s`.
fn human_short(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

fn stats_line(frame: &Frame<'_>) -> String {
    let leader = match (frame.pending, frame.leader.and_then(|i| frame.nodes.get(i))) {
        (Some((kind, at)), _) => {
            let running = frame.now.saturating_duration_since(at);
            let text = format!("failing over after {}: {}", kind.short(), human(running));
            paint(YELLOW, &text)
        }
        (None, Some(row)) => {
            let term = row
                .latest
                .as_ref()
                .and_then(|o| o.reply.status())
                .map_or(0, |s| s.term);
            paint(GREEN, &format!("leader {} (term {term})", row.name))
        }
        (None, None) => paint(YELLOW, "no leader"),
    };
    let mut line = format!(" {leader} · failovers {}", frame.failovers.len());
    if let Some((median, max)) = frame.stats {
        let _ = write!(line, " (median {}, max {})", human(median), human(max));
    }
    line
}

fn event_line(logged: &Logged, width: usize) -> String {
    let text = fit(
        &format!("{:>9.3}s  {}", logged.at.as_secs_f64(), logged.event),
        width.saturating_sub(1),
    );
    let color = match logged.event.severity() {
        Severity::Info => DIM,
        Severity::Fault => YELLOW,
        Severity::Leader => GREEN,
        Severity::Trouble => RED,
        Severity::Alarm => ALARM,
    };
    format!(" {}", paint(color, &text))
}

fn keys_line() -> String {
    let key = |k: &str, what: &str| format!("{} {what}", paint(INVERSE_GREEN, &format!(" {k} ")));
    format!(
        " {}  {}  {}  {}",
        key("k", "kill -9 leader"),
        key(
            "p",
            &format!("freeze leader (SIGSTOP {})", human_short(FAULT_LENGTH))
        ),
        key("t", "graceful handoff (SIGTERM)"),
        key("q", "quit"),
    )
}

/// Returns the plain line of `logged` printed by `--no-tui`.
pub fn plain_line(logged: &Logged) -> String {
    let alarm = if logged.event.severity() == Severity::Alarm {
        "!! "
    } else {
        ""
    };
    format!(
        "[{:>9.3}s] {alarm}{}",
        logged.at.as_secs_f64(),
        logged.event
    )
}

/// What the summary at exit reports.
#[derive(Clone, Debug)]
pub struct Summary<'a> {
    /// How long the demo ran.
    pub ran: Duration,
    /// Nodes it ran.
    pub nodes: usize,
    /// Why it ended (`duration reached`, `q pressed`, ...).
    pub reason: &'a str,
    /// Completed failovers.
    pub failovers: &'a [Failover],
    /// Median and longest failover.
    pub stats: Option<(Duration, Duration)>,
    /// A fault still waiting for a new leader at exit.
    pub pending: Option<FaultKind>,
    /// Two-leader violations.
    pub violations: &'a [Violation],
    /// Polls answered and checked.
    pub polls: u64,
}

/// Renders the summary printed at exit (plain text, one line each).
pub fn summary(s: &Summary<'_>) -> String {
    let mut out = format!(
        "raft-elector demo: ran {} with {} nodes ({})\n",
        human(s.ran),
        s.nodes,
        s.reason
    );
    let _ = write!(out, "failovers: {}", s.failovers.len());
    if let Some((median, max)) = s.stats {
        let _ = write!(out, " (median {}, max {})", human(median), human(max));
    }
    out.push('\n');
    for (i, f) in s.failovers.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {:>2}. {} of {} -> {} (term {}) in {}",
            i + 1,
            f.kind,
            f.from,
            f.to,
            f.term,
            human(f.took)
        );
    }
    if let Some(kind) = s.pending {
        let _ = writeln!(out, "  unfinished: {kind} had no new leader yet at exit");
    }
    if s.violations.is_empty() {
        let _ = writeln!(out, "never two leaders: {} polls checked", s.polls);
    } else {
        for violation in s.violations {
            let _ = writeln!(out, "!! {violation}");
        }
    }
    out
}

/// Wraps `text` in `color` (nothing when `color` is empty).
fn paint(color: &str, text: &str) -> String {
    if color.is_empty() {
        text.to_string()
    } else {
        format!("{color}{text}{RESET}")
    }
}

/// Cuts plain `text` to at most `width` characters, marking the cut with `…`.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Cuts `line`, which may hold ANSI color sequences, to `width` visible
/// characters, keeping the sequences so colors end where they should.
fn fit_painted(line: &str, width: usize) -> String {
    if strip_ansi(line).chars().count() <= width {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len());
    let mut visible = 0;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            out.push(c);
            for c in chars.by_ref() {
                out.push(c);
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if visible + 1 < width {
            out.push(c);
            visible += 1;
        }
    }
    out.push('…');
    out.push_str(RESET);
    out
}

/// Removes ANSI color sequences (for tests and width checks).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::LeaderStatus;
    use crate::demo::timeline::Cause;

    const MS: Duration = Duration::from_millis(1);

    fn answered(node: usize, leading: bool, role: &str, now: Instant) -> Option<Observation> {
        Some(Observation {
            node,
            sent: now,
            received: now,
            reply: Reply::Answered {
                leading,
                status: LeaderStatus {
                    is_leader: leading,
                    node: format!("node-{}", node + 1),
                    node_id: String::new(),
                    role: role.into(),
                    leader: Some("node-1".into()),
                    leader_id: None,
                    leader_address: None,
                    term: 3,
                    lease_remaining_ms: if leading { 141 } else { 0 },
                    voters: 3,
                    learners: 0,
                },
            },
        })
    }

    fn rows(now: Instant) -> Vec<NodeRow> {
        vec![
            NodeRow {
                name: "node-1".into(),
                pid: Some(41230),
                life: Life::Running,
                latest: answered(0, true, "leader", now),
            },
            NodeRow {
                name: "node-2".into(),
                pid: Some(41231),
                life: Life::Frozen {
                    since: now,
                    thaw_at: now + 1200 * MS,
                },
                latest: None,
            },
            NodeRow {
                name: "node-3".into(),
                pid: None,
                life: Life::Killed {
                    restart_at: now + 1500 * MS,
                },
                latest: answered(2, false, "follower", now),
            },
        ]
    }

    fn frame<'a>(
        nodes: &'a [NodeRow],
        events: &'a [Logged],
        violations: &'a [Violation],
        now: Instant,
    ) -> Frame<'a> {
        Frame {
            nodes,
            leader: Some(0),
            now,
            uptime: Duration::from_secs(62),
            failovers: &[],
            stats: Some((182 * MS, 240 * MS)),
            pending: None,
            violations,
            events,
            hint: "try: curl -i 127.0.0.1:14040/is-leader",
            schedule: "kill -9 every 10 s",
            lease: Duration::from_millis(148),
            size: (100, 30),
        }
    }

    fn plain(lines: &[String]) -> String {
        lines
            .iter()
            .map(|l| strip_ansi(l))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn logged(ms: u64, event: Event) -> Logged {
        Logged {
            at: Duration::from_millis(ms),
            event,
        }
    }

    #[test]
    fn the_screen_highlights_the_leader_and_shows_each_process() {
        let now = Instant::now();
        let nodes = rows(now);
        let events = [logged(
            1234,
            Event::Fault {
                node: "node-1".into(),
                kind: FaultKind::Kill,
            },
        )];
        let lines = render(&frame(&nodes, &events, &[], now));
        let text = plain(&lines);
        assert!(text.contains("up 1m 02s"), "{text}");
        let leader_row = text.lines().find(|l| l.contains("node-1 ")).expect("row");
        assert!(
            leader_row.contains('▶') && leader_row.contains("LEADER"),
            "{leader_row}"
        );
        assert!(leader_row.contains("▰▰▰▰▰▰ 141 ms"), "{leader_row}");
        assert!(text.contains(" kill -9 every 10 s\n"), "{text}");
        assert!(text.contains("frozen, 1.2s left"), "{text}");
        assert!(text.contains("killed, back in 1.5s"), "{text}");
        assert!(
            text.contains("failovers 0 (median 182 ms, max 240 ms)"),
            "{text}"
        );
        assert!(text.contains("never two leaders"), "{text}");
        assert!(
            text.contains("    1.234s  killed node-1 (kill -9)"),
            "{text}"
        );
        assert!(text.contains("freeze leader (SIGSTOP 2.0s)"), "{text}");
        assert_eq!(lines.len(), 30, "fills the terminal height");
        assert!(!text.contains("!!"));
    }

    #[test]
    fn two_leaders_are_shown_as_a_banner_and_stop_the_all_clear() {
        let now = Instant::now();
        let nodes = rows(now);
        let violations = [Violation::SameTerm {
            first: "node-1".into(),
            second: "node-2".into(),
            term: 3,
        }];
        let lines = render(&frame(&nodes, &[], &violations, now));
        assert!(lines[2].starts_with(ALARM), "{:?}", lines[2]);
        let text = plain(&lines);
        assert!(text.contains("!! TWO LEADERS: node-1 and node-2"), "{text}");
        assert!(!text.contains("never two leaders"), "{text}");
        assert!(
            text.lines()
                .next()
                .is_some_and(|l| l.contains("TWO LEADERS SEEN")),
            "{text}"
        );
    }

    #[test]
    fn only_the_newest_events_that_fit_are_shown() {
        let now = Instant::now();
        let nodes = rows(now);
        let events: Vec<Logged> = (0..100)
            .map(|i| {
                logged(
                    i,
                    Event::NoLeader {
                        kind: FaultKind::Kill,
                    },
                )
            })
            .collect();
        let mut f = frame(&nodes, &events, &[], now);
        f.size = (80, 20);
        let lines = render(&f);
        assert_eq!(lines.len(), 20);
        let text = plain(&lines);
        assert!(text.contains("0.099s"), "newest shown");
        assert!(!text.contains(" 0.000s"), "oldest dropped");
        for line in &lines {
            let width = strip_ansi(line).chars().count();
            assert!(width <= 80, "{width} columns: {line}");
        }
    }

    #[test]
    fn failovers_are_drawn_as_bars_of_twenty_ms_a_cell() {
        let now = Instant::now();
        let nodes = rows(now);
        let failover = |took_ms: u64| Failover {
            kind: FaultKind::Kill,
            from: "node-1".into(),
            to: "node-5".into(),
            term: 2,
            took: Duration::from_millis(took_ms),
        };
        let failovers: Vec<Failover> = [5, 203, 900, 1, 1, 1].map(failover).into();
        let mut f = frame(&nodes, &[], &[], now);
        f.failovers = &failovers;
        let text = plain(&render(&f));
        let bars: Vec<&str> = text.lines().filter(|l| l.contains(" → ")).collect();
        assert_eq!(bars.len(), 5, "the newest five: {text}");
        assert!(
            bars[0].ends_with(&format!("203 ms  {}", "█".repeat(10))),
            "{}",
            bars[0]
        );
        assert!(
            bars[1].ends_with(&format!("{}▶", "█".repeat(40))),
            "{}",
            bars[1]
        );
        assert!(
            bars[4].ends_with("1 ms  █"),
            "at least one cell: {}",
            bars[4]
        );
    }

    #[test]
    fn the_lease_bar_shows_the_share_of_a_full_lease_left() {
        let full = Duration::from_millis(148);
        assert_eq!(strip_ansi(&lease_bar(70, full)), "▰▰▰▱▱▱  70 ms");
        assert_eq!(strip_ansi(&lease_bar(0, full)), "▱▱▱▱▱▱   0 ms");
        assert_eq!(strip_ansi(&lease_bar(500, full)), "▰▰▰▰▰▰ 500 ms");
    }

    #[test]
    fn plain_lines_carry_the_time_and_mark_alarms() {
        let line = plain_line(&logged(
            5182,
            Event::Leader {
                node: "node-4".into(),
                term: 3,
                cause: Cause::Failover(Failover {
                    kind: FaultKind::Kill,
                    from: "node-2".into(),
                    to: "node-4".into(),
                    term: 3,
                    took: 182 * MS,
                }),
            },
        ));
        assert_eq!(line, "[    5.182s] new leader node-4 (term 3) after 182 ms");
        let alarm = plain_line(&logged(
            1,
            Event::Violation(Violation::SameTerm {
                first: "a".into(),
                second: "b".into(),
                term: 1,
            }),
        ));
        assert!(alarm.starts_with("[    0.001s] !! TWO LEADERS"), "{alarm}");
    }

    #[test]
    fn the_summary_lists_every_failover_and_the_verdict() {
        let failovers = [Failover {
            kind: FaultKind::Freeze,
            from: "node-1".into(),
            to: "node-3".into(),
            term: 4,
            took: 231 * MS,
        }];
        let text = summary(&Summary {
            ran: Duration::from_secs(6),
            nodes: 3,
            reason: "duration reached",
            failovers: &failovers,
            stats: Some((231 * MS, 231 * MS)),
            pending: Some(FaultKind::Kill),
            violations: &[],
            polls: 900,
        });
        assert!(text.starts_with("raft-elector demo: ran 6.0 s with 3 nodes (duration reached)\n"));
        assert!(
            text.contains("failovers: 1 (median 231 ms, max 231 ms)"),
            "{text}"
        );
        assert!(
            text.contains("1. freeze (SIGSTOP) of node-1 -> node-3 (term 4) in 231 ms"),
            "{text}"
        );
        assert!(text.contains("unfinished: kill -9"), "{text}");
        assert!(
            text.contains("never two leaders: 900 polls checked"),
            "{text}"
        );
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis() {
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
        assert_eq!(strip_ansi(&paint(RED, "x")), "x");
        let painted = format!("{}{}", paint(RED, "abc"), paint(GREEN, "defgh"));
        let cut = fit_painted(&painted, 5);
        assert_eq!(strip_ansi(&cut), "abcd…");
        assert!(cut.starts_with(RED) && cut.ends_with(RESET), "{cut:?}");
    }
}
