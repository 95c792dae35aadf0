//! Live queries against the real engine: writes are seen, an engine restart is survived, and
//! what changed while disconnected arrives in the first diff after reconnecting.

mod common;

use std::time::Duration;

use common::{client, fast_live_options, new_instance, unique};
use whist_dbclient::{
    ConnectionState, HasuraClient, HasuraConfig, Snapshot, Subscription, live, ops,
};
use whist_types::{
    Instance, InstanceStatus, Mandelbox, MandelboxId, MandelboxStatus, NewMandelbox,
};

const PATIENCE: Duration = Duration::from_secs(15);

/// Waits for the first snapshot that satisfies `done`.
async fn wait_for<T>(
    subscription: &mut Subscription<T>,
    done: impl Fn(&Snapshot<T>) -> bool,
) -> Snapshot<T>
where
    T: whist_dbclient::Keyed + Clone + PartialEq + Send + Sync + 'static,
{
    tokio::time::timeout(PATIENCE, async {
        loop {
            let snapshot = subscription.next().await.expect("subscription running");
            if done(&snapshot) {
                return snapshot;
            }
        }
    })
    .await
    .expect("the expected snapshot arrived in time")
}

#[tokio::test]
async fn a_committed_write_is_seen_with_every_row_diffed() {
    let client = client();
    let instance = unique("i");
    client
        .execute(&ops::instances::insert_instances(&[new_instance(
            &instance,
            "r",
            3,
            InstanceStatus::Active,
        )]))
        .await
        .expect("insert");
    let mut boxes = client.subscribe_with(
        live::queries::mandelboxes_on_instance(&instance),
        fast_live_options(),
    );
    let first = wait_for(&mut boxes, |_| true).await;
    assert!(first.after_connect && first.rows.is_empty());

    // Three rows at once: the diff reports all of them, not just the first.
    let ids: Vec<_> = (0..3).map(|_| MandelboxId::new_random()).collect();
    let rows: Vec<_> = ids
        .iter()
        .map(|id| NewMandelbox::waiting(*id, "CHROME", &instance))
        .collect();
    client
        .execute(&ops::mandelboxes::insert_mandelboxes(&rows))
        .await
        .expect("insert");
    let added = wait_for(&mut boxes, |snapshot| snapshot.rows.len() == 3).await;
    assert_eq!(added.added.len(), 3);
    assert!(!added.after_connect);

    client
        .claim_mandelbox(ids[1], &unique("user"), "1")
        .await
        .expect("claim");
    client
        .execute(&ops::mandelboxes::delete_mandelbox(ids[2]))
        .await
        .expect("delete");
    let changed = wait_for(&mut boxes, |snapshot| snapshot.rows.len() == 2).await;
    let allocated: Vec<&Mandelbox> = changed
        .rows
        .iter()
        .filter(|mandelbox| mandelbox.status == MandelboxStatus::Allocated)
        .collect();
    assert_eq!(allocated.len(), 1);
    assert_eq!(
        changed.removed.iter().map(|m| m.id).collect::<Vec<_>>(),
        [ids[2]]
    );
    assert!(
        changed.changed.iter().any(|m| m.id == ids[1])
            || changed.rows.iter().any(|m| m.id == ids[1])
    );
}

#[tokio::test]
async fn an_engine_restart_is_survived_and_missed_changes_arrive_in_the_first_diff() {
    let client = client();
    let stack = whist_test_support::shared();
    let log = std::env::temp_dir().join(format!("{}.log", unique("engine")));
    let mut engine = stack
        .start_private_engine(log.clone())
        .expect("a private engine starts");
    let mut config = HasuraConfig::new(
        engine.graphql_url().parse().expect("url"),
        Some(stack.admin_secret.clone()),
    );
    config.websocket_url = Some(engine.websocket_url().parse().expect("url"));
    let private = HasuraClient::new(config);

    let region = unique("region");
    let kept = unique("i");
    let doomed = unique("i");
    client
        .execute(&ops::instances::insert_instances(&[
            new_instance(&kept, &region, 2, InstanceStatus::PreConnection),
            new_instance(&doomed, &region, 2, InstanceStatus::PreConnection),
        ]))
        .await
        .expect("insert");

    let mut instances = private.subscribe_with(live::queries::instances(), fast_live_options());
    let mine =
        |snapshot: &Snapshot<Instance>| snapshot.rows.iter().filter(|i| i.region == region).count();
    wait_for(&mut instances, |snapshot| mine(snapshot) == 2).await;

    engine.stop();
    let mut state = instances.state_watch();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|state| matches!(state, ConnectionState::Waiting { .. })),
    )
    .await
    .expect("the subscription notices the engine is gone")
    .expect("state channel open");

    // Changes while nobody is listening: one added, one changed, one removed.
    let added = unique("i");
    client
        .execute(&ops::instances::insert_instances(&[new_instance(
            &added,
            &region,
            2,
            InstanceStatus::PreConnection,
        )]))
        .await
        .expect("insert");
    client
        .execute(&ops::instances::register_instance(
            &kept,
            "198.51.100.1",
            "sha",
            common::TEST_FINGERPRINT,
        ))
        .await
        .expect("register")
        .expect("registered");
    client
        .execute(&ops::instances::delete_instance(&doomed))
        .await
        .expect("delete");

    engine.restart().expect("the engine comes back");
    let first = wait_for(&mut instances, |snapshot| snapshot.after_connect).await;
    // Other tests share the database: look only at this test's region.
    let ours = |rows: &[Instance]| -> Vec<(String, InstanceStatus)> {
        rows.iter()
            .filter(|i| i.region == region)
            .map(|i| (i.id.clone(), i.status))
            .collect()
    };
    assert_eq!(
        ours(&first.added),
        [(added.clone(), InstanceStatus::PreConnection)]
    );
    assert_eq!(
        ours(&first.changed),
        [(kept.clone(), InstanceStatus::Active)]
    );
    assert_eq!(
        ours(&first.removed),
        [(doomed.clone(), InstanceStatus::PreConnection)]
    );
    assert_eq!(instances.state(), ConnectionState::Live);

    // And it keeps delivering after the reconnect.
    client
        .execute(&ops::instances::delete_instance(&added))
        .await
        .expect("delete");
    let later = wait_for(&mut instances, |snapshot| {
        snapshot.removed.iter().any(|i| i.id == added)
    })
    .await;
    assert!(!later.after_connect);
    drop(engine);
    let _ = std::fs::remove_file(log);
}

#[tokio::test]
async fn configuration_tables_are_live_too() {
    let client = client();
    let mut settings = client.subscribe_with(live::queries::fleet_settings(), fast_live_options());
    let first = wait_for(&mut settings, |_| true).await;
    assert_eq!(first.rows.len(), 1);
    let mut version =
        client.subscribe_with(live::queries::desktop_app_version(), fast_live_options());
    wait_for(&mut version, |snapshot| snapshot.rows.len() == 1).await;
    let hash = unique("commit");
    client
        .execute(&ops::config::set_desktop_app_commit(
            whist_types::Environment::Prod,
            &hash,
        ))
        .await
        .expect("publish");
    wait_for(&mut version, |snapshot| {
        snapshot.rows.iter().any(|row| row.prod_commit_hash == hash)
    })
    .await;
    let mut images = client.subscribe_with(live::queries::images(), fast_live_options());
    wait_for(&mut images, |_| true).await;
    let mut regions = client.subscribe_with(live::queries::region_configs(), fast_live_options());
    wait_for(&mut regions, |_| true).await;
    let mut all_boxes = client.subscribe_with(live::queries::mandelboxes(), fast_live_options());
    wait_for(&mut all_boxes, |_| true).await;
    let id = unique("i");
    let mut one = client.subscribe_with(live::queries::instance(&id), fast_live_options());
    wait_for(&mut one, |snapshot| snapshot.rows.is_empty()).await;
}
