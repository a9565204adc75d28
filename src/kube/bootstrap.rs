//! The Kubernetes side of bootstrap: the group's first configuration is
//! recorded once, by compare-and-swap on the `LeaderElection` status (the
//! resourceVersion is the precondition), and every member adopts what is
//! recorded. Members that start together may propose different
//! configurations (they saw different DNS answers); exactly one wins, so
//! they form exactly one cluster.
//!
//! A group re-bootstraps only when none of the recorded members' pods still
//! exists ([`CrBootstrap::forget_if_abandoned`]).

use super::crd::{
    BootstrapMember, BootstrapRecord, LeaderElection, LeaderElectionSpec, LeaderElectionStatus,
};
use super::error::{Error, Result};
use crate::leadership::LeaderState;
use crate::raft::NodeId;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Most compare-and-swap rounds before giving up (each loses only to a
/// concurrent writer, so a handful suffices).
const MAX_ROUNDS: usize = 16;

/// Records and reads the first configuration of one election group.
#[derive(Clone)]
pub struct CrBootstrap {
    les: Api<LeaderElection>,
    pods: Api<Pod>,
    name: String,
    spec: LeaderElectionSpec,
}

/// What [`CrBootstrap::record_or_adopt`] ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// This member's proposal is the group's first configuration.
    Recorded(BootstrapRecord),
    /// Another member's proposal was there first: adopt it.
    Adopted(BootstrapRecord),
}

impl Outcome {
    /// Returns the configuration every member must use.
    pub fn record(&self) -> &BootstrapRecord {
        match self {
            Outcome::Recorded(r) | Outcome::Adopted(r) => r,
        }
    }
}

impl CrBootstrap {
    /// Creates the seam for CR `name` in `namespace`; `spec` is used when
    /// the CR has to be created.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        spec: LeaderElectionSpec,
    ) -> CrBootstrap {
        CrBootstrap {
            les: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client, namespace),
            name: name.to_string(),
            spec,
        }
    }

    /// Returns the recorded first configuration, if any.
    pub async fn recorded(&self) -> Result<Option<BootstrapRecord>> {
        let le = self.get_or_create().await?;
        Ok(le.status.and_then(|s| s.bootstrap))
    }

    /// Records `proposal` as the first configuration unless one is already
    /// recorded, creating the CR when it is missing. Exactly one concurrent
    /// caller gets [`Outcome::Recorded`]; all others get the same record as
    /// [`Outcome::Adopted`].
    pub async fn record_or_adopt(&self, proposal: BootstrapRecord) -> Result<Outcome> {
        validate(&proposal)?;
        for _ in 0..MAX_ROUNDS {
            let mut le = self.get_or_create().await?;
            let mut status = le.status.take().unwrap_or_default();
            if let Some(existing) = status.bootstrap {
                return Ok(Outcome::Adopted(existing));
            }
            status.bootstrap = Some(proposal.clone());
            le.status = Some(status);
            match self.replace_status(&le).await {
                Ok(_) => return Ok(Outcome::Recorded(proposal)),
                // Someone wrote in between: read again and decide again.
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Invalid {
            what: format!("leaderelection/{}", self.name),
            reason: format!("status kept changing for {MAX_ROUNDS} compare-and-swap rounds"),
        })
    }

    /// Forgets the recorded configuration (and the terms written after it)
    /// when no member of it, nor of the last configuration a leader
    /// published in the status, still has a pod, so the next members
    /// bootstrap a new group. Names in `replaced` are skipped: the caller
    /// knows they run another, unjoined incarnation now (a pod recreated
    /// under the same name). Returns whether it forgot. A status with a
    /// live member's pod is never touched, and the write is conditional on
    /// the resourceVersion that was checked.
    pub async fn forget_if_abandoned(&self, replaced: &BTreeSet<String>) -> Result<bool> {
        for _ in 0..MAX_ROUNDS {
            let le = self.get_or_create().await?;
            let Some(status) = le.status.as_ref() else {
                return Ok(false);
            };
            let Some(record) = status.bootstrap.as_ref() else {
                return Ok(false);
            };
            let mut names: BTreeSet<&str> = record
                .members
                .iter()
                .map(|m| m.id.rsplit_once('#').map_or(m.id.as_str(), |(n, _)| n))
                .collect();
            names.extend(status.members.iter().map(|m| m.name.as_str()));
            for name in names.into_iter().filter(|n| !replaced.contains(*n)) {
                let found = self
                    .pods
                    .get_opt(name)
                    .await
                    .map_err(|e| Error::from_kube("get", format!("pod/{name}"), e))?;
                if found.is_some() {
                    return Ok(false);
                }
            }
            let mut fresh = le;
            fresh.status = Some(LeaderElectionStatus::default());
            match self.replace_status(&fresh).await {
                Ok(_) => return Ok(true),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    async fn get_or_create(&self) -> Result<LeaderElection> {
        let what = format!("leaderelection/{}", self.name);
        if let Some(le) = self
            .les
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::from_kube("get", what.clone(), e))?
        {
            return Ok(le);
        }
        let obj = LeaderElection::new(&self.name, self.spec.clone());
        match self.les.create(&PostParams::default(), &obj).await {
            Ok(created) => Ok(created),
            // Created concurrently: read the winner's.
            Err(kube::Error::Api(s)) if s.code == 409 => self
                .les
                .get(&self.name)
                .await
                .map_err(|e| Error::from_kube("get", what, e)),
            Err(e) => Err(Error::from_kube("create", what, e)),
        }
    }

    async fn replace_status(&self, le: &LeaderElection) -> Result<LeaderElection> {
        self.les
            .replace_status(&self.name, &PostParams::default(), le)
            .await
            .map_err(|e| {
                Error::from_kube("replace_status", format!("leaderelection/{}", self.name), e)
            })
    }
}

/// How often a forget that found a live member's pod is checked again,
/// while it is still asked for.
const FORGET_RECHECK: Duration = Duration::from_secs(1);

/// What the recorder knows of the recorded first configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Known {
    /// Not read since the recorder last became active.
    Unread,
    /// Nothing is recorded (or the CR does not exist yet).
    Empty,
    /// The recorded members and the CR spec's voter limit.
    Members {
        /// Every recorded member (identity, address).
        members: Vec<(NodeId, String)>,
        /// `spec.maxVoters`: the lowest that many ids vote.
        max_voters: usize,
    },
}

/// What the node's side asks of the recorder; the latest ask wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Keep [`Known`] current.
    Read,
    /// Record these members unless some are recorded
    /// ([`CrBootstrap::record_or_adopt`]).
    Record {
        /// The proposal (identity, address), proposer included.
        members: Vec<(NodeId, String)>,
        /// The proposer.
        by: NodeId,
    },
    /// Forget the record of `recorded` if abandoned
    /// ([`CrBootstrap::forget_if_abandoned`] with `replaced`).
    Forget {
        /// The recorded members as the asker read them.
        recorded: Vec<NodeId>,
        /// Names known to run another, unjoined incarnation.
        replaced: BTreeSet<String>,
    },
}

/// The node side of the recorder: read the latest view, hand over asks.
/// Neither blocks (the node's bootstrap authority calls them in its loop).
pub struct RecorderHandle {
    asks: watch::Sender<Ask>,
    known: watch::Receiver<Known>,
}

impl RecorderHandle {
    /// Returns the record as last read.
    pub fn read(&self) -> Known {
        self.known.borrow().clone()
    }

    /// Hands the recorder a new ask; it acts on the latest one.
    pub fn ask(&mut self, ask: Ask) {
        self.asks.send_replace(ask);
    }
}

/// The task that keeps [`Known`] and serves the [`Ask`]s against the CR.
/// It watches the CR only while this node has not joined a cluster: a
/// running member holds no watch and makes no request for bootstrap.
pub struct Recorder {
    cas: CrBootstrap,
    asks: watch::Receiver<Ask>,
    known: watch::Sender<Known>,
    /// resourceVersion of the object [`Known`] was read from.
    version: Option<u64>,
}

impl CrBootstrap {
    /// Returns the recorder of this CR and its node-side handle.
    pub fn recorder(self) -> (RecorderHandle, Recorder) {
        let (ask_tx, ask_rx) = watch::channel(Ask::Read);
        let (known_tx, known_rx) = watch::channel(Known::Unread);
        let handle = RecorderHandle {
            asks: ask_tx,
            known: known_rx,
        };
        let recorder = Recorder {
            cas: self,
            asks: ask_rx,
            known: known_tx,
            version: None,
        };
        (handle, recorder)
    }
}

impl Recorder {
    /// Runs until `shutdown` resolves or the node is gone: active while the
    /// leadership state says this node has not joined, idle otherwise.
    pub async fn run(
        mut self,
        mut state: watch::Receiver<LeaderState>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                unjoined = state.wait_for(|s| !s.joined) => if unjoined.is_err() { return },
            }
            debug!(name = %self.cas.name, "reading the bootstrap record");
            if !self.serve(&mut state, shutdown.as_mut()).await {
                return;
            }
            // Joined: forget the view, a later attempt reads it afresh.
            self.known.send_replace(Known::Unread);
            self.version = None;
        }
    }

    /// Watches the CR and serves asks until this node joined (`true`) or
    /// the recorder has to stop (`false`).
    async fn serve(
        &mut self,
        state: &mut watch::Receiver<LeaderState>,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let les = watcher(
            self.cas.les.clone(),
            watcher::Config::default().fields(&format!("metadata.name={}", self.cas.name)),
        )
        .backoff(super::publisher::RetryBackoff::new());
        tokio::pin!(les);
        let mut backoff = super::publisher::RetryBackoff::new();
        let mut retry_at: Option<Instant> = None;
        let mut listing: Option<Option<LeaderElection>> = None;
        let mut due = true;
        loop {
            tokio::select! {
                _ = shutdown.as_mut() => return false,
                changed = state.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                    if state.borrow_and_update().joined {
                        return true;
                    }
                }
                changed = self.asks.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                    due = true;
                }
                event = les.next() => match event {
                    Some(Ok(ev)) => due |= self.apply(ev, &mut listing),
                    Some(Err(e)) => debug!(error = %e, "watch of the bootstrap record failed; it resumes after a backoff"),
                    None => return false,
                },
                _ = sleep_until(retry_at), if retry_at.is_some() => {
                    retry_at = None;
                    due = true;
                }
            }
            if !due || retry_at.is_some() || *self.known.borrow() == Known::Unread {
                continue;
            }
            due = false;
            let ask = self.asks.borrow_and_update().clone();
            match self.act(&ask).await {
                Ok(recheck) => {
                    use kube::runtime::utils::Backoff;
                    backoff.reset();
                    retry_at = recheck.map(|d| Instant::now() + d);
                }
                Err(e) => {
                    let delay = backoff.next().unwrap_or(super::publisher::MAX_BACKOFF);
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "bootstrap record request failed; this node does not bootstrap until it succeeds");
                    retry_at = Some(Instant::now() + delay);
                }
            }
        }
    }

    /// Applies a watch event; returns whether the view changed.
    fn apply(
        &mut self,
        event: watcher::Event<LeaderElection>,
        listing: &mut Option<Option<LeaderElection>>,
    ) -> bool {
        match event {
            watcher::Event::Init => {
                *listing = Some(None);
                false
            }
            watcher::Event::InitApply(le) => {
                *listing = Some(Some(le));
                false
            }
            watcher::Event::InitDone => {
                let listed = listing.take().flatten();
                // A relist replaces the view whatever its version.
                self.version = None;
                self.set(listed.as_ref())
            }
            watcher::Event::Apply(le) => self.set(Some(&le)),
            watcher::Event::Delete(_) => {
                self.version = None;
                self.known
                    .send_if_modified(|k| replace_if_differs(k, Known::Empty))
            }
        }
    }

    /// Sets the view from `le` unless it is older than the one held.
    fn set(&mut self, le: Option<&LeaderElection>) -> bool {
        let version = le.and_then(|l| l.resource_version()?.parse::<u64>().ok());
        if let (Some(held), Some(new)) = (self.version, version) {
            if new < held {
                return false;
            }
        }
        self.version = version;
        let known = le.map_or(Known::Empty, known_of);
        self.known
            .send_if_modified(|k| replace_if_differs(k, known))
    }

    /// Serves one ask; returns when to serve it again, if it waits on
    /// something (a live member's pod).
    async fn act(&mut self, ask: &Ask) -> Result<Option<Duration>> {
        let known = self.known.borrow().clone();
        match (ask, known) {
            (Ask::Record { members, by }, Known::Empty) => {
                let proposal = BootstrapRecord {
                    members: members
                        .iter()
                        .map(|(id, address)| BootstrapMember {
                            id: id.to_string(),
                            address: address.clone(),
                        })
                        .collect(),
                    recorded_by: by.to_string(),
                    recorded_at: Some(Time(Timestamp::now())),
                };
                match self.cas.record_or_adopt(proposal).await? {
                    Outcome::Recorded(r) => info!(
                        members = r.members.len(),
                        "recorded the first configuration in the LeaderElection"
                    ),
                    Outcome::Adopted(r) => {
                        info!(members = r.members.len(), by = %r.recorded_by, "another member recorded the first configuration first")
                    }
                }
                // The watch brings the record.
                Ok(None)
            }
            (Ask::Forget { recorded, replaced }, Known::Members { members, .. }) => {
                let held: BTreeSet<&NodeId> = members.iter().map(|(id, _)| id).collect();
                if held != recorded.iter().collect::<BTreeSet<_>>() {
                    return Ok(None); // the record changed since it was read
                }
                if self.cas.forget_if_abandoned(replaced).await? {
                    info!("no member of the recorded first configuration has a pod any more: forgot it, the group bootstraps anew");
                    Ok(None)
                } else {
                    Ok(Some(FORGET_RECHECK))
                }
            }
            _ => Ok(None),
        }
    }
}

/// Returns the view of the record in `le`.
fn known_of(le: &LeaderElection) -> Known {
    let Some(record) = le.status.as_ref().and_then(|s| s.bootstrap.as_ref()) else {
        return Known::Empty;
    };
    let mut members = Vec::with_capacity(record.members.len());
    for m in &record.members {
        match m.id.parse::<NodeId>() {
            Ok(id) => members.push((id, m.address.clone())),
            Err(e) => {
                warn!(error = %e, name = %le.name_any(), "a recorded bootstrap member is malformed; ignored")
            }
        }
    }
    Known::Members {
        members,
        max_voters: usize::try_from(le.spec.max_voters).unwrap_or(usize::MAX),
    }
}

fn replace_if_differs(held: &mut Known, new: Known) -> bool {
    if *held == new {
        false
    } else {
        *held = new;
        true
    }
}

/// Sleeps until `at`, or forever without one (a disabled `select!` arm).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Refuses a proposal that could not be a configuration.
fn validate(record: &BootstrapRecord) -> Result<()> {
    let reason = if record.members.is_empty() {
        Some("no members".to_string())
    } else if record
        .members
        .iter()
        .any(|m| m.id.is_empty() || m.address.is_empty())
    {
        Some("a member without id or address".to_string())
    } else {
        let mut ids: Vec<&str> = record.members.iter().map(|m| m.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        (ids.len() != record.members.len()).then(|| "a member listed twice".to_string())
    };
    match reason {
        Some(reason) => Err(Error::Invalid {
            what: "bootstrap proposal".into(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> BootstrapMember {
        BootstrapMember {
            id: id.into(),
            address: format!("{id}:4041"),
        }
    }

    #[test]
    fn proposals_without_members_or_with_duplicates_are_refused() {
        let empty = BootstrapRecord::default();
        assert!(validate(&empty).is_err());
        let twice = BootstrapRecord {
            members: vec![member("a#1"), member("a#1")],
            recorded_by: "a#1".into(),
            recorded_at: None,
        };
        assert!(validate(&twice).is_err());
        let ok = BootstrapRecord {
            members: vec![member("a#1"), member("b#2")],
            recorded_by: "a#1".into(),
            recorded_at: None,
        };
        assert!(validate(&ok).is_ok());
    }
}
