//! The agent's state machine on the in-memory database and container engine, on paused tokio
//! time: every phase a box goes through, every way it ends, the races the agent must lose or
//! win on purpose, the resync's repairs and the drain. The same behaviour on Docker and the
//! stack is covered by `tests/lifecycle.rs` and its neighbours; these reach the rare paths.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use whist_dbclient::fake::{FakeDatabase, Fault};
use whist_types::{Instance, InstanceStatus, Mandelbox, MandelboxId, MandelboxStatus};

use super::transport::{TransportError, TransportReply, TransportRequest};
use super::{AgentHandle, AgentParts, DrainReport, spawn};
use crate::config::{Args, Config};
use crate::mandelbox::files::READY;
use crate::mandelbox::labels;
use crate::mandelbox::spec::HostFeatures;
use crate::metrics::Metrics;
use crate::resources::gpus::GpuSlots;
use crate::resources::ports::PortAllocator;
use crate::resources::ttys::TtyAllocator;
use crate::runtime::fake::{Call, FakeRuntime};
use crate::runtime::{ContainerRuntime, RuntimeError};

const INSTANCE: &str = "i-agent-under-test";
const IMAGE: &str = "whist/test-mandelbox:current";
const OWNER: &str = "alice";
/// Deadlines of the configuration below, which the tests wait past.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(5);
const RESYNC_INTERVAL: Duration = Duration::from_secs(60);
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

/// A directory removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("whist-agent-{}", MandelboxId::new_random()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(root: &Path) -> Config {
    let path = |name: &str| root.join(name).to_string_lossy().into_owned();
    let args = [
        "host-service",
        "--local",
        "--environment",
        "local",
        "--instance-id",
        INSTANCE,
        "--hasura-url",
        "http://127.0.0.1:9/v1/graphql",
        "--mandelbox-image",
        IMAGE,
        "--whist-dir",
        &path("whist"),
        "--temp-dir",
        &path("temp"),
        // Absent: the boxes get no virtual input devices.
        "--uinput-path",
        &path("no-uinput"),
        "--listen",
        "127.0.0.1:0",
        "--ops-listen",
        "127.0.0.1:0",
        "--connect-timeout",
        &CONNECT_TIMEOUT.as_secs().to_string(),
        "--ready-timeout",
        &READY_TIMEOUT.as_secs().to_string(),
        "--resync-interval",
        &RESYNC_INTERVAL.as_secs().to_string(),
        "--drain-deadline",
        &DRAIN_DEADLINE.as_secs().to_string(),
        "--stop-grace",
        "1",
        "--power-off-command",
        "",
    ];
    Args::try_parse_from(args)
        .expect("arguments parse")
        .validate()
        .expect("configuration is valid")
}

fn instance_row(capacity: i32) -> Instance {
    let now = chrono::Utc::now();
    Instance {
        id: INSTANCE.to_owned(),
        provider: "AWS".to_owned(),
        region: "us-east-1".to_owned(),
        image_id: "ami-test".to_owned(),
        client_sha: "test".to_owned(),
        ip_addr: Some("127.0.0.1".to_owned()),
        instance_type: "g4dn.xlarge".to_owned(),
        remaining_capacity: capacity,
        status: InstanceStatus::Active,
        created_at: now,
        updated_at: now,
        fleet: Some("whist-local".to_owned()),
        heartbeat_at: now,
        tls_fingerprint: None,
    }
}

/// One agent on the fakes.
struct Host {
    db: Arc<FakeDatabase>,
    runtime: Arc<FakeRuntime>,
    agent: AgentHandle,
    finished: Option<JoinHandle<DrainReport>>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    whist_dir: PathBuf,
    _scratch: Scratch,
}

impl Host {
    /// An agent on an ACTIVE instance of `capacity`, once all its zygotes are WAITING.
    async fn start(capacity: i32) -> Self {
        let host = Self::start_with(capacity, |_, _| {}).await;
        host.until("every zygote is WAITING", |host| {
            host.rows_in(MandelboxStatus::Waiting).len() == capacity as usize
        })
        .await;
        host
    }

    /// An agent whose fakes `prepare` scripted first; returns at once.
    async fn start_with(capacity: i32, prepare: impl FnOnce(&FakeDatabase, &FakeRuntime)) -> Self {
        let scratch = Scratch::new();
        let config = Arc::new(config(&scratch.0));
        let db = FakeDatabase::new();
        let runtime = Arc::new(FakeRuntime::with_images([IMAGE]));
        db.put_instance(instance_row(capacity));
        prepare(&db, &runtime);
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let (agent, finished) = spawn(
            AgentParts {
                config: config.clone(),
                instance: instance_row(capacity),
                db: db.client(),
                runtime: runtime.clone(),
                features: HostFeatures {
                    apparmor: false,
                    fuse: false,
                    cgroup_dir: false,
                    udev_data: false,
                },
                ports: PortAllocator::new(40_000..40_400, []),
                ttys: TtyAllocator::new(10..=90),
                gpus: GpuSlots::new(0, 0),
                metrics: metrics.clone(),
                adopted: Vec::new(),
                draining: false,
                live_options: whist_dbclient::LiveOptions::default(),
            },
            shutdown.clone(),
        );
        Self {
            db,
            runtime,
            agent,
            finished: Some(finished),
            shutdown,
            metrics,
            whist_dir: config.mandelbox.whist_dir.clone(),
            _scratch: scratch,
        }
    }

    /// Waits (on tokio's clock, which runs ahead while everything is idle) until `done` holds.
    async fn until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let limit = tokio::time::Instant::now() + Duration::from_secs(600);
        while !done(self) {
            assert!(
                tokio::time::Instant::now() < limit,
                "never happened: {what}; rows {:?}, containers {:?}",
                self.db.mandelboxes(),
                self.runtime.containers().keys().collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn rows(&self) -> Vec<Mandelbox> {
        self.db.mandelboxes()
    }

    fn rows_in(&self, status: MandelboxStatus) -> Vec<Mandelbox> {
        self.rows()
            .into_iter()
            .filter(|row| row.status == status)
            .collect()
    }

    fn row(&self, id: MandelboxId) -> Option<Mandelbox> {
        self.db.mandelbox(id)
    }

    fn remaining_capacity(&self) -> i32 {
        self.db
            .instance(INSTANCE)
            .map_or(-1, |row| row.remaining_capacity)
    }

    /// The container of box `id`, with whether it runs.
    fn container_of(&self, id: MandelboxId) -> Option<(String, bool)> {
        self.runtime
            .containers()
            .into_iter()
            .find(|(_, (spec, _))| spec.labels.get(labels::MANDELBOX_ID) == Some(&id.to_string()))
            .map(|(container, (_, running))| (container, running))
    }

    fn running_containers(&self) -> usize {
        self.runtime
            .containers()
            .values()
            .filter(|(_, running)| *running)
            .count()
    }

    /// How many boxes the agent has in `phase` (its own metric).
    fn in_phase(&self, phase: &str) -> i64 {
        let line = format!("whist_host_mandelboxes{{phase=\"{phase}\"}} ");
        self.metrics
            .render()
            .lines()
            .find_map(|text| text.strip_prefix(&line).and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    }

    /// Plays the box: its session is up (the file the host waits for).
    fn make_ready(&self, id: MandelboxId) {
        let dir = self
            .whist_dir
            .join(id.to_string())
            .join("mandelboxResourceMappings");
        std::fs::create_dir_all(&dir).expect("resource directory");
        std::fs::write(dir.join(READY), b"").expect("readiness file");
    }

    /// The client's `json_transport` from `caller`, answered.
    async fn transport(&self, id: MandelboxId, caller: &str) -> TransportReply {
        let (request, reply) = TransportRequest::new(
            id,
            Some(caller.to_owned()),
            r#"{"dark_mode":true}"#.to_owned(),
        );
        self.agent.transport(request).await;
        answered(reply).await
    }

    /// Claims a zygote for the owner, as the scaling-service does, and waits for the host to
    /// accept it.
    async fn claimed_and_connecting(&self) -> MandelboxId {
        let id = self.rows_in(MandelboxStatus::Waiting)[0].id;
        self.db.claim(id, OWNER, "1").expect("claim");
        self.until("the host accepts the claim", |host| {
            host.row(id)
                .is_some_and(|row| row.status == MandelboxStatus::Connecting)
        })
        .await;
        id
    }

    /// A session that is RUNNING.
    async fn running_session(&self) -> MandelboxId {
        let id = self.claimed_and_connecting().await;
        self.make_ready(id);
        self.transport(id, OWNER).await.expect("session starts");
        id
    }

    async fn finished(&mut self) -> DrainReport {
        let finished = self.finished.take().expect("not awaited yet");
        tokio::time::timeout(Duration::from_secs(600), finished)
            .await
            .expect("the agent ends")
            .expect("the agent does not panic")
    }
}

/// The agent's answer, which must come within its own deadlines.
async fn answered(reply: tokio::sync::oneshot::Receiver<TransportReply>) -> TransportReply {
    tokio::time::timeout(Duration::from_secs(600), reply)
        .await
        .expect("answered within the agent's deadlines")
        .expect("the agent answers every request")
}

/// Waits for a held database call to arrive.
async fn arrived(hold: &whist_dbclient::fake::Hold, what: &str) {
    tokio::time::timeout(Duration::from_secs(600), hold.arrived())
        .await
        .unwrap_or_else(|_| panic!("never sent: {what}"));
}

fn refused(error: &str) -> RuntimeError {
    RuntimeError::Refused {
        operation: "test",
        target: "scripted".to_owned(),
        message: error.to_owned(),
    }
}

// ----- zygotes -----

#[tokio::test(start_paused = true)]
async fn zygotes_fill_the_capacity_and_the_host_reports_ready() {
    let host = Host::start(3).await;
    assert_eq!(host.running_containers(), 3);
    assert_eq!(host.rows().len(), 3);
    assert_eq!(host.remaining_capacity(), 3, "zygotes hold no capacity");
    host.until("the host is ready", |host| host.agent.status().ready())
        .await;
    assert_eq!(host.in_phase("waiting"), 3);
}

#[tokio::test(start_paused = true)]
async fn a_zygote_that_fails_to_start_is_removed_and_made_again_after_a_backoff() {
    let host = Host::start_with(2, |_, runtime| {
        runtime.fail_next(Call::Start, refused("the box would not start"));
    })
    .await;
    host.until("both zygotes are WAITING", |host| {
        host.rows_in(MandelboxStatus::Waiting).len() == 2
    })
    .await;
    assert_eq!(
        host.runtime.calls(Call::Create),
        3,
        "one more create after the failure"
    );
    assert_eq!(
        host.runtime.containers().len(),
        2,
        "the failed container was removed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_zygote_whose_row_cannot_be_written_leaves_no_container_behind() {
    let host = Host::start_with(1, |db, _| {
        db.fail_next(
            "InsertMandelboxes",
            Fault::Error {
                code: "constraint-violation".to_owned(),
                message: "Foreign key violation. scripted".to_owned(),
            },
        );
    })
    .await;
    host.until("the first zygote failed", |host| {
        host.metrics.consecutive_zygote_failures() == 1
    })
    .await;
    host.until("its container is gone", |host| {
        host.runtime.containers().is_empty()
    })
    .await;
    assert!(host.rows().is_empty());
    host.until("the zygote is made again", |host| {
        host.rows_in(MandelboxStatus::Waiting).len() == 1
    })
    .await;
    assert_eq!(host.runtime.containers().len(), 1);
}

// ----- a session -----

#[tokio::test(start_paused = true)]
async fn a_claimed_box_becomes_a_running_session_with_its_ports() {
    let host = Host::start(2).await;
    let id = host.claimed_and_connecting().await;
    assert_eq!(host.remaining_capacity(), 1);
    assert_eq!(host.in_phase("connecting"), 1);

    host.make_ready(id);
    let ready = host.transport(id, OWNER).await.expect("session starts");
    assert!((40_000..40_400).contains(&ready.ports.port_32262));
    assert_eq!(ready.aes_key.len(), 32);
    assert_eq!(host.row(id).expect("row").status, MandelboxStatus::Running);
    assert_eq!(host.in_phase("running"), 1);

    assert_eq!(
        host.transport(id, OWNER).await,
        Err(TransportError::Repeated),
        "a second configuration for a running session"
    );
    assert_eq!(host.rows_in(MandelboxStatus::Waiting).len(), 1);
    assert_eq!(host.running_containers(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_stranger_is_refused_and_the_owner_still_connects() {
    let host = Host::start(1).await;
    let id = host.claimed_and_connecting().await;
    assert_eq!(
        host.transport(id, "mallory").await,
        Err(TransportError::NotYours)
    );
    host.make_ready(id);
    host.transport(id, OWNER).await.expect("the owner connects");
}

#[tokio::test(start_paused = true)]
async fn a_transport_for_an_unclaimed_box_is_refused_and_the_zygote_stays() {
    let host = Host::start(1).await;
    let id = host.rows()[0].id;
    assert_eq!(
        host.transport(id, OWNER).await,
        Err(TransportError::NotYours)
    );
    assert_eq!(
        host.transport(MandelboxId::new_random(), OWNER).await,
        Err(TransportError::UnknownMandelbox)
    );
    host.until("the box is back to waiting", |host| {
        host.in_phase("waiting") == 1
    })
    .await;
    assert_eq!(host.row(id).expect("row").status, MandelboxStatus::Waiting);
    assert!(host.container_of(id).expect("container").1);
}

#[tokio::test(start_paused = true)]
async fn a_transport_that_beats_the_live_query_reads_the_row_and_goes_on() {
    let host = Host::start(1).await;
    let id = host.rows()[0].id;
    // The claim lands while the host hears nothing of it.
    host.db.cut_live();
    host.db.claim(id, OWNER, "7").expect("claim");
    host.make_ready(id);
    let read = host.db.hold_next("MandelboxById");
    let (request, reply) =
        TransportRequest::new(id, Some(OWNER.to_owned()), r#"{"a":1}"#.to_owned());
    host.agent.transport(request).await;
    arrived(&read, "the read of the row").await;
    host.until("the box is checking its row", |host| {
        host.in_phase("checking") == 1
    })
    .await;
    read.release();
    answered(reply)
        .await
        .expect("the session starts from the row it read");
    assert_eq!(host.row(id).expect("row").status, MandelboxStatus::Running);
    host.db.restore_live();
}

#[tokio::test(start_paused = true)]
async fn a_database_outage_during_the_accept_is_repaired_by_the_resync() {
    let host = Host::start(1).await;
    let id = host.rows()[0].id;
    // More failures than the accept retries: it gives up and the resync takes it again.
    for _ in 0..5 {
        host.db.fail_next("TransitionMandelbox", Fault::Unavailable);
    }
    let resyncs = host.db.count("InstanceWithMandelboxes");
    host.db.claim(id, OWNER, "1").expect("claim");
    host.until("the host accepts the claim after all", |host| {
        host.row(id)
            .is_some_and(|row| row.status == MandelboxStatus::Connecting)
    })
    .await;
    assert!(host.db.count("TransitionMandelbox") >= 6);
    assert!(
        host.db.count("InstanceWithMandelboxes") > resyncs,
        "the resync read the row and accepted it again"
    );
    host.make_ready(id);
    host.transport(id, OWNER).await.expect("session starts");
}

// ----- endings -----

#[tokio::test(start_paused = true)]
async fn a_client_that_never_connects_gives_the_box_back() {
    let host = Host::start(2).await;
    let id = host.claimed_and_connecting().await;
    let started = tokio::time::Instant::now();
    host.until("the session is ended", |host| host.row(id).is_none())
        .await;
    assert!(started.elapsed() >= CONNECT_TIMEOUT);
    host.until("its container is gone and a zygote replaces it", |host| {
        host.container_of(id).is_none() && host.rows_in(MandelboxStatus::Waiting).len() == 2
    })
    .await;
    assert_eq!(host.remaining_capacity(), 2, "the capacity came back");
}

#[tokio::test(start_paused = true)]
async fn a_box_that_never_gets_ready_is_ended_and_replaced() {
    let host = Host::start(1).await;
    let id = host.claimed_and_connecting().await;
    assert_eq!(
        host.transport(id, OWNER).await,
        Err(TransportError::NotReady(READY_TIMEOUT))
    );
    host.until("the box is gone and replaced", |host| {
        host.row(id).is_none()
            && host.container_of(id).is_none()
            && host.rows_in(MandelboxStatus::Waiting).len() == 1
    })
    .await;
    assert_eq!(host.remaining_capacity(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_container_that_dies_under_a_session_ends_it() {
    let host = Host::start(1).await;
    let id = host.running_session().await;
    let (container, _) = host.container_of(id).expect("container");
    host.runtime.exit(&container, 139);
    host.until("the session's row and container are gone", |host| {
        host.row(id).is_none() && host.container_of(id).is_none()
    })
    .await;
    assert_eq!(host.remaining_capacity(), 1);
    host.until("a zygote replaces it", |host| {
        host.rows_in(MandelboxStatus::Waiting).len() == 1
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_row_deleted_elsewhere_takes_its_box_with_it() {
    let host = Host::start(2).await;
    let id = host.rows()[0].id;
    host.db.delete_mandelbox(id).expect("row");
    host.until("its container is gone and a new zygote made", |host| {
        host.container_of(id).is_none() && host.rows_in(MandelboxStatus::Waiting).len() == 2
    })
    .await;
    assert!(host.rows().iter().all(|row| row.id != id));
}

#[tokio::test(start_paused = true)]
async fn a_failed_container_removal_keeps_the_box_until_the_resync_removes_it() {
    let host = Host::start(1).await;
    let id = host.running_session().await;
    let (container, _) = host.container_of(id).expect("container");
    for _ in 0..3 {
        host.runtime
            .fail_next(Call::Remove, refused("device or resource busy"));
    }
    host.runtime.exit(&container, 0);
    host.until("the row is deleted", |host| host.row(id).is_none())
        .await;
    host.until("all three removals failed", |host| {
        host.runtime.calls(Call::Remove) == 3
    })
    .await;
    assert!(
        host.container_of(id).is_some(),
        "the container is still there"
    );
    assert_eq!(
        host.in_phase("tearing_down"),
        1,
        "the box keeps its resources"
    );
    host.until("the resync removed it and a zygote replaces it", |host| {
        host.container_of(id).is_none() && host.rows_in(MandelboxStatus::Waiting).len() == 1
    })
    .await;
}

// ----- races -----

#[tokio::test(start_paused = true)]
async fn a_claim_that_beats_the_retirement_of_its_zygote_keeps_the_session() {
    let host = Host::start(2).await;
    // The fleet lowers this host's capacity: the resync finds a surplus zygote and retires it.
    let retire = host.db.hold_next("DeleteMandelboxIn");
    host.db
        .update_instance(INSTANCE, |row| row.remaining_capacity = 1);
    arrived(&retire, "the retirement of the surplus zygote").await;
    let id: MandelboxId =
        serde_json::from_value(retire.variables().expect("arrived")["id"].clone())
            .expect("the retired box's id");
    // The claim commits between the retirement's decision and its delete.
    host.db.claim(id, OWNER, "1").expect("claim");
    retire.release();
    host.until("the claimed box is accepted", |host| {
        host.row(id)
            .is_some_and(|row| row.status == MandelboxStatus::Connecting)
    })
    .await;
    assert!(host.container_of(id).expect("container").1);
    host.make_ready(id);
    host.transport(id, OWNER).await.expect("the session starts");
    // The other zygote is now the surplus and leaves.
    host.until("only the session is left", |host| host.rows().len() == 1)
        .await;
    assert_eq!(host.remaining_capacity(), 0);
}

// ----- resync -----

#[tokio::test(start_paused = true)]
async fn the_resync_deletes_rows_without_a_box_and_removes_containers_nobody_tracks() {
    let host = Host::start(1).await;
    // A row for a box this host never made, holding a user's capacity.
    let now = chrono::Utc::now();
    let orphan = Mandelbox {
        id: MandelboxId::new_random(),
        app: "CHROME".to_owned(),
        instance_id: INSTANCE.to_owned(),
        user_id: Some("bob".to_owned()),
        session_id: Some("3".to_owned()),
        status: MandelboxStatus::Running,
        created_at: now,
        updated_at: now,
    };
    host.db.put_mandelbox(orphan.clone());
    host.db
        .update_instance(INSTANCE, |row| row.remaining_capacity = 0);
    // A container of this instance that nothing tracks (a crash mid-creation).
    let (_, (mut spec, _)) = host.runtime.containers().into_iter().next().expect("one");
    spec.name = "leftover".to_owned();
    spec.labels.insert(
        labels::MANDELBOX_ID.to_owned(),
        MandelboxId::new_random().to_string(),
    );
    let leftover = host.runtime.create(&spec).await.expect("create");
    host.runtime.start(&leftover).await.expect("start");

    host.until(
        "the orphan row and the leftover container are gone",
        |host| host.row(orphan.id).is_none() && !host.runtime.containers().contains_key(&leftover),
    )
    .await;
    assert_eq!(
        host.remaining_capacity(),
        1,
        "the orphan's capacity came back"
    );
    assert_eq!(host.rows_in(MandelboxStatus::Waiting).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn live_queries_cut_off_make_the_host_unready_until_they_return() {
    let host = Host::start(1).await;
    host.until("ready", |host| host.agent.status().ready())
        .await;
    host.db.cut_live();
    host.until("unready", |host| !host.agent.status().ready())
        .await;
    let status = host.agent.status();
    assert!(!status.mandelboxes_live && !status.instance_live);
    host.db.restore_live();
    host.until("ready again", |host| host.agent.status().ready())
        .await;
}

// ----- drain -----

#[tokio::test(start_paused = true)]
async fn shutdown_retires_the_zygotes_and_deletes_the_instance_row() {
    let mut host = Host::start(2).await;
    host.shutdown.cancel();
    let report = host.finished().await;
    assert_eq!(
        report,
        DrainReport {
            forced: false,
            row_deleted: true,
            requested_by_fleet: false
        }
    );
    assert!(host.db.instance(INSTANCE).is_none());
    assert!(host.rows().is_empty());
    assert!(host.runtime.containers().is_empty());
    assert!(
        host.db.count("TransitionInstance") >= 1,
        "marked DRAINING first"
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_the_fleet_asks_for_waits_for_sessions_until_its_deadline() {
    let mut host = Host::start(2).await;
    let id = host.running_session().await;
    let asked = tokio::time::Instant::now();
    host.db
        .update_instance(INSTANCE, |row| row.status = InstanceStatus::Draining);
    host.until("the zygote is retired", |host| host.rows().len() == 1)
        .await;
    assert_eq!(
        host.row(id).expect("session").status,
        MandelboxStatus::Running
    );
    let report = host.finished().await;
    assert!(asked.elapsed() >= DRAIN_DEADLINE);
    assert_eq!(
        report,
        DrainReport {
            forced: true,
            row_deleted: true,
            requested_by_fleet: true
        }
    );
    assert!(host.runtime.containers().is_empty());
    assert!(host.db.instance(INSTANCE).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_session_that_ends_lets_the_drain_finish_before_its_deadline() {
    let mut host = Host::start(1).await;
    let id = host.running_session().await;
    host.db
        .update_instance(INSTANCE, |row| row.status = InstanceStatus::Draining);
    let (container, _) = host.container_of(id).expect("container");
    host.runtime.exit(&container, 0);
    let report = host.finished().await;
    assert!(!report.forced && report.row_deleted && report.requested_by_fleet);
}

#[tokio::test(start_paused = true)]
async fn an_instance_row_deleted_elsewhere_drains_the_host() {
    let mut host = Host::start(2).await;
    host.db.delete_instance(INSTANCE).expect("row");
    let report = host.finished().await;
    assert!(report.requested_by_fleet);
    assert!(host.runtime.containers().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_row_deleted_while_the_live_query_is_down_is_found_by_the_resync() {
    let host = Host::start(1).await;
    let id = host.rows()[0].id;
    host.db.cut_live();
    host.db.delete_mandelbox(id).expect("row");
    let cut = tokio::time::Instant::now();
    host.until("the resync ended the box", |host| {
        host.container_of(id).is_none()
    })
    .await;
    assert!(cut.elapsed() <= RESYNC_INTERVAL + Duration::from_secs(1));
    host.until("a new zygote replaces it", |host| {
        host.rows_in(MandelboxStatus::Waiting).len() == 1
    })
    .await;
    host.db.restore_live();
}

#[tokio::test(start_paused = true)]
async fn an_assignment_withdrawn_before_the_host_accepts_it_ends_the_box() {
    let host = Host::start(1).await;
    let id = host.rows()[0].id;
    let accept = host.db.hold_next("TransitionMandelbox");
    host.db.claim(id, OWNER, "1").expect("claim");
    arrived(&accept, "the accept").await;
    // The fleet ends the assignment meanwhile (the row is DYING, its user still holds it).
    let mut row = host.row(id).expect("row");
    row.status = MandelboxStatus::Dying;
    host.db.put_mandelbox(row);
    accept.release();
    host.until("the box is gone and replaced", |host| {
        host.row(id).is_none()
            && host.container_of(id).is_none()
            && host.rows_in(MandelboxStatus::Waiting).len() == 1
    })
    .await;
    assert_eq!(
        host.remaining_capacity(),
        1,
        "the withdrawn user's capacity came back"
    );
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_configuration_is_refused_and_the_owner_may_send_a_good_one() {
    let host = Host::start(1).await;
    let id = host.claimed_and_connecting().await;
    let (request, reply) = TransportRequest::new(
        id,
        Some(OWNER.to_owned()),
        "not json, not base64".to_owned(),
    );
    host.agent.transport(request).await;
    assert_eq!(answered(reply).await, Err(TransportError::BadConfig));
    host.until("the box waits for the owner again", |host| {
        host.in_phase("connecting") == 1
    })
    .await;
    host.make_ready(id);
    host.transport(id, OWNER)
        .await
        .expect("the good one starts the session");
}

#[tokio::test(start_paused = true)]
async fn zygotes_that_keep_failing_make_the_host_unready_until_one_starts() {
    let host = Host::start_with(1, |_, runtime| {
        for _ in 0..3 {
            runtime.fail_next(Call::Create, RuntimeError::ImageMissing(IMAGE.to_owned()));
        }
    })
    .await;
    host.until("three failures in a row", |host| {
        host.metrics.consecutive_zygote_failures() >= 3
    })
    .await;
    assert!(
        !host.agent.status().ready(),
        "a host that cannot make sessions is not ready"
    );
    host.until("a zygote started after the backoff", |host| {
        host.rows_in(MandelboxStatus::Waiting).len() == 1
    })
    .await;
    host.until("ready again", |host| host.agent.status().ready())
        .await;
    assert!(
        host.runtime.containers().len() == 1,
        "no failed container left"
    );
}

/// On worker threads and real time: the race is between the caller's thread and the agent's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_who_retries_at_once_after_a_refused_configuration_is_served() {
    let host = Host::start(1).await;
    let id = host.claimed_and_connecting().await;
    host.make_ready(id);
    // Many times over: the retry must never meet the box before the refusal was taken in.
    for attempt in 0..50 {
        let (request, reply) =
            TransportRequest::new(id, Some(OWNER.to_owned()), format!("bad {attempt}"));
        host.agent.transport(request).await;
        assert_eq!(answered(reply).await, Err(TransportError::BadConfig));
    }
    host.transport(id, OWNER)
        .await
        .expect("the good configuration right after starts the session");
}

#[tokio::test(start_paused = true)]
async fn writes_whose_answers_were_lost_are_retried_and_land_once() {
    let host = Host::start(1).await;
    let id = host.rows()[0].id;
    // The accept commits but its answer never comes; its retry finds the row CONNECTING.
    host.db.fail_next("TransitionMandelbox", Fault::AnswerLost);
    host.db.claim(id, OWNER, "1").expect("claim");
    host.until("accepted", |host| {
        host.row(id)
            .is_some_and(|row| row.status == MandelboxStatus::Connecting)
    })
    .await;
    host.until("the accept settled", |host| {
        host.in_phase("connecting") == 1
    })
    .await;
    assert_eq!(host.db.count("TransitionMandelbox"), 2);
    // The same for the RUNNING write.
    host.db.fail_next("TransitionMandelbox", Fault::AnswerLost);
    host.make_ready(id);
    host.transport(id, OWNER).await.expect("the session starts");
    assert_eq!(host.row(id).expect("row").status, MandelboxStatus::Running);
    assert_eq!(host.db.count("TransitionMandelbox"), 4);
}
