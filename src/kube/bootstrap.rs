//! The Kubernetes side of bootstrap: the group's first configuration is
//! recorded once, by compare-and-swap on the `LeaderElection` status (the
//! resourceVersion is the precondition), and every member adopts what is
//! recorded. Members that start together may propose different
//! configurations (they saw different DNS answers); exactly one wins, so
//! they form exactly one cluster.
//!
//! A group re-bootstraps only when none of the recorded members' pods still
//! exists ([`CrBootstrap::forget_if_abandoned`]).

use super::crd::{BootstrapRecord, LeaderElection, LeaderElectionSpec, LeaderElectionStatus};
use super::error::{Error, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};

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
    /// when none of its members' pods exists any more, so the next members
    /// bootstrap a new group. Returns whether it did. A status with a live
    /// member's pod is never touched.
    pub async fn forget_if_abandoned(&self) -> Result<bool> {
        for _ in 0..MAX_ROUNDS {
            let le = self.get_or_create().await?;
            let Some(record) = le.status.as_ref().and_then(|s| s.bootstrap.clone()) else {
                return Ok(false);
            };
            for member in &record.members {
                let name = member.id.split('#').next().unwrap_or(&member.id);
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
    use crate::kube::crd::BootstrapMember;

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
