//! Every dbclient operation against the real stack (Postgres + the GraphQL engine).

mod common;

use chrono::Utc;
use common::{active_fleet, client, new_instance, unique};
use whist_dbclient::{ClaimOutcome, DbError, ops};
use whist_types::{
    Environment, FleetSettings, InstanceStatus, MandelboxId, MandelboxStatus, NewMandelbox,
    RegionConfig,
};

#[tokio::test]
async fn instance_lifecycle_from_launch_to_removal() {
    let client = client();
    let region = unique("region");
    let id = unique("i");
    let launched = new_instance(&id, &region, 2, InstanceStatus::PreConnection);
    assert_eq!(
        client
            .execute(&ops::instances::insert_instances(&[launched]))
            .await
            .expect("insert"),
        1
    );

    let row = client
        .execute(&ops::instances::instance_by_id(&id))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(row.status, InstanceStatus::PreConnection);
    assert_eq!(row.ip(), None);

    let registered = client
        .execute(&ops::instances::register_instance(
            &id,
            "203.0.113.7",
            "test-sha-full",
            common::TEST_FINGERPRINT,
        ))
        .await
        .expect("register")
        .expect("was PRE_CONNECTION");
    assert_eq!(registered.status, InstanceStatus::Active);
    assert_eq!(registered.ip(), Some([203, 0, 113, 7].into()));
    assert_eq!(registered.client_sha, "test-sha-full");
    let again = client
        .execute(&ops::instances::register_instance(
            &id,
            "203.0.113.7",
            "x",
            common::TEST_FINGERPRINT,
        ))
        .await
        .expect("register");
    assert_eq!(again, None, "registration happens once");

    let before = registered.updated_at;
    assert!(
        client
            .execute(&ops::instances::heartbeat(&id))
            .await
            .expect("heartbeat")
    );
    let after = client
        .execute(&ops::instances::instance_by_id(&id))
        .await
        .expect("read")
        .expect("exists");
    assert!(after.updated_at > before, "the heartbeat moves updated_at");
    assert!(
        !client
            .execute(&ops::instances::heartbeat(&unique("missing")))
            .await
            .expect("heartbeat")
    );

    let listed = client
        .execute(&ops::instances::instances_in_region(&region))
        .await
        .expect("list");
    assert_eq!(
        listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    assert!(
        client
            .execute(&ops::instances::instances())
            .await
            .expect("all")
            .iter()
            .any(|i| i.id == id)
    );

    let drained = client
        .execute(&ops::instances::transition_instance(
            &id,
            &[InstanceStatus::Active],
            InstanceStatus::Draining,
        ))
        .await
        .expect("transition")
        .expect("was ACTIVE");
    assert_eq!(drained.status, InstanceStatus::Draining);
    let not_active = client
        .execute(&ops::instances::transition_instance(
            &id,
            &[InstanceStatus::Active],
            InstanceStatus::Draining,
        ))
        .await
        .expect("transition");
    assert_eq!(not_active, None);

    assert!(
        client
            .execute(&ops::instances::delete_instance(&id))
            .await
            .expect("delete")
    );
    assert_eq!(
        client
            .execute(&ops::instances::instance_by_id(&id))
            .await
            .expect("read"),
        None
    );
}

#[tokio::test]
async fn an_instance_with_mandelboxes_is_read_as_one_and_deleted_as_one() {
    let client = client();
    let (instances, boxes) = active_fleet(&client, &unique("region"), 1, 2).await;
    let id = &instances[0];

    let nested = client
        .execute(&ops::instances::instance_with_mandelboxes(id))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(nested.mandelboxes.len(), 2);

    let refused = client.execute(&ops::instances::delete_instance(id)).await;
    assert!(
        matches!(refused, Err(DbError::ConstraintViolation { .. })),
        "{refused:?}"
    );

    assert!(
        client
            .execute(&ops::instances::delete_instance_and_mandelboxes(id))
            .await
            .expect("delete")
    );
    for mandelbox in boxes {
        assert_eq!(
            client
                .execute(&ops::mandelboxes::mandelbox_by_id(mandelbox))
                .await
                .expect("read"),
            None
        );
    }
}

#[tokio::test]
async fn a_mandelbox_is_read_with_its_instance() {
    let client = client();
    let (instances, boxes) = active_fleet(&client, &unique("region"), 1, 1).await;
    let read = client
        .execute(&ops::mandelboxes::mandelbox_with_instance(boxes[0]))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(read.mandelbox.id, boxes[0]);
    assert_eq!(read.instance.id, instances[0]);
    assert_eq!(
        client
            .execute(&ops::mandelboxes::mandelbox_with_instance(
                MandelboxId::new_random()
            ))
            .await
            .expect("read"),
        None
    );
}

#[tokio::test]
async fn draining_an_idle_instance_is_refused_once_someone_is_assigned() {
    let client = client();
    let (instances, boxes) = active_fleet(&client, &unique("region"), 2, 2).await;
    let claimed = client
        .claim_mandelbox(boxes[0], &unique("user"), "1")
        .await
        .expect("claim");
    assert!(matches!(claimed, ClaimOutcome::Claimed(_)));

    let busy = client
        .execute(&ops::instances::drain_idle_instance(
            &instances[0],
            2,
            common::FLEET,
        ))
        .await
        .expect("drain");
    assert_eq!(busy, None, "an instance with a session is never drained");
    let idle = client
        .execute(&ops::instances::drain_idle_instance(
            &instances[1],
            2,
            common::FLEET,
        ))
        .await
        .expect("drain");
    assert_eq!(
        idle.map(|instance| instance.status),
        Some(InstanceStatus::Draining)
    );

    let on_drained = client
        .claim_mandelbox(boxes[2], &unique("user"), "1")
        .await
        .expect("claim");
    assert!(
        matches!(on_drained, ClaimOutcome::InstanceNotAccepting { .. }),
        "{on_drained:?}"
    );
}

#[tokio::test]
async fn mandelbox_lifecycle_moves_capacity_only_for_assigned_boxes() {
    let client = client();
    let (instances, boxes) = active_fleet(&client, &unique("region"), 1, 2).await;
    let instance = &instances[0];
    let user = unique("user");
    let capacity = |client: whist_dbclient::HasuraClient, id: String| async move {
        client
            .execute(&ops::instances::instance_by_id(&id))
            .await
            .expect("read")
            .expect("exists")
            .remaining_capacity
    };

    let ClaimOutcome::Claimed(claimed) = client
        .claim_mandelbox(boxes[0], &user, "1700000000000")
        .await
        .expect("claim")
    else {
        panic!("the first claim wins");
    };
    assert_eq!(claimed.status, MandelboxStatus::Allocated);
    assert_eq!(claimed.user_id.as_deref(), Some(user.as_str()));
    assert_eq!(claimed.session_id.as_deref(), Some("1700000000000"));
    assert_eq!(capacity(client.clone(), instance.clone()).await, 1);
    assert_eq!(
        client
            .claim_mandelbox(boxes[0], &user, "2")
            .await
            .expect("claim"),
        ClaimOutcome::NotWaiting
    );

    let connecting = client
        .execute(&ops::mandelboxes::transition_mandelbox(
            boxes[0],
            instance,
            &[MandelboxStatus::Allocated],
            MandelboxStatus::Connecting,
        ))
        .await
        .expect("transition")
        .expect("was ALLOCATED");
    assert_eq!(connecting.status, MandelboxStatus::Connecting);
    assert!(connecting.updated_at >= claimed.updated_at);
    let wrong_host = client
        .execute(&ops::mandelboxes::transition_mandelbox(
            boxes[0],
            "another-host",
            &[MandelboxStatus::Connecting],
            MandelboxStatus::Running,
        ))
        .await
        .expect("transition");
    assert_eq!(wrong_host, None, "a host only moves its own boxes");

    let by_user = client
        .execute(&ops::mandelboxes::mandelboxes_of_user(&user))
        .await
        .expect("list");
    assert_eq!(by_user.iter().map(|m| m.id).collect::<Vec<_>>(), [boxes[0]]);
    let on_instance = client
        .execute(&ops::mandelboxes::mandelboxes_on_instance(instance))
        .await
        .expect("list");
    assert_eq!(on_instance.len(), 2);

    // A zygote that dies gives nothing back (it held nothing); a session's box does.
    let zygote = client
        .execute(&ops::mandelboxes::delete_mandelbox(boxes[1]))
        .await
        .expect("delete");
    assert_eq!(zygote.map(|m| m.id), Some(boxes[1]));
    assert_eq!(capacity(client.clone(), instance.clone()).await, 1);
    client
        .execute(&ops::mandelboxes::delete_mandelbox(boxes[0]))
        .await
        .expect("delete")
        .expect("existed");
    assert_eq!(capacity(client.clone(), instance.clone()).await, 2);
    assert_eq!(
        client
            .execute(&ops::mandelboxes::delete_mandelbox(boxes[0]))
            .await
            .expect("delete"),
        None
    );
}

#[tokio::test]
async fn a_conditional_delete_spares_a_box_that_was_claimed() {
    let client = client();
    let (_instances, boxes) = active_fleet(&client, &unique("region"), 1, 2).await;
    client
        .claim_mandelbox(boxes[0], &unique("user"), "1")
        .await
        .expect("claim");
    let waiting_only = [MandelboxStatus::Waiting];
    let claimed = client
        .execute(&ops::mandelboxes::delete_mandelbox_in(
            boxes[0],
            &waiting_only,
        ))
        .await
        .expect("delete");
    assert_eq!(claimed, None, "the claimed box stays");
    let zygote = client
        .execute(&ops::mandelboxes::delete_mandelbox_in(
            boxes[1],
            &waiting_only,
        ))
        .await
        .expect("delete");
    assert_eq!(zygote.map(|m| m.id), Some(boxes[1]));
}

#[tokio::test]
async fn stale_boxes_are_deleted_by_state_and_age() {
    let client = client();
    let (instances, boxes) = active_fleet(&client, &unique("region"), 1, 2).await;
    let instance = &instances[0];
    client
        .claim_mandelbox(boxes[0], &unique("user"), "1")
        .await
        .expect("claim");

    let none_yet = client
        .execute(&ops::mandelboxes::delete_stale_mandelboxes(
            instance,
            MandelboxStatus::Allocated,
            Utc::now() - chrono::Duration::minutes(1),
        ))
        .await
        .expect("reap");
    assert!(none_yet.is_empty());
    let reaped = client
        .execute(&ops::mandelboxes::delete_stale_mandelboxes(
            instance,
            MandelboxStatus::Allocated,
            Utc::now() + chrono::Duration::minutes(1),
        ))
        .await
        .expect("reap");
    assert_eq!(reaped.iter().map(|m| m.id).collect::<Vec<_>>(), [boxes[0]]);
    let row = client
        .execute(&ops::instances::instance_by_id(instance))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(
        row.remaining_capacity, 2,
        "reaping a session returns its capacity"
    );
}

#[tokio::test]
async fn bad_rows_are_refused_by_the_schema() {
    let client = client();
    let (instances, _) = active_fleet(&client, &unique("region"), 1, 0).await;
    let raw = whist_dbclient::Operation::new(
        "InsertRaw",
        "mutation InsertRaw($objects: [whist_mandelboxes_insert_input!]!) { insert_whist_mandelboxes(objects: $objects) { affected_rows } }",
        serde_json::json!({"objects": [{"id": "not-a-uuid", "app": "CHROME", "instance_id": instances[0], "status": "WAITING"}]}),
        Ok,
    );
    assert!(matches!(
        client.execute(&raw).await,
        Err(DbError::ConstraintViolation { .. })
    ));
    let unknown_instance =
        NewMandelbox::waiting(MandelboxId::new_random(), "CHROME", unique("nope"));
    let refused = client
        .execute(&ops::mandelboxes::insert_mandelboxes(&[unknown_instance]))
        .await;
    assert!(
        matches!(refused, Err(DbError::ConstraintViolation { .. })),
        "{refused:?}"
    );
    let negative = new_instance(&unique("i"), "r", -1, InstanceStatus::Active);
    let refused = client
        .execute(&ops::instances::insert_instances(&[negative]))
        .await;
    assert!(
        matches!(refused, Err(DbError::ConstraintViolation { .. })),
        "{refused:?}"
    );
}

#[tokio::test]
async fn images_are_replaced_per_region() {
    let client = client();
    let region = unique("region");
    assert_eq!(
        client
            .execute(&ops::images::image("AWS", &region))
            .await
            .expect("read"),
        None
    );
    client
        .execute(&ops::images::set_image("AWS", &region, "ami-1", "sha-1"))
        .await
        .expect("set");
    client
        .execute(&ops::images::set_image("AWS", &region, "ami-2", "sha-2"))
        .await
        .expect("replace");
    let image = client
        .execute(&ops::images::image("AWS", &region))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(
        (image.image_id.as_str(), image.client_sha.as_str()),
        ("ami-2", "sha-2")
    );
    let all = client.execute(&ops::images::images()).await.expect("list");
    assert_eq!(all.iter().filter(|image| image.region == region).count(), 1);
}

#[tokio::test]
async fn region_configuration_round_trips() {
    let client = client();
    let config = RegionConfig {
        region: unique("region"),
        enabled: true,
        desired_free_mandelboxes: 4,
        instance_types: vec!["g4dn.2xlarge".into(), "g5.2xlarge".into()],
        schedule_time_zone: "UTC".into(),
    };
    client
        .execute(&ops::config::set_region_config(&config))
        .await
        .expect("set");
    let changed = RegionConfig {
        enabled: false,
        desired_free_mandelboxes: 0,
        ..config.clone()
    };
    client
        .execute(&ops::config::set_region_config(&changed))
        .await
        .expect("replace");
    let read = client
        .execute(&ops::config::region_configs())
        .await
        .expect("read");
    assert_eq!(
        read.iter()
            .filter(|row| row.region == config.region)
            .collect::<Vec<_>>(),
        [&changed]
    );
    let negative = RegionConfig {
        desired_free_mandelboxes: -1,
        ..config.clone()
    };
    assert!(
        client
            .execute(&ops::config::set_region_config(&negative))
            .await
            .is_err()
    );
    assert!(
        client
            .execute(&ops::config::delete_region_config(&config.region))
            .await
            .expect("delete")
    );
}

#[tokio::test]
async fn settings_and_desktop_version_are_readable_and_validated() {
    let client = client();
    let settings = client
        .execute(&ops::config::fleet_settings())
        .await
        .expect("read")
        .expect("the row exists");
    assert!(settings.mandelbox_limit_per_user >= 1);
    // Writing the same values back exercises the mutation without disturbing other tests.
    client
        .execute(&ops::config::set_fleet_settings(&settings))
        .await
        .expect("write");
    let invalid = FleetSettings {
        mandelbox_limit_per_user: 0,
        ..settings.clone()
    };
    let refused = client
        .execute(&ops::config::set_fleet_settings(&invalid))
        .await;
    assert!(
        matches!(refused, Err(DbError::ConstraintViolation { .. })),
        "{refused:?}"
    );

    let hash = unique("commit");
    client
        .execute(&ops::config::set_desktop_app_commit(
            Environment::Staging,
            &hash,
        ))
        .await
        .expect("publish");
    let version = client
        .execute(&ops::config::desktop_app_version())
        .await
        .expect("read")
        .expect("row");
    assert_eq!(version.commit_hash(Environment::Staging), hash);
}

#[tokio::test]
async fn a_wrong_admin_secret_is_access_denied() {
    let stack = whist_test_support::shared();
    let config = whist_dbclient::HasuraConfig::new(
        stack.graphql_url.parse().expect("url"),
        Some("wrong".into()),
    );
    let result = whist_dbclient::HasuraClient::new(config)
        .execute(&ops::instances::instances())
        .await;
    assert!(
        matches!(
            result,
            Err(DbError::AccessDenied { .. }
                | DbError::HttpStatus {
                    status: 401 | 403,
                    ..
                })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn an_upgrade_is_requested_once_per_region_and_swaps_atomically() {
    use whist_types::UpgradeStatus;
    let client = client();
    let region = unique("region");
    let deadline = Utc::now() + chrono::Duration::minutes(30);
    client
        .execute(&ops::set_image("AWS", &region, "ami-old", "old-sha"))
        .await
        .expect("image");
    let upgrade = client
        .execute(&ops::request_upgrade(
            "AWS", &region, "ami-new", "new-sha", deadline,
        ))
        .await
        .expect("request")
        .expect("inserted");
    assert_eq!(upgrade.status, UpgradeStatus::Pending);
    let second = client
        .execute(&ops::request_upgrade(
            "AWS",
            &region,
            "ami-other",
            "x",
            deadline,
        ))
        .await;
    assert!(second.is_err(), "one upgrade in progress per region");

    let not_shielded = client
        .execute(&ops::swap_to_upgrade(&upgrade))
        .await
        .expect("swap");
    assert_eq!(not_shielded, None, "a PENDING upgrade cannot swap");
    let current = client
        .execute(&ops::image("AWS", &region))
        .await
        .expect("image")
        .expect("exists");
    assert_eq!(current.image_id, "ami-old", "nothing changed");

    let shielded = client
        .execute(&ops::transition_upgrade(
            &upgrade,
            &[UpgradeStatus::Pending],
            UpgradeStatus::Shielded,
        ))
        .await
        .expect("transition")
        .expect("was pending");
    assert_eq!(shielded.status, UpgradeStatus::Shielded);
    client
        .execute(&ops::swap_to_upgrade(&shielded))
        .await
        .expect("swap")
        .expect("was shielded");
    let current = client
        .execute(&ops::image("AWS", &region))
        .await
        .expect("image")
        .expect("exists");
    assert_eq!(
        (current.image_id.as_str(), current.client_sha.as_str()),
        ("ami-new", "new-sha")
    );
    let in_progress = client
        .execute(&ops::upgrades_in_progress())
        .await
        .expect("list");
    assert!(!in_progress.iter().any(|u| u.region == region));
}
