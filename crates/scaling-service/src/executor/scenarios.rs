//! The executor on the in-memory cloud and database, on paused tokio time: what each action does
//! to machines and rows, what a lost lease stops, the races it must lose, and every refusal of
//! reconciliation (the listing it distrusts, the proof it waits for, the budget it keeps). The
//! same rules against moto and the stack are in `tests/moto_fleet_safety.rs` and its neighbours.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use whist_dbclient::fake::{FakeDatabase, Fault};
use whist_types::{Environment, Instance, InstanceStatus, PROVIDER_AWS};

use super::{Executor, Safety, Suspicion, fleet_name, tags};
use crate::algorithm::{Action, DrainReason, ImageRef, LaunchPurpose, TerminateReason};
use crate::config::CloudBudget;
use crate::fleet::Fleet;
use crate::hosts::fake::{Call, FakeHosts};
use crate::hosts::{CloudState, HostError, HostHandler, LaunchRequest};
use crate::leader::{Term, TermHandle};
use crate::metrics::Metrics;

const REGION: &str = "us-east-1";
const LEASE: &str = "scaling";
const INSTANCE_TYPE: &str = "g4dn.2xlarge";
/// `INSTANCE_TYPE`'s sessions.
const CAPACITY: i32 = 2;
const READY_TIMEOUT: chrono::Duration = chrono::Duration::minutes(15);

fn image() -> ImageRef {
    ImageRef {
        image_id: "ami-current".to_owned(),
        client_sha: "sha-current".to_owned(),
    }
}

/// An executor of the local fleet on fresh fakes, leading in its own term.
struct Scene {
    db: Arc<FakeDatabase>,
    cloud: Arc<FakeHosts>,
    executor: Executor,
    term: Term,
    _term_handle: TermHandle,
}

impl Scene {
    fn new() -> Self {
        let db = FakeDatabase::new();
        let cloud = Arc::new(FakeHosts::new());
        let fence = db.grant_lease(LEASE, "replica-a");
        let (term, term_handle) = Term::until(
            fence,
            tokio::time::Instant::now() + Duration::from_secs(3600),
        );
        let executor = Executor {
            db: db.client(),
            hosts: cloud.clone(),
            environment: Environment::Local,
            user_data: String::new(),
            metrics: Arc::new(Metrics::new()),
            safety: Safety::default(),
            cloud: CloudBudget::default(),
        };
        Self {
            db,
            cloud,
            executor,
            term,
            _term_handle: term_handle,
        }
    }

    fn fleet_tag(&self) -> String {
        fleet_name(Environment::Local)
    }

    /// The scaler's view of the database now.
    fn fleet(&self) -> Fleet {
        Fleet {
            instances: Arc::new(self.db.instances()),
            complete: true,
            ..Fleet::default()
        }
    }

    async fn run(&self, actions: Vec<Action>) -> super::Outcome {
        self.executor
            .run(&self.term, REGION, actions, &self.fleet())
            .await
    }

    /// Launches `count` machines of this fleet and records them, as a launch does.
    async fn hosts(&self, count: u32) -> Vec<String> {
        let outcome = self.run(vec![launch(count)]).await;
        assert_eq!(outcome.errors, 0);
        outcome.launched.into_iter().map(|host| host.id).collect()
    }

    /// Makes a recorded host ACTIVE and idle, as its registration does.
    fn register(&self, id: &str) {
        self.db.update_instance(id, |row| {
            row.status = InstanceStatus::Active;
            row.ip_addr = Some("10.0.0.1".to_owned());
            row.heartbeat_at = Utc::now();
        });
    }

    /// The same fakes under another replica that took the lease in a new term.
    fn next_leader(self) -> Self {
        let fence = self.db.grant_lease(LEASE, "replica-b");
        let (term, term_handle) = Term::until(
            fence,
            tokio::time::Instant::now() + Duration::from_secs(3600),
        );
        Self {
            term,
            _term_handle: term_handle,
            ..self
        }
    }

    /// Another replica takes the lease: this scene's term is over as far as the database knows.
    fn lose_lease(&self) {
        self.db.grant_lease(LEASE, "replica-b");
    }

    async fn reconcile(
        &self,
        gone_since: HashMap<String, chrono::DateTime<Utc>>,
        now: chrono::DateTime<Utc>,
    ) -> super::Reconciled {
        self.executor
            .reconcile(
                &self.term,
                REGION,
                &self.fleet(),
                gone_since,
                now,
                READY_TIMEOUT,
            )
            .await
            .expect("reconciliation runs")
    }

    /// A machine of this fleet launched outside the executor (so it has no row).
    async fn unrecorded_machine(&self) -> String {
        let request = LaunchRequest {
            region: REGION.to_owned(),
            image_id: image().image_id,
            instance_type: INSTANCE_TYPE.to_owned(),
            count: 1,
            client_token: uuid::Uuid::new_v4().to_string(),
            user_data: String::new(),
            tags: [(tags::FLEET.to_owned(), self.fleet_tag())].into(),
        };
        self.cloud.launch(&request).await.expect("launch")[0]
            .id
            .clone()
    }
}

fn launch(count: u32) -> Action {
    Action::Launch {
        image: image(),
        instance_type: INSTANCE_TYPE.to_owned(),
        count,
        purpose: LaunchPurpose::Buffer,
    }
}

fn terminate(id: &str) -> Action {
    Action::Terminate {
        instance_id: id.to_owned(),
        reason: TerminateReason::Drained,
    }
}

fn row_of_fleet(id: &str, fleet: &str) -> Instance {
    let now = Utc::now();
    Instance {
        id: id.to_owned(),
        provider: PROVIDER_AWS.to_owned(),
        region: REGION.to_owned(),
        image_id: image().image_id,
        client_sha: image().client_sha,
        ip_addr: Some("10.0.0.2".to_owned()),
        instance_type: INSTANCE_TYPE.to_owned(),
        remaining_capacity: CAPACITY,
        status: InstanceStatus::Active,
        created_at: now,
        updated_at: now,
        fleet: Some(fleet.to_owned()),
        heartbeat_at: now,
        tls_fingerprint: None,
    }
}

// ----- actions -----

#[tokio::test(start_paused = true)]
async fn a_launch_records_one_row_per_machine_with_the_fleet_and_term_tags() {
    let scene = Scene::new();
    let ids = scene.hosts(2).await;
    assert_eq!(ids.len(), 2);
    let machines = scene.cloud.machines(REGION);
    assert_eq!(machines.len(), 2);
    for machine in &machines {
        assert_eq!(machine.tags[tags::FLEET], scene.fleet_tag());
        assert_eq!(
            machine.tags[tags::TERM],
            scene.term.generation().to_string()
        );
    }
    for id in &ids {
        let row = scene.db.instance(id).expect("recorded");
        assert_eq!(row.status, InstanceStatus::PreConnection);
        assert_eq!(row.fleet.as_deref(), Some(scene.fleet_tag().as_str()));
        assert_eq!(row.remaining_capacity, CAPACITY);
    }
}

#[tokio::test(start_paused = true)]
async fn a_term_that_ended_launches_nothing_and_writes_nothing() {
    let scene = Scene::new();
    scene.lose_lease();
    let outcome = scene.run(vec![launch(1)]).await;
    assert!(outcome.launched.is_empty());
    assert_eq!(
        scene.cloud.calls(Call::Launch),
        0,
        "no machine without the lease"
    );
    assert!(scene.db.instances().is_empty());
}

#[tokio::test(start_paused = true)]
async fn machines_whose_rows_were_lost_to_a_lease_change_are_recorded_by_the_next_term() {
    let scene = Scene::new();
    // The lease moves while the launch is in flight: the machines exist, their rows are refused.
    let insert = scene.db.hold_next("InsertInstances");
    let run = scene.run(vec![launch(1)]);
    let lose = async {
        insert.arrived().await;
        scene.lose_lease();
        insert.release();
    };
    let (outcome, ()) = tokio::join!(run, lose);
    assert_eq!(
        outcome.launched.len(),
        1,
        "the machine is reported all the same"
    );
    assert!(
        scene.db.instances().is_empty(),
        "the old term wrote nothing"
    );

    // The new leader's reconciliation records it: it is young and carries the fleet's tag.
    let next = scene.next_leader();
    let now = Utc::now() + next.executor.safety.reconcile_grace + chrono::Duration::seconds(1);
    let report = next.reconcile(HashMap::new(), now).await;
    assert_eq!(report.recorded.len(), 1);
    assert_eq!(next.db.instances().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_drain_happens_only_while_the_host_is_idle() {
    let scene = Scene::new();
    let ids = scene.hosts(2).await;
    for id in &ids {
        scene.register(id);
    }
    // The decision saw both idle; a claim took a session on the second host after it.
    let decided_on = scene.fleet();
    scene
        .db
        .update_instance(&ids[1], |row| row.remaining_capacity = CAPACITY - 1);
    let drains = ids
        .iter()
        .map(|id| Action::Drain {
            instance_id: id.clone(),
            reason: DrainReason::Surplus,
        })
        .collect();
    let outcome = scene
        .executor
        .run(&scene.term, REGION, drains, &decided_on)
        .await;
    assert_eq!(outcome.drained, 1);
    assert_eq!(
        scene.db.instance(&ids[0]).expect("row").status,
        InstanceStatus::Draining
    );
    assert_eq!(
        scene.db.instance(&ids[1]).expect("row").status,
        InstanceStatus::Active,
        "the claim won"
    );
}

#[tokio::test(start_paused = true)]
async fn a_terminate_ends_the_machine_then_deletes_its_row() {
    let scene = Scene::new();
    let id = scene.hosts(1).await.remove(0);
    let delete = scene.db.hold_next("DeleteFleetInstance");
    let run = scene.run(vec![terminate(&id)]);
    let check = async {
        delete.arrived().await;
        let machine = scene.cloud.machines(REGION).remove(0);
        assert_eq!(
            machine.state,
            CloudState::Terminated,
            "the machine ends before its row goes"
        );
        assert!(scene.db.instance(&id).is_some());
        delete.release();
    };
    let (outcome, ()) = tokio::join!(run, check);
    assert_eq!(outcome.errors, 0);
    assert!(scene.db.instance(&id).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_host_of_another_fleet_is_never_terminated() {
    let scene = Scene::new();
    scene
        .db
        .put_instance(row_of_fleet("i-production", "whist-prod"));
    let outcome = scene.run(vec![terminate("i-production")]).await;
    assert_eq!(outcome.errors, 0);
    assert_eq!(scene.cloud.calls(Call::Terminate), 0);
    assert!(scene.db.instance("i-production").is_some());
}

#[tokio::test(start_paused = true)]
async fn a_failed_termination_keeps_the_row() {
    let scene = Scene::new();
    let id = scene.hosts(1).await.remove(0);
    scene.cloud.fail_next(
        Call::Terminate,
        HostError::Refused("UnauthorizedOperation".to_owned()),
    );
    let outcome = scene.run(vec![terminate(&id)]).await;
    assert_eq!(outcome.errors, 1);
    assert!(
        scene.db.instance(&id).is_some(),
        "no row deleted without the machine gone"
    );
}

#[tokio::test(start_paused = true)]
async fn a_database_outage_during_the_lease_check_stops_the_cloud_call() {
    let scene = Scene::new();
    let id = scene.hosts(1).await.remove(0);
    scene.db.fail_next("LeaseCheck", Fault::Unavailable);
    let outcome = scene.run(vec![terminate(&id)]).await;
    assert_eq!(outcome.errors, 1);
    assert_eq!(scene.cloud.calls(Call::Terminate), 0);
    assert!(scene.db.instance(&id).is_some());
}

// ----- reconciliation's refusals -----

#[tokio::test(start_paused = true)]
async fn an_empty_listing_while_rows_exist_pauses_everything_destructive() {
    let scene = Scene::new();
    let ids = scene.hosts(3).await;
    scene.cloud.hide_from_listings(ids.clone());
    let later = Utc::now() + chrono::Duration::hours(1);
    let gone_long_ago: HashMap<String, _> = ids
        .iter()
        .map(|id| (id.clone(), Utc::now() - chrono::Duration::hours(1)))
        .collect();
    let report = scene.reconcile(gone_long_ago, later).await;
    assert_eq!(report.paused, Some(Suspicion::EmptyListing));
    assert_eq!(report.deleted, 0);
    assert_eq!(scene.db.instances().len(), 3);
    assert_eq!(scene.cloud.calls(Call::Describe), 0);
    assert_eq!(scene.cloud.calls(Call::Terminate), 0);
}

#[tokio::test(start_paused = true)]
async fn a_listing_that_lacks_most_rows_pauses_everything_destructive() {
    let scene = Scene::new();
    let ids = scene.hosts(4).await;
    scene.cloud.hide_from_listings(ids[..3].to_vec());
    let report = scene
        .reconcile(HashMap::new(), Utc::now() + chrono::Duration::hours(1))
        .await;
    assert_eq!(
        report.paused,
        Some(Suspicion::LostRows {
            missing: 3,
            rows: 4
        })
    );
    assert_eq!(scene.db.instances().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn many_machines_without_rows_pause_instead_of_being_terminated() {
    let scene = Scene::new();
    let recorded = scene.hosts(1).await;
    for _ in 0..3 {
        scene.unrecorded_machine().await;
    }
    // Old enough to be leftovers rather than launches whose rows are on their way.
    let report = scene
        .reconcile(HashMap::new(), Utc::now() + chrono::Duration::hours(1))
        .await;
    assert!(
        matches!(
            report.paused,
            Some(Suspicion::UnrecordedMachines { unrecorded: 3, .. })
        ),
        "{:?}",
        report.paused
    );
    assert_eq!(scene.cloud.calls(Call::Terminate), 0);
    assert!(scene.db.instance(&recorded[0]).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_row_is_deleted_only_after_its_machine_has_been_gone_for_the_grace() {
    let scene = Scene::new();
    let ids = scene.hosts(3).await;
    scene.cloud.terminate_outside(&ids[0]);
    let first_seen = Utc::now();
    let report = scene.reconcile(HashMap::new(), first_seen).await;
    assert_eq!(
        report.deleted, 0,
        "first sight of the machine gone proves nothing yet"
    );
    assert!(report.gone_since.contains_key(&ids[0]));
    assert!(scene.db.instance(&ids[0]).is_some());

    let grace = scene.executor.safety.reconcile_grace;
    let report = scene
        .reconcile(
            report.gone_since,
            first_seen + grace - chrono::Duration::seconds(1),
        )
        .await;
    assert_eq!(report.deleted, 0, "within the grace");

    let report = scene
        .reconcile(
            report.gone_since,
            first_seen + grace + chrono::Duration::seconds(1),
        )
        .await;
    assert_eq!(report.deleted, 1);
    assert!(scene.db.instance(&ids[0]).is_none());
    assert_eq!(scene.db.instances().len(), 2, "the others are kept");
}

#[tokio::test(start_paused = true)]
async fn a_machine_missing_from_the_listing_but_running_keeps_its_row() {
    let scene = Scene::new();
    let ids = scene.hosts(3).await;
    // Its tag was removed: the listing lacks it, asked by id it runs.
    scene.cloud.hide_from_listings([ids[0].clone()]);
    let long_ago = HashMap::from([(ids[0].clone(), Utc::now() - chrono::Duration::hours(1))]);
    let report = scene.reconcile(long_ago, Utc::now()).await;
    assert_eq!(report.paused, None);
    assert_eq!(report.deleted, 0);
    assert!(
        !report.gone_since.contains_key(&ids[0]),
        "its clock starts over"
    );
    assert_eq!(scene.cloud.calls(Call::Describe), 1);
    assert!(scene.db.instance(&ids[0]).is_some());
}

#[tokio::test(start_paused = true)]
async fn one_pass_deletes_at_most_its_share_of_the_region() {
    let scene = Scene::new();
    let ids = scene.hosts(20).await;
    // Half of them vanish long ago: a share a listing still explains, but more than a pass
    // may destroy.
    for id in &ids[..10] {
        scene.cloud.terminate_outside(id);
    }
    let since = Utc::now() - chrono::Duration::hours(1);
    let gone: HashMap<String, _> = ids[..10].iter().map(|id| (id.clone(), since)).collect();
    let report = scene.reconcile(gone, Utc::now()).await;
    assert_eq!(report.paused, None);
    assert_eq!(report.deleted, 2, "10% of 20 hosts");
    assert_eq!(report.deferred, 8);
    assert_eq!(scene.db.instances().len(), 18);
}

#[tokio::test(start_paused = true)]
async fn an_old_machine_without_a_row_is_terminated_and_a_young_one_recorded() {
    let scene = Scene::new();
    let _recorded = scene.hosts(3).await;
    let leftover = scene.unrecorded_machine().await;
    let report = scene
        .reconcile(HashMap::new(), Utc::now() + chrono::Duration::hours(1))
        .await;
    assert_eq!(report.paused, None);
    let machine = scene
        .cloud
        .machines(REGION)
        .into_iter()
        .find(|machine| machine.id == leftover)
        .expect("listed");
    assert_eq!(machine.state, CloudState::Terminated);

    let young = scene.unrecorded_machine().await;
    let now = Utc::now() + scene.executor.safety.reconcile_grace + chrono::Duration::seconds(1);
    let report = scene.reconcile(HashMap::new(), now).await;
    assert_eq!(report.recorded.len(), 1);
    assert_eq!(
        scene.db.instance(&young).expect("recorded").status,
        InstanceStatus::PreConnection
    );
}

#[tokio::test(start_paused = true)]
async fn a_reconciliation_without_the_lease_touches_nothing() {
    let scene = Scene::new();
    let ids = scene.hosts(2).await;
    scene.cloud.terminate_outside(&ids[0]);
    scene.lose_lease();
    let since = Utc::now() - chrono::Duration::hours(1);
    let result = scene
        .executor
        .reconcile(
            &scene.term,
            REGION,
            &scene.fleet(),
            HashMap::from([(ids[0].clone(), since)]),
            Utc::now(),
            READY_TIMEOUT,
        )
        .await;
    assert!(result.is_err(), "the term ended");
    assert_eq!(scene.db.instances().len(), 2);
    assert_eq!(scene.cloud.calls(Call::List), 0);
}
