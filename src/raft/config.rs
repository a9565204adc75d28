//! Timing and membership settings of the core.

use std::time::Duration;
use thiserror::Error;

/// Default lower bound of the randomized election timeout (Raft paper §9.3).
pub const DEFAULT_ELECTION_TIMEOUT_MIN: Duration = Duration::from_millis(150);
/// Default upper bound of the randomized election timeout.
pub const DEFAULT_ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(300);
/// Default interval between heartbeat rounds.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);
/// Default bound on how much two nodes' clock rates may differ (1%).
pub const DEFAULT_MAX_CLOCK_DRIFT: f64 = 0.01;
/// Default number of voters; further members follow as learners.
pub const DEFAULT_MAX_VOTERS: usize = 5;
/// Default number of committed entries kept before compacting to a snapshot.
pub const DEFAULT_COMPACTION_THRESHOLD: u64 = 32;
/// Most entries sent in one AppendEntries.
pub const MAX_ENTRIES_PER_MESSAGE: usize = 64;

/// Settings of one Raft core. Validate with [`Config::validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Lower bound of the election timeout; also the stickiness window and
    /// the CheckQuorum period.
    pub election_timeout_min: Duration,
    /// Upper bound (exclusive) of the election timeout; equal to the minimum
    /// gives a fixed timeout, which only tests should use.
    pub election_timeout_max: Duration,
    /// Interval between heartbeat rounds of a leader.
    pub heartbeat_interval: Duration,
    /// Bound on the relative difference of any two nodes' clock rates
    /// (0.01 = 1%). The lease lasts `election_timeout_min × (1 − drift)`.
    pub max_clock_drift: f64,
    /// Most voters; further members are learners.
    pub max_voters: usize,
    /// Committed entries kept in the log before it is compacted.
    pub compaction_threshold: u64,
    /// Whether to run a PreVote round before each election (§9.6).
    pub pre_vote: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            election_timeout_min: DEFAULT_ELECTION_TIMEOUT_MIN,
            election_timeout_max: DEFAULT_ELECTION_TIMEOUT_MAX,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            max_clock_drift: DEFAULT_MAX_CLOCK_DRIFT,
            max_voters: DEFAULT_MAX_VOTERS,
            compaction_threshold: DEFAULT_COMPACTION_THRESHOLD,
            pre_vote: true,
        }
    }
}

/// A setting that makes the election unsafe or unable to work.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("election timeout min ({min:?}) must be at most the max ({max:?})")]
    TimeoutRange { min: Duration, max: Duration },
    #[error("election timeout min must be positive")]
    ZeroTimeout,
    #[error("heartbeat interval ({heartbeat:?}) must be positive and below the election timeout min ({min:?}); use at most a third of it")]
    Heartbeat { heartbeat: Duration, min: Duration },
    #[error("max clock drift {0} must be in [0, 0.5)")]
    Drift(f64),
    #[error("max voters must be at least 1")]
    MaxVoters,
    #[error("compaction threshold must be at least 1")]
    Compaction,
}

impl Config {
    /// Checks the settings; an error says which one to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.election_timeout_min.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        if self.election_timeout_min > self.election_timeout_max {
            return Err(ConfigError::TimeoutRange {
                min: self.election_timeout_min,
                max: self.election_timeout_max,
            });
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.election_timeout_min
        {
            return Err(ConfigError::Heartbeat {
                heartbeat: self.heartbeat_interval,
                min: self.election_timeout_min,
            });
        }
        if !(0.0..0.5).contains(&self.max_clock_drift) {
            return Err(ConfigError::Drift(self.max_clock_drift));
        }
        if self.max_voters == 0 {
            return Err(ConfigError::MaxVoters);
        }
        if self.compaction_threshold == 0 {
            return Err(ConfigError::Compaction);
        }
        Ok(())
    }

    /// Returns how long a lease lasts after the round it is based on was sent:
    /// `election_timeout_min × (1 − max_clock_drift)` (dissertation §6.4).
    pub fn lease_duration(&self) -> Duration {
        self.election_timeout_min
            .mul_f64(1.0 - self.max_clock_drift)
    }
}
