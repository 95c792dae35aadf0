//! The assign decided inside the database (`whist.assign_ledger`'s trigger), against the real
//! engine: the rules as a table of cases (region order, the fullest host, the commit rule, hosts
//! that cannot take a session), the true refusal and the invariants under concurrency, and the
//! ledger's bounded retention.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use common::{TEST_FINGERPRINT, client, new_instance, unique};
use tokio::sync::Barrier;
use whist_dbclient::HasuraClient;
use whist_dbclient::ops::{self, AssignAttempt, AssignDecision};
use whist_types::{InstanceStatus, MandelboxId, MandelboxStatus, NewMandelbox, RegionConfig};

/// A region with its image row.
struct Region {
    name: String,
    image_id: String,
}

impl Region {
    async fn create(db: &HasuraClient, enabled: bool, image_commit: &str) -> Self {
        let region = Self {
            name: unique("region"),
            image_id: unique("ami"),
        };
        db.execute(&ops::set_region_config(&RegionConfig {
            region: region.name.clone(),
            enabled,
            desired_free_mandelboxes: 0,
            instance_types: vec!["g4dn.2xlarge".into()],
            schedule_time_zone: "UTC".into(),
        }))
        .await
        .expect("region");
        db.execute(&ops::set_image(
            "AWS",
            &region.name,
            &region.image_id,
            image_commit,
        ))
        .await
        .expect("image");
        region
    }

    /// A registered host (ACTIVE, an address, a fresh heartbeat) running `commit` on `image`,
    /// with `boxes` WAITING boxes and as much capacity.
    async fn host(&self, db: &HasuraClient, image: &str, commit: &str, boxes: usize) -> String {
        let id = unique("i");
        let mut row = new_instance(&id, &self.name, boxes as i32, InstanceStatus::PreConnection);
        row.image_id = image.to_owned();
        row.client_sha = commit.to_owned();
        db.execute(&ops::insert_instances(&[row]))
            .await
            .expect("instance");
        db.execute(&ops::register_instance(
            &id,
            "10.1.2.3",
            commit,
            TEST_FINGERPRINT,
        ))
        .await
        .expect("register");
        let rows: Vec<_> = (0..boxes)
            .map(|_| NewMandelbox::waiting(MandelboxId::new_random(), "CHROME", &id))
            .collect();
        if !rows.is_empty() {
            db.execute(&ops::insert_mandelboxes(&rows))
                .await
                .expect("boxes");
        }
        id
    }
}

async fn attempt(
    db: &HasuraClient,
    user: &str,
    regions: &[&str],
    commit: &str,
    any_client_commit: bool,
) -> AssignDecision {
    db.execute(&ops::assign(&AssignAttempt {
        user_id: user,
        session_id: "1",
        regions,
        client_commit: commit,
        any_client_commit,
    }))
    .await
    .expect("the engine answers")
    .expect("the attempt is stored")
}

const SHA: &str = "sha0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_decide_as_the_service_did() {
    let db = client();
    let east = Region::create(&db, true, SHA).await;
    let west = Region::create(&db, true, SHA).await;
    let north = Region::create(&db, false, SHA).await;
    let fuller = east.host(&db, &east.image_id, SHA, 1).await;
    let emptier = east.host(&db, &east.image_id, SHA, 3).await;
    let _old_image = east.host(&db, "ami-old", SHA, 5).await;
    let in_west = west.host(&db, &west.image_id, SHA, 1).await;
    let _in_north = north.host(&db, &north.image_id, SHA, 1).await;
    let unknown = unique("nowhere");

    // (case, regions, client commit, any client commit, outcome, host)
    type Case<'a> = (
        &'a str,
        Vec<&'a str>,
        &'a str,
        bool,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        ("no region", vec![], SHA, false, "REGION_NOT_ENABLED", None),
        (
            "only disabled or unknown",
            vec![&north.name, &unknown],
            SHA,
            false,
            "REGION_NOT_ENABLED",
            None,
        ),
        (
            "the client's order, skipping the disabled one",
            vec![&north.name, &west.name, &east.name],
            SHA,
            false,
            "ASSIGNED",
            Some(&in_west),
        ),
        (
            "the fullest host on the region's image first",
            vec![&east.name],
            SHA,
            false,
            "ASSIGNED",
            Some(&fuller),
        ),
        (
            "then the next one (the old image's host never)",
            vec![&west.name, &east.name],
            SHA,
            false,
            "ASSIGNED",
            Some(&emptier),
        ),
        (
            "an abbreviated client commit is the same build",
            vec![&east.name],
            &SHA[..7],
            false,
            "ASSIGNED",
            Some(&emptier),
        ),
        (
            "another build",
            vec![&east.name],
            "sha9999",
            false,
            "COMMIT_HASH_MISMATCH",
            None,
        ),
        (
            "local_dev outside local",
            vec![&east.name],
            "local_dev",
            false,
            "COMMIT_HASH_MISMATCH",
            None,
        ),
        (
            "any build in local",
            vec![&east.name],
            "local_dev",
            true,
            "ASSIGNED",
            Some(&emptier),
        ),
        (
            "a full region",
            vec![&west.name, &east.name],
            SHA,
            false,
            "NO_INSTANCE_AVAILABLE",
            None,
        ),
    ];
    for (case, regions, commit, any, outcome, host) in cases {
        let decision = attempt(&db, &unique("user"), &regions, commit, any).await;
        assert_eq!(decision.outcome, outcome, "{case}: {decision:?}");
        assert_eq!(decision.instance_id.as_deref(), host, "{case}");
        if outcome == "ASSIGNED" {
            assert_eq!(decision.ip(), "10.1.2.3".parse().ok(), "{case}");
            let id = decision.mandelbox_id.expect("a box");
            let row = db
                .execute(&ops::mandelbox_by_id(id))
                .await
                .expect("read")
                .expect("row");
            assert_eq!(row.status, MandelboxStatus::Allocated, "{case}");
            assert_eq!(row.instance_id.as_str(), host.expect("host"), "{case}");
        }
        assert!(decision.decision_ms.is_some_and(|ms| ms >= 0.0), "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_cannot_take_a_session_are_passed_over() {
    let db = client();
    // The image row names a build none of the region's hosts runs: a configuration error.
    let misconfigured = Region::create(&db, true, "other-build").await;
    misconfigured
        .host(&db, &misconfigured.image_id, SHA, 2)
        .await;
    let decision = attempt(
        &db,
        &unique("user"),
        &[&misconfigured.name],
        "other-build",
        false,
    )
    .await;
    assert_eq!(decision.outcome, "SERVICE_UNAVAILABLE", "{decision:?}");
    assert!(
        decision
            .detail
            .as_deref()
            .is_some_and(|detail| detail.contains(&misconfigured.name)),
        "{decision:?}"
    );

    // Silent and draining hosts get nothing, whatever their boxes say; a live one does.
    let region = Region::create(&db, true, SHA).await;
    let silent = region.host(&db, &region.image_id, SHA, 1).await;
    let draining = region.host(&db, &region.image_id, SHA, 1).await;
    whist_test_support::shared()
        .sql(&format!(
            "SET session_replication_role = replica; \
             UPDATE whist.instances SET heartbeat_at = now() - interval '1 hour' WHERE id = '{silent}'; \
             UPDATE whist.instances SET status = 'DRAINING' WHERE id = '{draining}';"
        ))
        .expect("age one host, drain the other");
    let decision = attempt(&db, &unique("user"), &[&region.name], SHA, false).await;
    assert_eq!(decision.outcome, "NO_INSTANCE_AVAILABLE", "{decision:?}");
    let alive = region.host(&db, &region.image_id, SHA, 1).await;
    let decision = attempt(&db, &unique("user"), &[&region.name], SHA, false).await;
    assert_eq!(decision.instance_id.as_deref(), Some(alive.as_str()));
}

/// Fires the attempts at once (behind a barrier).
async fn at_once(db: &HasuraClient, region: &str, users: Vec<String>) -> Vec<AssignDecision> {
    let barrier = Arc::new(Barrier::new(users.len()));
    let tasks: Vec<_> = users
        .into_iter()
        .map(|user| {
            let (db, barrier, region) = (db.clone(), barrier.clone(), region.to_owned());
            tokio::spawn(async move {
                barrier.wait().await;
                attempt(&db, &user, &[&region], SHA, false).await
            })
        })
        .collect();
    let mut decisions = Vec::new();
    for task in tasks {
        decisions.push(task.await.expect("attempt"));
    }
    decisions
}

fn count(decisions: &[AssignDecision]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for decision in decisions {
        *counts.entry(decision.outcome.as_str()).or_default() += 1;
    }
    counts
}

/// The hostile case that once gave `NO_INSTANCE_AVAILABLE` while boxes were free: 500 attempts
/// at once for one user with a limit of 3. Exactly three boxes, and every other answer says the
/// user is at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_at_once_gets_the_limit_and_the_true_refusal() {
    let db = client();
    let region = Region::create(&db, true, SHA).await;
    for _ in 0..4 {
        region.host(&db, &region.image_id, SHA, 5).await;
    }
    let user = unique("hasty");
    let decisions = at_once(&db, &region.name, vec![user.clone(); 500]).await;
    let counts = count(&decisions);
    assert_eq!(counts.get("ASSIGNED"), Some(&3), "{counts:?}");
    assert_eq!(counts.get("USER_ALREADY_ACTIVE"), Some(&497), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_users_on_a_hundred_boxes_share_nothing_and_capacity_adds_up() {
    let db = client();
    let region = Region::create(&db, true, SHA).await;
    let mut hosts = Vec::new();
    for _ in 0..10 {
        hosts.push(region.host(&db, &region.image_id, SHA, 10).await);
    }
    let users: Vec<String> = (0..300).map(|_| unique("user")).collect();
    let decisions = at_once(&db, &region.name, users).await;
    let counts = count(&decisions);
    assert_eq!(counts.get("ASSIGNED"), Some(&100), "{counts:?}");
    assert_eq!(
        counts.get("NO_INSTANCE_AVAILABLE"),
        Some(&200),
        "{counts:?}"
    );
    let boxes: HashSet<MandelboxId> = decisions.iter().filter_map(|d| d.mandelbox_id).collect();
    assert_eq!(boxes.len(), 100, "no box given twice");
    for host in &hosts {
        let row = db
            .execute(&ops::instance_by_id(host))
            .await
            .expect("read")
            .expect("row");
        assert_eq!(row.remaining_capacity, 0, "{host}");
        let rows = db
            .execute(&ops::mandelboxes_on_instance(host))
            .await
            .expect("read");
        assert!(
            rows.iter()
                .all(|row| row.status == MandelboxStatus::Allocated && row.user_id.is_some())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_kept_and_only_expired_ones_leave_two_at_a_time() {
    let db = client();
    let stack = whist_test_support::shared();
    let region = Region::create(&db, true, SHA).await;
    region.host(&db, &region.image_id, SHA, 1).await;
    let user = unique("planner");
    // Five attempts from past the retention (720 hours by default) and one from an hour ago,
    // written as the trigger never would (it stamps the database's time).
    stack
        .sql(&format!(
            "SET session_replication_role = replica; \
             INSERT INTO whist.assign_ledger (requested_at, user_id, session_id, regions, client_commit, outcome) \
             SELECT now() - interval '721 hours', '{user}-old', '1', '[]', '', 'NO_INSTANCE_AVAILABLE' FROM generate_series(1, 5); \
             INSERT INTO whist.assign_ledger (requested_at, user_id, session_id, regions, client_commit, outcome) \
             VALUES (now() - interval '1 hour', '{user}-young', '1', '[]', '', 'NO_INSTANCE_AVAILABLE');"
        ))
        .expect("old attempts");
    let rows_of = |who: String| {
        let sql = format!("SELECT count(*) FROM whist.assign_ledger WHERE user_id = '{who}'");
        move || {
            stack
                .sql(&sql)
                .expect("count")
                .trim()
                .parse::<usize>()
                .expect("a count")
        }
    };
    let old = rows_of(format!("{user}-old"));
    let young = rows_of(format!("{user}-young"));
    let own = rows_of(user.clone());

    let first = attempt(&db, &user, &[&region.name], SHA, false).await;
    assert_eq!(first.outcome, "ASSIGNED");
    let second = attempt(&db, &user, &[&region.name], SHA, false).await;
    assert_eq!(second.outcome, "NO_INSTANCE_AVAILABLE");
    // Other tests' attempts may have taken some old rows too; never more than two per attempt,
    // and never a young one.
    assert!(old() <= 3, "{} old rows left after two attempts", old());
    attempt(&db, &user, &[&region.name], SHA, false).await;
    attempt(&db, &user, &[&region.name], SHA, false).await;
    assert_eq!(old(), 0);
    assert_eq!(young(), 1, "an attempt inside the retention stays");
    assert_eq!(own(), 4, "every attempt is a row, refusals too");
    let recorded = stack
        .sql(&format!(
            "SELECT outcome, region = '{}' FROM whist.assign_ledger WHERE user_id = '{user}' ORDER BY id",
            region.name
        ))
        .expect("read");
    assert!(recorded.contains("ASSIGNED"), "{recorded}");
    assert!(recorded.contains("NO_INSTANCE_AVAILABLE"), "{recorded}");
}
