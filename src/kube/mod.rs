//! Kubernetes publishing: the `LeaderElection` CRD ([`crd`]), the publisher
//! that labels member pods and writes the status ([`publisher`], deciding
//! through the pure [`plan`]), the compare-and-swap bootstrap record
//! ([`bootstrap`]), and the client ([`client`]) with request metrics.
//!
//! Which pods are members: the pods in this member's namespace that match
//! `--pod-selector` (default `raft-elector.io/group=<cluster-id>`, the label
//! the chart puts on every member). A member's name (`--id`, default
//! `$POD_NAME`) is its pod's name; the leader labels its own pod `leader`
//! and every other selected pod `follower`.

pub mod bootstrap;
pub mod client;
pub mod crd;
pub mod error;
pub mod plan;
pub mod publisher;

pub use error::{Error, Result};

use crate::leadership::LeaderState;
use crate::metrics::Metrics;
use crd::LeaderElectionSpec;
use publisher::{Publisher, PublisherConfig};
use std::future::Future;
use std::path::PathBuf;
use tokio::sync::watch;

/// What `raft-elector run` tells the Kubernetes layer.
#[derive(Clone, Debug)]
pub struct KubeSettings {
    /// `--kubeconfig`; `None` infers (`$KUBECONFIG`, `~/.kube/config`, in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// `$POD_NAMESPACE`; `None` uses the configuration's namespace.
    pub namespace: Option<String>,
    /// This member's name (its pod's name).
    pub me: String,
    /// `$POD_UID`.
    pub pod_uid: Option<String>,
    /// `--cluster-id`: the group and the CR's name.
    pub cluster_id: String,
    /// `--pod-selector`; `None` selects `raft-elector.io/group=<cluster-id>`.
    pub pod_selector: Option<String>,
    /// Spec written when the CR has to be created.
    pub spec: LeaderElectionSpec,
}

/// Connects to the API server and returns the publisher's task, ready to
/// spawn. Nothing is written until this node leads.
pub async fn start_publisher(
    settings: KubeSettings,
    state: watch::Receiver<LeaderState>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = ()> + Send + 'static> {
    let (client, default_ns) = client::connect(settings.kubeconfig.as_deref(), &metrics).await?;
    let pod_selector = settings
        .pod_selector
        .clone()
        .unwrap_or_else(|| PublisherConfig::default_selector(&settings.cluster_id));
    let cfg = PublisherConfig {
        namespace: settings.namespace.clone().unwrap_or(default_ns),
        name: settings.cluster_id.clone(),
        me: settings.me.clone(),
        pod_uid: settings.pod_uid.clone(),
        cluster_id: settings.cluster_id.clone(),
        pod_selector,
        spec: settings.spec,
    };
    let publisher = Publisher::new(client, cfg, metrics);
    Ok(publisher.run(state, shutdown))
}
