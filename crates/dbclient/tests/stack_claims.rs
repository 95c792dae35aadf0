//! The assignment invariants under concurrency, against the real database: no mandelbox is
//! claimed twice, capacity is never lost or double-counted, and the per-user limit holds.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use common::{active_fleet, client, unique};
use tokio::sync::Barrier;
use whist_dbclient::{ClaimOutcome, HasuraClient, ops};
use whist_types::MandelboxId;

/// Fires all claims at once (behind a barrier) and returns their outcomes.
async fn claim_concurrently(
    client: &HasuraClient,
    claims: Vec<(MandelboxId, String)>,
) -> Vec<ClaimOutcome> {
    let barrier = Arc::new(Barrier::new(claims.len()));
    let tasks: Vec<_> = claims
        .into_iter()
        .enumerate()
        .map(|(n, (mandelbox, user))| {
            let client = client.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                client
                    .claim_mandelbox(mandelbox, &user, &n.to_string())
                    .await
                    .expect("the engine answers")
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("claim task"));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_claims_on_fifty_boxes_give_exactly_fifty_sessions() {
    let client = client();
    let region = unique("region");
    let (instances, boxes) = active_fleet(&client, &region, 10, 5).await;

    // Four claimants per box, each a different user, in shuffled order.
    let mut claims: Vec<_> = (0..200)
        .map(|n| (boxes[n % boxes.len()], unique("user")))
        .collect();
    fastrand::shuffle(&mut claims);
    let outcomes = claim_concurrently(&client, claims).await;

    let won: Vec<_> = outcomes
        .iter()
        .filter_map(|outcome| match outcome {
            ClaimOutcome::Claimed(mandelbox) => Some(mandelbox),
            _ => None,
        })
        .collect();
    assert_eq!(won.len(), 50, "every box claimed exactly once");
    let distinct: HashSet<_> = won.iter().map(|mandelbox| mandelbox.id).collect();
    assert_eq!(distinct.len(), 50, "no box claimed twice");
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, ClaimOutcome::Claimed(_) | ClaimOutcome::NotWaiting)),
        "losers lose the race, nothing else: {outcomes:?}"
    );

    // The database agrees: every box is ALLOCATED to the user whose claim won it, and each
    // instance's remaining capacity is its true free count (capacity minus assigned boxes).
    let winners: HashMap<_, _> = won
        .iter()
        .map(|mandelbox| (mandelbox.id, mandelbox.user_id.clone()))
        .collect();
    for instance in &instances {
        let row = client
            .execute(&ops::instances::instance_with_mandelboxes(instance))
            .await
            .expect("read")
            .expect("exists");
        let assigned = row
            .mandelboxes
            .iter()
            .filter(|mandelbox| mandelbox.user_id.is_some())
            .count();
        assert_eq!(
            row.instance.remaining_capacity,
            5 - i32::try_from(assigned).expect("small")
        );
        assert_eq!(row.instance.remaining_capacity, 0);
        for mandelbox in &row.mandelboxes {
            assert_eq!(winners.get(&mandelbox.id), Some(&mandelbox.user_id));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_racing_twenty_claims_gets_exactly_the_limit() {
    let client = client();
    let limit = client
        .execute(&ops::config::fleet_settings())
        .await
        .expect("read")
        .expect("settings row")
        .mandelbox_limit_per_user;
    assert_eq!(limit, 3, "the shared stack runs with the default limit");
    let (instances, boxes) = active_fleet(&client, &unique("region"), 4, 5).await;
    let user = unique("user");

    let claims = boxes
        .iter()
        .take(20)
        .map(|mandelbox| (*mandelbox, user.clone()))
        .collect();
    let outcomes = claim_concurrently(&client, claims).await;

    let won = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, ClaimOutcome::Claimed(_)))
        .count();
    let refused = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, ClaimOutcome::UserAtLimit { .. }))
        .count();
    assert_eq!(won, 3, "{outcomes:?}");
    assert_eq!(refused, 17);
    let held = client
        .execute(&ops::mandelboxes::mandelboxes_of_user(&user))
        .await
        .expect("read");
    assert_eq!(held.len(), 3);

    // Capacity taken equals sessions held: refused claims rolled back whole.
    let mut taken = 0;
    for instance in &instances {
        let row = client
            .execute(&ops::instances::instance_by_id(instance))
            .await
            .expect("read")
            .expect("row");
        taken += 5 - row.remaining_capacity;
    }
    assert_eq!(taken, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_racing_a_drain_never_leave_a_session_on_a_draining_host() {
    let client = client();
    for _ in 0..10 {
        let (instances, boxes) = active_fleet(&client, &unique("region"), 1, 3).await;
        let instance = instances[0].clone();
        let drain = {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .execute(&ops::instances::drain_idle_instance(
                        &instance,
                        3,
                        common::FLEET,
                    ))
                    .await
            })
        };
        let claims = claim_concurrently(
            &client,
            boxes.iter().map(|id| (*id, unique("user"))).collect(),
        )
        .await;
        let drained = drain.await.expect("drain task").expect("drain answered");
        let claimed = claims
            .iter()
            .filter(|outcome| matches!(outcome, ClaimOutcome::Claimed(_)))
            .count();
        // Either the drain won (no session anywhere) or a claim did (the drain matched nothing).
        match drained {
            Some(_) => assert_eq!(claimed, 0, "{claims:?}"),
            None => assert!(claimed > 0),
        }
        let row = client
            .execute(&ops::instances::instance_by_id(&instances[0]))
            .await
            .expect("read")
            .expect("row");
        assert_eq!(
            row.remaining_capacity,
            3 - i32::try_from(claimed).expect("small")
        );
    }
}
