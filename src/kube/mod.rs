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
use bootstrap::{CrBootstrap, RecorderHandle};
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

/// One member's connection to the API server, from which its publisher and
/// its bootstrap recorder are made (they share the client and its metrics).
pub struct Kube {
    client: ::kube::Client,
    namespace: String,
    settings: KubeSettings,
}

/// Connects to the API server named by the settings (or the inferred one).
pub async fn connect(settings: KubeSettings, metrics: &Metrics) -> Result<Kube> {
    let (client, default_ns) = client::connect(settings.kubeconfig.as_deref(), metrics).await?;
    let namespace = settings.namespace.clone().unwrap_or(default_ns);
    Ok(Kube {
        client,
        namespace,
        settings,
    })
}

impl Kube {
    /// Returns the publisher's task, ready to spawn. Nothing is written
    /// until this node leads.
    pub fn publisher(
        &self,
        state: watch::Receiver<LeaderState>,
        metrics: Metrics,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let settings = &self.settings;
        let pod_selector = settings
            .pod_selector
            .clone()
            .unwrap_or_else(|| PublisherConfig::default_selector(&settings.cluster_id));
        let cfg = PublisherConfig {
            namespace: self.namespace.clone(),
            name: settings.cluster_id.clone(),
            me: settings.me.clone(),
            pod_uid: settings.pod_uid.clone(),
            cluster_id: settings.cluster_id.clone(),
            pod_selector,
            spec: settings.spec.clone(),
        };
        let publisher = Publisher::new(self.client.clone(), cfg, metrics);
        publisher.run(state, shutdown)
    }

    /// Returns the handle the node's bootstrap authority reads and asks
    /// through, and the recorder's task (the CR compare-and-swap), ready to
    /// spawn.
    pub fn bootstrap_recorder(
        &self,
        state: watch::Receiver<LeaderState>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (RecorderHandle, impl Future<Output = ()> + Send + 'static) {
        let cas = CrBootstrap::new(
            self.client.clone(),
            &self.namespace,
            &self.settings.cluster_id,
            self.settings.spec.clone(),
        );
        let (handle, recorder) = cas.recorder();
        (handle, recorder.run(state, shutdown))
    }
}
