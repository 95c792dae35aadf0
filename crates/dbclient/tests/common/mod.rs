//! Fixtures shared by the integration tests: a client for the shared stack and a small fleet
//! written under ids unique to each test.

#![allow(dead_code)]

use std::time::Duration;

use whist_dbclient::{HasuraClient, LiveOptions, ops};
use whist_types::{InstanceStatus, MandelboxId, NewInstance, NewMandelbox};

/// A client for the stack this test binary shares.
pub fn client() -> HasuraClient {
    whist_logging::init_for_tests();
    whist_test_support::shared().client()
}

/// Options that notice failures quickly, for tests.
pub fn fast_live_options() -> LiveOptions {
    LiveOptions {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(5),
        keep_alive_interval: Duration::from_secs(1),
        keep_alive_retries: 1,
    }
}

/// The certificate fingerprint test hosts publish (no TLS server presents it).
pub const TEST_FINGERPRINT: &str =
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The fleet the tests' instance rows belong to.
pub const FLEET: &str = "whist-test";

/// A prefix no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub fn new_instance(id: &str, region: &str, capacity: i32, status: InstanceStatus) -> NewInstance {
    NewInstance {
        id: id.to_owned(),
        provider: "AWS".to_owned(),
        region: region.to_owned(),
        image_id: "ami-test".to_owned(),
        client_sha: "test-sha".to_owned(),
        instance_type: "g4dn.2xlarge".to_owned(),
        remaining_capacity: capacity,
        status,
        fleet: Some(FLEET.to_owned()),
    }
}

/// Writes ACTIVE instances with `boxes_each` WAITING mandelboxes and capacity for all of them.
/// Returns the instance ids and the mandelbox ids.
pub async fn active_fleet(
    client: &HasuraClient,
    region: &str,
    instances: usize,
    boxes_each: usize,
) -> (Vec<String>, Vec<MandelboxId>) {
    let capacity = i32::try_from(boxes_each).expect("small");
    let rows: Vec<_> = (0..instances)
        .map(|_| new_instance(&unique("i"), region, capacity, InstanceStatus::Active))
        .collect();
    client
        .execute(&ops::instances::insert_instances(&rows))
        .await
        .expect("insert instances");
    let boxes: Vec<_> = rows
        .iter()
        .flat_map(|instance| {
            (0..boxes_each)
                .map(|_| NewMandelbox::waiting(MandelboxId::new_random(), "CHROME", &instance.id))
        })
        .collect();
    if !boxes.is_empty() {
        client
            .execute(&ops::mandelboxes::insert_mandelboxes(&boxes))
            .await
            .expect("insert mandelboxes");
    }
    (
        rows.into_iter().map(|row| row.id).collect(),
        boxes.into_iter().map(|row| row.id).collect(),
    )
}
