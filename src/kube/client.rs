//! Builds the Kubernetes client: `--kubeconfig`, else `kube::Config::infer`
//! (`$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account),
//! with every request counted in `raft_elector_kube_requests_total{verb,code}`.

use super::error::{Error, Result};
use crate::metrics::Metrics;
use futures::future::BoxFuture;
use hyper::{Request, Response};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::path::Path;
use std::task::{Context, Poll};

/// Connects to the API server named by `kubeconfig`, or the inferred one.
/// Returns the client and the configuration's default namespace.
pub async fn connect(kubeconfig: Option<&Path>, metrics: &Metrics) -> Result<(Client, String)> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.to_path_buf(),
                source,
            })?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None => Config::infer().await.map_err(Error::NoConfig)?,
    };
    let namespace = config.default_namespace.clone();
    let client = ClientBuilder::try_from(config)
        .map_err(Error::Client)?
        .with_layer(&CountRequests {
            metrics: metrics.clone(),
        })
        .build();
    Ok((client, namespace))
}

/// A tower layer that counts every request by Kubernetes verb and answer.
#[derive(Clone)]
pub struct CountRequests {
    metrics: Metrics,
}

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`CountRequests`] wraps around the HTTP client.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B, R> tower::Service<Request<B>> for Counted<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, std::result::Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let verb = kube_verb(req.method().as_str(), req.uri().path(), req.uri().query());
        let counter = self.metrics.kube_requests.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let answer = fut.await;
            let code = match &answer {
                Ok(resp) => resp.status().as_u16().to_string(),
                Err(_) => "error".to_string(),
            };
            counter.with_label_values(&[verb, &code]).inc();
            answer
        })
    }
}

/// Returns the Kubernetes verb of an HTTP request (`get`, `list`, `watch`,
/// `create`, `update`, `patch`, `delete`), the way RBAC names it.
pub fn kube_verb(method: &str, path: &str, query: Option<&str>) -> &'static str {
    match method {
        "GET" => {
            let watching =
                query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
            if watching {
                "watch"
            } else if is_collection(path) {
                "list"
            } else {
                "get"
            }
        }
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "other",
    }
}

/// Returns whether `path` names a collection (`.../namespaces/NS/pods`)
/// rather than one object (`.../namespaces/NS/pods/NAME[/status]`).
fn is_collection(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.iter().position(|s| *s == "namespaces") {
        // namespaces/NS/RESOURCE[/NAME...]
        Some(i) if segments.len() > i + 2 => segments.len() == i + 3,
        // A cluster-scoped path: api/v1/RESOURCE[/NAME] or apis/G/V/RESOURCE[/NAME].
        _ => {
            let prefix = if segments.first() == Some(&"api") {
                2
            } else {
                3
            };
            segments.len() <= prefix + 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_requests_map_to_the_rbac_verbs() {
        let pods = "/api/v1/namespaces/ns/pods";
        assert_eq!(kube_verb("GET", pods, Some("labelSelector=a%3Db")), "list");
        assert_eq!(
            kube_verb("GET", pods, Some("watch=true&resourceVersion=5")),
            "watch"
        );
        assert_eq!(
            kube_verb("GET", "/api/v1/namespaces/ns/pods/p", None),
            "get"
        );
        assert_eq!(
            kube_verb("PATCH", "/api/v1/namespaces/ns/pods/p", None),
            "patch"
        );
        let le = "/apis/raft-elector.io/v1alpha1/namespaces/ns/leaderelections/g/status";
        assert_eq!(kube_verb("PUT", le, None), "update");
        assert_eq!(kube_verb("GET", le, None), "get");
        assert_eq!(
            kube_verb("POST", "/api/v1/namespaces/ns/events", None),
            "create"
        );
        assert_eq!(kube_verb("GET", "/api/v1/namespaces", None), "list");
        assert_eq!(kube_verb("GET", "/api/v1/namespaces/ns", None), "get");
    }
}
