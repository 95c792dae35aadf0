//! The scaling-service's own state: image upgrades (`config.image_upgrades`) and leases
//! (`config.leases`).

use chrono::{DateTime, Utc};
use serde_json::json;
use whist_types::{ImageUpgrade, Lease, UpgradeStatus};

use crate::operation::{fence_check, fence_variables, field, returning_one};
use crate::{Fence, Operation};

/// The columns of `config.image_upgrades`.
macro_rules! upgrade_fields {
    () => {
        "provider region image_id client_sha state deadline_at created_at updated_at"
    };
}

pub(crate) use upgrade_fields;

const UPGRADES_IN_PROGRESS: &str = concat!(
    "query UpgradesInProgress { config_image_upgrades(where: {state: {_in: [\"PENDING\", \"SHIELDED\"]}}, order_by: {region: asc}) { ",
    upgrade_fields!(),
    " } }"
);

/// Upgrades still to be carried through, at most one per region.
pub fn upgrades_in_progress() -> Operation<Vec<ImageUpgrade>> {
    Operation::new(
        "UpgradesInProgress",
        UPGRADES_IN_PROGRESS,
        json!({}),
        field("config_image_upgrades"),
    )
}

const REQUEST_UPGRADE: &str = concat!(
    "mutation RequestUpgrade($provider: String!, $region: String!, $image_id: String!, $client_sha: String!, $deadline_at: timestamptz!) { ",
    "insert_config_image_upgrades(objects: [{provider: $provider, region: $region, image_id: $image_id, client_sha: $client_sha, state: \"PENDING\", deadline_at: $deadline_at}]) { affected_rows returning { ",
    upgrade_fields!(),
    " } } }"
);

/// Asks for a region to move to a new image (what deploy tooling does after building one). The
/// database refuses a second upgrade in progress for the same region.
pub fn request_upgrade(
    provider: &str,
    region: &str,
    image_id: &str,
    client_sha: &str,
    deadline_at: DateTime<Utc>,
) -> Operation<Option<ImageUpgrade>> {
    Operation::new(
        "RequestUpgrade",
        REQUEST_UPGRADE,
        json!({ "provider": provider, "region": region, "image_id": image_id, "client_sha": client_sha, "deadline_at": deadline_at }),
        returning_one("insert_config_image_upgrades"),
    )
}

const TRANSITION_UPGRADE: &str = concat!(
    "mutation TransitionUpgrade($provider: String!, $region: String!, $image_id: String!, $from: [String!], $to: String!) { ",
    "update_config_image_upgrades(where: {provider: {_eq: $provider}, region: {_eq: $region}, image_id: {_eq: $image_id}, state: {_in: $from}}, _set: {state: $to}) { affected_rows returning { ",
    upgrade_fields!(),
    " } } }"
);

/// Moves an upgrade to `to` if it is in one of `from`. `None` when it was not.
pub fn transition_upgrade(
    upgrade: &ImageUpgrade,
    from: &[UpgradeStatus],
    to: UpgradeStatus,
) -> Operation<Option<ImageUpgrade>> {
    Operation::new(
        "TransitionUpgrade",
        TRANSITION_UPGRADE,
        json!({ "provider": upgrade.provider, "region": upgrade.region, "image_id": upgrade.image_id, "from": from, "to": to }),
        returning_one("update_config_image_upgrades"),
    )
}

const SWAP_TO_UPGRADE: &str = concat!(
    "mutation SwapToUpgrade($provider: String!, $region: String!, $image_id: String!) { ",
    "update_config_image_upgrades(where: {provider: {_eq: $provider}, region: {_eq: $region}, image_id: {_eq: $image_id}, state: {_eq: \"SHIELDED\"}}, _set: {state: \"SWAPPED\"}) { affected_rows returning { ",
    upgrade_fields!(),
    " } } }"
);

/// Marks a SHIELDED upgrade SWAPPED; the database makes its image the region's current one in
/// the same transaction. `None` (and nothing changes) unless the upgrade was SHIELDED.
pub fn swap_to_upgrade(upgrade: &ImageUpgrade) -> Operation<Option<ImageUpgrade>> {
    Operation::new(
        "SwapToUpgrade",
        SWAP_TO_UPGRADE,
        json!({ "provider": upgrade.provider, "region": upgrade.region, "image_id": upgrade.image_id }),
        returning_one("update_config_image_upgrades"),
    )
}

const ACQUIRE_LEASE: &str = "mutation AcquireLease($name: String!, $holder: String!, $lease_seconds: Int!) { update_config_leases(where: {name: {_eq: $name}}, _set: {holder: $holder, lease_seconds: $lease_seconds}) { affected_rows returning { name holder generation expires_at renewed_at } } }";

/// Takes or renews the lease `name` for `holder` for `lease_seconds`. The database decides, on
/// its own clock (trigger `leases_decide`): the holder renews; anyone takes an expired lease;
/// a live lease of another holder is left alone and this answers `None`.
pub fn acquire_lease(name: &str, holder: &str, lease_seconds: u32) -> Operation<Option<Lease>> {
    Operation::new(
        "AcquireLease",
        ACQUIRE_LEASE,
        json!({ "name": name, "holder": holder, "lease_seconds": lease_seconds }),
        returning_one("update_config_leases"),
    )
}

const CREATE_LEASE: &str = "mutation CreateLease($name: String!) { insert_config_leases(objects: [{name: $name}]) { affected_rows } }";

/// Creates the lease row `name`, free. Fails with a constraint violation if it exists already,
/// which callers that only want it to exist ignore.
pub fn create_lease(name: &str) -> Operation<()> {
    Operation::new("CreateLease", CREATE_LEASE, json!({ "name": name }), |_| {
        Ok(())
    })
}

const RELEASE_LEASE: &str = "mutation ReleaseLease($name: String!, $holder: String!) { update_config_leases(where: {name: {_eq: $name}, holder: {_eq: $holder}}, _set: {holder: null}) { affected_rows returning { name holder generation expires_at renewed_at } } }";

/// Gives the lease up at once (a clean shutdown), if `holder` has it.
pub fn release_lease(name: &str, holder: &str) -> Operation<Option<Lease>> {
    Operation::new(
        "ReleaseLease",
        RELEASE_LEASE,
        json!({ "name": name, "holder": holder }),
        returning_one("update_config_leases"),
    )
}

const LEASE_CHECK: &str = concat!(
    "mutation LeaseCheck(",
    fence_variables!(),
    ") { ",
    fence_check!(),
    " }"
);

/// Nothing but the fence: proves, on the database's clock, that `fence` still holds its lease
/// (`DbError::Fenced` when not). Run before cloud calls, which no database fence can stop.
pub fn lease_check(fence: &Fence) -> Operation<()> {
    Operation::new(
        "LeaseCheck",
        LEASE_CHECK,
        serde_json::Value::Object(fence.variables()),
        |_| Ok(()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::assert_well_formed;

    fn upgrade() -> ImageUpgrade {
        ImageUpgrade {
            provider: "AWS".into(),
            region: "us-east-1".into(),
            image_id: "ami-2".into(),
            client_sha: "abc".into(),
            status: UpgradeStatus::Shielded,
            deadline_at: Utc::now(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn every_document_is_well_formed() {
        assert_well_formed(&upgrades_in_progress());
        assert_well_formed(&request_upgrade("AWS", "r", "ami", "sha", Utc::now()));
        assert_well_formed(&transition_upgrade(
            &upgrade(),
            &[UpgradeStatus::Pending],
            UpgradeStatus::Shielded,
        ));
        assert_well_formed(&swap_to_upgrade(&upgrade()));
        assert_well_formed(&acquire_lease("scaling", "a", 15));
        assert_well_formed(&release_lease("scaling", "a"));
        assert_well_formed(&lease_check(&Fence {
            lease: "scaling".into(),
            holder: "a".into(),
            generation: 1,
        }));
        assert_well_formed(&create_lease("eu"));
    }

    #[test]
    fn the_swap_is_conditional_on_the_shield() {
        let operation = swap_to_upgrade(&upgrade());
        assert!(operation.document().contains("state: {_eq: \"SHIELDED\"}"));
        let refused = operation
            .decode(json!({"update_config_image_upgrades": {"affected_rows": 0, "returning": []}}))
            .expect("decodes");
        assert_eq!(refused, None);
    }
}
