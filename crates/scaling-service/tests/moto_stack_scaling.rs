//! The controller end to end: the real stack, EC2 from moto on loopback, and host agents that
//! register and heartbeat as host-services do. Each test owns one AWS region name (moto knows
//! only real ones) and its own leader lease.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::{HostAgents, Region, Scaler, cloud_hosts, eventually, unique};
use whist_dbclient::ops;
use whist_test_support::jwt::TestIssuer;
use whist_types::{Environment, InstanceStatus, UpgradeStatus};

const PATIENCE: Duration = Duration::from_secs(60);

/// A region under a real AWS name, configured fresh for this test.
async fn region(db: &whist_dbclient::HasuraClient, name: &str, desired: i32) -> Region {
    common::clean_region(name);
    whist_test_support::shared()
        .sql(&format!(
            "DELETE FROM config.image_upgrades WHERE region = '{name}'"
        ))
        .expect("clean upgrades");
    let region = Region {
        name: name.to_owned(),
        image_id: unique("ami"),
        client_sha: unique("sha"),
    };
    common::configure_region(db, name, desired).await;
    db.execute(&ops::set_image(
        "AWS",
        name,
        &region.image_id,
        &region.client_sha,
    ))
    .await
    .expect("image");
    region
}

async fn issuer() -> Arc<TestIssuer> {
    Arc::new(TestIssuer::start().await.expect("issuer"))
}

async fn instances(db: &whist_dbclient::HasuraClient, region: &str) -> Vec<whist_types::Instance> {
    db.execute(&ops::instances_in_region(region))
        .await
        .expect("instances")
}

async fn wait_leader(scaler: &Scaler) {
    eventually("leadership", PATIENCE, || async {
        scaler.is_leader().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_fills_from_empty_follows_load_and_shrinks_when_it_leaves() {
    let name = "us-east-2";
    let db = common::db();
    let region = region(&db, name, 4).await;
    let _agents = HostAgents::start(db.clone(), name.to_owned());
    let scaler = Scaler::scaling(issuer().await, &[name], &unique("lease"), "solo").await;
    wait_leader(&scaler).await;

    // Empty region, target 4, two sessions per host: one launch of two hosts.
    eventually("two ACTIVE hosts", PATIENCE, || async {
        let rows = instances(&db, name).await;
        (rows.len() == 2 && rows.iter().all(|i| i.status == InstanceStatus::Active)).then_some(())
    })
    .await;
    let cloud = cloud_hosts(name).await;
    assert_eq!(cloud.len(), 2, "one EC2 machine per row: {cloud:?}");
    assert!(
        cloud
            .iter()
            .all(|h| h.image_id == region.image_id && h.tags.contains_key("whist:region"))
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        instances(&db, name).await.len(),
        2,
        "the buffer is full: no more launches"
    );

    // Three sessions start: free capacity 1 < 4, so ceil(3 / 2) = 2 more hosts.
    let hosts: Vec<String> = instances(&db, name)
        .await
        .into_iter()
        .map(|i| i.id)
        .collect();
    let mut claimed = Vec::new();
    for host in &hosts {
        for mandelbox in common::boxes_on(&db, host).await {
            if claimed.len() < 3 {
                db.claim_mandelbox(mandelbox.id, &unique("user"), "1")
                    .await
                    .expect("claim");
                claimed.push(mandelbox.id);
            }
        }
    }
    eventually("four ACTIVE hosts", PATIENCE, || async {
        let rows = instances(&db, name).await;
        (rows.len() == 4 && rows.iter().all(|i| i.status == InstanceStatus::Active)).then_some(())
    })
    .await;

    // The sessions end: free 8 > 4 + 2, so idle hosts drain until one more would cross it.
    for id in claimed {
        db.execute(&ops::delete_mandelbox(id))
            .await
            .expect("end session");
    }
    eventually(
        "the surplus host drained and terminated",
        PATIENCE,
        || async {
            let rows = instances(&db, name).await;
            (rows.len() == 3 && rows.iter().all(|i| i.status == InstanceStatus::Active))
                .then_some(())
        },
    )
    .await;
    eventually("its machine terminated", PATIENCE, || async {
        (cloud_hosts(name).await.len() == 3).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_heartbeat_stops_is_reaped_and_replaced() {
    let name = "us-west-1";
    let db = common::db();
    region(&db, name, 2).await;
    let agents = HostAgents::start(db.clone(), name.to_owned());
    let scaler = Scaler::scaling(issuer().await, &[name], &unique("lease"), "solo").await;
    wait_leader(&scaler).await;
    let first = eventually("one ACTIVE host", PATIENCE, || async {
        let rows = instances(&db, name).await;
        (rows.len() == 1 && rows[0].status == InstanceStatus::Active).then(|| rows[0].id.clone())
    })
    .await;

    agents.frozen.lock().expect("lock").push(first.clone());
    eventually("the dead host replaced", PATIENCE, || async {
        let rows = instances(&db, name).await;
        (rows.len() == 1 && rows[0].id != first && rows[0].status == InstanceStatus::Active)
            .then_some(())
    })
    .await;
    let cloud = cloud_hosts(name).await;
    assert!(
        !cloud.iter().any(|h| h.id == first),
        "the dead machine is terminated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_upgrade_is_shielded_then_swapped_and_survives_a_restart() {
    let name = "eu-west-1";
    let db = common::db();
    let region = region(&db, name, 2).await;
    let _agents = HostAgents::start(db.clone(), name.to_owned());
    let mut scaler = Scaler::scaling(issuer().await, &[name], &unique("lease"), "first").await;
    wait_leader(&scaler).await;
    let old_host = eventually("the old image's host", PATIENCE, || async {
        let rows = instances(&db, name).await;
        (rows.len() == 1 && rows[0].status == InstanceStatus::Active).then(|| rows[0].id.clone())
    })
    .await;

    let new_image = unique("ami-new");
    let new_sha = unique("sha-new");
    db.execute(&ops::request_upgrade(
        "AWS",
        name,
        &new_image,
        &new_sha,
        Utc::now() + chrono::Duration::minutes(10),
    ))
    .await
    .expect("request")
    .expect("inserted");
    eventually("the shielded buffer ACTIVE", PATIENCE, || async {
        let rows = instances(&db, name).await;
        rows.iter()
            .any(|i| i.image_id == new_image && i.status == InstanceStatus::Active)
            .then_some(())
    })
    .await;

    // A restart mid-upgrade neither loses the shield nor launches the buffer again.
    scaler.stop().await;
    scaler.extra_args.push("--replica-id".into());
    scaler.extra_args.push("second".into());
    scaler.launch().await;
    wait_leader(&scaler).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows = instances(&db, name).await;
    assert_eq!(
        rows.iter().filter(|i| i.image_id == new_image).count(),
        1,
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|i| i.id == old_host),
        "the old host stays until the swap"
    );
    let upgrade = db
        .execute(&ops::upgrades_in_progress())
        .await
        .expect("upgrades")
        .into_iter()
        .find(|u| u.region == name)
        .expect("in progress");
    assert_eq!(upgrade.status, UpgradeStatus::Shielded);

    // The client for the new commit is published: the region swaps and the old host drains.
    db.execute(&ops::set_desktop_app_commit(Environment::Dev, &new_sha))
        .await
        .expect("publish");
    eventually("the swap and the old host gone", PATIENCE, || async {
        let image = db.execute(&ops::image("AWS", name)).await.ok().flatten()?;
        let rows = instances(&db, name).await;
        (image.image_id == new_image && !rows.iter().any(|i| i.id == old_host)).then_some(())
    })
    .await;
    assert_ne!(region.image_id, new_image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_whose_hosts_never_boot_is_rolled_back() {
    let name = "eu-central-1";
    let db = common::db();
    let region = region(&db, name, 2).await;
    let agents = HostAgents::start(db.clone(), name.to_owned());
    let scaler = Scaler::scaling(issuer().await, &[name], &unique("lease"), "solo").await;
    wait_leader(&scaler).await;
    eventually("the current image's host", PATIENCE, || async {
        let rows = instances(&db, name).await;
        (rows.len() == 1 && rows[0].status == InstanceStatus::Active).then_some(())
    })
    .await;

    let broken = unique("ami-broken");
    agents.never_boot.lock().expect("lock").push(broken.clone());
    db.execute(&ops::request_upgrade(
        "AWS",
        name,
        &broken,
        &unique("sha"),
        Utc::now() + chrono::Duration::seconds(4),
    ))
    .await
    .expect("request");
    eventually("the rollback", PATIENCE, || async {
        let rows = instances(&db, name).await;
        let in_progress = db.execute(&ops::upgrades_in_progress()).await.ok()?;
        (!rows.iter().any(|i| i.image_id == broken)
            && !in_progress.iter().any(|u| u.region == name))
        .then_some(())
    })
    .await;
    let image = db
        .execute(&ops::image("AWS", name))
        .await
        .expect("image")
        .expect("row");
    assert_eq!(image.image_id, region.image_id, "the old image is kept");
    assert!(!cloud_hosts(name).await.iter().any(|h| h.image_id == broken));
    let metrics = reqwest::get(scaler.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("outcome=\"rolled_back\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_fail_over() {
    let name = "ap-southeast-1";
    let db = common::db();
    region(&db, name, 2).await;
    let _agents = HostAgents::start(db.clone(), name.to_owned());
    let lease = unique("lease");
    let issuer = issuer().await;
    let mut a = Scaler::scaling(issuer.clone(), &[name], &lease, "replica-a").await;
    let b = Scaler::scaling(issuer, &[name], &lease, "replica-b").await;
    eventually("one leader", PATIENCE, || async {
        (a.is_leader() ^ b.is_leader()).then_some(())
    })
    .await;
    eventually("one host for the region", PATIENCE, || async {
        (instances(&db, name).await.len() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cloud_hosts(name).await.len(), 1, "only the leader launched");
    assert!(a.is_leader() ^ b.is_leader());

    // Both serve the API regardless.
    for scaler in [&a, &b] {
        let status = reqwest::get(scaler.url("/healthz"))
            .await
            .expect("health")
            .status();
        assert_eq!(status, 200);
    }

    let a_led = a.is_leader();
    if a_led {
        a.stop().await;
        eventually("b takes over", PATIENCE, || async {
            b.is_leader().then_some(())
        })
        .await;
    } else {
        drop(b);
        eventually("a takes over", PATIENCE, || async {
            a.is_leader().then_some(())
        })
        .await;
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_launched_outside_the_database_is_recorded_and_a_vanished_one_forgotten() {
    use scaling_service::hosts::{HostHandler, LaunchRequest};
    let name = "us-west-2";
    let db = common::db();
    let region = region(&db, name, 0).await;
    let scaler = Scaler::scaling(issuer().await, &[name], &unique("lease"), "solo").await;
    wait_leader(&scaler).await;

    // A machine of our fleet whose row was never written (a crash between launch and insert).
    let ec2 = common::ec2();
    let launched = ec2
        .launch(&LaunchRequest {
            region: name.to_owned(),
            image_id: region.image_id.clone(),
            instance_type: common::INSTANCE_TYPE.to_owned(),
            count: 1,
            client_token: unique("token"),
            user_data: "#!/bin/sh\n".to_owned(),
            tags: [
                (
                    scaling_service::executor::tags::FLEET.to_owned(),
                    "whist-dev".to_owned(),
                ),
                (
                    scaling_service::executor::tags::CLIENT_SHA.to_owned(),
                    region.client_sha.clone(),
                ),
            ]
            .into(),
        })
        .await
        .expect("launch");
    let id = launched[0].id.clone();
    eventually(
        "the unrecorded machine to get its row",
        PATIENCE,
        || async {
            instances(&db, name)
                .await
                .iter()
                .any(|i| i.id == id && i.status == InstanceStatus::PreConnection)
                .then_some(())
        },
    )
    .await;

    // A row whose machine is gone (terminated behind the fleet's back) is deleted.
    ec2.terminate(name, std::slice::from_ref(&id))
        .await
        .expect("terminate");
    eventually("the vanished machine's row to go", PATIENCE, || async {
        (!instances(&db, name).await.iter().any(|i| i.id == id)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_buffer_for_this_hour_drives_a_launch() {
    use chrono::{Datelike, Timelike};
    let name = "me-south-1";
    let db = common::db();
    let _region = region(&db, name, 0).await;
    db.execute(&ops::set_region_schedule(name, &[]))
        .await
        .expect("no schedule yet");
    let _agents = HostAgents::start(db.clone(), name.to_owned());
    let scaler = Scaler::scaling(issuer().await, &[name], &unique("lease"), "solo").await;
    wait_leader(&scaler).await;
    let target = format!("whist_scaling_region_target_free{{region=\"{name}\"}}");
    eventually("a decision with the default target", PATIENCE, || async {
        scaler.metric_present(&target).await.then_some(())
    })
    .await;
    assert_eq!(scaler.metric(&target).await, 0.0);
    assert!(instances(&db, name).await.is_empty(), "target 0: nothing");

    // This hour and the next (the hour may turn during the test) want two free sessions.
    let now = Utc::now();
    let cells: Vec<whist_types::ScheduledBuffer> = [now, now + chrono::Duration::hours(1)]
        .iter()
        .map(|time| whist_types::ScheduledBuffer {
            region: name.to_owned(),
            weekday: i16::try_from(time.weekday().number_from_monday()).expect("1-7"),
            hour: i16::try_from(time.hour()).expect("0-23"),
            desired_free_mandelboxes: 2,
        })
        .collect();
    db.execute(&ops::set_region_schedule(name, &cells))
        .await
        .expect("schedule");
    eventually(
        "one ACTIVE host for the scheduled buffer",
        PATIENCE,
        || async {
            let rows = instances(&db, name).await;
            (rows.len() == 1 && rows[0].status == InstanceStatus::Active).then_some(())
        },
    )
    .await;
    assert_eq!(scaler.metric(&target).await, 2.0);
    assert_eq!(cloud_hosts(name).await.len(), 1);
    db.execute(&ops::set_region_schedule(name, &[]))
        .await
        .expect("clear the schedule");
}
