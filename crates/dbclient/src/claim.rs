//! The atomic claim of a mandelbox, with the database's refusals turned into outcomes.

use whist_types::{Mandelbox, MandelboxId};

use crate::{DbError, HasuraClient, ops};

/// What a claim came to. Everything but a transport or engine failure is an outcome, not an
/// error: losing a race or hitting a limit is part of normal operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The box is now ALLOCATED to the user; the instance's capacity was taken with it.
    Claimed(Mandelbox),
    /// The box was not WAITING any more (another claim won, or it is gone). Try another.
    NotWaiting,
    /// The user already holds as many live mandelboxes as the limit allows.
    UserAtLimit { message: String },
    /// The box's instance is not ACTIVE (draining, or not registered yet).
    InstanceNotAccepting { message: String },
    /// The box's instance has no remaining capacity.
    InstanceFull { message: String },
}

/// The tags the assignment trigger starts its messages with (see the migration that creates it).
const TAG_USER_LIMIT: &str = "mandelbox_limit_reached";
const TAG_NOT_ACCEPTING: &str = "instance_not_accepting";
const TAG_FULL: &str = "instance_full";

impl HasuraClient {
    /// Claims the WAITING mandelbox `id` for `user_id` in one round trip.
    #[tracing::instrument(level = "debug", skip(self), fields(mandelbox.id = %id))]
    pub async fn claim_mandelbox(
        &self,
        id: MandelboxId,
        user_id: &str,
        session_id: &str,
    ) -> Result<ClaimOutcome, DbError> {
        classify(
            self.execute(&ops::mandelboxes::claim_mandelbox(id, user_id, session_id))
                .await,
        )
    }
}

fn classify(result: Result<Option<Mandelbox>, DbError>) -> Result<ClaimOutcome, DbError> {
    match result {
        Ok(Some(mandelbox)) => Ok(ClaimOutcome::Claimed(mandelbox)),
        Ok(None) => Ok(ClaimOutcome::NotWaiting),
        Err(DbError::ConstraintViolation { message, .. }) if message.contains(TAG_USER_LIMIT) => {
            Ok(ClaimOutcome::UserAtLimit { message })
        }
        Err(DbError::ConstraintViolation { message, .. })
            if message.contains(TAG_NOT_ACCEPTING) =>
        {
            Ok(ClaimOutcome::InstanceNotAccepting { message })
        }
        // The trigger checks capacity itself; the CHECK constraint is the backstop for writers
        // that bypass it.
        Err(DbError::ConstraintViolation { message, .. })
            if message.contains(TAG_FULL) || message.contains("remaining_capacity") =>
        {
            Ok(ClaimOutcome::InstanceFull { message })
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violation(message: &str) -> Result<Option<Mandelbox>, DbError> {
        Err(DbError::ConstraintViolation {
            operation: "ClaimMandelbox",
            message: message.into(),
        })
    }

    #[test]
    fn trigger_refusals_become_outcomes() {
        assert!(matches!(
            classify(violation("mandelbox_limit_reached: user u already has 3")),
            Ok(ClaimOutcome::UserAtLimit { .. })
        ));
        assert!(matches!(
            classify(violation("instance_not_accepting: instance i is DRAINING")),
            Ok(ClaimOutcome::InstanceNotAccepting { .. })
        ));
        assert!(matches!(
            classify(violation(
                "instance_full: instance i has no remaining capacity"
            )),
            Ok(ClaimOutcome::InstanceFull { .. })
        ));
        assert_eq!(
            classify(Ok(None)).expect("outcome"),
            ClaimOutcome::NotWaiting
        );
    }

    #[test]
    fn other_failures_stay_errors() {
        assert!(classify(violation("some other constraint")).is_err());
        let transport = classify(Err(DbError::HttpStatus {
            operation: "ClaimMandelbox",
            status: 503,
            body: String::new(),
        }));
        assert!(transport.is_err());
    }
}
