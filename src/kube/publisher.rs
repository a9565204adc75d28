//! The Kubernetes publisher: one task per sidecar, fed by the leadership
//! watch, that keeps the member pods' role labels, the `LeaderElection`
//! status and one Event per leader change equal to what the leader knows.
//!
//! ```text
//!  leadership watch ─┐                    ┌─► PATCH pods (conditional, demote first)
//!  pod watch ────────┼─► caches ─► plan ──┼─► PUT leaderelections/NAME/status (resourceVersion)
//!  CR watch ─────────┘   (level)  (pure)  └─► POST events (one per term)
//! ```
//!
//! Rules (ARCHITECTURE.md, "Kubernetes publishing"):
//! - Every member watches (metadata-only pod watch, CR watch), only the
//!   leader writes, and only while its lease holds: the lease is checked
//!   right before each request. One exception: between winning and its
//!   lease, a leader already demotes the pods that still say `leader`
//!   (term-fenced and resourceVersion-conditional, so never a second
//!   leader; see `Publisher::demote_before_lease`), which leaves one
//!   request between the first `/is-leader` 200 and the label.
//! - It re-plans on a leadership change only when something it publishes
//!   changed (role, term, leader, membership, lease held or not), never on
//!   a lease extension: an idle leader's publisher does not wake.
//! - Level-triggered: any watch event or leadership change re-plans from
//!   the caches; a relabelled or recreated pod is repaired, and a converged
//!   view plans no writes at all.
//! - Fenced by term: a pod annotation or status of a higher term stops the
//!   writer; every pod patch and status write carries the cached
//!   resourceVersion, so a writer with a stale view gets 409 and re-reads.
//! - Nothing here feeds back into the election: the node never waits on
//!   this task; API errors back off (at most [`MAX_BACKOFF`]), are counted,
//!   logged and shown in the `Published` condition.

use super::crd::{LeaderElection, LeaderElectionSpec, GROUP_LABEL, ROLE_LABEL, TERM_ANNOTATION};
use super::error::{Error, Result};
use super::plan::{self, Fence, LabelPatch, PodView, Published, StatusInputs};
use crate::leadership::{LeaderState, MemberInfo};
use crate::metrics::Metrics;
use crate::raft::Role;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// First retry delay after a failed write or watch.
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest retry delay: labels catch up within this after the API returns.
pub const MAX_BACKOFF: Duration = Duration::from_millis(800);
/// Longest a single request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest the publisher spends clearing its own label once stopped.
pub const FINAL_CLEAR_TIMEOUT: Duration = Duration::from_millis(300);
/// Reporting component of the Events.
const COMPONENT: &str = "raft-elector";

/// Where and as whom the publisher writes.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// Namespace of the member pods and the CR.
    pub namespace: String,
    /// Name of the `LeaderElection` (the group's `--cluster-id`).
    pub name: String,
    /// This member's name, which is its pod's name.
    pub me: String,
    /// This pod's UID from the downward API (else read from the pod).
    pub pod_uid: Option<String>,
    /// The election group id written to the status.
    pub cluster_id: String,
    /// Label selector of the member pods.
    pub pod_selector: String,
    /// Spec of the CR when this member has to create it.
    pub spec: LeaderElectionSpec,
}

impl PublisherConfig {
    /// Returns the default pod selector of group `cluster_id`.
    pub fn default_selector(cluster_id: &str) -> String {
        format!("{GROUP_LABEL}={cluster_id}")
    }
}

/// Exponential retry delays from [`MIN_BACKOFF`] to [`MAX_BACKOFF`].
#[derive(Clone, Debug)]
pub struct RetryBackoff {
    next: Duration,
}

impl RetryBackoff {
    /// Returns a backoff at its first delay.
    pub fn new() -> RetryBackoff {
        RetryBackoff { next: MIN_BACKOFF }
    }
}

impl Default for RetryBackoff {
    fn default() -> RetryBackoff {
        RetryBackoff::new()
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        Some(now)
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }
}

/// A watch-fed cache of one kind of object, swapped atomically on relists.
#[derive(Debug)]
struct Cache<T> {
    /// Whether the first list completed (no decisions before that).
    ready: bool,
    items: BTreeMap<String, T>,
    relist: Option<BTreeMap<String, T>>,
}

impl<T: Versioned> Cache<T> {
    fn new() -> Cache<T> {
        Cache {
            ready: false,
            items: BTreeMap::new(),
            relist: None,
        }
    }

    fn apply(&mut self, event: watcher::Event<T>) {
        match event {
            watcher::Event::Init => self.relist = Some(BTreeMap::new()),
            watcher::Event::InitApply(obj) => {
                if let Some(buf) = &mut self.relist {
                    buf.insert(obj.key(), obj);
                }
            }
            watcher::Event::InitDone => {
                if let Some(buf) = self.relist.take() {
                    self.items = buf;
                }
                self.ready = true;
            }
            watcher::Event::Apply(obj) => self.upsert(obj),
            watcher::Event::Delete(obj) => {
                self.items.remove(&obj.key());
            }
        }
    }

    /// Stores `obj` unless the cache already holds a newer version of it (a
    /// write's answer can arrive before the watch catches up).
    fn upsert(&mut self, obj: T) {
        let key = obj.key();
        if let Some(old) = self.items.get(&key) {
            if let (Some(a), Some(b)) = (old.version(), obj.version()) {
                if b < a {
                    return;
                }
            }
        }
        self.items.insert(key, obj);
    }
}

/// What [`Cache`] needs of an object.
trait Versioned {
    fn key(&self) -> String;
    /// The resourceVersion as a number, when it is one (etcd revisions are).
    fn version(&self) -> Option<u64>;
}

impl Versioned for PodView {
    fn key(&self) -> String {
        self.name.clone()
    }
    fn version(&self) -> Option<u64> {
        self.resource_version.as_deref()?.parse().ok()
    }
}

impl Versioned for LeaderElection {
    fn key(&self) -> String {
        self.name_any()
    }
    fn version(&self) -> Option<u64> {
        self.resource_version()?.parse().ok()
    }
}

/// Returns the publisher's view of a pod's metadata.
fn pod_view(meta: &ObjectMeta) -> PodView {
    PodView {
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        role: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(ROLE_LABEL).cloned()),
        term: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(TERM_ANNOTATION))
            .and_then(|t| t.parse().ok()),
    }
}

/// API errors since the last time everything was published.
#[derive(Debug, Default)]
struct Trouble {
    /// The latest failure while it lasts: (metric label, message).
    failing: Option<(&'static str, String)>,
    /// Failures since publishing last converged.
    failures: u64,
    /// When the failures began.
    since: Option<Timestamp>,
    /// Shown once the API is back, until the next term.
    recovered: Option<String>,
}

impl Trouble {
    fn fail(&mut self, e: &Error) {
        self.failures += 1;
        self.since.get_or_insert_with(Timestamp::now);
        self.failing = Some((e.metric_label(), e.to_string()));
    }

    fn converged(&mut self) {
        if let Some((label, _)) = self.failing.take() {
            let since = self.since.take().map(|t| t.to_string()).unwrap_or_default();
            self.recovered = Some(format!(
                "published after {} failed API requests since {since} (last: {label})",
                self.failures
            ));
        }
        self.failures = 0;
        self.since = None;
    }

    fn published(&self, own_pod_found: bool, selector: &str, me: &str) -> Published {
        if let Some((label, message)) = &self.failing {
            return Published {
                ok: false,
                reason: camel(label),
                message: message.clone(),
            };
        }
        if !own_pod_found {
            return Published {
                ok: false,
                reason: "PodNotFound".into(),
                message: format!(
                    "no pod named {me} matches {selector}: the member name (--id) must be its pod name and the pod must carry the selector's labels"
                ),
            };
        }
        match &self.recovered {
            Some(message) => Published {
                ok: true,
                reason: "Recovered".into(),
                message: message.clone(),
            },
            None => Published {
                ok: true,
                reason: "Synced".into(),
                message: "member pod labels and this status match the leader".into(),
            },
        }
    }
}

/// Returns `snake_case` as `CamelCase` (condition reasons).
fn camel(label: &str) -> String {
    label
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// What a reconcile pass ended with.
enum Pass {
    /// Everything matches (or this node has nothing to write).
    Done,
    /// The lease lapsed or leadership changed mid-pass: stop quietly.
    Yielded,
}

/// The publisher task's state.
pub struct Publisher {
    cfg: PublisherConfig,
    metrics: Metrics,
    pods_api: Api<Pod>,
    /// Metadata-only reads of the member pods (small objects, small cache).
    pod_meta_api: Api<PartialObjectMeta<Pod>>,
    le_api: Api<LeaderElection>,
    events_api: Api<Event>,
    pods: Cache<PodView>,
    le: Cache<LeaderElection>,
    /// Term whose Event is out.
    event_term: u64,
    /// Term in which a newer writer was seen: no writes in it.
    fenced_term: Option<u64>,
    /// Since when this node's view waits to be published.
    publish_started: Option<Instant>,
    /// Term whose tenure [`Self::publish_started`] was last set for.
    started_term: u64,
    trouble: Trouble,
    trouble_term: u64,
}

impl Publisher {
    /// Creates a publisher writing with `client`.
    pub fn new(client: Client, cfg: PublisherConfig, metrics: Metrics) -> Publisher {
        Publisher {
            pods_api: Api::namespaced(client.clone(), &cfg.namespace),
            pod_meta_api: Api::namespaced(client.clone(), &cfg.namespace),
            le_api: Api::namespaced(client.clone(), &cfg.namespace),
            events_api: Api::namespaced(client, &cfg.namespace),
            cfg,
            metrics,
            pods: Cache::new(),
            le: Cache::new(),
            event_term: 0,
            fenced_term: None,
            publish_started: None,
            started_term: 0,
            trouble: Trouble::default(),
            trouble_term: 0,
        }
    }

    /// Runs until `shutdown` resolves or the leadership watch closes, then
    /// clears this node's own leader label best-effort.
    pub async fn run(
        mut self,
        mut state: watch::Receiver<LeaderState>,
        shutdown: impl Future<Output = ()>,
    ) {
        let pods = watcher(
            self.pod_meta_api.clone(),
            watcher::Config::default().labels(&self.cfg.pod_selector),
        )
        .backoff(RetryBackoff::new());
        let les = watcher(
            self.le_api.clone(),
            watcher::Config::default().fields(&format!("metadata.name={}", self.cfg.name)),
        )
        .backoff(RetryBackoff::new());
        tokio::pin!(pods, les, shutdown);
        let mut backoff = RetryBackoff::new();
        let mut retry_at: Option<Instant> = None;
        // What the last complete pass planned from: a wake that brings the
        // same needs no pass (a Yielded or failed pass leaves nothing here).
        let mut planned: Option<Relevant> = None;
        info!(
            namespace = %self.cfg.namespace,
            name = %self.cfg.name,
            selector = %self.cfg.pod_selector,
            "Kubernetes publishing on"
        );
        loop {
            tokio::select! {
                // Stop: clear our own label below, then return.
                _ = &mut shutdown => break,
                // Leadership changed: re-plan only when something publishing
                // depends on did (not on lease extensions or peer counts).
                changed = state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = Relevant::of(&state.borrow_and_update(), Instant::now());
                    if planned.as_ref() == Some(&now) {
                        continue;
                    }
                }
                // A member pod changed: labels may need repair.
                event = pods.next() => self.on_pod_event(event),
                // The CR changed: the status may need writing.
                event = les.next() => self.on_le_event(event),
                // A failed pass waited its backoff.
                _ = sleep_until(retry_at), if retry_at.is_some() => retry_at = None,
            }
            if retry_at.is_some() {
                continue;
            }
            let key = Relevant::of(&state.borrow(), Instant::now());
            match self.reconcile(&state).await {
                Ok(pass) => {
                    backoff.reset();
                    planned = matches!(pass, Pass::Done).then_some(key);
                }
                Err(e) => {
                    planned = None;
                    let delay = backoff.next().unwrap_or(MAX_BACKOFF);
                    self.failed(&e, delay);
                    retry_at = Some(Instant::now() + delay);
                }
            }
        }
        let last = state.borrow().clone();
        let cleared = tokio::time::timeout(FINAL_CLEAR_TIMEOUT, self.step_down(&last)).await;
        if let Ok(Err(e)) = cleared {
            debug!(error = %e, "could not clear this pod's leader label on the way out");
        }
    }

    fn on_pod_event(
        &mut self,
        event: Option<Result<watcher::Event<PartialObjectMeta<Pod>>, watcher::Error>>,
    ) {
        match event {
            Some(Ok(ev)) => self.pods.apply(map_event(ev, |p| pod_view(&p.metadata))),
            Some(Err(source)) => self.watch_failed(Error::Watch {
                what: "pods",
                source,
            }),
            None => {}
        }
    }

    fn on_le_event(
        &mut self,
        event: Option<Result<watcher::Event<LeaderElection>, watcher::Error>>,
    ) {
        match event {
            Some(Ok(ev)) => self.le.apply(ev),
            Some(Err(source)) => self.watch_failed(Error::Watch {
                what: "leaderelections",
                source,
            }),
            None => {}
        }
    }

    fn watch_failed(&mut self, e: Error) {
        self.metrics
            .kube_publish_errors
            .with_label_values(&[e.metric_label()])
            .inc();
        debug!(error = %e, "watch failed; it resumes after a backoff");
    }

    fn failed(&mut self, e: &Error, retry_in: Duration) {
        self.metrics
            .kube_publish_errors
            .with_label_values(&[e.metric_label()])
            .inc();
        if e.is_conflict() {
            debug!(error = %e, "stale cache; retrying once the watch catches up");
        } else {
            self.trouble.fail(e);
            warn!(error = %e, retry_in_ms = retry_in.as_millis() as u64, "Kubernetes publishing failed; the election is unaffected");
        }
    }

    /// Makes the API objects match this node's view, if it may write.
    async fn reconcile(&mut self, state: &watch::Receiver<LeaderState>) -> Result<Pass> {
        let s = state.borrow().clone();
        if s.role != Role::Leader || s.shutting_down {
            self.publish_started = None;
            self.started_term = 0;
            return self.step_down(&s).await;
        }
        if !s.is_leader_at(Instant::now()) {
            return self.demote_before_lease(state, &s).await;
        }
        if !self.pods.ready || !self.le.ready {
            return Ok(Pass::Done);
        }
        if self.fenced_term == Some(s.term) {
            return Ok(Pass::Done);
        }
        if self.trouble_term != s.term {
            self.trouble = Trouble::default();
            self.trouble_term = s.term;
        }
        if self.started_term != s.term {
            // A new tenure: time it from its first pass with a lease.
            self.started_term = s.term;
            self.publish_started = Some(Instant::now());
        }
        if !self.le.items.contains_key(&self.cfg.name) {
            if let Pass::Yielded = self.create_le(state, s.term).await? {
                return Ok(Pass::Yielded);
            }
        }
        let pods: Vec<PodView> = self.pods.items.values().cloned().collect();
        let labels = match plan::plan_labels(&s.node_name, s.term, &pods) {
            Ok(p) => p,
            Err(fence) => return Err(self.fence(fence, s.term)),
        };
        if !labels.is_empty() && self.publish_started.is_none() {
            // Drift (a hand edit, a recreated pod): time its repair.
            self.publish_started = Some(Instant::now());
        }
        let label_result = self.apply_labels(state, s.term, labels).await;
        match &label_result {
            Ok(Pass::Yielded) => return Ok(Pass::Yielded),
            Err(e) if e.is_conflict() => return label_result,
            Err(e) => self.trouble.fail(e),
            Ok(Pass::Done) => {}
        }
        let status_result = self.apply_status(state, &s).await;
        label_result?;
        if let Pass::Yielded = status_result? {
            return Ok(Pass::Yielded);
        }
        if self.event_term < s.term {
            if let Pass::Yielded = self.announce(state, &s).await? {
                return Ok(Pass::Yielded);
            }
        }
        if self.trouble.failing.is_some() {
            // Everything went through: show the recovery once.
            self.trouble.converged();
            return self.apply_status(state, &s).await;
        }
        self.trouble.converged();
        if let Some(t0) = self.publish_started.take() {
            self.metrics
                .kube_publish_seconds
                .observe(t0.elapsed().as_secs_f64());
        }
        Ok(Pass::Done)
    }

    /// Demotes, between winning the election and holding the lease, the
    /// pods that still say `leader` (after a crash: the predecessor's), so
    /// that the promotion is the only request left between this node's
    /// first `/is-leader` 200 and its label.
    ///
    /// Why a leader without its lease may send these and nothing else: a
    /// demotion never makes a pod say `leader`, so it cannot create two
    /// leaders for any watch; it carries this term and is planned only
    /// when no pod was written in a higher one (a newer leader fences it);
    /// and it carries the cached resourceVersion, so a node with a stale
    /// view (woken from SIGSTOP, partitioned) gets 409 and changes nothing.
    /// At worst a deposed leader that has not heard of its successor yet
    /// clears a label its predecessor's lease still covers: no pod says
    /// `leader` for a moment, which every reader already has to handle.
    ///
    /// Failures here are counted and logged but start no backoff: the
    /// lease arriving must not wait out a retry delay; the same demotion
    /// is planned again then.
    async fn demote_before_lease(
        &mut self,
        state: &watch::Receiver<LeaderState>,
        s: &LeaderState,
    ) -> Result<Pass> {
        if !self.pods.ready || self.fenced_term == Some(s.term) {
            return Ok(Pass::Done);
        }
        let pods: Vec<PodView> = self.pods.items.values().cloned().collect();
        let plan = match plan::plan_labels(&s.node_name, s.term, &pods) {
            Ok(p) => p,
            Err(fence) => return Err(self.fence(fence, s.term)),
        };
        for patch in plan.demote {
            if !may_demote(state, s.term) {
                return Ok(Pass::Yielded);
            }
            match send_patch(&self.pods_api, &patch).await {
                Ok(pod) => {
                    debug!(pod = %patch.pod, term = s.term, "demoted before the lease");
                    self.pods.upsert(pod_view(&pod.metadata));
                }
                Err(e) => {
                    self.metrics
                        .kube_publish_errors
                        .with_label_values(&[e.metric_label()])
                        .inc();
                    debug!(error = %e, "demotion before the lease failed; it is planned again with the lease");
                    return Ok(Pass::Done);
                }
            }
        }
        Ok(Pass::Done)
    }

    fn fence(&mut self, fence: Fence, term: u64) -> Error {
        self.fenced_term = Some(term);
        warn!(what = %fence.what, theirs = fence.theirs, ours = term, "a newer leader already wrote; this node stops writing in its term");
        Error::Fenced {
            what: fence.what,
            theirs: fence.theirs,
            ours: term,
        }
    }

    /// Sends the label patches in order: demotions, then this node's
    /// promotion, then the other followers together.
    async fn apply_labels(
        &mut self,
        state: &watch::Receiver<LeaderState>,
        term: u64,
        plan: plan::LabelPlan,
    ) -> Result<Pass> {
        for patch in plan.demote.into_iter().chain(plan.promote) {
            if let Pass::Yielded = self.patch_pod(state, Some(term), &patch).await? {
                return Ok(Pass::Yielded);
            }
        }
        if plan.followers.is_empty() {
            return Ok(Pass::Done);
        }
        if !may_write(state, Some(term)) {
            return Ok(Pass::Yielded);
        }
        let api = self.pods_api.clone();
        let sends = plan.followers.iter().map(|p| send_patch(&api, p));
        let answers = futures::future::join_all(sends).await;
        let mut first_err = None;
        for answer in answers {
            match answer {
                Ok(pod) => self.pods.upsert(pod_view(&pod.metadata)),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(Pass::Done), Err)
    }

    /// Sends one conditional label patch, if this node may still write.
    async fn patch_pod(
        &mut self,
        state: &watch::Receiver<LeaderState>,
        term: Option<u64>,
        patch: &LabelPatch,
    ) -> Result<Pass> {
        if !may_write(state, term) {
            return Ok(Pass::Yielded);
        }
        let pod = send_patch(&self.pods_api, patch).await?;
        debug!(pod = %patch.pod, role = patch.role, term = patch.term, "labelled");
        self.pods.upsert(pod_view(&pod.metadata));
        Ok(Pass::Done)
    }

    /// Writes the status if it differs from the leader's view.
    async fn apply_status(
        &mut self,
        state: &watch::Receiver<LeaderState>,
        s: &LeaderState,
    ) -> Result<Pass> {
        let Some(current) = self.le.items.get(&self.cfg.name).cloned() else {
            return Ok(Pass::Done);
        };
        let own = self.pods.items.get(&s.node_name);
        let inputs = StatusInputs {
            me: &s.node_name,
            uid: own
                .and_then(|p| p.uid.clone())
                .or_else(|| self.cfg.pod_uid.clone()),
            term: s.term,
            cluster_id: &self.cfg.cluster_id,
            members: &s.members,
            generation: current.metadata.generation,
            published: self
                .trouble
                .published(own.is_some(), &self.cfg.pod_selector, &s.node_name),
            now: Time(Timestamp::now()),
        };
        let desired = match plan::plan_status(current.status.as_ref(), &inputs) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(Pass::Done),
            Err(fence) => return Err(self.fence(fence, s.term)),
        };
        if !may_write(state, Some(s.term)) {
            return Ok(Pass::Yielded);
        }
        let mut obj = current;
        obj.status = Some(desired);
        let what = format!("leaderelection/{}", self.cfg.name);
        let written = timed("replace_status", &what, async {
            self.le_api
                .replace_status(&self.cfg.name, &PostParams::default(), &obj)
                .await
        })
        .await?;
        info!(term = s.term, leader = %s.node_name, "LeaderElection status written");
        self.le.upsert(written);
        Ok(Pass::Done)
    }

    /// Creates the CR from this member's flags (it was missing).
    async fn create_le(&mut self, state: &watch::Receiver<LeaderState>, term: u64) -> Result<Pass> {
        if !may_write(state, Some(term)) {
            return Ok(Pass::Yielded);
        }
        let obj = LeaderElection::new(&self.cfg.name, self.cfg.spec.clone());
        let what = format!("leaderelection/{}", self.cfg.name);
        // A 409 means another member created it first: the watch brings it.
        let created = timed("create", &what, async {
            self.le_api.create(&PostParams::default(), &obj).await
        })
        .await?;
        info!(name = %self.cfg.name, "created the LeaderElection");
        self.le.upsert(created);
        Ok(Pass::Done)
    }

    /// Creates the one Event of this leader change. Its name is derived from
    /// the term, so a retry after a lost answer cannot make a second one.
    async fn announce(
        &mut self,
        state: &watch::Receiver<LeaderState>,
        s: &LeaderState,
    ) -> Result<Pass> {
        let Some(le) = self.le.items.get(&self.cfg.name) else {
            return Ok(Pass::Done);
        };
        if !may_write(state, Some(s.term)) {
            return Ok(Pass::Yielded);
        }
        let now = Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.term-{}", self.cfg.name, s.term)),
                namespace: Some(self.cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some(LeaderElection::api_version(&()).into_owned()),
                kind: Some(LeaderElection::kind(&()).into_owned()),
                name: Some(self.cfg.name.clone()),
                namespace: Some(self.cfg.namespace.clone()),
                uid: le.metadata.uid.clone(),
                ..ObjectReference::default()
            },
            reason: Some("LeaderElected".into()),
            message: Some(format!("{} leads term {}", s.node_name, s.term)),
            type_: Some("Normal".into()),
            action: Some("Elect".into()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: Some(s.node_name.clone()),
            source: Some(EventSource {
                component: Some(COMPONENT.into()),
                host: None,
            }),
            ..Event::default()
        };
        let what = format!("event/{}", self.cfg.name);
        match timed("create", &what, async {
            self.events_api.create(&PostParams::default(), &event).await
        })
        .await
        {
            Ok(_) => {}
            // Already out (an earlier attempt's answer was lost).
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e),
        }
        self.event_term = s.term;
        Ok(Pass::Done)
    }

    /// Puts this node's own pod back to `follower` if it still says `leader`
    /// and no newer leader wrote it.
    async fn step_down(&mut self, s: &LeaderState) -> Result<Pass> {
        if !self.pods.ready {
            return Ok(Pass::Done);
        }
        let pods: Vec<PodView> = self.pods.items.values().cloned().collect();
        let Some(patch) = plan::plan_step_down(&s.node_name, s.term, &pods) else {
            return Ok(Pass::Done);
        };
        let pod = send_patch(&self.pods_api, &patch).await?;
        info!(
            term = s.term,
            "not the leader: cleared this pod's leader label"
        );
        self.pods.upsert(pod_view(&pod.metadata));
        Ok(Pass::Done)
    }
}

/// Maps the object of a watcher event.
fn map_event<A, B>(event: watcher::Event<A>, f: impl Fn(&A) -> B) -> watcher::Event<B> {
    match event {
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(a) => watcher::Event::InitApply(f(&a)),
        watcher::Event::InitDone => watcher::Event::InitDone,
        watcher::Event::Apply(a) => watcher::Event::Apply(f(&a)),
        watcher::Event::Delete(a) => watcher::Event::Delete(f(&a)),
    }
}

/// Returns whether this node may write now: the leader of `term` (or, with
/// `None`, anyone clearing its own label), holding its lease.
fn may_write(state: &watch::Receiver<LeaderState>, term: Option<u64>) -> bool {
    let Some(term) = term else { return true };
    let s = state.borrow();
    s.role == Role::Leader && s.term == term && !s.shutting_down && s.is_leader_at(Instant::now())
}

/// Returns whether this node may demote other pods now: the leader of
/// `term`, lease or not (see [`Publisher::demote_before_lease`]).
fn may_demote(state: &watch::Receiver<LeaderState>, term: u64) -> bool {
    let s = state.borrow();
    s.role == Role::Leader && s.term == term && !s.shutting_down
}

/// What of the leadership state publishing depends on. The publisher
/// re-plans when this changes, and not when only the rest does: a lease
/// extension, the voter and learner counts, the leader's address.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Relevant {
    role: Role,
    term: u64,
    me: String,
    leader: Option<String>,
    shutting_down: bool,
    /// Whether the lease holds: gaining it starts the writes.
    leasing: bool,
    members: Vec<MemberInfo>,
}

impl Relevant {
    fn of(s: &LeaderState, now: Instant) -> Relevant {
        Relevant {
            role: s.role,
            term: s.term,
            me: s.node_name.clone(),
            leader: s.leader_id.clone(),
            shutting_down: s.shutting_down,
            leasing: s.is_leader_at(now),
            members: s.members.clone(),
        }
    }
}

/// Sends a conditional merge patch of a pod's role label and term annotation.
async fn send_patch(api: &Api<Pod>, patch: &LabelPatch) -> Result<Pod> {
    let mut metadata = serde_json::json!({
        "labels": { ROLE_LABEL: patch.role },
        "annotations": { TERM_ANNOTATION: patch.term.to_string() },
    });
    if let Some(rv) = &patch.resource_version {
        // A resourceVersion in a patch is a precondition: 409 if it moved.
        metadata["resourceVersion"] = serde_json::Value::String(rv.clone());
    }
    let body = serde_json::json!({ "metadata": metadata });
    let what = format!("pod/{}", patch.pod);
    timed("patch", &what, async {
        api.patch(&patch.pod, &PatchParams::default(), &Patch::Merge(&body))
            .await
    })
    .await
}

/// Runs one request with [`REQUEST_TIMEOUT`], mapping its error.
async fn timed<T>(
    verb: &'static str,
    what: &str,
    request: impl Future<Output = kube::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::from_kube(verb, what, e)),
        Err(_) => Err(Error::Timeout {
            verb,
            what: what.to_string(),
            timeout_ms: REQUEST_TIMEOUT.as_millis() as u64,
        }),
    }
}

/// Sleeps until `at`, or forever without one (a disabled `select!` arm).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::crd::ROLE_LEADER;

    fn view(name: &str, rv: &str, role: Option<&str>) -> PodView {
        PodView {
            name: name.into(),
            uid: None,
            resource_version: Some(rv.into()),
            role: role.map(str::to_string),
            term: None,
        }
    }

    #[test]
    fn cache_keeps_a_newer_version_over_a_late_watch_event() {
        let mut c = Cache::new();
        c.apply(watcher::Event::Init);
        c.apply(watcher::Event::InitApply(view("a", "5", None)));
        assert!(
            !c.ready && c.items.is_empty(),
            "nothing until the list is complete"
        );
        c.apply(watcher::Event::InitDone);
        assert!(c.ready);
        c.upsert(view("a", "9", Some(ROLE_LEADER)));
        c.apply(watcher::Event::Apply(view("a", "7", None)));
        assert_eq!(c.items["a"].role.as_deref(), Some(ROLE_LEADER));
        c.apply(watcher::Event::Delete(view("a", "10", None)));
        assert!(c.items.is_empty());
    }

    #[test]
    fn relist_replaces_the_cache_at_once() {
        let mut c = Cache::new();
        c.apply(watcher::Event::InitDone);
        c.upsert(view("gone", "3", None));
        c.apply(watcher::Event::Init);
        c.apply(watcher::Event::InitApply(view("b", "4", None)));
        assert!(
            c.items.contains_key("gone"),
            "old view until the relist is done"
        );
        c.apply(watcher::Event::InitDone);
        assert_eq!(c.items.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = RetryBackoff::new();
        let delays: Vec<Duration> = (0..6).filter_map(|_| b.next()).collect();
        assert_eq!(delays[0], MIN_BACKOFF);
        assert_eq!(delays[1], MIN_BACKOFF * 2);
        assert_eq!(*delays.last().expect("six"), MAX_BACKOFF);
        b.reset();
        assert_eq!(b.next(), Some(MIN_BACKOFF));
    }

    #[test]
    fn lease_extensions_and_peer_counts_do_not_wake_a_pass_but_gaining_the_lease_does() {
        let now = Instant::now();
        let mut s = LeaderState::initial("a#1".into(), "a".into());
        s.role = Role::Leader;
        s.term = 4;
        s.leader = Some("a".into());
        s.leader_id = Some("a#1".into());
        let before_lease = Relevant::of(&s, now);
        s.lease_until = Some(now + Duration::from_millis(300));
        let leased = Relevant::of(&s, now);
        assert_ne!(before_lease, leased, "gaining the lease starts the writes");
        s.lease_until = Some(now + Duration::from_millis(350));
        s.voters = 5;
        s.learners = 1;
        s.leader_address = Some("10.0.0.1:4041".into());
        assert_eq!(
            Relevant::of(&s, now),
            leased,
            "an extension is not a change"
        );
        assert_ne!(
            Relevant::of(&s, now + Duration::from_secs(1)),
            leased,
            "a lapsed lease is"
        );
        s.members.push(MemberInfo {
            name: "b".into(),
            id: "b#2".into(),
            address: "b:4041".into(),
            voter: true,
        });
        let with_b = Relevant::of(&s, now);
        assert_ne!(with_b, leased, "membership is published");
        s.term = 5;
        assert_ne!(Relevant::of(&s, now), with_b, "a new term is published");
    }

    #[test]
    fn failure_labels_become_condition_reasons() {
        assert_eq!(camel("server_error"), "ServerError");
        assert_eq!(camel("transport"), "Transport");
    }
}
