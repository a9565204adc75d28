//! The command line: `raft-elector run` (the sidecar) and `raft-elector demo`
//! (a local cluster), parsed with clap and validated into plain configs.
//!
//! ```text
//!  argv + RAFT_ELECTOR_* ──clap──► RunArgs ──validate(HostEnv)──► RunConfig ──► runtime
//!  POD_NAME, POD_IP, .. ─────────► HostEnv ─┘
//! ```
//!
//! Every `run` flag has an environment twin `RAFT_ELECTOR_<FLAG>` (flags win).
//! Pod identity comes from the downward API variables `POD_NAME`,
//! `POD_NAMESPACE`, `POD_IP` and `POD_UID`. Validation changes nothing and
//! prints nothing: warnings travel in [`RunConfig::warnings`] so the binary can
//! log them once logging is set up. Usage errors exit with code 2, as clap's do.

use crate::raft::{Config, ConfigError};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Fewest bytes a peer secret may have (after trimming a trailing newline).
pub const MIN_SECRET_BYTES: usize = 16;
/// Most bytes read from a secret file; more means the path is wrong.
pub const MAX_SECRET_BYTES: usize = 4096;
/// Longest member id or cluster id (a DNS-1123 subdomain).
pub const MAX_NAME_LEN: usize = 253;
/// Exit code of a usage or configuration error (the same as clap's).
pub const EXIT_USAGE: i32 = 2;
/// Exit code of any other failure.
pub const EXIT_FAILURE: i32 = 1;
/// Environment variable holding the peer secret itself.
pub const SECRET_ENV: &str = "RAFT_ELECTOR_SECRET";
/// Longest `--pod-selector` accepted.
const MAX_SELECTOR_LEN: usize = 1024;
/// Most nodes the demo runs.
pub const MAX_DEMO_NODES: u8 = 9;
/// Shortest Raft timing value (heartbeat, election timeouts): shorter ones
/// cannot be met and only keep the CPU busy.
pub const MIN_RAFT_DURATION: Duration = Duration::from_millis(1);
/// Shortest period of `--dns-interval` and the demo's fault timers.
pub const MIN_PERIOD: Duration = Duration::from_millis(100);
/// Longest duration any flag accepts (365 days); longer is surely a typo, and
/// the code multiplies some durations by small factors, which must not overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// `raft-elector`: Raft leader election for Kubernetes pods.
#[derive(Debug, Parser)]
#[command(name = "raft-elector", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the sidecar: elects a leader among the peers and serves /is-leader.
    Run(Box<RunArgs>),
    /// Runs a local cluster of N nodes on 127.0.0.1 (no Kubernetes) and shows it.
    Demo(DemoArgs),
    /// Prints the LeaderElection CRD as YAML (`raft-elector crd | kubectl apply -f -`).
    Crd,
}

/// Raft timing flags, shared by `run` and `demo`.
#[derive(Clone, Debug, Args)]
pub struct RaftArgs {
    /// Lower bound of the randomized election timeout; also the lease length
    /// (less the clock drift).
    #[arg(long, env = "RAFT_ELECTOR_ELECTION_TIMEOUT_MIN", default_value = "150ms", value_parser = parse_duration)]
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout.
    #[arg(long, env = "RAFT_ELECTOR_ELECTION_TIMEOUT_MAX", default_value = "300ms", value_parser = parse_duration)]
    pub election_timeout_max: Duration,
    /// Interval between a leader's heartbeats; keep it at most a third of the
    /// election timeout min.
    #[arg(long, env = "RAFT_ELECTOR_HEARTBEAT_INTERVAL", default_value = "50ms", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Bound on the relative clock-rate difference of two nodes (0.01 = 1%).
    #[arg(long, env = "RAFT_ELECTOR_MAX_CLOCK_DRIFT", default_value_t = crate::raft::config::DEFAULT_MAX_CLOCK_DRIFT)]
    pub max_clock_drift: f64,
    /// Most voting members; further members follow as learners.
    #[arg(long, env = "RAFT_ELECTOR_MAX_VOTERS", default_value_t = crate::raft::config::DEFAULT_MAX_VOTERS)]
    pub max_voters: usize,
}

impl RaftArgs {
    /// Builds and checks the core's [`Config`] (other fields at their defaults).
    pub fn to_config(&self) -> Result<Config, CliError> {
        if self.max_voters == 0 {
            return Err(CliError::MaxVoters);
        }
        for (flag, value, example) in [
            (
                "--heartbeat-interval",
                self.heartbeat_interval,
                "50ms (the default)",
            ),
            (
                "--election-timeout-min",
                self.election_timeout_min,
                "150ms (the default)",
            ),
            (
                "--election-timeout-max",
                self.election_timeout_max,
                "300ms (the default)",
            ),
        ] {
            check_at_least(flag, value, MIN_RAFT_DURATION, example)?;
        }
        let config = Config {
            election_timeout_min: self.election_timeout_min,
            election_timeout_max: self.election_timeout_max,
            heartbeat_interval: self.heartbeat_interval,
            max_clock_drift: self.max_clock_drift,
            max_voters: self.max_voters,
            ..Config::default()
        };
        config.validate().map_err(|reason| CliError::Raft {
            flags: flags_of(&reason),
            reason,
        })?;
        Ok(config)
    }
}

/// Names the flags that set what `err` complains about.
fn flags_of(err: &ConfigError) -> &'static str {
    match err {
        ConfigError::TimeoutRange { .. } => "--election-timeout-min / --election-timeout-max",
        ConfigError::ZeroTimeout => "--election-timeout-min",
        ConfigError::Heartbeat { .. } => "--heartbeat-interval / --election-timeout-min",
        ConfigError::Drift(_) => "--max-clock-drift",
        ConfigError::MaxVoters => "--max-voters",
        ConfigError::Compaction => "the compaction threshold (not a flag; report a bug)",
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `raft-elector run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// This member's name [default: $POD_NAME, else the hostname].
    #[arg(long, env = "RAFT_ELECTOR_ID")]
    pub id: Option<String>,
    /// Listener of the app-facing API and metrics (ip:port).
    #[arg(long, env = "RAFT_ELECTOR_HTTP_LISTEN", default_value = "0.0.0.0:4040")]
    pub http_listen: String,
    /// Listener of the peer (Raft) RPCs (ip:port).
    #[arg(long, env = "RAFT_ELECTOR_PEER_LISTEN", default_value = "0.0.0.0:4041")]
    pub peer_listen: String,
    /// Address peers use to reach this node (host:port) [default: $POD_IP:<peer port>].
    #[arg(long, env = "RAFT_ELECTOR_ADVERTISE")]
    pub advertise: Option<String>,
    /// Headless Service DNS name to discover peers from (name or name:port).
    #[arg(long, env = "RAFT_ELECTOR_SERVICE")]
    pub service: Option<String>,
    /// DNS server to resolve --service with instead of the system's (ip:port).
    #[arg(long, env = "RAFT_ELECTOR_DNS_SERVER")]
    pub dns_server: Option<String>,
    /// Static peer list instead of DNS (host:port,host:port,...).
    #[arg(long, env = "RAFT_ELECTOR_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Local mode: form the cluster once this many members are seen.
    #[arg(long, env = "RAFT_ELECTOR_BOOTSTRAP_EXPECT")]
    pub bootstrap_expect: Option<usize>,
    /// Election group name; messages of another group are refused.
    #[arg(long, env = "RAFT_ELECTOR_CLUSTER_ID", default_value = "default")]
    pub cluster_id: String,
    /// File holding the shared peer secret (or put the secret itself in
    /// RAFT_ELECTOR_SECRET); at least 16 bytes.
    #[arg(long, env = "RAFT_ELECTOR_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Directory for hard state; without it every start is a new incarnation.
    #[arg(long, env = "RAFT_ELECTOR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Raft timing.
    #[command(flatten)]
    pub raft: RaftArgs,
    /// Interval between DNS lookups of --service.
    #[arg(long, env = "RAFT_ELECTOR_DNS_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub dns_interval: Duration,
    /// How long a member may be missing from discovery before it is removed.
    #[arg(long, env = "RAFT_ELECTOR_REMOVAL_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub removal_grace: Duration,
    /// File kept equal to the /is-leader JSON (rewritten atomically).
    #[arg(long, env = "RAFT_ELECTOR_STATUS_FILE")]
    pub status_file: Option<PathBuf>,
    /// Log line format.
    #[arg(long, env = "RAFT_ELECTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, e.g. info or raft_elector=debug [default: $RUST_LOG, else info].
    #[arg(long, env = "RAFT_ELECTOR_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Kubeconfig for publishing [default: in-cluster config].
    #[arg(long, env = "RAFT_ELECTOR_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Turns Kubernetes publishing (pod label, LeaderElection status) off.
    #[arg(long, env = "RAFT_ELECTOR_NO_KUBERNETES")]
    pub no_kubernetes: bool,
    /// Label selector of the member pods to label [default: raft-elector.io/group=<cluster-id>].
    #[arg(long, env = "RAFT_ELECTOR_POD_SELECTOR")]
    pub pod_selector: Option<String>,
}

/// Where peers are found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// Resolve the A/AAAA records of a headless Service.
    Dns {
        /// The Service's DNS name.
        name: String,
        /// Peer port of every member.
        port: u16,
        /// DNS server to ask instead of the system's.
        server: Option<SocketAddr>,
    },
    /// A fixed list of `host:port` peer addresses.
    Static(Vec<String>),
}

/// This pod's identity from the downward API (all optional outside Kubernetes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIdentity {
    /// `POD_NAME`.
    pub name: Option<String>,
    /// `POD_NAMESPACE`.
    pub namespace: Option<String>,
    /// `POD_IP`.
    pub ip: Option<IpAddr>,
    /// `POD_UID`.
    pub uid: Option<String>,
}

/// A validated `run` configuration.
#[derive(Clone, PartialEq)]
pub struct RunConfig {
    /// This member's name.
    pub id: String,
    /// Listener of the app-facing API.
    pub http_listen: SocketAddr,
    /// Listener of the peer RPCs.
    pub peer_listen: SocketAddr,
    /// Address peers use to reach this node (`host:port`).
    pub advertise: String,
    /// Where peers are found.
    pub discovery: Discovery,
    /// Local mode: members to wait for before bootstrapping.
    pub bootstrap_expect: Option<usize>,
    /// Election group name.
    pub cluster_id: String,
    /// Shared peer secret (at least [`MIN_SECRET_BYTES`]); never logged.
    pub secret: Vec<u8>,
    /// Directory for hard state; `None` keeps it in memory.
    pub state_dir: Option<PathBuf>,
    /// Settings of the Raft core, validated.
    pub raft: Config,
    /// Interval between DNS lookups.
    pub dns_interval: Duration,
    /// How long a member may be missing from discovery before removal.
    pub removal_grace: Duration,
    /// File kept equal to the `/is-leader` JSON.
    pub status_file: Option<PathBuf>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter (`tracing_subscriber::EnvFilter` syntax), validated.
    pub log_level: String,
    /// Whether to publish to Kubernetes.
    pub kubernetes: bool,
    /// Kubeconfig for publishing; `None` uses the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// Label selector of the member pods; `None` selects by group label.
    pub pod_selector: Option<String>,
    /// This pod's identity.
    pub pod: PodIdentity,
    /// Things worth a warning in the log once logging is set up.
    pub warnings: Vec<String>,
}

impl fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunConfig")
            .field("id", &self.id)
            .field("http_listen", &self.http_listen)
            .field("peer_listen", &self.peer_listen)
            .field("advertise", &self.advertise)
            .field("discovery", &self.discovery)
            .field("bootstrap_expect", &self.bootstrap_expect)
            .field("cluster_id", &self.cluster_id)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("state_dir", &self.state_dir)
            .field("raft", &self.raft)
            .field("dns_interval", &self.dns_interval)
            .field("removal_grace", &self.removal_grace)
            .field("status_file", &self.status_file)
            .field("log_format", &self.log_format)
            .field("log_level", &self.log_level)
            .field("kubernetes", &self.kubernetes)
            .field("kubeconfig", &self.kubeconfig)
            .field("pod_selector", &self.pod_selector)
            .field("pod", &self.pod)
            .field("warnings", &self.warnings)
            .finish()
    }
}

/// What the process environment contributes to the configuration besides the
/// `RAFT_ELECTOR_*` flag twins (which clap reads). Empty values count as unset.
#[derive(Clone, Default)]
pub struct HostEnv {
    /// `POD_NAME`.
    pub pod_name: Option<String>,
    /// `POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `POD_IP`.
    pub pod_ip: Option<String>,
    /// `POD_UID`.
    pub pod_uid: Option<String>,
    /// The hostname (`/proc/sys/kernel/hostname`, else `HOSTNAME`).
    pub hostname: Option<String>,
    /// `RAFT_ELECTOR_SECRET`: the peer secret itself.
    pub secret: Option<String>,
    /// `RUST_LOG`: the log filter when `--log-level` is not given.
    pub rust_log: Option<String>,
}

impl HostEnv {
    /// Reads the variables (and the hostname) of this process.
    pub fn from_process() -> HostEnv {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| var("HOSTNAME"));
        HostEnv {
            pod_name: var("POD_NAME"),
            pod_namespace: var("POD_NAMESPACE"),
            pod_ip: var("POD_IP"),
            pod_uid: var("POD_UID"),
            hostname,
            secret: var(SECRET_ENV),
            rust_log: var("RUST_LOG"),
        }
    }
}

/// A configuration that cannot work; each message says what to fix.
#[derive(Debug, Error)]
pub enum CliError {
    #[error(
        "no member id: pass --id NAME (or RAFT_ELECTOR_ID), or set POD_NAME from the downward API"
    )]
    EmptyId,
    #[error("--pod-selector {0:?} is empty or longer than 1024 characters; use a label selector such as raft-elector.io/group=NAME")]
    PodSelector(String),
    #[error("{flag} {value:?} is not a valid name: {reason}; use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters")]
    InvalidName {
        flag: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{flag} {value:?} is not a valid address: {reason}; use {expected}")]
    Address {
        flag: &'static str,
        value: String,
        reason: String,
        expected: &'static str,
    },
    #[error("POD_IP {0:?} is not an IP address; set it from the downward API (status.podIP) or pass --advertise")]
    PodIp(String),
    #[error("no peer discovery: pass --service <headless Service DNS name> (Kubernetes) or --peers host:port,... (static)")]
    NoDiscovery,
    #[error("--service and --peers both given: pass only one way to discover peers")]
    BothDiscoveries,
    #[error(
        "--dns-server only applies to --service; remove it or use --service instead of --peers"
    )]
    DnsServerWithoutService,
    #[error("no peer secret: pass --secret-file PATH or set RAFT_ELECTOR_SECRET (at least 16 bytes, e.g. `head -c 32 /dev/urandom | base64`)")]
    NoSecret,
    #[error("both --secret-file and RAFT_ELECTOR_SECRET are set: keep only one")]
    BothSecrets,
    // The causes below are part of the text and deliberately not a
    // `#[source]`: printing the error chain would repeat them.
    #[error("cannot read the secret file {path}: {error}; check that the Secret is mounted there and readable")]
    SecretUnreadable {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the peer secret has {len} bytes but at least 16 are required; generate one with `head -c 32 /dev/urandom | base64`")]
    SecretTooShort { len: usize },
    #[error(
        "the secret file {0} is larger than 4096 bytes; point --secret-file at the secret itself"
    )]
    SecretTooLong(PathBuf),
    #[error("--max-voters must be at least 1 (5 is a good choice)")]
    MaxVoters,
    #[error("--bootstrap-expect must be at least 1: it is the number of members to wait for before forming the cluster")]
    BootstrapExpectZero,
    #[error("{0} must be longer than zero")]
    ZeroDuration(&'static str),
    #[error("{flag} {value} is too short: use at least {min}, e.g. {example}")]
    TooShort {
        flag: &'static str,
        value: String,
        min: String,
        example: &'static str,
    },
    #[error("invalid Raft setting: {reason}; fix {flags}")]
    Raft {
        flags: &'static str,
        reason: ConfigError,
    },
    #[error("--log-level {value:?} is not a valid log filter ({reason}); use e.g. info, debug or raft_elector=debug,info")]
    LogLevel { value: String, reason: String },
    #[error("--base-port {base_port} with {nodes} nodes needs ports up to {last}, above 65535; choose a base port of at most {max_base}")]
    DemoPorts {
        base_port: u16,
        nodes: usize,
        last: u32,
        max_base: u32,
    },
    #[error("--base-port must not be 0: the demo needs fixed ports to show")]
    DemoBasePortZero,
}

/// Returns the process exit code for `err`: 2 for usage and configuration
/// errors (a [`CliError`] or a clap error anywhere in the source chain), clap's
/// own code for `--help`/`--version` (0), and 1 for anything else.
pub fn exit_code_for(err: &(dyn std::error::Error + 'static)) -> i32 {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<CliError>() {
            return EXIT_USAGE;
        }
        if let Some(clap_err) = e.downcast_ref::<clap::Error>() {
            return clap_err.exit_code();
        }
        current = e.source();
    }
    EXIT_FAILURE
}

/// Parses a humantime duration such as `150ms`, `2s` or `1m 30s`, of at most
/// [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{e}; use a duration like 150ms, 2s or 1m"))?;
    if duration > MAX_DURATION {
        return Err(
            "longer than 365 days, the longest duration accepted; use a duration like 150ms, 2s or 1m"
                .to_string(),
        );
    }
    Ok(duration)
}

/// Refuses `value` of `flag` when it is shorter than `min`.
fn check_at_least(
    flag: &'static str,
    value: Duration,
    min: Duration,
    example: &'static str,
) -> Result<(), CliError> {
    if value < min {
        return Err(CliError::TooShort {
            flag,
            value: humantime::format_duration(value).to_string(),
            min: humantime::format_duration(min).to_string(),
            example,
        });
    }
    Ok(())
}

impl RunArgs {
    /// Checks every flag against this process's environment and returns the
    /// configuration to run with.
    pub fn validate(self) -> Result<RunConfig, CliError> {
        self.validate_with(&HostEnv::from_process())
    }

    /// Checks every flag against `host` (pod identity, hostname, secret,
    /// `RUST_LOG`) and returns the configuration to run with.
    pub fn validate_with(self, host: &HostEnv) -> Result<RunConfig, CliError> {
        let id = match self.id.clone().or_else(|| host.pod_name.clone()) {
            Some(id) => id,
            None => host.hostname.clone().ok_or(CliError::EmptyId)?,
        };
        check_name("--id", &id)?;
        check_name("--cluster-id", &self.cluster_id)?;
        let http_listen = parse_listen("--http-listen", &self.http_listen)?;
        let peer_listen = parse_listen("--peer-listen", &self.peer_listen)?;
        let pod = pod_identity(host)?;
        if let Some(sel) = &self.pod_selector {
            if sel.trim().is_empty() || sel.len() > MAX_SELECTOR_LEN {
                return Err(CliError::PodSelector(sel.clone()));
            }
        }
        let mut warnings = Vec::new();
        let advertise = match &self.advertise {
            Some(advertise) => check_advertise(advertise)?,
            None => default_advertise(peer_listen, pod.ip, &mut warnings),
        };
        let discovery = self.discovery(peer_listen.port())?;
        if self.bootstrap_expect == Some(0) {
            return Err(CliError::BootstrapExpectZero);
        }
        let secret = read_secret(self.secret_file.as_deref(), host.secret.as_deref())?;
        let raft = self.raft.to_config()?;
        check_at_least(
            "--dns-interval",
            self.dns_interval,
            MIN_PERIOD,
            "2s (the default)",
        )?;
        if self.removal_grace.is_zero() {
            return Err(CliError::ZeroDuration("--removal-grace"));
        }
        let log_level = self
            .log_level
            .clone()
            .or_else(|| host.rust_log.clone())
            .unwrap_or_else(|| "info".to_string());
        check_log_filter(&log_level)?;
        Ok(RunConfig {
            id,
            http_listen,
            peer_listen,
            advertise,
            discovery,
            bootstrap_expect: self.bootstrap_expect,
            cluster_id: self.cluster_id,
            secret,
            state_dir: self.state_dir,
            raft,
            dns_interval: self.dns_interval,
            removal_grace: self.removal_grace,
            status_file: self.status_file,
            log_format: self.log_format,
            log_level,
            kubernetes: !self.no_kubernetes,
            kubeconfig: self.kubeconfig,
            pod_selector: self.pod_selector,
            pod,
            warnings,
        })
    }

    fn discovery(&self, peer_port: u16) -> Result<Discovery, CliError> {
        match (&self.service, self.peers.is_empty()) {
            (Some(_), false) => Err(CliError::BothDiscoveries),
            (None, true) => Err(CliError::NoDiscovery),
            (None, false) => {
                if self.dns_server.is_some() {
                    return Err(CliError::DnsServerWithoutService);
                }
                for peer in &self.peers {
                    check_host_port(peer).map_err(|reason| CliError::Address {
                        flag: "--peers",
                        value: peer.clone(),
                        reason,
                        expected:
                            "a comma-separated list of host:port, e.g. 10.0.0.5:4041,node-b:4041",
                    })?;
                }
                Ok(Discovery::Static(self.peers.clone()))
            }
            (Some(service), true) => {
                let (name, port) = parse_service(service, peer_port)?;
                let server = match &self.dns_server {
                    Some(server) => Some(parse_socket_addr(
                        "--dns-server",
                        server,
                        "ip:port, e.g. 10.96.0.10:53",
                    )?),
                    None => None,
                };
                Ok(Discovery::Dns { name, port, server })
            }
        }
    }
}

/// Checks a DNS-1123-style name (pod names, cluster ids).
fn check_name(flag: &'static str, value: &str) -> Result<(), CliError> {
    let invalid = |reason| CliError::InvalidName {
        flag,
        value: value.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(if flag == "--id" {
            CliError::EmptyId
        } else {
            invalid("it is empty")
        });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(invalid("it is longer than 253 characters"));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if !value.chars().all(allowed) {
        return Err(invalid(
            "it contains a character other than a-z, 0-9, '-' and '.'",
        ));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(value.chars().next()) || !alnum(value.chars().last()) {
        return Err(invalid("it must start and end with a letter or digit"));
    }
    Ok(())
}

fn parse_socket_addr(
    flag: &'static str,
    value: &str,
    expected: &'static str,
) -> Result<SocketAddr, CliError> {
    value
        .parse()
        .map_err(|e: std::net::AddrParseError| CliError::Address {
            flag,
            value: value.to_string(),
            reason: e.to_string(),
            expected,
        })
}

fn parse_listen(flag: &'static str, value: &str) -> Result<SocketAddr, CliError> {
    parse_socket_addr(flag, value, "ip:port, e.g. 0.0.0.0:4040 or [::]:4040")
}

/// Splits and checks `host:port` (`[v6]:port` for IPv6); returns the reason
/// when it is not one.
fn check_host_port(value: &str) -> Result<(String, u16), String> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| "the :port is missing".to_string())?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err("port 0 is not a reachable port".to_string());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ip = inner
            .strip_suffix(']')
            .ok_or_else(|| "an IPv6 address needs both brackets: [addr]:port".to_string())?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
        return Ok((host.to_string(), port));
    }
    if host.contains(':') {
        return Err("an IPv6 address must be in brackets: [addr]:port".to_string());
    }
    let host_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
    if host.is_empty() || host.len() > MAX_NAME_LEN || !host.chars().all(host_char) {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok((host.to_string(), port))
}

fn check_advertise(value: &str) -> Result<String, CliError> {
    let bad = |reason: String| CliError::Address {
        flag: "--advertise",
        value: value.to_string(),
        reason,
        expected: "host:port that peers can reach, e.g. $(POD_IP):4041",
    };
    let (host, _) = check_host_port(value).map_err(bad)?;
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>();
    if ip.is_ok_and(|ip| ip.is_unspecified()) {
        return Err(bad(
            "peers cannot connect to the unspecified address".to_string()
        ));
    }
    Ok(value.to_string())
}

/// Picks the advertised address when none is given: the pod IP, else the
/// peer listener's own IP, else loopback (with a warning).
fn default_advertise(
    peer_listen: SocketAddr,
    pod_ip: Option<IpAddr>,
    warnings: &mut Vec<String>,
) -> String {
    let port = peer_listen.port();
    if let Some(ip) = pod_ip {
        return SocketAddr::new(ip, port).to_string();
    }
    if !peer_listen.ip().is_unspecified() {
        return peer_listen.to_string();
    }
    let fallback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    warnings.push(format!(
        "no --advertise and no POD_IP: advertising {fallback}, which only peers on this host can reach"
    ));
    fallback.to_string()
}

fn parse_service(service: &str, peer_port: u16) -> Result<(String, u16), CliError> {
    let (name, port) = match service.rsplit_once(':') {
        Some(_) => check_host_port(service),
        None => check_host_port(&format!("{service}:{peer_port}")),
    }
    .map_err(|reason| CliError::Address {
        flag: "--service",
        value: service.to_string(),
        reason,
        expected: "the headless Service DNS name, e.g. elector.default.svc.cluster.local",
    })?;
    Ok((name, port))
}

fn pod_identity(host: &HostEnv) -> Result<PodIdentity, CliError> {
    let ip = match &host.pod_ip {
        Some(ip) => Some(ip.parse().map_err(|_| CliError::PodIp(ip.clone()))?),
        None => None,
    };
    Ok(PodIdentity {
        name: host.pod_name.clone(),
        namespace: host.pod_namespace.clone(),
        ip,
        uid: host.pod_uid.clone(),
    })
}

/// Reads the secret from exactly one of the file and the variable, drops one
/// trailing newline (files written with `echo`), and checks its length.
fn read_secret(file: Option<&Path>, from_env: Option<&str>) -> Result<Vec<u8>, CliError> {
    let mut secret = match (file, from_env) {
        (Some(_), Some(_)) => return Err(CliError::BothSecrets),
        (None, None) => return Err(CliError::NoSecret),
        (None, Some(value)) => value.as_bytes().to_vec(),
        (Some(path), None) => read_secret_file(path)?,
    };
    if secret.last() == Some(&b'\n') {
        secret.pop();
        if secret.last() == Some(&b'\r') {
            secret.pop();
        }
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(CliError::SecretTooShort { len: secret.len() });
    }
    Ok(secret)
}

fn read_secret_file(path: &Path) -> Result<Vec<u8>, CliError> {
    let unreadable = |error| CliError::SecretUnreadable {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    // Bounded read: a wrong path (a device, a huge file) must not hang or exhaust memory.
    file.take(MAX_SECRET_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() > MAX_SECRET_BYTES {
        return Err(CliError::SecretTooLong(path.to_path_buf()));
    }
    Ok(bytes)
}

fn check_log_filter(filter: &str) -> Result<(), CliError> {
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| CliError::LogLevel {
            value: filter.to_string(),
            reason: e.to_string(),
        })
}

/// Flags of `raft-elector demo`.
#[derive(Clone, Debug, Args)]
pub struct DemoArgs {
    /// Nodes to run (1 to 9).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_DEMO_NODES)))]
    pub nodes: u8,
    /// First port: node i serves HTTP on base+2i and peers on base+2i+1.
    #[arg(long, default_value_t = 14040)]
    pub base_port: u16,
    /// Kill the leader this often (e.g. 10s) and restart it.
    #[arg(long, value_parser = parse_duration)]
    pub kill_every: Option<Duration>,
    /// Cut the leader off from its peers this often (e.g. 15s), then heal.
    #[arg(long, value_parser = parse_duration)]
    pub partition_every: Option<Duration>,
    /// Exit after this long [default: run until Ctrl-C].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print plain log lines instead of the live view.
    #[arg(long)]
    pub no_tui: bool,
    /// Raft timing.
    #[command(flatten)]
    pub raft: RaftArgs,
}

/// A validated `demo` configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoConfig {
    /// Nodes to run.
    pub nodes: usize,
    /// First port (see [`DemoConfig::http_port`], [`DemoConfig::peer_port`]).
    pub base_port: u16,
    /// Period of leader kills.
    pub kill_every: Option<Duration>,
    /// Period of leader partitions.
    pub partition_every: Option<Duration>,
    /// When to exit.
    pub duration: Option<Duration>,
    /// Whether to show the live view.
    pub tui: bool,
    /// Settings of every node's Raft core, validated.
    pub raft: Config,
}

impl DemoArgs {
    /// Checks the flags and returns the demo configuration.
    pub fn validate(self) -> Result<DemoConfig, CliError> {
        let nodes = usize::from(self.nodes);
        if self.base_port == 0 {
            return Err(CliError::DemoBasePortZero);
        }
        let last = u32::from(self.base_port) + 2 * self.nodes as u32 - 1;
        if last > u32::from(u16::MAX) {
            return Err(CliError::DemoPorts {
                base_port: self.base_port,
                nodes,
                last,
                max_base: u32::from(u16::MAX) + 1 - 2 * self.nodes as u32,
            });
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return Err(CliError::ZeroDuration("--duration"));
        }
        for (flag, period) in [
            ("--kill-every", self.kill_every),
            ("--partition-every", self.partition_every),
        ] {
            if let Some(period) = period {
                check_at_least(flag, period, MIN_PERIOD, "10s")?;
            }
        }
        Ok(DemoConfig {
            nodes,
            base_port: self.base_port,
            kill_every: self.kill_every,
            partition_every: self.partition_every,
            duration: self.duration,
            tui: !self.no_tui,
            raft: self.raft.to_config()?,
        })
    }
}

impl DemoConfig {
    /// Returns the HTTP port of node `index` (0-based): `base + 2 × index`.
    pub fn http_port(&self, index: usize) -> u16 {
        self.port(2 * index)
    }

    /// Returns the peer port of node `index` (0-based): `base + 2 × index + 1`.
    pub fn peer_port(&self, index: usize) -> u16 {
        self.port(2 * index + 1)
    }

    fn port(&self, offset: usize) -> u16 {
        // validate() checked that every node's ports fit below 65536.
        u16::try_from(usize::from(self.base_port) + offset).unwrap_or(u16::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Serializes every test that parses: clap reads `RAFT_ELECTOR_*`, and
    /// one test sets them.
    static ENV_LOCK: Mutex<()> = Mutex::new(());

    const SECRET: &str = "0123456789abcdef-peer-secret";

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        Cli::try_parse_from(std::iter::once("raft-elector").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        match parse(&full).expect("flags parse").command {
            Command::Run(args) => *args,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn demo_args(args: &[&str]) -> DemoArgs {
        let mut full = vec!["demo"];
        full.extend_from_slice(args);
        match parse(&full).expect("flags parse").command {
            Command::Demo(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn pod_env() -> HostEnv {
        HostEnv {
            pod_name: Some("web-0".into()),
            pod_namespace: Some("shop".into()),
            pod_ip: Some("10.1.2.3".into()),
            pod_uid: Some("uid-1".into()),
            hostname: Some("web-0".into()),
            secret: Some(SECRET.into()),
            rust_log: None,
        }
    }

    fn validate(args: &[&str]) -> Result<RunConfig, CliError> {
        run_args(args).validate_with(&pod_env())
    }

    fn error_of(args: &[&str]) -> String {
        validate(args)
            .expect_err("configuration is refused")
            .to_string()
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_match_the_documented_values() {
        let args = run_args(&[]);
        assert_eq!(args.id, None);
        assert_eq!(args.http_listen, "0.0.0.0:4040");
        assert_eq!(args.peer_listen, "0.0.0.0:4041");
        assert_eq!(args.cluster_id, "default");
        assert_eq!(args.raft.election_timeout_min, Duration::from_millis(150));
        assert_eq!(args.raft.election_timeout_max, Duration::from_millis(300));
        assert_eq!(args.raft.heartbeat_interval, Duration::from_millis(50));
        assert_eq!(args.raft.max_clock_drift, 0.01);
        assert_eq!(args.raft.max_voters, 5);
        assert_eq!(args.dns_interval, Duration::from_secs(2));
        assert_eq!(args.removal_grace, Duration::from_secs(30));
        assert_eq!(args.log_format, LogFormat::Text);
        assert!(args.peers.is_empty() && !args.no_kubernetes);
        assert!(args.service.is_none() && args.secret_file.is_none() && args.state_dir.is_none());
    }

    #[test]
    fn a_valid_run_configuration_carries_every_setting() {
        let config = validate(&[
            "--service",
            "elector.shop.svc.cluster.local",
            "--dns-server",
            "10.96.0.10:53",
        ])
        .expect("valid");
        assert_eq!(config.id, "web-0");
        assert_eq!(config.http_listen, "0.0.0.0:4040".parse().expect("addr"));
        assert_eq!(config.advertise, "10.1.2.3:4041");
        assert_eq!(
            config.discovery,
            Discovery::Dns {
                name: "elector.shop.svc.cluster.local".into(),
                port: 4041,
                server: Some("10.96.0.10:53".parse().expect("addr")),
            }
        );
        assert_eq!(config.secret, SECRET.as_bytes());
        assert_eq!(config.raft, Config::default());
        assert_eq!(config.log_level, "info");
        assert!(config.kubernetes && config.warnings.is_empty());
        assert_eq!(config.pod.namespace.as_deref(), Some("shop"));
        assert_eq!(config.pod.ip, Some("10.1.2.3".parse().expect("ip")));
    }

    #[test]
    fn every_run_flag_has_an_env_twin_and_flags_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret_path = dir.path().join("secret");
        std::fs::write(&secret_path, format!("{SECRET}\n")).expect("write secret");
        let vars = [
            ("RAFT_ELECTOR_ID", "env-node"),
            ("RAFT_ELECTOR_HTTP_LISTEN", "127.0.0.1:5040"),
            ("RAFT_ELECTOR_PEER_LISTEN", "127.0.0.1:5041"),
            ("RAFT_ELECTOR_ADVERTISE", "node.example:5041"),
            ("RAFT_ELECTOR_PEERS", "a:5041,b:5041"),
            ("RAFT_ELECTOR_BOOTSTRAP_EXPECT", "3"),
            ("RAFT_ELECTOR_CLUSTER_ID", "blue"),
            (
                "RAFT_ELECTOR_SECRET_FILE",
                secret_path.to_str().expect("utf-8 path"),
            ),
            ("RAFT_ELECTOR_STATE_DIR", "/var/lib/elector"),
            ("RAFT_ELECTOR_ELECTION_TIMEOUT_MIN", "1s"),
            ("RAFT_ELECTOR_ELECTION_TIMEOUT_MAX", "2s"),
            ("RAFT_ELECTOR_HEARTBEAT_INTERVAL", "100ms"),
            ("RAFT_ELECTOR_MAX_CLOCK_DRIFT", "0.05"),
            ("RAFT_ELECTOR_MAX_VOTERS", "3"),
            ("RAFT_ELECTOR_DNS_INTERVAL", "5s"),
            ("RAFT_ELECTOR_REMOVAL_GRACE", "1m"),
            ("RAFT_ELECTOR_STATUS_FILE", "/run/status.json"),
            ("RAFT_ELECTOR_LOG_FORMAT", "json"),
            ("RAFT_ELECTOR_LOG_LEVEL", "debug"),
            ("RAFT_ELECTOR_KUBECONFIG", "/etc/kubeconfig"),
            ("RAFT_ELECTOR_NO_KUBERNETES", "true"),
        ];
        let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for (name, value) in vars {
            std::env::set_var(name, value);
        }
        let from_env = Cli::try_parse_from(["raft-elector", "run"]);
        let overridden = Cli::try_parse_from(["raft-elector", "run", "--cluster-id", "green"]);
        for (name, _) in vars {
            std::env::remove_var(name);
        }
        std::env::set_var("RAFT_ELECTOR_SERVICE", "svc.example");
        let service = Cli::try_parse_from(["raft-elector", "run"]);
        std::env::remove_var("RAFT_ELECTOR_SERVICE");
        drop(_guard);

        let Command::Run(args) = from_env.expect("env parses").command else {
            panic!("parsed as demo");
        };
        let host = HostEnv::default();
        let config = args.validate_with(&host).expect("env config is valid");
        assert_eq!(config.id, "env-node");
        assert_eq!(config.http_listen, "127.0.0.1:5040".parse().expect("addr"));
        assert_eq!(config.peer_listen, "127.0.0.1:5041".parse().expect("addr"));
        assert_eq!(config.advertise, "node.example:5041");
        assert_eq!(
            config.discovery,
            Discovery::Static(vec!["a:5041".into(), "b:5041".into()])
        );
        assert_eq!(config.bootstrap_expect, Some(3));
        assert_eq!(config.cluster_id, "blue");
        assert_eq!(config.secret, SECRET.as_bytes());
        assert_eq!(config.state_dir, Some(PathBuf::from("/var/lib/elector")));
        assert_eq!(config.raft.election_timeout_min, Duration::from_secs(1));
        assert_eq!(config.raft.election_timeout_max, Duration::from_secs(2));
        assert_eq!(config.raft.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(config.raft.max_clock_drift, 0.05);
        assert_eq!(config.raft.max_voters, 3);
        assert_eq!(config.dns_interval, Duration::from_secs(5));
        assert_eq!(config.removal_grace, Duration::from_secs(60));
        assert_eq!(config.status_file, Some(PathBuf::from("/run/status.json")));
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.log_level, "debug");
        assert_eq!(config.kubeconfig, Some(PathBuf::from("/etc/kubeconfig")));
        assert!(!config.kubernetes);

        let Command::Run(args) = overridden.expect("flag parses").command else {
            panic!("parsed as demo");
        };
        assert_eq!(args.cluster_id, "green");
        let Command::Run(args) = service.expect("service parses").command else {
            panic!("parsed as demo");
        };
        assert_eq!(args.service.as_deref(), Some("svc.example"));
    }

    #[test]
    fn durations_parse_in_humantime_style() {
        let args = run_args(&[
            "--election-timeout-min",
            "1s",
            "--election-timeout-max",
            "1s 500ms",
            "--heartbeat-interval",
            "20ms",
            "--removal-grace",
            "2m",
        ]);
        assert_eq!(args.raft.election_timeout_min, Duration::from_secs(1));
        assert_eq!(args.raft.election_timeout_max, Duration::from_millis(1500));
        assert_eq!(args.raft.heartbeat_interval, Duration::from_millis(20));
        assert_eq!(args.removal_grace, Duration::from_secs(120));
    }

    #[test]
    fn a_duration_without_a_unit_is_a_usage_error() {
        let err = parse(&["run", "--heartbeat-interval", "50"]).expect_err("refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("150ms, 2s or 1m"), "{err}");
        assert_eq!(exit_code_for(&err), EXIT_USAGE);
    }

    #[test]
    fn id_defaults_to_pod_name_then_to_the_hostname() {
        let peers = ["--peers", "a:4041"];
        let config = run_args(&peers).validate_with(&pod_env()).expect("valid");
        assert_eq!(config.id, "web-0");

        let host = HostEnv {
            pod_name: None,
            hostname: Some("laptop".into()),
            ..pod_env()
        };
        let config = run_args(&peers).validate_with(&host).expect("valid");
        assert_eq!(config.id, "laptop");

        let config = run_args(&["--peers", "a:4041", "--id", "explicit"])
            .validate_with(&pod_env())
            .expect("valid");
        assert_eq!(config.id, "explicit");
    }

    #[test]
    fn a_missing_or_empty_id_is_refused() {
        let host = HostEnv {
            pod_name: None,
            hostname: None,
            ..pod_env()
        };
        let err = run_args(&["--peers", "a:4041"])
            .validate_with(&host)
            .expect_err("no id");
        assert!(matches!(err, CliError::EmptyId), "{err}");
        assert!(err.to_string().contains("--id"));
        let err = error_of(&["--peers", "a:4041", "--id", ""]);
        assert!(err.contains("POD_NAME"), "{err}");
    }

    #[test]
    fn ids_that_are_not_dns_names_are_refused() {
        let long = "a".repeat(254);
        for (bad, why) in [
            ("Web-0", "a-z"),
            ("web_0", "a-z"),
            ("-web", "start and end"),
            ("web.", "start and end"),
            (long.as_str(), "253"),
        ] {
            let id_flag = format!("--id={bad}");
            let err = error_of(&["--peers", "a:4041", &id_flag]);
            assert!(err.starts_with("--id"), "{err}");
            assert!(err.contains(why), "{bad}: {err}");
        }
        let err = error_of(&["--peers", "a:4041", "--cluster-id", "Blue"]);
        assert!(err.starts_with("--cluster-id"), "{err}");
    }

    #[test]
    fn timeout_min_above_max_is_refused_naming_both_flags() {
        let err = error_of(&["--peers", "a:4041", "--election-timeout-min", "400ms"]);
        assert!(
            err.contains("--election-timeout-min / --election-timeout-max"),
            "{err}"
        );
        assert!(err.contains("400ms"), "{err}");
    }

    #[test]
    fn heartbeat_not_below_the_election_timeout_is_refused() {
        let err = error_of(&["--peers", "a:4041", "--heartbeat-interval", "150ms"]);
        assert!(err.contains("--heartbeat-interval"), "{err}");
        assert!(err.contains("a third"), "{err}");
    }

    #[test]
    fn raft_timing_below_a_millisecond_is_refused_naming_the_flag() {
        for flag in [
            "--heartbeat-interval",
            "--election-timeout-min",
            "--election-timeout-max",
        ] {
            for tiny in ["0s", "1ns", "100ns", "999us"] {
                let err = validate(&["--peers", "a:4041", flag, tiny]).expect_err(tiny);
                assert_eq!(exit_code_for(&err), EXIT_USAGE);
                let text = err.to_string();
                assert!(text.starts_with(&format!("{flag} ")), "{text}");
                assert!(text.contains("at least 1ms"), "{text}");
            }
            let err = demo_args(&[flag, "1ns"]).validate().expect_err("demo");
            assert!(err.to_string().starts_with(flag), "{err}");
        }
        let config = validate(&["--peers", "a:4041", "--heartbeat-interval", "1ms"]).expect("1ms");
        assert_eq!(config.raft.heartbeat_interval, Duration::from_millis(1));
    }

    #[test]
    fn periods_below_100ms_are_refused_naming_the_flag() {
        let err = error_of(&["--peers", "a:4041", "--dns-interval", "1ns"]);
        assert!(err.starts_with("--dns-interval 1ns"), "{err}");
        assert!(err.contains("at least 100ms"), "{err}");
        let config = validate(&["--peers", "a:4041", "--dns-interval", "100ms"]).expect("valid");
        assert_eq!(config.dns_interval, MIN_PERIOD);
        for flag in ["--kill-every", "--partition-every"] {
            let err = demo_args(&[flag, "99ms"]).validate().expect_err(flag);
            assert!(err.to_string().starts_with(flag), "{err}");
            assert!(err.to_string().contains("at least 100ms"), "{err}");
        }
    }

    #[test]
    fn durations_above_365_days_are_refused_and_the_longest_cannot_overflow() {
        for huge in ["99999999999999d", "366d", "365d 1ns"] {
            let err = parse(&["run", "--removal-grace", huge]).expect_err(huge);
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
            assert_eq!(exit_code_for(&err), EXIT_USAGE);
            let text = err.to_string();
            assert!(text.contains("--removal-grace"), "{text}");
            assert!(text.contains("longer than 365 days"), "{text}");
        }
        let config = validate(&[
            "--peers",
            "a:4041",
            "--removal-grace",
            "365d",
            "--dns-interval",
            "365d",
            "--election-timeout-max",
            "365d",
        ])
        .expect("the longest durations are valid");
        assert_eq!(config.removal_grace, MAX_DURATION);
        assert_eq!(config.dns_interval, MAX_DURATION);
        // The runtime multiplies --removal-grace and --dns-interval by small
        // factors (4 and 10) and adds them to instants: none of that overflows.
        let factor = crate::runtime::membership::TOMBSTONE_GRACE_FACTOR.max(10);
        let longest = MAX_DURATION.checked_mul(factor).expect("no overflow");
        assert!(std::time::Instant::now().checked_add(longest).is_some());
        assert!(tokio::time::Instant::now().checked_add(longest).is_some());
    }

    #[test]
    fn configuration_errors_state_their_reason_once() {
        let err =
            validate(&["--peers", "a:4041", "--heartbeat-interval", "150ms"]).expect_err("refused");
        // main prints the whole error chain, as anyhow's {:#} does.
        let chain = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(chain.matches("a third").count(), 1, "{chain}");
        assert!(chain.contains("fix --heartbeat-interval"), "{chain}");
        // The secret file's OS error: `secret_files_are_read_trimmed_and_checked`.
    }

    #[test]
    fn zero_max_voters_and_zero_bootstrap_expect_are_refused() {
        let err = validate(&["--peers", "a:4041", "--max-voters", "0"]).expect_err("refused");
        assert!(matches!(err, CliError::MaxVoters), "{err}");
        let err = validate(&["--peers", "a:4041", "--bootstrap-expect", "0"]).expect_err("refused");
        assert!(matches!(err, CliError::BootstrapExpectZero), "{err}");
        assert!(err.to_string().contains("at least 1"));
    }

    #[test]
    fn an_out_of_range_clock_drift_is_refused() {
        let err = error_of(&["--peers", "a:4041", "--max-clock-drift", "0.7"]);
        assert!(err.contains("--max-clock-drift"), "{err}");
    }

    #[test]
    fn discovery_needs_exactly_one_of_service_and_peers() {
        let err = validate(&[]).expect_err("refused");
        assert!(matches!(err, CliError::NoDiscovery), "{err}");
        assert!(err.to_string().contains("--service") && err.to_string().contains("--peers"));
        let err = validate(&["--service", "svc", "--peers", "a:4041"]).expect_err("refused");
        assert!(matches!(err, CliError::BothDiscoveries), "{err}");
        let err =
            validate(&["--peers", "a:4041", "--dns-server", "10.0.0.1:53"]).expect_err("refused");
        assert!(matches!(err, CliError::DnsServerWithoutService), "{err}");
    }

    #[test]
    fn service_takes_the_peer_port_unless_it_names_one() {
        let config =
            validate(&["--service", "svc", "--peer-listen", "0.0.0.0:7000"]).expect("valid");
        assert_eq!(
            config.discovery,
            Discovery::Dns {
                name: "svc".into(),
                port: 7000,
                server: None
            }
        );
        let config = validate(&["--service", "svc:7100"]).expect("valid");
        assert_eq!(
            config.discovery,
            Discovery::Dns {
                name: "svc".into(),
                port: 7100,
                server: None
            }
        );
    }

    #[test]
    fn bad_addresses_are_refused_naming_the_flag() {
        for (args, flag) in [
            (
                &["--peers", "a:4041", "--http-listen", "localhost"][..],
                "--http-listen",
            ),
            (
                &["--peers", "a:4041", "--peer-listen", "0.0.0.0:99999"][..],
                "--peer-listen",
            ),
            (
                &["--peers", "a:4041", "--advertise", "0.0.0.0:4041"][..],
                "--advertise",
            ),
            (
                &["--peers", "a:4041", "--advertise", "node"][..],
                "--advertise",
            ),
            (&["--peers", "a:4041,b"][..], "--peers"),
            (&["--peers", "a:4041,"][..], "--peers"),
            (&["--peers", "fe80::1:4041"][..], "--peers"),
            (&["--peers", "a:0"][..], "--peers"),
            (&["--service", "bad name"][..], "--service"),
            (
                &["--service", "svc", "--dns-server", "dns.local:53"][..],
                "--dns-server",
            ),
        ] {
            let err = validate(args).expect_err("refused");
            assert!(matches!(err, CliError::Address { .. }), "{args:?}: {err}");
            assert!(err.to_string().starts_with(flag), "{args:?}: {err}");
            assert!(err.to_string().contains("use "), "{err}");
        }
        let config = validate(&["--peers", "[fe80::1]:4041,10.0.0.2:4041"]).expect("valid");
        assert_eq!(
            config.discovery,
            Discovery::Static(vec!["[fe80::1]:4041".into(), "10.0.0.2:4041".into()])
        );
    }

    #[test]
    fn advertise_defaults_to_pod_ip_then_listener_then_loopback_with_a_warning() {
        let v6 = HostEnv {
            pod_ip: Some("fd00::5".into()),
            ..pod_env()
        };
        let config = run_args(&["--peers", "a:4041"])
            .validate_with(&v6)
            .expect("valid");
        assert_eq!(config.advertise, "[fd00::5]:4041");

        let no_ip = HostEnv {
            pod_ip: None,
            ..pod_env()
        };
        let config = run_args(&["--peers", "a:4041", "--peer-listen", "127.0.0.2:6001"])
            .validate_with(&no_ip)
            .expect("valid");
        assert_eq!(config.advertise, "127.0.0.2:6001");
        assert!(config.warnings.is_empty());

        let config = run_args(&["--peers", "a:4041"])
            .validate_with(&no_ip)
            .expect("valid");
        assert_eq!(config.advertise, "127.0.0.1:4041");
        assert_eq!(config.warnings.len(), 1);
        assert!(config.warnings[0].contains("POD_IP"));

        let bad_ip = HostEnv {
            pod_ip: Some("not-an-ip".into()),
            ..pod_env()
        };
        let err = run_args(&["--peers", "a:4041"])
            .validate_with(&bad_ip)
            .expect_err("refused");
        assert!(matches!(err, CliError::PodIp(_)), "{err}");
    }

    #[test]
    fn a_secret_is_required_from_exactly_one_source() {
        let none = HostEnv {
            secret: None,
            ..pod_env()
        };
        let err = run_args(&["--peers", "a:4041"])
            .validate_with(&none)
            .expect_err("refused");
        assert!(matches!(err, CliError::NoSecret), "{err}");
        assert!(err.to_string().contains("RAFT_ELECTOR_SECRET"));

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, SECRET).expect("write");
        let path = path.to_str().expect("utf-8 path");
        let err = validate(&["--peers", "a:4041", "--secret-file", path]).expect_err("refused");
        assert!(matches!(err, CliError::BothSecrets), "{err}");
    }

    #[test]
    fn secret_files_are_read_trimmed_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let no_env = HostEnv {
            secret: None,
            ..pod_env()
        };
        let with_file = |content: &[u8]| {
            let path = dir.path().join("secret");
            std::fs::write(&path, content).expect("write");
            run_args(&[
                "--peers",
                "a:4041",
                "--secret-file",
                path.to_str().expect("utf-8"),
            ])
            .validate_with(&no_env)
        };
        let config = with_file(b"0123456789abcdef\r\n").expect("16 bytes after trimming");
        assert_eq!(config.secret, b"0123456789abcdef");

        let err = with_file(b"0123456789abcde\n").expect_err("15 bytes");
        assert!(matches!(err, CliError::SecretTooShort { len: 15 }), "{err}");
        assert!(err.to_string().contains("at least 16"));

        let err = with_file(&[b'x'; MAX_SECRET_BYTES + 1]).expect_err("too long");
        assert!(matches!(err, CliError::SecretTooLong(_)), "{err}");

        let missing = dir.path().join("missing");
        let err = run_args(&[
            "--peers",
            "a:4041",
            "--secret-file",
            missing.to_str().expect("utf-8"),
        ])
        .validate_with(&no_env)
        .expect_err("unreadable");
        assert!(matches!(err, CliError::SecretUnreadable { .. }), "{err}");
        assert!(err.to_string().contains("mounted"), "{err}");
        // main prints the whole chain: the OS error appears once in it.
        let chain = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(chain.matches("os error").count(), 1, "{chain}");
    }

    #[test]
    fn log_level_falls_back_to_rust_log_and_bad_filters_are_refused() {
        let host = HostEnv {
            rust_log: Some("raft_elector=debug".into()),
            ..pod_env()
        };
        let config = run_args(&["--peers", "a:4041"])
            .validate_with(&host)
            .expect("valid");
        assert_eq!(config.log_level, "raft_elector=debug");
        let config = run_args(&["--peers", "a:4041", "--log-level", "warn"])
            .validate_with(&host)
            .expect("valid");
        assert_eq!(config.log_level, "warn");
        let err = error_of(&["--peers", "a:4041", "--log-level", "raft_elector=loud"]);
        assert!(err.starts_with("--log-level"), "{err}");
    }

    #[test]
    fn zero_intervals_are_refused() {
        let err = error_of(&["--peers", "a:4041", "--dns-interval", "0s"]);
        assert!(err.contains("--dns-interval"), "{err}");
        let err = error_of(&["--peers", "a:4041", "--removal-grace", "0s"]);
        assert!(err.contains("--removal-grace"), "{err}");
    }

    #[test]
    fn debug_output_of_a_run_config_hides_the_secret() {
        let config = validate(&["--peers", "a:4041"]).expect("valid");
        let text = format!("{config:?}");
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains("<28 bytes>"), "{text}");
    }

    #[test]
    fn demo_defaults_give_five_nodes_with_paired_ports() {
        let config = demo_args(&[]).validate().expect("valid");
        assert_eq!(
            (config.nodes, config.base_port, config.tui),
            (5, 14040, true)
        );
        assert_eq!((config.http_port(0), config.peer_port(0)), (14040, 14041));
        assert_eq!((config.http_port(4), config.peer_port(4)), (14048, 14049));
        assert_eq!(config.raft, Config::default());
        assert_eq!(config.kill_every, None);
    }

    #[test]
    fn demo_flags_parse_and_validate() {
        let config = demo_args(&[
            "--nodes",
            "3",
            "--kill-every",
            "10s",
            "--partition-every",
            "15s",
            "--duration",
            "1m",
            "--no-tui",
            "--heartbeat-interval",
            "30ms",
        ])
        .validate()
        .expect("valid");
        assert_eq!(config.nodes, 3);
        assert_eq!(config.kill_every, Some(Duration::from_secs(10)));
        assert_eq!(config.partition_every, Some(Duration::from_secs(15)));
        assert_eq!(config.duration, Some(Duration::from_secs(60)));
        assert!(!config.tui);
        assert_eq!(config.raft.heartbeat_interval, Duration::from_millis(30));
    }

    #[test]
    fn demo_refuses_node_counts_outside_one_to_nine_and_ports_past_65535() {
        for nodes in ["0", "10"] {
            let err = parse(&["demo", "--nodes", nodes]).expect_err("refused");
            assert_eq!(exit_code_for(&err), EXIT_USAGE);
        }
        let err = demo_args(&["--base-port", "65530"])
            .validate()
            .expect_err("refused");
        assert!(err.to_string().contains("at most 65526"), "{err}");
        let err = demo_args(&["--base-port", "0"])
            .validate()
            .expect_err("refused");
        assert!(matches!(err, CliError::DemoBasePortZero), "{err}");
        let err = demo_args(&["--kill-every", "0s"])
            .validate()
            .expect_err("refused");
        assert!(err.to_string().contains("--kill-every"), "{err}");
    }

    #[test]
    fn configuration_errors_exit_2_and_other_errors_exit_1() {
        let err = validate(&[]).expect_err("refused");
        assert_eq!(exit_code_for(&err), EXIT_USAGE);
        let wrapped = anyhow::Error::new(err).context("starting raft-elector");
        assert_eq!(exit_code_for(wrapped.as_ref()), EXIT_USAGE);
        let io = std::io::Error::other("address in use");
        assert_eq!(exit_code_for(&io), EXIT_FAILURE);
        let help = parse(&["--help"]).expect_err("help is an error in clap");
        assert_eq!(exit_code_for(&help), 0);
        let unknown = parse(&["run", "--no-such-flag"]).expect_err("refused");
        assert_eq!(exit_code_for(&unknown), EXIT_USAGE);
    }
}
