//! The `LeaderElection` custom resource (`raft-elector.io/v1alpha1`): one per
//! election group, named after the group's `--cluster-id`, in the members'
//! namespace. The spec records what the group is (written from the flags of
//! the member that creates it); the status is written by the leader only,
//! fenced by term (see [`crate::kube::publisher`]).
//!
//! `raft-elector crd` prints [`crd_yaml`]; `crds/leaderelections.raft-elector.io.yaml`
//! holds the same text and a test fails when the two drift.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::crd::CustomResourceExt;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the CRD.
pub const GROUP: &str = "raft-elector.io";
/// Label on every member pod: `leader` or `follower`.
pub const ROLE_LABEL: &str = "raft-elector.io/role";
/// Annotation on every member pod: the term its role label was written in.
pub const TERM_ANNOTATION: &str = "raft-elector.io/term";
/// Label that marks a pod as a member of an election group (value: the
/// group's `--cluster-id`); the default pod selector.
pub const GROUP_LABEL: &str = "raft-elector.io/group";
/// Value of [`ROLE_LABEL`] on the leader's pod.
pub const ROLE_LEADER: &str = "leader";
/// Value of [`ROLE_LABEL`] on every other member's pod.
pub const ROLE_FOLLOWER: &str = "follower";
/// Condition type saying whether the leader's view is published.
pub const CONDITION_PUBLISHED: &str = "Published";

/// Default peer port (`--peer-listen`'s port).
const DEFAULT_PEER_PORT: u16 = 4041;
/// Default most voting members (`--max-voters`).
const DEFAULT_MAX_VOTERS: u32 = 5;

// clippy reads the printcolumn arguments as repeated attributes.
#[allow(clippy::duplicated_attributes)]
/// What an election group is. Written from the flags of the member that
/// creates the CR, so `kubectl get le -o yaml` shows how the group runs; each
/// member's own flags stay authoritative for it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "raft-elector.io",
    version = "v1alpha1",
    kind = "LeaderElection",
    plural = "leaderelections",
    singular = "leaderelection",
    shortname = "le",
    namespaced,
    status = "LeaderElectionStatus",
    derive = "PartialEq",
    doc = "An election group of raft-elector sidecars. The spec says what the group is; the leader writes the status (fenced by term).",
    printcolumn(
        name = "Leader",
        type_ = "string",
        description = "Pod name of the current leader",
        json_path = ".status.leader"
    ),
    printcolumn(
        name = "Term",
        type_ = "integer",
        description = "Raft term the leader was elected in",
        json_path = ".status.term"
    ),
    printcolumn(
        name = "Members",
        type_ = "integer",
        description = "Members of the leader's configuration",
        json_path = ".status.memberCount"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.electionTimeoutMin) || !has(self.electionTimeoutMax) || duration(self.electionTimeoutMin) < duration(self.electionTimeoutMax)"
).message("electionTimeoutMin must be below electionTimeoutMax"))]
#[x_kube(validation = Rule::new(
    "!has(self.heartbeatInterval) || !has(self.electionTimeoutMin) || duration(self.heartbeatInterval) < duration(self.electionTimeoutMin)"
).message("heartbeatInterval must be below electionTimeoutMin"))]
pub struct LeaderElectionSpec {
    /// Headless Service whose DNS records list the members (`--service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service: Option<String>,
    /// Peer (Raft) port of every member.
    #[serde(default = "default_peer_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub peer_port: u16,
    /// Label selector of the member pods (default `raft-elector.io/group=<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pod_selector: Option<String>,
    /// Members of the first configuration (`--bootstrap-expect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub expected_members: Option<u32>,
    /// Most voting members; the rest follow as learners (`--max-voters`).
    #[serde(default = "default_max_voters")]
    #[schemars(range(min = 1, max = 99))]
    pub max_voters: u32,
    /// Lower bound of the randomized election timeout, e.g. `150ms`; also the lease length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("must be a positive duration such as 150ms"))]
    pub election_timeout_min: Option<String>,
    /// Upper bound of the randomized election timeout, e.g. `300ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("must be a positive duration such as 300ms"))]
    pub election_timeout_max: Option<String>,
    /// Leader heartbeat period, e.g. `50ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("must be a positive duration such as 50ms"))]
    pub heartbeat_interval: Option<String>,
}

fn default_peer_port() -> u16 {
    DEFAULT_PEER_PORT
}

fn default_max_voters() -> u32 {
    DEFAULT_MAX_VOTERS
}

/// What the leader publishes. Written only by the leader of `term`, with the
/// object's resourceVersion, never over a status of a higher term.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaderElectionStatus {
    /// Pod name of the current leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// UID of the leader's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_uid: Option<String>,
    /// Raft term the leader was elected in; the fence of every status write.
    #[serde(default)]
    pub term: u64,
    /// Election group id (the members' `--cluster-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// Members of the leader's latest configuration.
    #[serde(default)]
    pub member_count: u32,
    /// Members of the leader's latest configuration, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// The first configuration, recorded once by compare-and-swap
    /// (resourceVersion precondition); every member adopts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapRecord>,
    /// When the leader last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The spec generation this status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions; `Published` says whether labels and status match
    /// the leader's view, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One member of the leader's configuration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Member (pod) name.
    pub name: String,
    /// `leader` or `follower`.
    pub role: String,
    /// Whether the member votes (else it is a learner).
    pub voter: bool,
    /// Peer address (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// When the leader last confirmed the member in its configuration. It is
    /// refreshed only when the status is written for another reason, so a
    /// healthy group costs no API writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
}

/// The group's first configuration, as recorded by the first member that won
/// the compare-and-swap.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapRecord {
    /// Every member of the first configuration. The lowest ids vote, as many
    /// as the largest odd number no greater than the member count and
    /// `maxVoters`; the others start as learners.
    pub members: Vec<BootstrapMember>,
    /// Member that recorded it.
    pub recorded_by: String,
    /// When it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_at: Option<Time>,
}

/// One member of the first configuration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapMember {
    /// Full member identity (`name#incarnation`).
    pub id: String,
    /// Peer address (`host:port`).
    pub address: String,
}

/// Returns the CRD as YAML, exactly as `crds/leaderelections.raft-elector.io.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&LeaderElection::crd())?;
    Ok(format!(
        "# Generated by `raft-elector crd` from src/kube/crd.rs; do not edit by hand.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_names_match_the_interface_contract() {
        let crd = LeaderElection::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("leaderelections.raft-elector.io")
        );
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["le".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Leader", "Term", "Members", "Age"]);
    }

    #[test]
    fn spec_defaults_fill_peer_port_and_max_voters() {
        let spec: LeaderElectionSpec = serde_json::from_str("{}").expect("empty spec parses");
        assert_eq!(spec.peer_port, 4041);
        assert_eq!(spec.max_voters, 5);
        assert_eq!(spec.service, None);
    }

    #[test]
    fn schema_carries_cel_rules_and_ranges() {
        let yaml = crd_yaml().expect("renders");
        assert!(
            yaml.contains("duration(self.electionTimeoutMin) < duration(self.electionTimeoutMax)")
        );
        assert!(yaml.contains("maximum: 65535"));
        assert!(yaml.contains("x-kubernetes-validations"));
    }
}
