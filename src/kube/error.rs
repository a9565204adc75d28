//! The one error type of the Kubernetes boundary, with a label for the
//! failure counters.

use std::path::PathBuf;

/// What went wrong talking to Kubernetes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig named by `--kubeconfig` could not be read or used.
    #[error("cannot use kubeconfig {path:?}: {source}; check the file or pass --no-kubernetes")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither `--kubeconfig`, `$KUBECONFIG`, `~/.kube/config` nor the
    /// in-cluster service account gave a configuration.
    #[error("no Kubernetes configuration ({0}): pass --kubeconfig, run in a pod with a service account, or pass --no-kubernetes")]
    NoConfig(#[source] kube::config::InferConfigError),
    /// The HTTP client could not be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The API server answered with an error status.
    #[error("API server answered {code} {reason} to {verb} {what}: {message}")]
    Api {
        /// What was asked (`patch`, `replace_status`, `create`, ...).
        verb: &'static str,
        /// The object (`pod/NAME`, `leaderelection/NAME`, ...).
        what: String,
        /// HTTP status code.
        code: u16,
        /// Kubernetes reason (`Conflict`, `Forbidden`, ...).
        reason: String,
        /// The server's message.
        message: String,
    },
    /// The request did not get an answer (connection refused, TLS, timeout).
    #[error("{verb} {what} failed: {source}")]
    Transport {
        /// What was asked.
        verb: &'static str,
        /// The object.
        what: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// A request took longer than the publisher waits.
    #[error("{verb} {what} took longer than {timeout_ms} ms")]
    Timeout {
        /// What was asked.
        verb: &'static str,
        /// The object.
        what: String,
        /// The limit in milliseconds.
        timeout_ms: u64,
    },
    /// A watch failed; the watcher retries by itself.
    #[error("watch of {what} failed: {source}")]
    Watch {
        /// What is watched.
        what: &'static str,
        /// Why.
        #[source]
        source: kube::runtime::watcher::Error,
    },
    /// A newer leader already wrote: this node must not write over it.
    #[error("fenced: {what} was written in term {theirs}, this node leads term {ours}")]
    Fenced {
        /// The object.
        what: String,
        /// The term already there.
        theirs: u64,
        /// This node's term.
        ours: u64,
    },
    /// The custom resource or a pod holds something this code cannot read.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The object.
        what: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Wraps a client error of request `verb` on `what`.
    pub fn from_kube(verb: &'static str, what: impl Into<String>, e: kube::Error) -> Error {
        match e {
            kube::Error::Api(status) => Error::Api {
                verb,
                what: what.into(),
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            other => Error::Transport {
                verb,
                what: what.into(),
                source: other,
            },
        }
    }

    /// Returns the HTTP status code when the server answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            Error::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Returns whether the object changed under us (409): re-read and retry.
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }

    /// Returns whether the object does not exist (404).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }

    /// Returns a short, bounded label for the failure counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kubeconfig { .. } => "kubeconfig",
            Error::NoConfig(_) => "no_config",
            Error::Client(_) => "client",
            Error::Api { code: 409, .. } => "conflict",
            Error::Api { code: 404, .. } => "not_found",
            Error::Api { code: 401, .. } => "unauthorized",
            Error::Api { code: 403, .. } => "forbidden",
            Error::Api { code: 422, .. } => "invalid_request",
            Error::Api { code: 429, .. } => "throttled",
            Error::Api { code, .. } if *code >= 500 => "server_error",
            Error::Api { .. } => "api_error",
            Error::Transport { .. } => "transport",
            Error::Timeout { .. } => "timeout",
            Error::Watch { .. } => "watch",
            Error::Fenced { .. } => "fenced",
            Error::Invalid { .. } => "invalid",
        }
    }
}

/// Results of the Kubernetes boundary.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        Error::Api {
            verb: "patch",
            what: "pod/a".into(),
            code,
            reason: "R".into(),
            message: "m".into(),
        }
    }

    #[test]
    fn metric_labels_name_the_kind_of_failure() {
        assert_eq!(api(409).metric_label(), "conflict");
        assert_eq!(api(503).metric_label(), "server_error");
        assert_eq!(api(403).metric_label(), "forbidden");
        assert_eq!(api(418).metric_label(), "api_error");
        assert!(api(409).is_conflict() && !api(404).is_conflict());
        assert!(api(404).is_not_found());
    }
}
