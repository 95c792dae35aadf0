//! The database's part in keeping the fleet controller safe, against the real stack: leases on
//! the database clock with a fencing generation, heartbeats only the database stamps, claims
//! refused on a host whose heartbeat stopped, and deletions scoped to one fleet.

mod common;

use std::time::Duration;

use common::{FLEET, active_fleet, client, new_instance, unique};
use whist_dbclient::{ClaimOutcome, DbError, Fence, HasuraClient, ops};
use whist_types::{InstanceStatus, MandelboxId, NewMandelbox};

fn sql(statement: &str) -> String {
    whist_test_support::shared().sql(statement).expect("sql")
}

/// Makes a host's last heartbeat an hour old, as if it had stopped beating. Triggers are off
/// for this one session only (`session_replication_role`), so nobody else's writes are affected.
fn age_heartbeat(id: &str) {
    sql(&format!(
        "SET session_replication_role = replica; \
         UPDATE whist.instances SET heartbeat_at = now() - interval '1 hour' WHERE id = '{id}'"
    ));
}

async fn acquire(client: &HasuraClient, name: &str, holder: &str, seconds: u32) -> Option<i64> {
    client
        .execute(&ops::acquire_lease(name, holder, seconds))
        .await
        .expect("acquire")
        .map(|lease| {
            assert_eq!(lease.holder.as_deref(), Some(holder));
            lease.generation
        })
}

fn fence(name: &str, holder: &str, generation: i64) -> Fence {
    Fence {
        lease: name.to_owned(),
        holder: holder.to_owned(),
        generation,
    }
}

#[tokio::test]
async fn a_lease_has_one_holder_on_the_database_clock_and_a_new_generation_per_term() {
    let client = client();
    let name = unique("lease");
    client
        .execute(&ops::create_lease(&name))
        .await
        .expect("create");

    let first = acquire(&client, &name, "replica-a", 2).await.expect("free");
    let lease = client
        .execute(&ops::acquire_lease(&name, "replica-a", 2))
        .await
        .expect("renew")
        .expect("the holder renews");
    assert_eq!(lease.generation, first, "a renewal keeps the term");
    // The database's clock, not the writer's, sets the expiry.
    let length = lease.expires_at - lease.renewed_at;
    assert_eq!(length, chrono::Duration::seconds(2), "{lease:?}");
    assert_eq!(acquire(&client, &name, "replica-b", 2).await, None, "held");

    tokio::time::sleep(Duration::from_millis(2300)).await;
    let second = acquire(&client, &name, "replica-b", 30)
        .await
        .expect("expired: taken over");
    assert_eq!(second, first + 1);

    // A clean release frees it at once; the next holder starts a new term.
    let released = client
        .execute(&ops::release_lease(&name, "replica-b"))
        .await
        .expect("release")
        .expect("b held it");
    assert_eq!(released.holder, None);
    assert_eq!(
        client
            .execute(&ops::release_lease(&name, "replica-b"))
            .await
            .expect("release again"),
        None,
        "only the holder releases"
    );
    let third = acquire(&client, &name, "replica-a", 30)
        .await
        .expect("free");
    assert_eq!(third, second + 1);
}

#[tokio::test]
async fn an_old_generation_cannot_write() {
    let client = client();
    let name = unique("lease");
    client
        .execute(&ops::create_lease(&name))
        .await
        .expect("create");
    let old = acquire(&client, &name, "replica-a", 1).await.expect("free");
    let region = unique("region");
    let id = unique("i");
    let row = new_instance(&id, &region, 2, InstanceStatus::PreConnection);

    // While the term holds, its fenced writes land.
    client
        .execute(&ops::lease_check(&fence(&name, "replica-a", old)))
        .await
        .expect("the holder passes the fence");
    assert_eq!(
        client
            .execute(
                &ops::insert_instances(std::slice::from_ref(&row)).fenced(&fence(
                    &name,
                    "replica-a",
                    old
                ))
            )
            .await
            .expect("fenced insert"),
        1
    );

    // Expired, then taken over: the old term's writes are refused whole.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let expired = client
        .execute(&ops::delete_fleet_instance(&id, FLEET).fenced(&fence(&name, "replica-a", old)))
        .await;
    assert!(
        matches!(expired, Err(DbError::Fenced { .. })),
        "{expired:?}"
    );
    let new = acquire(&client, &name, "replica-b", 30)
        .await
        .expect("taken");
    for holder_generation in [("replica-a", old), ("replica-b", old), ("replica-a", new)] {
        let refused = client
            .execute(&ops::delete_fleet_instance(&id, FLEET).fenced(&fence(
                &name,
                holder_generation.0,
                holder_generation.1,
            )))
            .await;
        assert!(
            matches!(refused, Err(DbError::Fenced { .. })),
            "{holder_generation:?}: {refused:?}"
        );
    }
    assert!(
        client
            .execute(&ops::instance_by_id(&id))
            .await
            .expect("read")
            .is_some(),
        "nothing of a refused write landed"
    );
    assert!(
        client
            .execute(&ops::delete_fleet_instance(&id, FLEET).fenced(&fence(
                &name,
                "replica-b",
                new
            )))
            .await
            .expect("the new term writes")
    );
}

#[tokio::test]
async fn only_the_database_clock_stamps_heartbeats_and_claims_do_not() {
    let client = client();
    let region = unique("region");
    let (instances, boxes) = active_fleet(&client, &region, 1, 2).await;
    let id = &instances[0];
    // A writer that sends its own time (a skewed host clock) still gets the database's.
    sql(&format!(
        "UPDATE whist.instances SET heartbeat_at = now() + interval '1 day' WHERE id = '{id}'"
    ));
    let skewed = sql(&format!(
        "SELECT heartbeat_at <= now() FROM whist.instances WHERE id = '{id}'"
    ));
    assert_eq!(skewed, "t");

    let before = client
        .execute(&ops::instance_by_id(id))
        .await
        .expect("read")
        .expect("exists");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let claimed = client
        .claim_mandelbox(boxes[0], &unique("user"), "1")
        .await
        .expect("claim");
    assert!(matches!(claimed, ClaimOutcome::Claimed(_)));
    let after_claim = client
        .execute(&ops::instance_by_id(id))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(
        after_claim.heartbeat_at, before.heartbeat_at,
        "a claim is no heartbeat"
    );
    assert!(after_claim.updated_at > before.updated_at);

    assert!(client.execute(&ops::heartbeat(id)).await.expect("beat"));
    let beaten = client
        .execute(&ops::instance_by_id(id))
        .await
        .expect("read")
        .expect("exists");
    assert!(beaten.heartbeat_at > before.heartbeat_at);
}

#[tokio::test]
async fn a_host_whose_heartbeat_stopped_gets_no_claim() {
    let client = client();
    let region = unique("region");
    let (instances, boxes) = active_fleet(&client, &region, 1, 3).await;
    let id = &instances[0];
    // The setting is fleet-wide: this test ages the heartbeat instead of shortening the limit.
    age_heartbeat(id);
    let refused = client
        .claim_mandelbox(boxes[0], &unique("user"), "1")
        .await
        .expect("outcome");
    assert!(
        matches!(&refused, ClaimOutcome::InstanceNotAccepting { message } if message.contains("heartbeat")),
        "{refused:?}"
    );
    // Nothing moved: the box waits, the capacity is whole.
    let row = client
        .execute(&ops::instance_by_id(id))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(row.remaining_capacity, 3);

    // One heartbeat later the host takes sessions again.
    assert!(client.execute(&ops::heartbeat(id)).await.expect("beat"));
    let claimed = client
        .claim_mandelbox(boxes[1], &unique("user"), "1")
        .await
        .expect("claim");
    assert!(matches!(claimed, ClaimOutcome::Claimed(_)), "{claimed:?}");
}

#[tokio::test]
async fn the_scaler_deletes_and_drains_only_its_own_fleet() {
    let client = client();
    let region = unique("region");
    let mut ours = new_instance(&unique("i"), &region, 2, InstanceStatus::Active);
    ours.fleet = Some(FLEET.to_owned());
    let mut theirs = new_instance(&unique("i"), &region, 2, InstanceStatus::Active);
    theirs.fleet = Some("whist-prod".to_owned());
    let mut unclaimed = new_instance(&unique("i"), &region, 2, InstanceStatus::Active);
    unclaimed.fleet = None;
    let rows = [ours.clone(), theirs.clone(), unclaimed.clone()];
    client
        .execute(&ops::insert_instances(&rows))
        .await
        .expect("insert");
    let boxes: Vec<NewMandelbox> = rows
        .iter()
        .map(|row| NewMandelbox::waiting(MandelboxId::new_random(), "CHROME", &row.id))
        .collect();
    client
        .execute(&ops::insert_mandelboxes(&boxes))
        .await
        .expect("boxes");

    for other in [&theirs, &unclaimed] {
        assert_eq!(
            client
                .execute(&ops::drain_idle_instance(&other.id, 2, FLEET))
                .await
                .expect("drain"),
            None,
            "{:?}",
            other.fleet
        );
        assert!(
            !client
                .execute(&ops::delete_fleet_instance(&other.id, FLEET))
                .await
                .expect("delete"),
            "{:?}",
            other.fleet
        );
        let kept = client
            .execute(&ops::instance_with_mandelboxes(&other.id))
            .await
            .expect("read")
            .expect("kept");
        assert_eq!(kept.mandelboxes.len(), 1, "its boxes are kept too");
    }
    assert!(
        client
            .execute(&ops::delete_fleet_instance(&ours.id, FLEET))
            .await
            .expect("delete")
    );
}
