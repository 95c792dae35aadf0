//! Operations on `whist.instances`.

use serde_json::json;
use whist_types::{Instance, InstanceStatus, InstanceWithMandelboxes, NewInstance};

use super::{instance_fields, mandelbox_fields};
use crate::Operation;
use crate::operation::{affected_rows, field, returning_one};

const INSTANCE_BY_ID: &str = concat!(
    "query InstanceById($id: String!) { whist_instances_by_pk(id: $id) { ",
    instance_fields!(),
    " } }"
);

/// One instance by id.
pub fn instance_by_id(id: &str) -> Operation<Option<Instance>> {
    Operation::new(
        "InstanceById",
        INSTANCE_BY_ID,
        json!({ "id": id }),
        field("whist_instances_by_pk"),
    )
}

const INSTANCE_WITH_MANDELBOXES: &str = concat!(
    "query InstanceWithMandelboxes($id: String!) { whist_instances_by_pk(id: $id) { ",
    instance_fields!(),
    " mandelboxes { ",
    mandelbox_fields!(),
    " } } }"
);

/// One instance and its mandelboxes, read together (one snapshot).
pub fn instance_with_mandelboxes(id: &str) -> Operation<Option<InstanceWithMandelboxes>> {
    Operation::new(
        "InstanceWithMandelboxes",
        INSTANCE_WITH_MANDELBOXES,
        json!({ "id": id }),
        field("whist_instances_by_pk"),
    )
}

const INSTANCES: &str = concat!(
    "query Instances { whist_instances(order_by: {id: asc}) { ",
    instance_fields!(),
    " } }"
);

/// Every instance of the fleet.
pub fn instances() -> Operation<Vec<Instance>> {
    Operation::new("Instances", INSTANCES, json!({}), field("whist_instances"))
}

const INSTANCES_IN_REGION: &str = concat!(
    "query InstancesInRegion($region: String!) { whist_instances(where: {region: {_eq: $region}}, order_by: {id: asc}) { ",
    instance_fields!(),
    " } }"
);

/// Every instance of one region.
pub fn instances_in_region(region: &str) -> Operation<Vec<Instance>> {
    Operation::new(
        "InstancesInRegion",
        INSTANCES_IN_REGION,
        json!({ "region": region }),
        field("whist_instances"),
    )
}

const INSERT_INSTANCES: &str = "mutation InsertInstances($objects: [whist_instances_insert_input!]!) { insert_whist_instances(objects: $objects) { affected_rows } }";

/// Records launched hosts (normally in PRE_CONNECTION). All rows or none are written.
pub fn insert_instances(instances: &[NewInstance]) -> Operation<u64> {
    Operation::new(
        "InsertInstances",
        INSERT_INSTANCES,
        json!({ "objects": instances }),
        affected_rows("insert_whist_instances"),
    )
}

const REGISTER_INSTANCE: &str = concat!(
    "mutation RegisterInstance($id: String!, $ip_addr: inet!, $client_sha: String!, $tls_fingerprint: String!) { ",
    "update_whist_instances(where: {id: {_eq: $id}, status: {_eq: \"PRE_CONNECTION\"}}, ",
    "_set: {status: \"ACTIVE\", ip_addr: $ip_addr, client_sha: $client_sha, tls_fingerprint: $tls_fingerprint, heartbeat_at: \"1970-01-01T00:00:00Z\"}) { affected_rows returning { ",
    instance_fields!(),
    " } } }"
);

/// A host's registration: PRE_CONNECTION → ACTIVE with its real address, full commit and TLS
/// certificate fingerprint, and its first heartbeat. `None` when the row is not (or no longer)
/// in PRE_CONNECTION, e.g. drained meanwhile.
pub fn register_instance(
    id: &str,
    ip_addr: &str,
    client_sha: &str,
    tls_fingerprint: &str,
) -> Operation<Option<Instance>> {
    Operation::new(
        "RegisterInstance",
        REGISTER_INSTANCE,
        json!({ "id": id, "ip_addr": ip_addr, "client_sha": client_sha, "tls_fingerprint": tls_fingerprint }),
        returning_one("update_whist_instances"),
    )
}

const PUBLISH_CERTIFICATE: &str = concat!(
    "mutation PublishCertificate($id: String!, $tls_fingerprint: String!) { ",
    "update_whist_instances(where: {id: {_eq: $id}, status: {_in: [\"ACTIVE\", \"DRAINING\"]}}, ",
    "_set: {tls_fingerprint: $tls_fingerprint}) { affected_rows returning { ",
    instance_fields!(),
    " } } }"
);

/// A restarted host's new certificate fingerprint on its registered row. `None` when the row is
/// not ACTIVE or DRAINING.
pub fn publish_certificate(id: &str, tls_fingerprint: &str) -> Operation<Option<Instance>> {
    Operation::new(
        "PublishCertificate",
        PUBLISH_CERTIFICATE,
        json!({ "id": id, "tls_fingerprint": tls_fingerprint }),
        returning_one("update_whist_instances"),
    )
}

/// Any value written to `heartbeat_at` is replaced by the database's clock (trigger
/// `instances_stamp_heartbeat`); this one says so to a reader of the document.
const HEARTBEAT: &str = "mutation Heartbeat($id: String!) { update_whist_instances(where: {id: {_eq: $id}}, _set: {heartbeat_at: \"1970-01-01T00:00:00Z\"}) { affected_rows } }";

/// Stamps `heartbeat_at` with the database's clock. Returns whether the row still exists.
pub fn heartbeat(id: &str) -> Operation<bool> {
    let decode = affected_rows("update_whist_instances");
    Operation::new("Heartbeat", HEARTBEAT, json!({ "id": id }), move |data| {
        decode(data).map(|rows| rows > 0)
    })
}

const TRANSITION_INSTANCE: &str = concat!(
    "mutation TransitionInstance($id: String!, $from: [String!], $to: String!) { ",
    "update_whist_instances(where: {id: {_eq: $id}, status: {_in: $from}}, _set: {status: $to}) { affected_rows returning { ",
    instance_fields!(),
    " } } }"
);

/// Moves an instance to `to` if it is in one of `from`. `None` when it was not.
pub fn transition_instance(
    id: &str,
    from: &[InstanceStatus],
    to: InstanceStatus,
) -> Operation<Option<Instance>> {
    Operation::new(
        "TransitionInstance",
        TRANSITION_INSTANCE,
        json!({ "id": id, "from": from, "to": to }),
        returning_one("update_whist_instances"),
    )
}

const DRAIN_IDLE_INSTANCE: &str = concat!(
    "mutation DrainIdleInstance($id: String!, $capacity: Int!, $fleet: String!) { ",
    "update_whist_instances(where: {id: {_eq: $id}, fleet: {_eq: $fleet}, status: {_eq: \"ACTIVE\"}, remaining_capacity: {_eq: $capacity}}, ",
    "_set: {status: \"DRAINING\"}) { affected_rows returning { ",
    instance_fields!(),
    " } } }"
);

/// Drains an ACTIVE instance of `fleet` only if nobody is assigned to it (its remaining capacity
/// is its full `capacity`). The condition is on the row itself, so a claim racing this update
/// either commits first (and this matches nothing) or finds the instance DRAINING and fails.
pub fn drain_idle_instance(id: &str, capacity: u32, fleet: &str) -> Operation<Option<Instance>> {
    Operation::new(
        "DrainIdleInstance",
        DRAIN_IDLE_INSTANCE,
        json!({ "id": id, "capacity": capacity, "fleet": fleet }),
        returning_one("update_whist_instances"),
    )
}

const DELETE_INSTANCE: &str = "mutation DeleteInstance($id: String!) { delete_whist_instances(where: {id: {_eq: $id}}) { affected_rows } }";

/// Deletes an instance row that has no mandelboxes left (the foreign key refuses otherwise).
/// Returns whether a row was deleted.
pub fn delete_instance(id: &str) -> Operation<bool> {
    let decode = affected_rows("delete_whist_instances");
    Operation::new(
        "DeleteInstance",
        DELETE_INSTANCE,
        json!({ "id": id }),
        move |data| decode(data).map(|rows| rows > 0),
    )
}

const DELETE_INSTANCE_AND_MANDELBOXES: &str = concat!(
    "mutation DeleteInstanceAndMandelboxes($id: String!) { ",
    "delete_whist_mandelboxes(where: {instance_id: {_eq: $id}}) { affected_rows } ",
    "delete_whist_instances(where: {id: {_eq: $id}}) { affected_rows } }"
);

/// Removes an instance whose machine is gone, with its mandelbox rows, in one transaction.
/// Returns whether the instance row existed.
pub fn delete_instance_and_mandelboxes(id: &str) -> Operation<bool> {
    let decode = affected_rows("delete_whist_instances");
    Operation::new(
        "DeleteInstanceAndMandelboxes",
        DELETE_INSTANCE_AND_MANDELBOXES,
        json!({ "id": id }),
        move |data| decode(data).map(|rows| rows > 0),
    )
}

const DELETE_FLEET_INSTANCE: &str = concat!(
    "mutation DeleteFleetInstance($id: String!, $fleet: String!) { ",
    "delete_whist_mandelboxes(where: {instance_id: {_eq: $id}, instance: {fleet: {_eq: $fleet}}}) { affected_rows } ",
    "delete_whist_instances(where: {id: {_eq: $id}, fleet: {_eq: $fleet}}) { affected_rows } }"
);

/// The scaler's deletion of a host whose machine is gone: the row and its mandelbox rows, in one
/// transaction, and only if the row belongs to `fleet` (rows of other fleets, and rows from
/// before fleets were recorded, are never matched). Returns whether the row was deleted.
pub fn delete_fleet_instance(id: &str, fleet: &str) -> Operation<bool> {
    let decode = affected_rows("delete_whist_instances");
    Operation::new(
        "DeleteFleetInstance",
        DELETE_FLEET_INSTANCE,
        json!({ "id": id, "fleet": fleet }),
        move |data| decode(data).map(|rows| rows > 0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::assert_well_formed;

    fn new_instance() -> NewInstance {
        NewInstance {
            id: "i-1".into(),
            provider: "AWS".into(),
            region: "us-east-1".into(),
            image_id: "ami-1".into(),
            client_sha: "abc".into(),
            instance_type: "g4dn.2xlarge".into(),
            remaining_capacity: 2,
            status: InstanceStatus::PreConnection,
            fleet: Some("whist-prod".into()),
        }
    }

    #[test]
    fn every_document_is_well_formed() {
        assert_well_formed(&instance_by_id("i-1"));
        assert_well_formed(&instance_with_mandelboxes("i-1"));
        assert_well_formed(&instances());
        assert_well_formed(&instances_in_region("us-east-1"));
        assert_well_formed(&insert_instances(&[new_instance()]));
        assert_well_formed(&register_instance("i-1", "1.2.3.4", "abc", &"f".repeat(64)));
        assert_well_formed(&publish_certificate("i-1", &"f".repeat(64)));
        assert_well_formed(&heartbeat("i-1"));
        assert_well_formed(&transition_instance(
            "i-1",
            &[InstanceStatus::Active],
            InstanceStatus::Draining,
        ));
        assert_well_formed(&drain_idle_instance("i-1", 2, "whist-prod"));
        assert_well_formed(&delete_fleet_instance("i-1", "whist-prod"));
        assert_well_formed(&delete_instance("i-1"));
        assert_well_formed(&delete_instance_and_mandelboxes("i-1"));
    }

    #[test]
    fn statuses_travel_as_their_database_text() {
        let operation = transition_instance(
            "i-1",
            &[InstanceStatus::PreConnection, InstanceStatus::Active],
            InstanceStatus::Draining,
        );
        assert_eq!(
            operation.variables(),
            &json!({"id": "i-1", "from": ["PRE_CONNECTION", "ACTIVE"], "to": "DRAINING"})
        );
    }

    #[test]
    fn inserted_rows_carry_every_required_column() {
        let operation = insert_instances(&[new_instance()]);
        let object = &operation.variables()["objects"][0];
        for column in [
            "id",
            "provider",
            "region",
            "image_id",
            "client_sha",
            "instance_type",
            "remaining_capacity",
            "status",
            "fleet",
        ] {
            assert!(object.get(column).is_some(), "missing {column}");
        }
        assert_eq!(object["status"], "PRE_CONNECTION");
    }

    #[test]
    fn the_drain_condition_is_on_the_row_itself() {
        let operation = drain_idle_instance("i-1", 2, "whist-prod");
        let document = operation.document();
        assert!(document.contains("status: {_eq: \"ACTIVE\"}"));
        assert!(document.contains("remaining_capacity: {_eq: $capacity}"));
        assert!(document.contains("fleet: {_eq: $fleet}"));
    }

    #[test]
    fn the_scaler_deletes_only_its_own_fleet() {
        let operation = delete_fleet_instance("i-1", "whist-prod");
        let document = operation.document();
        assert!(document.contains("instance: {fleet: {_eq: $fleet}}"));
        assert!(document.contains("id: {_eq: $id}, fleet: {_eq: $fleet}"));
    }

    #[test]
    fn registration_only_moves_a_pre_connection_row() {
        let operation = register_instance("i-1", "1.2.3.4", "abc", &"f".repeat(64));
        assert!(
            operation
                .document()
                .contains("status: {_eq: \"PRE_CONNECTION\"}")
        );
        let decoded = operation
            .decode(json!({"update_whist_instances": {"affected_rows": 0, "returning": []}}))
            .expect("decodes");
        assert_eq!(decoded, None);
    }
}
