//! Pure decisions of the publisher: which pods to patch, in which order, and
//! which status to write, from the cached objects and the leader's view. No
//! I/O here, so every rule is a unit test.

use super::crd::{
    LeaderElectionStatus, MemberStatus, CONDITION_PUBLISHED, ROLE_FOLLOWER, ROLE_LEADER,
};
use crate::leadership::MemberInfo;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// What the publisher keeps of a member pod (metadata only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// Pod name (= member name).
    pub name: String,
    /// Pod UID.
    pub uid: Option<String>,
    /// The version the next patch is conditional on.
    pub resource_version: Option<String>,
    /// Value of the role label, if any.
    pub role: Option<String>,
    /// Value of the term annotation, if it parses.
    pub term: Option<u64>,
}

/// One conditional label patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelPatch {
    /// The pod.
    pub pod: String,
    /// Precondition: the pod's resourceVersion as cached.
    pub resource_version: Option<String>,
    /// New role label value.
    pub role: &'static str,
    /// Term written to the term annotation.
    pub term: u64,
}

/// The label writes one reconcile needs, in the order they MUST go out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelPlan {
    /// Pods that carry `role=leader` but are not this node: demoted first,
    /// and only once they are done is [`promote`](Self::promote) sent, so a
    /// watch never sees two leaders.
    pub demote: Vec<LabelPatch>,
    /// This node's own pod, when it does not say `leader` yet.
    pub promote: Option<LabelPatch>,
    /// Every other member pod whose label is missing or wrong.
    pub followers: Vec<LabelPatch>,
}

impl LabelPlan {
    /// Returns whether nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.demote.is_empty() && self.promote.is_none() && self.followers.is_empty()
    }

    /// Returns how many patches the plan sends.
    pub fn len(&self) -> usize {
        self.demote.len() + usize::from(self.promote.is_some()) + self.followers.len()
    }
}

/// A newer leader already wrote here; this node must not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The object written in a higher term.
    pub what: String,
    /// That term.
    pub theirs: u64,
}

/// Plans the label writes of the leader `me` of `term` over the member pods.
/// Pods whose label is already right are left alone (their term annotation
/// keeps the term it was written in), so a leader change patches only the
/// two pods whose role changes.
pub fn plan_labels(me: &str, term: u64, pods: &[PodView]) -> Result<LabelPlan, Fence> {
    if let Some(newer) = pods.iter().find(|p| p.term.is_some_and(|t| t > term)) {
        return Err(Fence {
            what: format!("pod/{}", newer.name),
            theirs: newer.term.unwrap_or_default(),
        });
    }
    let mut plan = LabelPlan::default();
    for pod in pods {
        let patch = |role| LabelPatch {
            pod: pod.name.clone(),
            resource_version: pod.resource_version.clone(),
            role,
            term,
        };
        let role = pod.role.as_deref();
        if pod.name == me {
            if role != Some(ROLE_LEADER) {
                plan.promote = Some(patch(ROLE_LEADER));
            }
        } else if role == Some(ROLE_LEADER) {
            plan.demote.push(patch(ROLE_FOLLOWER));
        } else if role != Some(ROLE_FOLLOWER) {
            plan.followers.push(patch(ROLE_FOLLOWER));
        }
    }
    Ok(plan)
}

/// Plans the label write of a node that is not (or no longer) the leader:
/// its own pod goes back to `follower` if it still says `leader` and no newer
/// leader wrote it.
pub fn plan_step_down(me: &str, term: u64, pods: &[PodView]) -> Option<LabelPatch> {
    let pod = pods.iter().find(|p| p.name == me)?;
    let newer = pod.term.is_some_and(|t| t > term);
    (pod.role.as_deref() == Some(ROLE_LEADER) && !newer).then(|| LabelPatch {
        pod: pod.name.clone(),
        resource_version: pod.resource_version.clone(),
        role: ROLE_FOLLOWER,
        term,
    })
}

/// The `Published` condition the leader wants on the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// `True` or `False`.
    pub ok: bool,
    /// CamelCase reason.
    pub reason: String,
    /// What a person should know; stable while nothing changes, so it causes
    /// no rewrites of its own.
    pub message: String,
}

/// Everything the leader's status is made of.
#[derive(Clone, Debug)]
pub struct StatusInputs<'a> {
    /// This node's member name (its pod).
    pub me: &'a str,
    /// Its pod's UID, when known.
    pub uid: Option<String>,
    /// Its term.
    pub term: u64,
    /// The election group.
    pub cluster_id: &'a str,
    /// Members of its latest configuration.
    pub members: &'a [MemberInfo],
    /// The spec generation seen.
    pub generation: Option<i64>,
    /// The condition to show.
    pub published: Published,
    /// The time to stamp on what changes.
    pub now: Time,
}

/// Returns the status to write, `Ok(None)` when the current one already says
/// it (zero writes at steady state), or the fence when a newer term is there.
pub fn plan_status(
    current: Option<&LeaderElectionStatus>,
    input: &StatusInputs<'_>,
) -> Result<Option<LeaderElectionStatus>, Fence> {
    let empty = LeaderElectionStatus::default();
    let current = current.unwrap_or(&empty);
    if current.term > input.term {
        return Err(Fence {
            what: "status".into(),
            theirs: current.term,
        });
    }
    let same_leader = current.term == input.term && current.leader.as_deref() == Some(input.me);
    let members: Vec<MemberStatus> = input
        .members
        .iter()
        .map(|m| MemberStatus {
            name: m.name.clone(),
            role: if m.name == input.me {
                ROLE_LEADER
            } else {
                ROLE_FOLLOWER
            }
            .to_string(),
            voter: m.voter,
            address: Some(m.address.clone()),
            last_seen: None,
        })
        .collect();
    let mut desired = LeaderElectionStatus {
        leader: Some(input.me.to_string()),
        leader_uid: input
            .uid
            .clone()
            .or_else(|| same_leader.then(|| current.leader_uid.clone()).flatten()),
        term: input.term,
        cluster_id: Some(input.cluster_id.to_string()),
        member_count: u32::try_from(members.len()).unwrap_or(u32::MAX),
        members,
        bootstrap: current.bootstrap.clone(),
        last_transition_time: if same_leader {
            current.last_transition_time.clone()
        } else {
            Some(input.now.clone())
        },
        observed_generation: input.generation.or(current.observed_generation),
        conditions: vec![condition(current, input)],
    };
    // lastSeen is carried over while a member is unchanged, so that time
    // passing alone never causes a write.
    carry_last_seen(&mut desired.members, &current.members);
    if desired == *current {
        return Ok(None);
    }
    // Written anyway: every member in the leader's configuration was seen now.
    for m in &mut desired.members {
        m.last_seen = Some(input.now.clone());
    }
    Ok(Some(desired))
}

/// Copies `lastSeen` from the current entries of unchanged members.
fn carry_last_seen(desired: &mut [MemberStatus], current: &[MemberStatus]) {
    for m in desired.iter_mut() {
        let old = current.iter().find(|c| {
            c.name == m.name && c.role == m.role && c.voter == m.voter && c.address == m.address
        });
        m.last_seen = old.and_then(|c| c.last_seen.clone());
    }
}

/// Builds the `Published` condition, keeping its transition time while its
/// status stays the same.
fn condition(current: &LeaderElectionStatus, input: &StatusInputs<'_>) -> Condition {
    let status = if input.published.ok { "True" } else { "False" };
    let old = current
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_PUBLISHED && c.status == status);
    Condition {
        type_: CONDITION_PUBLISHED.to_string(),
        status: status.to_string(),
        reason: input.published.reason.clone(),
        message: input.published.message.clone(),
        observed_generation: input.generation,
        last_transition_time: old
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| input.now.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn pod(name: &str, role: Option<&str>, term: Option<u64>) -> PodView {
        PodView {
            name: name.into(),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("7".into()),
            role: role.map(str::to_string),
            term,
        }
    }

    #[test]
    fn new_leader_demotes_the_old_leader_and_promotes_itself() {
        let pods = [
            pod("a", Some("leader"), Some(3)),
            pod("b", Some("follower"), Some(3)),
            pod("c", Some("follower"), Some(3)),
        ];
        let plan = plan_labels("b", 4, &pods).expect("not fenced");
        assert_eq!(plan.demote.len(), 1);
        assert_eq!(plan.demote[0].pod, "a");
        assert_eq!(plan.demote[0].role, "follower");
        assert_eq!(plan.promote.as_ref().map(|p| p.pod.as_str()), Some("b"));
        assert!(plan.followers.is_empty(), "c keeps its label and term");
        assert_eq!(plan.len(), 2);
    }

    #[test]
    fn steady_state_plans_no_writes() {
        let pods = [
            pod("a", Some("leader"), Some(4)),
            pod("b", Some("follower"), Some(2)),
        ];
        assert!(plan_labels("a", 4, &pods).expect("not fenced").is_empty());
    }

    #[test]
    fn unlabelled_and_hand_edited_pods_become_followers() {
        let pods = [
            pod("a", Some("leader"), Some(4)),
            pod("b", None, None),
            pod("c", Some("boss"), Some(1)),
        ];
        let plan = plan_labels("a", 4, &pods).expect("not fenced");
        let names: Vec<&str> = plan.followers.iter().map(|p| p.pod.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
    }

    #[test]
    fn a_pod_written_in_a_higher_term_fences_the_leader() {
        let pods = [pod("a", Some("follower"), Some(9)), pod("b", None, None)];
        let fence = plan_labels("b", 4, &pods).expect_err("fenced");
        assert_eq!(fence.theirs, 9);
    }

    #[test]
    fn stepping_down_clears_only_its_own_leader_label() {
        let pods = [
            pod("a", Some("leader"), Some(4)),
            pod("b", Some("leader"), Some(5)),
        ];
        let patch = plan_step_down("a", 4, &pods).expect("a clears");
        assert_eq!(patch.role, "follower");
        assert_eq!(
            plan_step_down("b", 4, &pods),
            None,
            "written in a newer term"
        );
        assert_eq!(plan_step_down("c", 4, &pods), None, "no such pod");
    }

    fn inputs<'a>(me: &'a str, term: u64, members: &'a [MemberInfo], now: i64) -> StatusInputs<'a> {
        StatusInputs {
            me,
            uid: Some(format!("uid-{me}")),
            term,
            cluster_id: "g",
            members,
            generation: Some(1),
            published: Published {
                ok: true,
                reason: "Synced".into(),
                message: "labels and status match the leader".into(),
            },
            now: Time(Timestamp::from_second(now).expect("valid time")),
        }
    }

    fn members() -> Vec<MemberInfo> {
        ["a", "b"]
            .iter()
            .map(|n| MemberInfo {
                name: n.to_string(),
                id: format!("{n}#1"),
                address: format!("{n}:4041"),
                voter: true,
            })
            .collect()
    }

    #[test]
    fn status_is_written_once_per_term_and_not_again_as_time_passes() {
        let m = members();
        let first = plan_status(None, &inputs("a", 2, &m, 100))
            .expect("not fenced")
            .expect("a write");
        assert_eq!(first.leader.as_deref(), Some("a"));
        assert_eq!(first.member_count, 2);
        assert!(first.members.iter().all(|m| m.last_seen.is_some()));
        let later = plan_status(Some(&first), &inputs("a", 2, &m, 500)).expect("not fenced");
        assert_eq!(later, None, "time passing alone writes nothing");
        let next = plan_status(Some(&first), &inputs("b", 3, &m, 600))
            .expect("not fenced")
            .expect("new leader writes");
        assert_ne!(next.last_transition_time, first.last_transition_time);
        assert_eq!(next.members[1].role, "leader");
    }

    #[test]
    fn status_of_a_higher_term_is_never_replaced() {
        let m = members();
        let newer = plan_status(None, &inputs("b", 7, &m, 100))
            .expect("not fenced")
            .expect("a write");
        let fence = plan_status(Some(&newer), &inputs("a", 6, &m, 200)).expect_err("fenced");
        assert_eq!(fence.theirs, 7);
    }

    #[test]
    fn bootstrap_record_survives_status_writes() {
        let m = members();
        let mut current = LeaderElectionStatus {
            bootstrap: Some(super::super::crd::BootstrapRecord {
                members: vec![],
                recorded_by: "a#1".into(),
                recorded_at: None,
            }),
            ..Default::default()
        };
        current.term = 1;
        let next = plan_status(Some(&current), &inputs("a", 2, &m, 1))
            .expect("not fenced")
            .expect("a write");
        assert_eq!(next.bootstrap, current.bootstrap);
    }
}
