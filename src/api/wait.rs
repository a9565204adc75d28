//! Waiting for the answer to change: the long-poll of `GET /is-leader?wait=..`
//! and the stream of `GET /events`.
//!
//! The answer can change in two ways: the runtime publishes a new
//! [`LeaderState`], or a leader's lease runs out with nothing published. The
//! second never shows on the watch channel, so every wait also sleeps until
//! the lease deadline and looks again.

use super::status::Answer;
use crate::leadership::LeaderState;
use serde::Deserialize;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

/// Longest wait a client may ask for; a longer `wait=` is refused with 400.
pub const MAX_WAIT: Duration = Duration::from_secs(5 * 60);

/// Query of `GET /is-leader`. Fields stay text so a bad value gets a message
/// naming the parameter rather than a generic deserialization error.
#[derive(Debug, Default, Deserialize)]
pub struct IsLeaderQuery {
    /// How long to wait for a change: `30s`, `500ms`, or whole seconds (`2`).
    pub wait: Option<String>,
    /// The term the client last saw.
    pub term: Option<String>,
    /// The `isLeader` value the client last saw (`true` or `false`).
    #[serde(rename = "isLeader")]
    pub is_leader: Option<String>,
    /// The leader name the client last saw (empty for none).
    pub leader: Option<String>,
}

/// A query parameter that cannot be understood; answered with 400.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("invalid wait={0:?}: use a duration like 30s or 500ms, or a whole number of seconds (at most 5m)")]
    Wait(String),
    #[error("invalid term={0:?}: use the term number from the last answer")]
    Term(String),
    #[error("invalid isLeader={0:?}: use true or false")]
    IsLeader(String),
}

/// A validated long-poll request.
#[derive(Debug, PartialEq, Eq)]
pub struct WaitRequest {
    /// How long to wait at most (never more than [`MAX_WAIT`]).
    pub wait: Duration,
    /// What the client last saw; fields it did not send are `None` and are
    /// taken from the state at request time.
    pub seen_term: Option<u64>,
    /// The `isLeader` value the client last saw.
    pub seen_is_leader: Option<bool>,
    /// The leader the client last saw (`Some(None)`: it saw no leader).
    pub seen_leader: Option<Option<String>>,
}

impl WaitRequest {
    /// Parses the query; `Ok(None)` when no `wait` was asked for.
    pub fn parse(query: &IsLeaderQuery) -> Result<Option<WaitRequest>, QueryError> {
        let Some(wait) = &query.wait else {
            return Ok(None);
        };
        let seen_term = match &query.term {
            Some(t) => Some(t.parse().map_err(|_| QueryError::Term(t.clone()))?),
            None => None,
        };
        let seen_is_leader = match query.is_leader.as_deref() {
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => return Err(QueryError::IsLeader(other.to_string())),
            None => None,
        };
        let seen_leader = query
            .leader
            .as_ref()
            .map(|l| (!l.is_empty()).then(|| l.clone()));
        Ok(Some(WaitRequest {
            wait: parse_wait(wait)?,
            seen_term,
            seen_is_leader,
            seen_leader,
        }))
    }

    /// Returns what the client saw, filling what it did not send from `current`.
    pub fn seen(&self, current: &Answer) -> Answer {
        Answer {
            is_leader: self.seen_is_leader.unwrap_or(current.is_leader),
            leader: self
                .seen_leader
                .clone()
                .unwrap_or_else(|| current.leader.clone()),
            term: self.seen_term.unwrap_or(current.term),
        }
    }
}

/// Parses a wait duration (`30s`, `500ms`, `2` = seconds); one longer than
/// [`MAX_WAIT`] is refused, as the error message says.
pub fn parse_wait(text: &str) -> Result<Duration, QueryError> {
    let bad = || QueryError::Wait(text.to_string());
    let wait = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(text.parse().map_err(|_| bad())?)
    } else {
        humantime::parse_duration(text).map_err(|_| bad())?
    };
    if wait > MAX_WAIT {
        return Err(bad());
    }
    Ok(wait)
}

/// Why [`wait_for_change`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The answer differs from what the caller saw.
    Changed,
    /// The deadline passed with the answer unchanged.
    TimedOut,
    /// The runtime stopped publishing and no lease is left to expire: the
    /// answer can never change again.
    Closed,
}

/// Waits until the answer of `rx` differs from `seen`, `deadline` passes
/// (never, if `None`), or nothing can change any more; returns the state
/// current at that moment and why it returned.
pub async fn wait_for_change(
    rx: &mut watch::Receiver<LeaderState>,
    seen: &Answer,
    deadline: Option<Instant>,
) -> (LeaderState, WaitOutcome) {
    let mut closed = false;
    loop {
        let state = rx.borrow_and_update().clone();
        let now = Instant::now();
        if Answer::of(&state, now) != *seen {
            return (state, WaitOutcome::Changed);
        }
        let lease_expiry = state.lease_until.filter(|until| *until > now);
        if closed && lease_expiry.is_none() {
            return (state, WaitOutcome::Closed);
        }
        tokio::select! {
            // The runtime published a new state, or dropped its sender.
            changed = rx.changed(), if !closed => closed = changed.is_err(),
            // The lease runs out without anything published: look again.
            () = sleep_until_some(lease_expiry) => {}
            // The caller has waited long enough: answer with what is current.
            () = sleep_until_some(deadline) => {
                let state = rx.borrow().clone();
                return (state, WaitOutcome::TimedOut);
            }
        }
    }
}

/// Sleeps until `deadline`, or forever when there is none.
pub(crate) async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Role;

    fn follower(term: u64, leader: Option<&str>) -> LeaderState {
        let mut s = LeaderState::initial("a#1".into(), "a".into());
        s.term = term;
        s.leader = leader.map(str::to_string);
        s
    }

    fn leader_until(term: u64, until: Instant) -> LeaderState {
        let mut s = follower(term, Some("a"));
        s.role = Role::Leader;
        s.lease_until = Some(until);
        s
    }

    #[test]
    fn wait_accepts_durations_and_plain_seconds() {
        assert_eq!(parse_wait("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_wait("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_wait("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_wait("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn wait_up_to_five_minutes_is_accepted_and_longer_is_refused() {
        assert_eq!(parse_wait("5m"), Ok(MAX_WAIT));
        assert_eq!(parse_wait("300"), Ok(MAX_WAIT));
        for long in ["5m 1ms", "301", "10m", "1h", "99999h", "100000"] {
            let err = parse_wait(long).expect_err(long);
            assert_eq!(err, QueryError::Wait(long.to_string()));
            assert!(err.to_string().contains("at most 5m"), "{err}");
        }
    }

    #[test]
    fn bad_wait_values_are_rejected_with_the_value_named() {
        for bad in [
            "",
            "abc",
            "-1",
            "1.5",
            "10 parsecs",
            "99999999999999999999999",
        ] {
            let err = parse_wait(bad).expect_err(bad);
            assert!(err.to_string().contains("500ms"), "{err}");
        }
    }

    #[test]
    fn wait_request_takes_missing_seen_fields_from_the_current_answer() {
        let query = IsLeaderQuery {
            wait: Some("1s".into()),
            term: Some("7".into()),
            ..IsLeaderQuery::default()
        };
        let req = WaitRequest::parse(&query)
            .expect("valid")
            .expect("wait asked");
        let current = Answer {
            is_leader: true,
            leader: Some("b".into()),
            term: 9,
        };
        let seen = req.seen(&current);
        assert_eq!(seen.term, 7);
        assert!(seen.is_leader);
        assert_eq!(seen.leader.as_deref(), Some("b"));
    }

    #[test]
    fn wait_request_rejects_bad_term_and_is_leader() {
        let bad_term = IsLeaderQuery {
            wait: Some("1s".into()),
            term: Some("x".into()),
            ..IsLeaderQuery::default()
        };
        assert_eq!(
            WaitRequest::parse(&bad_term),
            Err(QueryError::Term("x".into()))
        );
        let bad_flag = IsLeaderQuery {
            wait: Some("1s".into()),
            is_leader: Some("yes".into()),
            ..IsLeaderQuery::default()
        };
        assert_eq!(
            WaitRequest::parse(&bad_flag),
            Err(QueryError::IsLeader("yes".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wait_returns_when_a_new_term_is_published() {
        let (tx, mut rx) = watch::channel(follower(1, Some("b")));
        let seen = Answer::of(&rx.borrow(), Instant::now());
        let publisher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send_replace(follower(2, Some("c")));
            tx
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let (state, outcome) = wait_for_change(&mut rx, &seen, Some(deadline)).await;
        assert_eq!(outcome, WaitOutcome::Changed);
        assert_eq!(state.term, 2);
        assert!(Instant::now() < deadline);
        drop(publisher.await);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_ignores_publications_that_do_not_change_the_answer() {
        let start = Instant::now();
        let (tx, mut rx) = watch::channel(follower(1, Some("b")));
        let seen = Answer::of(&rx.borrow(), start);
        let mut same_answer = follower(1, Some("b"));
        same_answer.voters = 3;
        tx.send_replace(same_answer);
        let deadline = start + Duration::from_secs(1);
        let (state, outcome) = wait_for_change(&mut rx, &seen, Some(deadline)).await;
        assert_eq!(outcome, WaitOutcome::TimedOut);
        assert_eq!(state.voters, 3);
        assert_eq!(Instant::now(), deadline);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_wakes_at_lease_expiry_without_any_publication() {
        let start = Instant::now();
        let lease_end = start + Duration::from_millis(140);
        let (tx, mut rx) = watch::channel(leader_until(3, lease_end));
        let seen = Answer::of(&rx.borrow(), start);
        assert!(seen.is_leader);
        let deadline = start + Duration::from_secs(30);
        let (state, outcome) = wait_for_change(&mut rx, &seen, Some(deadline)).await;
        assert_eq!(outcome, WaitOutcome::Changed);
        assert!(!state.is_leader_at(Instant::now()));
        assert!(Instant::now() >= lease_end && Instant::now() < deadline);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_ends_when_the_runtime_stops_publishing() {
        let (tx, mut rx) = watch::channel(follower(1, None));
        let seen = Answer::of(&rx.borrow(), Instant::now());
        drop(tx);
        let (_, outcome) = wait_for_change(&mut rx, &seen, None).await;
        assert_eq!(outcome, WaitOutcome::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_returns_at_once_when_the_client_saw_something_else() {
        let (tx, mut rx) = watch::channel(follower(5, Some("b")));
        let seen = Answer {
            is_leader: false,
            leader: Some("b".into()),
            term: 4,
        };
        let start = Instant::now();
        let (state, outcome) = wait_for_change(&mut rx, &seen, None).await;
        assert_eq!((outcome, state.term), (WaitOutcome::Changed, 5));
        assert_eq!(Instant::now(), start);
        drop(tx);
    }
}
