//! What the database must do for the operations the fake serves, as cases any engine can be run
//! through: the stack's engine (`tests/stack_fake_conformance.rs`) and [`super::FakeDatabase`]
//! in memory. A fake that passes them answers like the engine wherever the agent and the
//! executor rely on it: the conditions of conditional writes, the capacity a box's user holds,
//! the assignment trigger's refusals, the uniqueness and foreign keys, the fence, the lease.
//!
//! Each case writes rows under ids of its own, so cases sharing one database never meet.

use whist_types::{
    InstanceStatus, Mandelbox, MandelboxId, MandelboxStatus, NewInstance, NewMandelbox,
};

use crate::{ClaimOutcome, DbError, Fence, HasuraClient, ops};

/// The fleet the cases' rows belong to.
pub const FLEET: &str = "whist-conformance";
/// `g4dn.12xlarge` holds 12 sessions; the rows say so.
const INSTANCE_TYPE: &str = "g4dn.12xlarge";

/// Runs every case.
pub async fn all(db: &HasuraClient) {
    conditional_transitions_change_only_matching_rows(db).await;
    a_user_holds_capacity_from_claim_to_delete(db).await;
    claims_are_refused_with_the_triggers_reasons(db).await;
    duplicate_and_dangling_rows_are_constraint_violations(db).await;
    conditional_deletes_and_reads_with_relationships(db).await;
    instance_writes_keep_to_their_conditions(db).await;
    fenced_writes_land_only_for_the_lease_holder(db).await;
    a_lapsed_lease_renewed_is_a_new_term(db).await;
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn instance(db: &HasuraClient, capacity: i32, status: InstanceStatus) -> String {
    let id = unique("i");
    let row = NewInstance {
        id: id.clone(),
        provider: "AWS".to_owned(),
        region: unique("region"),
        image_id: "ami-conformance".to_owned(),
        client_sha: "sha".to_owned(),
        instance_type: INSTANCE_TYPE.to_owned(),
        remaining_capacity: capacity,
        status,
        fleet: Some(FLEET.to_owned()),
    };
    let inserted = db
        .execute(&ops::insert_instances(&[row]))
        .await
        .expect("insert instance");
    assert_eq!(inserted, 1);
    id
}

async fn zygote(db: &HasuraClient, instance: &str) -> MandelboxId {
    let id = MandelboxId::new_random();
    db.execute(&ops::insert_mandelboxes(&[NewMandelbox::waiting(
        id, "CHROME", instance,
    )]))
    .await
    .expect("insert mandelbox");
    id
}

async fn remaining(db: &HasuraClient, instance: &str) -> i32 {
    db.execute(&ops::instance_by_id(instance))
        .await
        .expect("read instance")
        .expect("instance exists")
        .remaining_capacity
}

async fn claimed(db: &HasuraClient, id: MandelboxId, user: &str) -> Mandelbox {
    match db.claim_mandelbox(id, user, "1").await.expect("claim") {
        ClaimOutcome::Claimed(row) => row,
        other => panic!("claim refused: {other:?}"),
    }
}

pub async fn conditional_transitions_change_only_matching_rows(db: &HasuraClient) {
    let host = instance(db, 2, InstanceStatus::Active).await;
    let id = zygote(db, &host).await;
    let from_allocated = ops::transition_mandelbox(
        id,
        &host,
        &[MandelboxStatus::Allocated],
        MandelboxStatus::Connecting,
    );
    assert_eq!(db.execute(&from_allocated).await.expect("answer"), None);
    let elsewhere = ops::transition_mandelbox(
        id,
        "i-of-another-host",
        &[MandelboxStatus::Waiting],
        MandelboxStatus::Dying,
    );
    assert_eq!(db.execute(&elsewhere).await.expect("answer"), None);

    let row = claimed(db, id, &unique("user")).await;
    assert_eq!(row.status, MandelboxStatus::Allocated);
    let moved = db
        .execute(&from_allocated)
        .await
        .expect("answer")
        .expect("matched");
    assert_eq!(moved.status, MandelboxStatus::Connecting);
    assert_eq!(moved.user_id, row.user_id, "the user stays");
    assert!(moved.updated_at >= row.updated_at, "stamped on the change");
    let read = db
        .execute(&ops::mandelbox_by_id(id))
        .await
        .expect("read")
        .expect("row");
    assert_eq!(read, moved);
}

pub async fn a_user_holds_capacity_from_claim_to_delete(db: &HasuraClient) {
    let host = instance(db, 2, InstanceStatus::Active).await;
    let waiting = zygote(db, &host).await;
    let session = zygote(db, &host).await;
    assert_eq!(remaining(db, &host).await, 2, "zygotes hold nothing");
    claimed(db, session, &unique("user")).await;
    assert_eq!(remaining(db, &host).await, 1);
    // Through every state while the row has its user, down to DYING.
    for to in [
        MandelboxStatus::Connecting,
        MandelboxStatus::Running,
        MandelboxStatus::Dying,
    ] {
        db.execute(&ops::transition_mandelbox(
            session,
            &host,
            &[
                MandelboxStatus::Allocated,
                MandelboxStatus::Connecting,
                MandelboxStatus::Running,
            ],
            to,
        ))
        .await
        .expect("transition")
        .expect("matched");
        assert_eq!(remaining(db, &host).await, 1, "held while {to}");
    }
    let deleted = db
        .execute(&ops::delete_mandelbox(session))
        .await
        .expect("delete")
        .expect("row");
    assert_eq!(deleted.id, session);
    assert_eq!(remaining(db, &host).await, 2, "given back with the row");
    db.execute(&ops::delete_mandelbox(waiting))
        .await
        .expect("delete");
    assert_eq!(remaining(db, &host).await, 2, "a zygote gives nothing back");
    assert_eq!(
        db.execute(&ops::delete_mandelbox(waiting))
            .await
            .expect("delete"),
        None,
        "deleting twice finds nothing"
    );
}

pub async fn claims_are_refused_with_the_triggers_reasons(db: &HasuraClient) {
    let full = instance(db, 0, InstanceStatus::Active).await;
    let id = zygote(db, &full).await;
    let outcome = db
        .claim_mandelbox(id, &unique("user"), "1")
        .await
        .expect("answer");
    assert!(
        matches!(outcome, ClaimOutcome::InstanceFull { .. }),
        "{outcome:?}"
    );
    let draining = instance(db, 2, InstanceStatus::Draining).await;
    let id = zygote(db, &draining).await;
    let outcome = db
        .claim_mandelbox(id, &unique("user"), "1")
        .await
        .expect("answer");
    assert!(
        matches!(outcome, ClaimOutcome::InstanceNotAccepting { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        db.execute(&ops::mandelbox_by_id(id))
            .await
            .expect("read")
            .expect("row")
            .status,
        MandelboxStatus::Waiting,
        "a refused claim changes nothing"
    );
    let host = instance(db, 2, InstanceStatus::Active).await;
    let id = zygote(db, &host).await;
    claimed(db, id, &unique("user")).await;
    assert_eq!(
        db.claim_mandelbox(id, &unique("user"), "2")
            .await
            .expect("answer"),
        ClaimOutcome::NotWaiting
    );
}

pub async fn duplicate_and_dangling_rows_are_constraint_violations(db: &HasuraClient) {
    let host = instance(db, 1, InstanceStatus::Active).await;
    let id = zygote(db, &host).await;
    let again = db
        .execute(&ops::insert_mandelboxes(&[NewMandelbox::waiting(
            id, "CHROME", &host,
        )]))
        .await;
    assert!(
        matches!(again, Err(DbError::ConstraintViolation { .. })),
        "{again:?}"
    );
    let dangling = db
        .execute(&ops::insert_mandelboxes(&[NewMandelbox::waiting(
            MandelboxId::new_random(),
            "CHROME",
            unique("i-never-recorded"),
        )]))
        .await;
    assert!(
        matches!(dangling, Err(DbError::ConstraintViolation { .. })),
        "{dangling:?}"
    );
    // All rows of a refused insert or none.
    let fresh = MandelboxId::new_random();
    let mixed = db
        .execute(&ops::insert_mandelboxes(&[
            NewMandelbox::waiting(fresh, "CHROME", &host),
            NewMandelbox::waiting(id, "CHROME", &host),
        ]))
        .await;
    assert!(mixed.is_err());
    assert_eq!(
        db.execute(&ops::mandelbox_by_id(fresh))
            .await
            .expect("read"),
        None
    );
}

pub async fn conditional_deletes_and_reads_with_relationships(db: &HasuraClient) {
    let host = instance(db, 2, InstanceStatus::Active).await;
    let waiting = zygote(db, &host).await;
    let session = zygote(db, &host).await;
    claimed(db, session, &unique("user")).await;
    let only_waiting = [MandelboxStatus::Waiting];
    assert_eq!(
        db.execute(&ops::delete_mandelbox_in(session, &only_waiting))
            .await
            .expect("answer"),
        None,
        "a claim that won keeps its row"
    );
    let with_boxes = db
        .execute(&ops::instance_with_mandelboxes(&host))
        .await
        .expect("read")
        .expect("instance");
    assert_eq!(with_boxes.mandelboxes.len(), 2);
    assert_eq!(with_boxes.instance.remaining_capacity, 1);
    let on_host = db
        .execute(&ops::mandelboxes_on_instance(&host))
        .await
        .expect("read");
    assert_eq!(on_host.len(), 2);
    let with_instance = db
        .execute(&ops::mandelbox_with_instance(session))
        .await
        .expect("read")
        .expect("row");
    assert_eq!(with_instance.instance.id, host);
    assert_eq!(
        db.execute(&ops::mandelbox_with_instance(MandelboxId::new_random()))
            .await
            .expect("read"),
        None
    );
    assert!(
        db.execute(&ops::delete_mandelbox_in(waiting, &only_waiting))
            .await
            .expect("answer")
            .is_some()
    );
    assert!(
        db.execute(&ops::delete_instance_and_mandelboxes(&host))
            .await
            .expect("delete")
    );
    assert_eq!(
        db.execute(&ops::mandelbox_by_id(session))
            .await
            .expect("read"),
        None,
        "the instance's boxes went with it"
    );
    assert!(
        !db.execute(&ops::delete_instance_and_mandelboxes(&host))
            .await
            .expect("delete"),
        "nothing left the second time"
    );
}

pub async fn instance_writes_keep_to_their_conditions(db: &HasuraClient) {
    let capacity = whist_types::capacity_of(INSTANCE_TYPE);
    let busy = instance(db, 2, InstanceStatus::Active).await;
    let idle = instance(db, capacity as i32, InstanceStatus::Active).await;
    assert_eq!(
        db.execute(&ops::drain_idle_instance(&busy, capacity, FLEET))
            .await
            .expect("answer"),
        None,
        "not idle"
    );
    assert_eq!(
        db.execute(&ops::drain_idle_instance(&idle, capacity, "whist-other"))
            .await
            .expect("answer"),
        None,
        "another fleet's"
    );
    let drained = db
        .execute(&ops::drain_idle_instance(&idle, capacity, FLEET))
        .await
        .expect("answer")
        .expect("drained");
    assert_eq!(drained.status, InstanceStatus::Draining);
    let again = db
        .execute(&ops::transition_instance(
            &idle,
            &[InstanceStatus::PreConnection, InstanceStatus::Active],
            InstanceStatus::Draining,
        ))
        .await
        .expect("answer");
    assert_eq!(again, None, "already DRAINING");
    assert!(db.execute(&ops::heartbeat(&busy)).await.expect("heartbeat"));
    assert!(
        !db.execute(&ops::heartbeat(&unique("i-gone")))
            .await
            .expect("heartbeat")
    );
    assert!(
        !db.execute(&ops::delete_fleet_instance(&busy, "whist-other"))
            .await
            .expect("answer"),
        "never another fleet's row"
    );
    assert!(
        db.execute(&ops::delete_fleet_instance(&busy, FLEET))
            .await
            .expect("answer")
    );
    assert_eq!(
        db.execute(&ops::instance_by_id(&busy)).await.expect("read"),
        None
    );
}

pub async fn fenced_writes_land_only_for_the_lease_holder(db: &HasuraClient) {
    let name = unique("lease");
    db.execute(&ops::create_lease(&name)).await.expect("create");
    let created_again = db.execute(&ops::create_lease(&name)).await;
    assert!(matches!(
        created_again,
        Err(DbError::ConstraintViolation { .. })
    ));
    let lease = db
        .execute(&ops::acquire_lease(&name, "replica-a", 60))
        .await
        .expect("answer")
        .expect("a free lease is taken");
    assert_eq!(
        db.execute(&ops::acquire_lease(&name, "replica-b", 60))
            .await
            .expect("answer"),
        None,
        "a live lease of another holder stays"
    );
    let renewed = db
        .execute(&ops::acquire_lease(&name, "replica-a", 60))
        .await
        .expect("answer")
        .expect("renewed");
    assert_eq!(
        renewed.generation, lease.generation,
        "a renewal keeps the term"
    );
    let fence = Fence {
        lease: name.clone(),
        holder: "replica-a".to_owned(),
        generation: lease.generation,
    };
    db.execute(&ops::lease_check(&fence)).await.expect("holds");
    let host = instance(db, 1, InstanceStatus::Active).await;
    assert!(
        db.execute(&ops::heartbeat(&host).fenced(&fence))
            .await
            .expect("a fenced write of the holder lands")
    );

    let stale = Fence {
        generation: lease.generation - 1,
        ..fence.clone()
    };
    let refused = db
        .execute(&ops::delete_fleet_instance(&host, FLEET).fenced(&stale))
        .await;
    assert!(
        matches!(refused, Err(DbError::Fenced { .. })),
        "{refused:?}"
    );
    assert!(
        db.execute(&ops::instance_by_id(&host))
            .await
            .expect("read")
            .is_some(),
        "nothing of a refused write lands"
    );

    db.execute(&ops::release_lease(&name, "replica-a"))
        .await
        .expect("answer")
        .expect("released");
    let refused = db.execute(&ops::lease_check(&fence)).await;
    assert!(
        matches!(refused, Err(DbError::Fenced { .. })),
        "{refused:?}"
    );
    let next = db
        .execute(&ops::acquire_lease(&name, "replica-b", 60))
        .await
        .expect("answer")
        .expect("a released lease is free");
    assert_eq!(
        next.generation,
        lease.generation + 1,
        "a new holder, a new term"
    );
}

pub async fn a_lapsed_lease_renewed_is_a_new_term(db: &HasuraClient) {
    let name = unique("lease");
    db.execute(&ops::create_lease(&name)).await.expect("create");
    let first = db
        .execute(&ops::acquire_lease(&name, "replica-a", 1))
        .await
        .expect("answer")
        .expect("taken");
    let fence = Fence {
        lease: name.clone(),
        holder: "replica-a".to_owned(),
        generation: first.generation,
    };
    // Past the one-second lease on the database's clock.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let refused = db.execute(&ops::lease_check(&fence)).await;
    assert!(
        matches!(refused, Err(DbError::Fenced { .. })),
        "{refused:?}"
    );
    let renewed = db
        .execute(&ops::acquire_lease(&name, "replica-a", 60))
        .await
        .expect("answer")
        .expect("a lapsed lease is free, to its old holder too");
    assert_eq!(
        renewed.generation,
        first.generation + 1,
        "writes of the lapsed term must not land in the new one"
    );
    let stale = db.execute(&ops::lease_check(&fence)).await;
    assert!(matches!(stale, Err(DbError::Fenced { .. })), "{stale:?}");
}
