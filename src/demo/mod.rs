//! `raft-elector demo`: a local cluster of real sidecars on 127.0.0.1 (no
//! Kubernetes), a live view of who leads, and faults on a key press or a timer.
//!
//! ```text
//!             ┌──────────── Cluster (cluster.rs) ─────────────┐
//!  keys ──┐   │ N × `raft-elector run --id node-i ...`         │
//!  timers ┼─► │ kill -9 · SIGSTOP/SIGCONT · SIGTERM · restart  │
//!  Ctrl-C ┘   └──────────────────────┬─────────────────────────┘
//!                                    │ GET /is-leader every 20 ms (probe.rs)
//!                                    ▼
//!                  Timeline (timeline.rs): leader changes, failover
//!                  times, two-leader checks (samples.rs) ──► events
//!                                    │
//!                                    ▼
//!                  view.rs: live screen (terminal.rs) or plain lines, summary
//! ```
//!
//! Failover time runs from the signal to the first 200 from the cluster
//! answered to a request sent after it. "Partition" is a freeze: processes on
//! one loopback cannot be cut off from each other, but a SIGSTOPped process is
//! indistinguishable from a partitioned one for its peers, and the view says
//! which it is.
//!
//! The process-cluster harness is shared with the integration tests and the
//! process benchmark (`tests/support/cluster.rs`): [`launch`] starts and
//! signals `raft-elector run` processes, [`probe`] polls `/is-leader`, and
//! [`samples`] records the answers and holds the two-leader check.

pub mod cluster;
pub mod launch;
pub mod probe;
pub mod samples;
mod terminal;
pub mod timeline;
pub mod view;

use crate::cli::DemoConfig;
use cluster::{Cluster, Life, NodeSpec};
use probe::Probes;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use terminal::{Key, Screen};
use thiserror::Error;
use timeline::{Event, FaultKind, Observation, Severity, Timeline};
use tokio::sync::mpsc;
use tokio::time::{interval, interval_at, sleep_until, Instant, Interval, MissedTickBehavior};
use view::{Frame, Logged, NodeRow, Summary};

/// Interval between two polls of one node: the resolution of failover times.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long one poll may take before the node counts as not answering.
const POLL_TIMEOUT: Duration = Duration::from_millis(250);
/// Interval between checks of the node processes (exits, thaws, restarts).
const TEND_INTERVAL: Duration = Duration::from_millis(50);
/// Interval between two frames of the live view.
const REDRAW_INTERVAL: Duration = Duration::from_millis(100);
/// Most events kept for the live view.
const MAX_EVENTS: usize = 500;
/// Longest wait for every node to join before the fault timers start anyway.
const JOIN_GRACE: Duration = Duration::from_secs(15);
/// Lines of a node's log shown when every node has exited.
const LOG_TAIL_LINES: usize = 5;

/// Why the demo could not start or had to stop; each says what to do.
#[derive(Debug, Error)]
pub enum DemoError {
    #[error("port {port} on 127.0.0.1 is in use ({source}); the demo needs ports {first}..={last}: pass --base-port with a free range or stop what uses it")]
    PortInUse {
        port: u16,
        first: u16,
        last: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find this program's own path to start the nodes: {0}")]
    Exe(#[source] std::io::Error),
    #[error("cannot create the demo's directory {path}: {source}; check that the temp dir (TMPDIR) is writable")]
    Workdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot drive the terminal: {0}; pass --no-tui for plain output")]
    Terminal(#[source] std::io::Error),
    #[error("every node exited; the end of {log}:\n{tail}")]
    AllExited { log: String, tail: String },
    #[error("two leaders were seen at once ({0} times): the election's core promise broke; node logs are kept, please report them")]
    TwoLeaders(usize),
}

/// Runs the demo with this very program as the node binary, until `q`,
/// Ctrl-C, SIGTERM or `--duration`; prints a summary and kills every node.
pub async fn run_demo(config: DemoConfig) -> anyhow::Result<()> {
    let exe = std::env::current_exe().map_err(DemoError::Exe)?;
    run_demo_with_binary(config, &exe).await
}

/// Runs the demo like [`run_demo`], starting nodes as `<exe> run ...`.
pub async fn run_demo_with_binary(config: DemoConfig, exe: &Path) -> anyhow::Result<()> {
    let specs = cluster::plan(&config);
    check_ports_free(&config, &specs)?;
    let mut workdir = WorkDir::create()?;
    let secret = hex::encode(rand::random::<[u8; 16]>());
    let live = config.tui && std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    let started = Instant::now();
    let (mut cluster, start_events) =
        Cluster::start(&config, &specs, exe, workdir.path.clone(), &secret).await?;

    let (observations, observed) = mpsc::channel(1024);
    let probes = Probes::spawn(
        probe::Client::new(POLL_TIMEOUT),
        POLL_INTERVAL,
        specs.iter().map(NodeSpec::is_leader_url).enumerate(),
        observations,
    );
    let (key_sender, keys) = mpsc::channel(16);
    let screen = if live {
        Some(Screen::enter(key_sender).map_err(DemoError::Terminal)?)
    } else {
        drop(key_sender);
        None
    };
    let mut demo = Demo {
        timeline: Timeline::new(
            specs.iter().map(|s| s.name.clone()).collect(),
            config.raft.max_voters,
            started,
        ),
        hint: format!(
            "try: curl -i 127.0.0.1:{}/is-leader   logs: {}",
            config.http_port(0),
            workdir.path.display()
        ),
        config,
        cluster: &mut cluster,
        screen,
        events: Vec::new(),
        started,
        polls: 0,
        troubled: false,
    };
    if demo.screen.is_none() {
        let nodes = specs.len();
        let _ = writeln!(
            std::io::stdout(),
            "raft-elector demo: {nodes} nodes on 127.0.0.1; {}",
            demo.hint
        );
    }
    for event in start_events {
        demo.log(event);
    }
    let outcome = demo.run(observed, keys).await;
    let screen = demo.screen.take();
    let report = demo.summary(outcome.as_ref().map_or("failed", |reason| reason));
    let (troubled, violations) = (demo.troubled, demo.timeline.violations().len());
    drop(screen);
    drop(probes);
    cluster.shutdown();
    workdir.keep = troubled;
    let kept = troubled.then(|| format!("node logs kept in {}\n", workdir.path.display()));
    let mut stdout = std::io::stdout();
    let _ = write!(stdout, "{report}{}", kept.unwrap_or_default());
    let _ = stdout.flush();
    outcome?;
    if violations > 0 {
        return Err(DemoError::TwoLeaders(violations).into());
    }
    Ok(())
}

/// Fails early, with the port's name, when a node's port is taken.
fn check_ports_free(config: &DemoConfig, specs: &[NodeSpec]) -> Result<(), DemoError> {
    let first = config.http_port(0);
    let last = config.peer_port(specs.len().saturating_sub(1));
    for port in specs.iter().flat_map(|s| [s.http_port, s.peer_port]) {
        std::net::TcpListener::bind(("127.0.0.1", port)).map_err(|source| {
            DemoError::PortInUse {
                port,
                first,
                last,
                source,
            }
        })?;
    }
    Ok(())
}

/// The demo's temporary directory (state dirs and logs); removed on drop
/// unless something went wrong and the logs are worth keeping.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create() -> Result<WorkDir, DemoError> {
        let name = format!(
            "raft-elector-demo-{}-{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).map_err(|source| DemoError::Workdir {
            path: path.clone(),
            source,
        })?;
        Ok(WorkDir { path, keep: false })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The running demo: the cluster, what it concluded, and where it shows it.
struct Demo<'a> {
    config: DemoConfig,
    cluster: &'a mut Cluster,
    timeline: Timeline,
    screen: Option<Screen>,
    events: Vec<Logged>,
    started: Instant,
    hint: String,
    /// Polls taken in (each checked for two leaders).
    polls: u64,
    /// Whether anything went wrong that the node logs may explain.
    troubled: bool,
}

impl Demo<'_> {
    /// Runs until the demo should end; returns why it ended.
    async fn run(
        &mut self,
        mut observed: mpsc::Receiver<Observation>,
        mut keys: mpsc::Receiver<Key>,
    ) -> Result<&'static str, DemoError> {
        let deadline = self.config.duration.map(|d| self.started + d);
        // Fault timers start once every node has joined: a fault before
        // that shows a cluster still forming, not a failover.
        let (mut kills, mut freezes) = (None, None);
        let mut armed = self.config.kill_every.is_none() && self.config.partition_every.is_none();
        let mut tend = interval(TEND_INTERVAL);
        tend.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut redraw = interval(REDRAW_INTERVAL);
        redraw.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                // A node answered a poll (or did not): conclude what it means.
                Some(observation) = observed.recv() => {
                    self.polls += 1;
                    for event in self.timeline.observe(observation) {
                        self.log(event);
                    }
                    if !armed && self.timeline.all_joined() {
                        (kills, freezes, armed) = self.arm();
                    }
                }
                // A key press in the live view.
                Some(key) = keys.recv() => match key {
                    Key::Quit => return Ok("quit"),
                    Key::Kill => self.inject(FaultKind::Kill),
                    Key::Freeze => self.inject(FaultKind::Freeze),
                    Key::Handoff => self.inject(FaultKind::Handoff),
                },
                // --kill-every and --partition-every.
                () = tick(&mut kills) => self.inject(FaultKind::Kill),
                () = tick(&mut freezes) => self.inject(FaultKind::Freeze),
                // Thaw, restart and reap node processes when due.
                _ = tend.tick() => {
                    for event in self.cluster.tend(Instant::now()).await {
                        self.log(event);
                    }
                    self.check_some_node_lives()?;
                    if !armed && self.started.elapsed() >= JOIN_GRACE {
                        self.log(Event::Failed {
                            message: format!(
                                "not every node joined within {}; fault timers start anyway",
                                timeline::human(JOIN_GRACE)
                            ),
                        });
                        (kills, freezes, armed) = self.arm();
                    }
                }
                _ = redraw.tick(), if self.screen.is_some() => self.draw()?,
                () = until(deadline) => return Ok("duration reached"),
                reason = &mut shutdown => return Ok(reason),
            }
        }
    }

    /// Starts the fault timers: first faults one period from now.
    fn arm(&self) -> (Option<Interval>, Option<Interval>, bool) {
        let now = Instant::now();
        (
            self.config.kill_every.map(|period| every(now, period)),
            self.config.partition_every.map(|period| every(now, period)),
            true,
        )
    }

    /// Injects `kind` into the current leader, if there is one running.
    fn inject(&mut self, kind: FaultKind) {
        let leader = self
            .timeline
            .current_leader()
            .filter(|&node| self.cluster.life(node) == Some(Life::Running));
        let Some(node) = leader else {
            self.log(Event::NoLeader { kind });
            return;
        };
        let now = Instant::now();
        let event = match self.cluster.inject(node, kind, now) {
            Ok(()) => self.timeline.fault(node, kind, now),
            Err(err) => Event::Failed {
                message: err.to_string(),
            },
        };
        self.log(event);
    }

    /// Ends the demo when every node has exited on its own (nothing left to show).
    fn check_some_node_lives(&self) -> Result<(), DemoError> {
        let all_exited =
            (0..self.cluster.len()).all(|i| self.cluster.life(i) == Some(Life::Exited));
        if !all_exited {
            return Ok(());
        }
        let log = self.cluster.log_path(0);
        Err(DemoError::AllExited {
            log: log.display().to_string(),
            tail: launch::log_tail(&log, LOG_TAIL_LINES),
        })
    }

    /// Records `event`; without the live view, prints it at once.
    fn log(&mut self, event: Event) {
        if event.severity() >= Severity::Trouble {
            self.troubled = true;
        }
        let logged = Logged {
            at: self.started.elapsed(),
            event,
        };
        if self.screen.is_none() {
            // A closed stdout must not end the demo (nor leave nodes behind).
            let _ = writeln!(std::io::stdout(), "{}", view::plain_line(&logged));
        }
        self.events.push(logged);
        if self.events.len() > MAX_EVENTS {
            self.events.drain(..self.events.len() - MAX_EVENTS);
        }
    }

    fn draw(&mut self) -> Result<(), DemoError> {
        let now = Instant::now();
        let rows: Vec<NodeRow> = (0..self.cluster.len())
            .map(|i| NodeRow {
                name: self
                    .cluster
                    .spec(i)
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                pid: self.cluster.pid(i),
                life: self.cluster.life(i).unwrap_or(Life::Exited),
                latest: self.timeline.latest(i).cloned(),
            })
            .collect();
        let schedule = self.schedule();
        let lines = view::render(&Frame {
            nodes: &rows,
            leader: self.timeline.current_leader(),
            now,
            uptime: now.saturating_duration_since(self.started),
            failovers: self.timeline.failovers(),
            stats: self.timeline.failover_stats(),
            pending: self.timeline.pending(),
            violations: self.timeline.violations(),
            events: &self.events,
            hint: &self.hint,
            schedule: &schedule,
            lease: self
                .config
                .raft
                .election_timeout_min
                .mul_f64(1.0 - self.config.raft.max_clock_drift),
            size: Screen::size(),
        });
        match self.screen.as_mut() {
            Some(screen) => screen.draw(&lines).map_err(DemoError::Terminal),
            None => Ok(()),
        }
    }

    /// Describes the fault timers, e.g. `kill -9 every 10 s`.
    fn schedule(&self) -> String {
        let mut parts = Vec::new();
        if let Some(period) = self.config.kill_every {
            parts.push(format!("kill -9 every {}", timeline::human(period)));
        }
        if let Some(period) = self.config.partition_every {
            parts.push(format!("freeze every {}", timeline::human(period)));
        }
        if let Some(duration) = self.config.duration {
            parts.push(format!("ends after {}", timeline::human(duration)));
        }
        if parts.is_empty() {
            return "no fault timers (see --kill-every, --partition-every)".into();
        }
        parts.join(" · ")
    }

    fn summary(&self, reason: &str) -> String {
        view::summary(&Summary {
            ran: self.started.elapsed(),
            nodes: self.cluster.len(),
            reason,
            failovers: self.timeline.failovers(),
            stats: self.timeline.failover_stats(),
            pending: self.timeline.pending().map(|(kind, _)| kind),
            violations: self.timeline.violations(),
            polls: self.polls,
        })
    }
}

/// Returns an interval whose first tick is one `period` after `start`.
fn every(start: Instant, period: Duration) -> Interval {
    let mut timer = interval_at(start + period, period);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer
}

/// Waits for the next tick of `timer`, or forever without one.
async fn tick(timer: &mut Option<Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Waits until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Waits for Ctrl-C or SIGTERM and says which.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "interrupted";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_refused_with_the_range_and_the_flag_to_change() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let config = DemoConfig {
            nodes: 1,
            base_port: port,
            kill_every: None,
            partition_every: None,
            duration: None,
            tui: false,
            raft: crate::raft::Config::default(),
        };
        let err = check_ports_free(&config, &cluster::plan(&config)).expect_err("taken");
        let text = err.to_string();
        assert!(text.contains(&format!("port {port}")), "{text}");
        assert!(text.contains("--base-port"), "{text}");
    }
}
