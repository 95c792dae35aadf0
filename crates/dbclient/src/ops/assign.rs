//! The assign: one insert into `whist.assign_ledger`, whose trigger chooses and claims the box
//! inside the database and records the attempt (migration `1763856000006_assign_ledger`).

use serde::Deserialize;
use serde_json::json;
use whist_types::MandelboxId;

use crate::Operation;
use crate::operation::returning_one;

/// What a client asked for, as the database decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignAttempt<'a> {
    pub user_id: &'a str,
    pub session_id: &'a str,
    /// In the client's order.
    pub regions: &'a [&'a str],
    pub client_commit: &'a str,
    /// The local environment: any client build counts as the region's.
    pub any_client_commit: bool,
}

/// The database's decision.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AssignDecision {
    /// `ASSIGNED`, or the refusal code clients switch on.
    pub outcome: String,
    pub region: Option<String>,
    pub instance_id: Option<String>,
    pub mandelbox_id: Option<MandelboxId>,
    /// The host's address (inet text).
    pub ip_addr: Option<String>,
    /// Why a region could not serve, when that is a configuration error.
    pub detail: Option<String>,
    pub decision_ms: Option<f64>,
}

impl AssignDecision {
    /// The host's address without an inet prefix length.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        whist_types::host_address(self.ip_addr.as_deref()?)
    }
}

/// The columns the decision fills in.
macro_rules! decision_fields {
    () => {
        "outcome region instance_id mandelbox_id ip_addr detail decision_ms"
    };
}

const ASSIGN: &str = concat!(
    "mutation Assign($user_id: String!, $session_id: String!, $regions: jsonb!, $client_commit: String!, $any_client_commit: Boolean!) { ",
    "insert_whist_assign_ledger(objects: [{user_id: $user_id, session_id: $session_id, regions: $regions, client_commit: $client_commit, any_client_commit: $any_client_commit}]) { returning { ",
    decision_fields!(),
    " } } }"
);

/// The whole assign in one round trip: the insert's `returning` is the decision. `None` only
/// if the engine stored no row (it always does; the service treats that as unavailable).
pub fn assign(attempt: &AssignAttempt<'_>) -> Operation<Option<AssignDecision>> {
    Operation::new(
        "Assign",
        ASSIGN,
        json!({
            "user_id": attempt.user_id,
            "session_id": attempt.session_id,
            "regions": attempt.regions,
            "client_commit": attempt.client_commit,
            "any_client_commit": attempt.any_client_commit,
        }),
        returning_one("insert_whist_assign_ledger"),
    )
}

const LATEST_ATTEMPT: &str = concat!(
    "query LatestAssignAttempt($user_id: String!, $session_id: String!) { ",
    "whist_assign_ledger(where: {user_id: {_eq: $user_id}, session_id: {_eq: $session_id}}, order_by: {id: desc}, limit: 1) { ",
    decision_fields!(),
    " } }"
);

/// The latest attempt of `user_id` for `session_id`: what was decided when the answer to an
/// [`assign`] was lost on the way back.
pub fn latest_assign_attempt(user_id: &str, session_id: &str) -> Operation<Option<AssignDecision>> {
    let decode = crate::operation::field::<Vec<AssignDecision>>("whist_assign_ledger");
    Operation::new(
        "LatestAssignAttempt",
        LATEST_ATTEMPT,
        json!({ "user_id": user_id, "session_id": session_id }),
        move |data| Ok(decode(data)?.into_iter().next()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::assert_well_formed;

    #[test]
    fn the_documents_are_well_formed() {
        let regions = ["us-east-1", "eu-west-1"];
        let attempt = AssignAttempt {
            user_id: "u",
            session_id: "1",
            regions: &regions,
            client_commit: "abc",
            any_client_commit: false,
        };
        let operation = assign(&attempt);
        assert_well_formed(&operation);
        assert_eq!(
            operation.variables()["regions"],
            json!(["us-east-1", "eu-west-1"])
        );
        assert_well_formed(&latest_assign_attempt("u", "1"));
    }

    #[test]
    fn a_decision_decodes_with_its_address() {
        let decode = returning_one::<AssignDecision>("insert_whist_assign_ledger");
        let decision = decode(json!({"insert_whist_assign_ledger": {"returning": [{
            "outcome": "ASSIGNED", "region": "r", "instance_id": "i-1",
            "mandelbox_id": "4f04f794-0c0e-4ed5-9b4c-f3770d48b2fb", "ip_addr": "10.0.0.5",
            "detail": null, "decision_ms": 0.7
        }]}}))
        .expect("decodes")
        .expect("a row");
        assert_eq!(decision.ip(), "10.0.0.5".parse().ok());
        let refused = decode(json!({"insert_whist_assign_ledger": {"returning": [{
            "outcome": "NO_INSTANCE_AVAILABLE", "region": null, "instance_id": null,
            "mandelbox_id": null, "ip_addr": null, "detail": null, "decision_ms": 0.2
        }]}}))
        .expect("decodes")
        .expect("a row");
        assert_eq!(refused.ip(), None);
        assert_eq!(refused.mandelbox_id, None);
    }
}
