//! Assigning a user to a mandelbox, in one database round trip: the request becomes a row of
//! the demand ledger (`whist.assign_ledger`), whose trigger chooses the box and claims it inside
//! the database, with the rules the service once applied itself: regions in the client's order,
//! the one commit rule, the fullest matching host first, boxes another attempt is claiming
//! skipped rather than waited for, one user's attempts one at a time so that the refusal is the
//! true one. The claim trigger's invariants (no double allocation, capacity, the per-user limit,
//! heartbeats) hold as for any claim. See migration `1763856000006_assign_ledger`.

use serde::{Deserialize, Serialize};
use whist_dbclient::ops::{self, AssignAttempt, AssignDecision};
use whist_dbclient::{DbError, HasuraClient};
use whist_types::{Environment, MandelboxId};

/// Regions of one request the database looks at (the first ones, each once); no client asks
/// for more, and a ledger row stays small whatever a caller sends.
pub const MAX_REGIONS: usize = 32;

/// The body of `POST /mandelbox/assign`. Unknown keys are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AssignRequest {
    /// Regions ordered by the client's latency to them.
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub client_commit_hash: String,
    /// For logs only; never trusted.
    #[serde(default)]
    pub user_email: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub session_id: Option<i64>,
    /// Honoured only when the service runs without token checks (local development).
    #[serde(default)]
    pub user_id: Option<String>,
}

impl AssignRequest {
    /// What no text the database stores may hold: a NUL character. Refused with the body's
    /// other faults rather than failing inside.
    pub fn check(&self) -> Result<(), String> {
        let texts = self
            .regions
            .iter()
            .chain([&self.client_commit_hash])
            .chain(&self.user_email)
            .chain(&self.version)
            .chain(&self.user_id);
        if texts.into_iter().any(|text| text.contains('\0')) {
            return Err("text fields must not contain NUL characters".to_owned());
        }
        Ok(())
    }
}

/// A successful assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    pub ip: String,
    pub mandelbox_id: MandelboxId,
    #[serde(skip)]
    pub region: String,
}

/// The business refusals, each with the code clients switch on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.code())]
pub enum AssignError {
    UserAlreadyActive,
    RegionNotEnabled,
    NoInstanceAvailable,
    CommitHashMismatch,
    ServiceUnavailable,
}

impl AssignError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::UserAlreadyActive => "USER_ALREADY_ACTIVE",
            Self::RegionNotEnabled => "REGION_NOT_ENABLED",
            Self::NoInstanceAvailable => "NO_INSTANCE_AVAILABLE",
            Self::CommitHashMismatch => "COMMIT_HASH_MISMATCH",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Assigner {
    db: HasuraClient,
    environment: Environment,
}

impl Assigner {
    pub fn new(db: HasuraClient, environment: Environment) -> Self {
        Self { db, environment }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(user))]
    pub async fn assign(
        &self,
        request: &AssignRequest,
        user: &str,
    ) -> Result<Assignment, AssignError> {
        let session_id = request
            .session_id
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis())
            .to_string();
        let regions = requested_regions(&request.regions);
        let attempt = AssignAttempt {
            user_id: user,
            session_id: &session_id,
            regions: &regions,
            client_commit: &request.client_commit_hash,
            any_client_commit: self.environment == Environment::Local,
        };
        let decision = match self.db.execute(&ops::assign(&attempt)).await {
            Ok(Some(decision)) => decision,
            Ok(None) => {
                tracing::error!("the engine stored no assign attempt");
                return Err(AssignError::ServiceUnavailable);
            }
            Err(error) => self.lost_answer(user, &session_id, error).await?,
        };
        decide(decision)
    }

    /// After a failed round trip: the attempt may have committed with its answer lost. If it
    /// assigned a box, the box is the user's to use, not a leak until its host reaps it.
    async fn lost_answer(
        &self,
        user: &str,
        session_id: &str,
        error: DbError,
    ) -> Result<AssignDecision, AssignError> {
        tracing::warn!(%error, "assign failed");
        match self
            .db
            .execute(&ops::latest_assign_attempt(user, session_id))
            .await
        {
            Ok(Some(decision)) if decision.outcome == ASSIGNED => Ok(decision),
            _ => Err(AssignError::ServiceUnavailable),
        }
    }
}

const ASSIGNED: &str = "ASSIGNED";

/// The database's decision as the API's answer.
fn decide(decision: AssignDecision) -> Result<Assignment, AssignError> {
    match decision.outcome.as_str() {
        ASSIGNED => {
            let (Some(ip), Some(mandelbox_id)) = (decision.ip(), decision.mandelbox_id) else {
                tracing::error!(?decision, "an assignment without a box or an address");
                return Err(AssignError::ServiceUnavailable);
            };
            Ok(Assignment {
                ip: ip.to_string(),
                mandelbox_id,
                region: decision.region.unwrap_or_default(),
            })
        }
        "USER_ALREADY_ACTIVE" => Err(AssignError::UserAlreadyActive),
        "REGION_NOT_ENABLED" => Err(AssignError::RegionNotEnabled),
        "NO_INSTANCE_AVAILABLE" => Err(AssignError::NoInstanceAvailable),
        "COMMIT_HASH_MISMATCH" => Err(AssignError::CommitHashMismatch),
        "SERVICE_UNAVAILABLE" => {
            if let Some(detail) = &decision.detail {
                tracing::error!(%detail, "nothing can be assigned there until the image row or the hosts are fixed");
            }
            Err(AssignError::ServiceUnavailable)
        }
        other => {
            tracing::error!(
                outcome = other,
                "an assign outcome this service does not know"
            );
            Err(AssignError::ServiceUnavailable)
        }
    }
}

/// The requested regions, each once, in the client's order, at most [`MAX_REGIONS`].
fn requested_regions(requested: &[String]) -> Vec<&str> {
    let mut regions: Vec<&str> = Vec::new();
    for region in requested {
        if regions.len() == MAX_REGIONS {
            break;
        }
        if !regions.contains(&region.as_str()) {
            regions.push(region);
        }
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_refused_in_every_text_field() {
        assert_eq!(AssignRequest::default().check(), Ok(()));
        let nul = "a\0b".to_owned();
        for request in [
            AssignRequest {
                regions: vec!["east".into(), nul.clone()],
                ..AssignRequest::default()
            },
            AssignRequest {
                client_commit_hash: nul.clone(),
                ..AssignRequest::default()
            },
            AssignRequest {
                user_email: Some(nul.clone()),
                ..AssignRequest::default()
            },
            AssignRequest {
                version: Some(nul.clone()),
                ..AssignRequest::default()
            },
            AssignRequest {
                user_id: Some(nul.clone()),
                ..AssignRequest::default()
            },
        ] {
            assert!(request.check().is_err(), "{request:?}");
        }
    }

    #[test]
    fn regions_keep_the_clients_order_each_once_and_at_most_the_cap() {
        let requested: Vec<String> = ["north", "west", "mars", "east", "west"]
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(
            requested_regions(&requested),
            ["north", "west", "mars", "east"]
        );
        let many: Vec<String> = (0..100).map(|n| format!("r{n}")).collect();
        assert_eq!(requested_regions(&many).len(), MAX_REGIONS);
        assert!(requested_regions(&[]).is_empty());
    }

    fn decision(outcome: &str) -> AssignDecision {
        AssignDecision {
            outcome: outcome.into(),
            region: None,
            instance_id: None,
            mandelbox_id: None,
            ip_addr: None,
            detail: None,
            decision_ms: None,
        }
    }

    #[test]
    fn every_outcome_maps_to_its_answer() {
        let id = MandelboxId::new_random();
        let assigned = decide(AssignDecision {
            region: Some("east".into()),
            instance_id: Some("i-1".into()),
            mandelbox_id: Some(id),
            ip_addr: Some("10.0.0.5/32".into()),
            ..decision(ASSIGNED)
        });
        assert_eq!(
            assigned,
            Ok(Assignment {
                ip: "10.0.0.5".into(),
                mandelbox_id: id,
                region: "east".into()
            })
        );
        for (outcome, error) in [
            ("USER_ALREADY_ACTIVE", AssignError::UserAlreadyActive),
            ("REGION_NOT_ENABLED", AssignError::RegionNotEnabled),
            ("NO_INSTANCE_AVAILABLE", AssignError::NoInstanceAvailable),
            ("COMMIT_HASH_MISMATCH", AssignError::CommitHashMismatch),
            ("SERVICE_UNAVAILABLE", AssignError::ServiceUnavailable),
            ("SOMETHING_NEW", AssignError::ServiceUnavailable),
        ] {
            assert_eq!(decide(decision(outcome)), Err(error), "{outcome}");
        }
        // An assignment the database could not give an address is not one.
        assert_eq!(
            decide(decision(ASSIGNED)),
            Err(AssignError::ServiceUnavailable)
        );
    }

    #[test]
    fn error_codes_are_the_contract() {
        assert_eq!(AssignError::UserAlreadyActive.code(), "USER_ALREADY_ACTIVE");
        assert_eq!(AssignError::RegionNotEnabled.code(), "REGION_NOT_ENABLED");
        assert_eq!(
            AssignError::NoInstanceAvailable.code(),
            "NO_INSTANCE_AVAILABLE"
        );
        assert_eq!(
            AssignError::CommitHashMismatch.code(),
            "COMMIT_HASH_MISMATCH"
        );
        assert_eq!(
            AssignError::ServiceUnavailable.code(),
            "SERVICE_UNAVAILABLE"
        );
    }
}
