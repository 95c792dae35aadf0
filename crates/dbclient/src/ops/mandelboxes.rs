//! Operations on `whist.mandelboxes`.

use chrono::{DateTime, Utc};
use serde_json::json;
use whist_types::{Mandelbox, MandelboxId, MandelboxStatus, MandelboxWithInstance, NewMandelbox};

use super::{instance_fields, mandelbox_fields};
use crate::Operation;
use crate::operation::{affected_rows, field, returning_one};

const MANDELBOX_BY_ID: &str = concat!(
    "query MandelboxById($id: String!) { whist_mandelboxes_by_pk(id: $id) { ",
    mandelbox_fields!(),
    " } }"
);

/// One mandelbox by id.
pub fn mandelbox_by_id(id: MandelboxId) -> Operation<Option<Mandelbox>> {
    Operation::new(
        "MandelboxById",
        MANDELBOX_BY_ID,
        json!({ "id": id }),
        field("whist_mandelboxes_by_pk"),
    )
}

const MANDELBOX_WITH_INSTANCE: &str = concat!(
    "query MandelboxWithInstance($id: String!) { whist_mandelboxes_by_pk(id: $id) { ",
    mandelbox_fields!(),
    " instance { ",
    instance_fields!(),
    " } } }"
);

/// One mandelbox and the instance it runs on, in one read.
pub fn mandelbox_with_instance(id: MandelboxId) -> Operation<Option<MandelboxWithInstance>> {
    Operation::new(
        "MandelboxWithInstance",
        MANDELBOX_WITH_INSTANCE,
        json!({ "id": id }),
        field("whist_mandelboxes_by_pk"),
    )
}

const MANDELBOXES: &str = concat!(
    "query Mandelboxes { whist_mandelboxes(order_by: {created_at: asc}) { ",
    mandelbox_fields!(),
    " } }"
);

/// Every mandelbox of the fleet, oldest first.
pub fn mandelboxes() -> Operation<Vec<Mandelbox>> {
    Operation::new(
        "Mandelboxes",
        MANDELBOXES,
        json!({}),
        field("whist_mandelboxes"),
    )
}

const MANDELBOXES_ON_INSTANCE: &str = concat!(
    "query MandelboxesOnInstance($instance_id: String!) { whist_mandelboxes(where: {instance_id: {_eq: $instance_id}}, order_by: {created_at: asc}) { ",
    mandelbox_fields!(),
    " } }"
);

/// Every mandelbox of one instance, oldest first.
pub fn mandelboxes_on_instance(instance_id: &str) -> Operation<Vec<Mandelbox>> {
    Operation::new(
        "MandelboxesOnInstance",
        MANDELBOXES_ON_INSTANCE,
        json!({ "instance_id": instance_id }),
        field("whist_mandelboxes"),
    )
}

const MANDELBOXES_OF_USER: &str = concat!(
    "query MandelboxesOfUser($user_id: String!) { whist_mandelboxes(where: {user_id: {_eq: $user_id}}, order_by: {created_at: asc}) { ",
    mandelbox_fields!(),
    " } }"
);

/// Every mandelbox assigned to one user.
pub fn mandelboxes_of_user(user_id: &str) -> Operation<Vec<Mandelbox>> {
    Operation::new(
        "MandelboxesOfUser",
        MANDELBOXES_OF_USER,
        json!({ "user_id": user_id }),
        field("whist_mandelboxes"),
    )
}

const INSERT_MANDELBOXES: &str = "mutation InsertMandelboxes($objects: [whist_mandelboxes_insert_input!]!) { insert_whist_mandelboxes(objects: $objects) { affected_rows } }";

/// Records new zygotes. All rows or none are written.
pub fn insert_mandelboxes(mandelboxes: &[NewMandelbox]) -> Operation<u64> {
    Operation::new(
        "InsertMandelboxes",
        INSERT_MANDELBOXES,
        json!({ "objects": mandelboxes }),
        affected_rows("insert_whist_mandelboxes"),
    )
}

const CLAIM_MANDELBOX: &str = concat!(
    "mutation ClaimMandelbox($id: String!, $user_id: String!, $session_id: String!) { ",
    "update_whist_mandelboxes(where: {id: {_eq: $id}, status: {_eq: \"WAITING\"}}, ",
    "_set: {status: \"ALLOCATED\", user_id: $user_id, session_id: $session_id}) { affected_rows returning { ",
    mandelbox_fields!(),
    " } } }"
);

/// The atomic claim of one WAITING mandelbox for a user, in one round trip.
///
/// The update matches only while the box is WAITING, so of two racing claims one matches no
/// row. The database trigger takes the instance's capacity and enforces the user's limit in the
/// same transaction. Send it with [`crate::HasuraClient::claim_mandelbox`], which turns the
/// refusals into a [`crate::ClaimOutcome`].
pub fn claim_mandelbox(
    id: MandelboxId,
    user_id: &str,
    session_id: &str,
) -> Operation<Option<Mandelbox>> {
    Operation::new(
        "ClaimMandelbox",
        CLAIM_MANDELBOX,
        json!({ "id": id, "user_id": user_id, "session_id": session_id }),
        returning_one("update_whist_mandelboxes"),
    )
}

const TRANSITION_MANDELBOX: &str = concat!(
    "mutation TransitionMandelbox($id: String!, $instance_id: String!, $from: [String!], $to: String!) { ",
    "update_whist_mandelboxes(where: {id: {_eq: $id}, instance_id: {_eq: $instance_id}, status: {_in: $from}}, ",
    "_set: {status: $to}) { affected_rows returning { ",
    mandelbox_fields!(),
    " } } }"
);

/// Moves a mandelbox of `instance_id` to `to` if it is in one of `from` (e.g. the host's
/// ALLOCATED → CONNECTING). `None` when it was not, or belongs to another instance.
pub fn transition_mandelbox(
    id: MandelboxId,
    instance_id: &str,
    from: &[MandelboxStatus],
    to: MandelboxStatus,
) -> Operation<Option<Mandelbox>> {
    Operation::new(
        "TransitionMandelbox",
        TRANSITION_MANDELBOX,
        json!({ "id": id, "instance_id": instance_id, "from": from, "to": to }),
        returning_one("update_whist_mandelboxes"),
    )
}

const DELETE_MANDELBOX: &str = concat!(
    "mutation DeleteMandelbox($id: String!) { delete_whist_mandelboxes(where: {id: {_eq: $id}}) { affected_rows returning { ",
    mandelbox_fields!(),
    " } } }"
);

/// Deletes a mandelbox row; an assigned box gives its capacity back in the same transaction.
/// Returns the deleted row, `None` if there was none.
pub fn delete_mandelbox(id: MandelboxId) -> Operation<Option<Mandelbox>> {
    Operation::new(
        "DeleteMandelbox",
        DELETE_MANDELBOX,
        json!({ "id": id }),
        returning_one("delete_whist_mandelboxes"),
    )
}

const DELETE_MANDELBOX_IN: &str = concat!(
    "mutation DeleteMandelboxIn($id: String!, $statuses: [String!]) { ",
    "delete_whist_mandelboxes(where: {id: {_eq: $id}, status: {_in: $statuses}}) { affected_rows returning { ",
    mandelbox_fields!(),
    " } } }"
);

/// Deletes a mandelbox row only while its status is one of `statuses` (e.g. a zygote retired
/// only while still WAITING, so a claim racing the retirement wins). `None` when nothing matched.
pub fn delete_mandelbox_in(
    id: MandelboxId,
    statuses: &[MandelboxStatus],
) -> Operation<Option<Mandelbox>> {
    Operation::new(
        "DeleteMandelboxIn",
        DELETE_MANDELBOX_IN,
        json!({ "id": id, "statuses": statuses }),
        returning_one("delete_whist_mandelboxes"),
    )
}

const DELETE_STALE_MANDELBOXES: &str = concat!(
    "mutation DeleteStaleMandelboxes($instance_id: String!, $status: String!, $before: timestamptz!) { ",
    "delete_whist_mandelboxes(where: {instance_id: {_eq: $instance_id}, status: {_eq: $status}, updated_at: {_lt: $before}}) { affected_rows returning { ",
    mandelbox_fields!(),
    " } } }"
);

/// Deletes the mandelboxes of an instance that entered `status` before `before` (stuck
/// sessions). Returns the deleted rows.
pub fn delete_stale_mandelboxes(
    instance_id: &str,
    status: MandelboxStatus,
    before: DateTime<Utc>,
) -> Operation<Vec<Mandelbox>> {
    let decode = field::<serde_json::Value>("delete_whist_mandelboxes");
    Operation::new(
        "DeleteStaleMandelboxes",
        DELETE_STALE_MANDELBOXES,
        json!({ "instance_id": instance_id, "status": status, "before": before }),
        move |data| {
            let result = decode(data)?;
            let rows = result
                .get("returning")
                .cloned()
                .ok_or("no returning rows")?;
            serde_json::from_value(rows).map_err(|error| error.to_string())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::assert_well_formed;

    #[test]
    fn every_document_is_well_formed() {
        let id = MandelboxId::new_random();
        assert_well_formed(&mandelbox_by_id(id));
        assert_well_formed(&mandelboxes_on_instance("i-1"));
        assert_well_formed(&mandelboxes_of_user("u"));
        assert_well_formed(&insert_mandelboxes(&[NewMandelbox::waiting(
            id, "CHROME", "i-1",
        )]));
        assert_well_formed(&claim_mandelbox(id, "u", "1"));
        assert_well_formed(&transition_mandelbox(
            id,
            "i-1",
            &[MandelboxStatus::Allocated],
            MandelboxStatus::Connecting,
        ));
        assert_well_formed(&delete_mandelbox(id));
        assert_well_formed(&delete_mandelbox_in(id, &[MandelboxStatus::Waiting]));
        assert_well_formed(&delete_stale_mandelboxes(
            "i-1",
            MandelboxStatus::Allocated,
            Utc::now(),
        ));
    }

    #[test]
    fn the_claim_is_conditional_on_waiting() {
        let id = MandelboxId::new_random();
        let operation = claim_mandelbox(id, "user-1", "1700000000000");
        assert!(operation.document().contains("status: {_eq: \"WAITING\"}"));
        assert!(operation.document().contains("status: \"ALLOCATED\""));
        assert_eq!(
            operation.variables(),
            &json!({"id": id.to_string(), "user_id": "user-1", "session_id": "1700000000000"})
        );
    }

    #[test]
    fn a_lost_claim_decodes_to_none() {
        let operation = claim_mandelbox(MandelboxId::new_random(), "u", "1");
        let decoded = operation
            .decode(json!({"update_whist_mandelboxes": {"affected_rows": 0, "returning": []}}))
            .expect("decodes");
        assert_eq!(decoded, None);
    }

    #[test]
    fn new_zygotes_are_waiting_and_unowned() {
        let id = MandelboxId::new_random();
        let operation = insert_mandelboxes(&[NewMandelbox::waiting(id, "CHROME", "i-1")]);
        assert_eq!(
            operation.variables()["objects"][0],
            json!({"id": id.to_string(), "app": "CHROME", "instance_id": "i-1", "status": "WAITING"})
        );
    }
}
