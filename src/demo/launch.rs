//! Starting `raft-elector run` processes and signalling them: the part of a
//! process cluster that the demo ([`super::cluster`]) and the integration
//! tests and benchmarks (`tests/support/cluster.rs`) share.
//!
//! ```text
//!  NodeCommand ──command()──► Launcher thread ──fork/exec──► raft-elector run --id <name> ...
//!  (flags, peers, secret,                                       (own process group, log file,
//!   log file, netns)         Process ◄── Child ───────────────   dies with the launcher thread)
//!                              kill -9 · SIGTERM · SIGSTOP/SIGCONT · reap
//! ```
//!
//! Every child is started from one long-lived launcher thread and asks the
//! kernel to SIGKILL it when that thread dies (`PR_SET_PDEATHSIG` follows the
//! *thread* that forked, not the process), so even a `kill -9` of the demo or
//! a crashed test leaves no node behind. A [`Process`] kills and reaps its
//! child when dropped. Children run in their own process group, so Ctrl-C in
//! a terminal reaches only the program that started them.

use crate::cli::SECRET_ENV;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use thiserror::Error;
use tokio::sync::oneshot;

/// Most bytes read from the end of a log by [`log_tail`].
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// Why a node could not be started or signalled; each says what to check.
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("cannot start the thread that launches nodes: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the launcher thread is gone; no more nodes can be started")]
    Gone,
    #[error("cannot start {node}: {source}; check that the binary exists and the demo directory is writable")]
    Spawn {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send {signal} to {node}: {errno}")]
    Signal {
        node: String,
        signal: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("{0} is not running")]
    NotRunning(String),
    #[error("there is no node #{0}")]
    NoSuchNode(usize),
}

/// How a node finds its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    /// `--peers`: every member's advertised address, itself included.
    Static(Vec<String>),
    /// `--service` resolved at `--dns-server` (a headless Service).
    Service {
        /// The DNS name of the Service.
        name: String,
        /// The DNS server to ask.
        dns_server: SocketAddr,
    },
}

/// The command line and environment of one `raft-elector run` node.
#[derive(Clone, Debug)]
pub struct NodeCommand {
    /// The binary to run (the demo runs itself).
    pub binary: PathBuf,
    /// Network namespace to run in (`ip netns exec <ns>`), if any.
    pub netns: Option<String>,
    /// `--id`: the member name.
    pub name: String,
    /// `--http-listen`: the app API (`/is-leader`).
    pub http: SocketAddr,
    /// `--peer-listen`: the Raft listener.
    pub peer: SocketAddr,
    /// `--advertise`: where peers reach it (a relay may sit in front of `peer`).
    pub advertise: SocketAddr,
    /// How it finds its peers.
    pub peers: Peers,
    /// `--bootstrap-expect`, if given.
    pub bootstrap_expect: Option<usize>,
    /// `--cluster-id`.
    pub cluster_id: String,
    /// The peer secret, passed in [`SECRET_ENV`] (never on the command line,
    /// where every local user could read it).
    pub secret: String,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// Flags added last (timing, `--kubeconfig`, ...). Without
    /// `--kubeconfig` among them the node runs with `--no-kubernetes`.
    pub extra_args: Vec<OsString>,
}

impl NodeCommand {
    /// Returns the arguments of `raft-elector`, starting with `run`.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "run",
            "--id",
            &self.name,
            "--http-listen",
            &self.http.to_string(),
            "--peer-listen",
            &self.peer.to_string(),
            "--advertise",
            &self.advertise.to_string(),
            "--cluster-id",
            &self.cluster_id,
            "--log-format",
            "json",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        args.push("--state-dir".into());
        args.push(self.state_dir.as_os_str().to_owned());
        if !self.extra_args.iter().any(|arg| arg == "--kubeconfig") {
            args.push("--no-kubernetes".into());
        }
        if let Some(expect) = self.bootstrap_expect {
            args.push("--bootstrap-expect".into());
            args.push(expect.to_string().into());
        }
        match &self.peers {
            Peers::Static(peers) => {
                args.push("--peers".into());
                args.push(peers.join(",").into());
            }
            Peers::Service { name, dns_server } => {
                args.push("--service".into());
                args.push(name.into());
                args.push("--dns-server".into());
                args.push(dns_server.to_string().into());
            }
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Returns the command that starts the node with stdout and stderr
    /// appended to `log`. The caller's `RAFT_ELECTOR_*` and `POD_*` settings
    /// are removed so they cannot leak into the node's flags.
    pub fn command(&self, log: &Path) -> Result<Command, LaunchError> {
        let spawn_error = |source| LaunchError::Spawn {
            node: self.name.clone(),
            source,
        };
        let out = open_log(log).map_err(spawn_error)?;
        let err = out.try_clone().map_err(spawn_error)?;
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        command
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        for (key, _) in std::env::vars_os() {
            let text = key.to_string_lossy();
            if text.starts_with("RAFT_ELECTOR_") || text.starts_with("POD_") {
                command.env_remove(&key);
            }
        }
        command.env(SECRET_ENV, &self.secret);
        Ok(command)
    }
}

fn open_log(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// A request to the launcher thread.
struct Launch {
    command: Command,
    reply: oneshot::Sender<std::io::Result<Child>>,
}

/// The thread every node is started from; the nodes die with it.
#[derive(Debug)]
pub struct Launcher {
    requests: Option<std_mpsc::Sender<Launch>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Launcher {
    /// Starts the launcher thread.
    pub fn new() -> Result<Launcher, LaunchError> {
        let (requests, inbox) = std_mpsc::channel::<Launch>();
        let thread = std::thread::Builder::new()
            .name("node-launcher".into())
            .spawn(move || {
                // Children die with this thread (PR_SET_PDEATHSIG), so it lives
                // as long as the launcher and does nothing but spawn.
                for launch in inbox {
                    let mut command = launch.command;
                    let _ = launch.reply.send(command.spawn());
                }
            })
            .map_err(LaunchError::Thread)?;
        Ok(Launcher {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Starts `command` (node `name`) from the launcher thread, set up to be
    /// killed when that thread dies, and returns its process.
    pub async fn spawn(&self, name: &str, mut command: Command) -> Result<Process, LaunchError> {
        die_with_launcher(&mut command);
        let (reply, answer) = oneshot::channel();
        let sent = self
            .requests
            .as_ref()
            .and_then(|requests| requests.send(Launch { command, reply }).ok());
        let result = match sent {
            Some(()) => answer.await.ok(),
            None => None,
        };
        match result {
            Some(Ok(child)) => Ok(Process {
                name: name.to_string(),
                child: Some(child),
            }),
            Some(Err(source)) => Err(LaunchError::Spawn {
                node: name.to_string(),
                source,
            }),
            None => Err(LaunchError::Gone),
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Asks the kernel to SIGKILL the child when the launcher thread dies.
#[cfg(target_os = "linux")]
fn die_with_launcher(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec of a multi-threaded
    // process, where only async-signal-safe calls are allowed: it makes two
    // system calls (prctl, getppid) and builds its errors from an errno
    // (`from_raw_os_error` stores the number; nothing is allocated).
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|errno| std::io::Error::from_raw_os_error(errno as i32))?;
            // The parent may have died before the prctl took effect.
            if std::os::unix::process::parent_id() != parent {
                return Err(std::io::Error::from_raw_os_error(
                    nix::errno::Errno::ESRCH as i32,
                ));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_command: &mut Command) {}

/// One node's process, from its start until it is reaped. Dropping it
/// kills (`kill -9`, which also ends a stopped process) and reaps it.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
}

impl Process {
    /// Returns the process id until the process is reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Returns whether the process was not reaped yet.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` to the process; an error when it was reaped already.
    pub fn signal(&self, signal: Signal) -> Result<(), LaunchError> {
        let not_running = || LaunchError::NotRunning(self.name.clone());
        let pid = self.pid().ok_or_else(not_running)?;
        let raw = i32::try_from(pid).map_err(|_| not_running())?;
        kill(Pid::from_raw(raw), signal).map_err(|errno| LaunchError::Signal {
            node: self.name.clone(),
            signal: signal.as_str(),
            errno,
        })
    }

    /// Collects the exit status if the process has ended (once).
    pub fn reap(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Kills the process with `kill -9` and waits for it; returns its exit
    /// status (`None` when it was reaped before).
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Returns the last `lines` lines of the log at `path` (read from at most
/// its last 64 KiB), or why it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read it: {err})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeCommand {
        NodeCommand {
            binary: PathBuf::from("/bin/raft-elector"),
            netns: None,
            name: "node-2".into(),
            http: "127.0.0.1:20002".parse().expect("addr"),
            peer: "127.0.0.1:20003".parse().expect("addr"),
            advertise: "127.0.0.1:20003".parse().expect("addr"),
            peers: Peers::Static(vec!["127.0.0.1:20001".into(), "127.0.0.1:20003".into()]),
            bootstrap_expect: Some(2),
            cluster_id: "c".into(),
            secret: "s".into(),
            state_dir: PathBuf::from("/tmp/x"),
            extra_args: Vec::new(),
        }
    }

    fn text(args: Vec<OsString>) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_node_runs_unpublished_unless_given_a_kubeconfig() {
        let mut cmd = node();
        assert!(text(cmd.args()).contains(" --no-kubernetes "));
        cmd.extra_args = vec!["--kubeconfig".into(), "/k".into()];
        let args = text(cmd.args());
        assert!(!args.contains("--no-kubernetes"), "{args}");
        assert!(args.ends_with("--kubeconfig /k"), "{args}");
    }

    #[test]
    fn a_service_is_resolved_at_the_given_dns_server() {
        let mut cmd = node();
        cmd.peers = Peers::Service {
            name: "nodes.test".into(),
            dns_server: "127.0.0.1:5353".parse().expect("addr"),
        };
        let args = text(cmd.args());
        assert!(
            args.contains("--service nodes.test --dns-server 127.0.0.1:5353"),
            "{args}"
        );
        assert!(!args.contains("--peers"), "{args}");
    }

    #[test]
    fn a_netns_node_runs_through_ip_netns_exec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = node();
        cmd.netns = Some("ns1".into());
        let command = cmd.command(&dir.path().join("log")).expect("command");
        assert_eq!(command.get_program(), "ip");
        let args: Vec<_> = command.get_args().take(4).collect();
        assert_eq!(args, ["netns", "exec", "ns1", "/bin/raft-elector"]);
    }

    #[test]
    fn the_log_tail_has_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node-1.log");
        std::fs::write(&path, "1\n2\n3\n4\n5\n6\n7\n").expect("write");
        assert_eq!(log_tail(&path, 5), "3\n4\n5\n6\n7");
        assert!(log_tail(&dir.path().join("missing"), 5).starts_with("(cannot read it"));
    }
}
