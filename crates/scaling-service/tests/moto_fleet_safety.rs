//! The controller never destroys what it cannot prove is gone: the real stack, EC2 from moto
//! on loopback (behind a fault proxy where the cloud must misbehave), and regions whose hosts
//! carry live sessions. Each test owns one AWS region name and its own leader lease.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{HostAgents, Scaler, eventually, unique};
use scaling_service::executor::tags;
use scaling_service::hosts::{CloudState, HostHandler, LaunchRequest};
use whist_dbclient::{HasuraClient, ops};
use whist_test_support::faults::{Ec2FaultProxy, FaultMode};
use whist_test_support::jwt::TestIssuer;
use whist_types::{Instance, MandelboxStatus};

const PATIENCE: Duration = Duration::from_secs(60);
/// Long enough for several reconciliations (the scalers here resync every second).
const SEVERAL_PASSES: Duration = Duration::from_secs(6);

async fn issuer() -> Arc<TestIssuer> {
    Arc::new(TestIssuer::start().await.expect("issuer"))
}

/// A region of fleet `whist-dev` with `hosts` ACTIVE hosts, each a real moto machine with the
/// fleet's tags and one RUNNING session plus one WAITING box; the target is met exactly, so a
/// healthy controller neither launches nor drains.
struct LiveRegion {
    name: String,
    hosts: Vec<String>,
    agents: HostAgents,
}

impl LiveRegion {
    async fn create(db: &HasuraClient, name: &str, hosts: usize) -> Self {
        common::clean_region(name);
        let image_id = unique("ami");
        let client_sha = unique("sha");
        common::configure_region(db, name, i32::try_from(hosts).expect("small")).await;
        db.execute(&ops::set_image("AWS", name, &image_id, &client_sha))
            .await
            .expect("image");
        let machines = common::ec2()
            .launch(&LaunchRequest {
                region: name.to_owned(),
                image_id: image_id.clone(),
                instance_type: common::INSTANCE_TYPE.to_owned(),
                count: u32::try_from(hosts).expect("small"),
                client_token: unique("token"),
                user_data: "#!/bin/sh\n".to_owned(),
                tags: [
                    (tags::FLEET.to_owned(), "whist-dev".to_owned()),
                    (tags::CLIENT_SHA.to_owned(), client_sha.clone()),
                ]
                .into(),
            })
            .await
            .expect("launch");
        let rows: Vec<whist_types::NewInstance> = machines
            .iter()
            .map(|machine| whist_types::NewInstance {
                id: machine.id.clone(),
                provider: "AWS".into(),
                region: name.to_owned(),
                image_id: image_id.clone(),
                client_sha: client_sha.clone(),
                instance_type: common::INSTANCE_TYPE.into(),
                remaining_capacity: 2,
                status: whist_types::InstanceStatus::PreConnection,
                fleet: Some("whist-dev".into()),
            })
            .collect();
        db.execute(&ops::insert_instances(&rows))
            .await
            .expect("rows");
        let ids: Vec<String> = rows.into_iter().map(|row| row.id).collect();
        for id in &ids {
            common::register(db, id, 2, &client_sha).await;
            let boxes = common::boxes_on(db, id).await;
            db.claim_mandelbox(boxes[0].id, &unique("user"), "1")
                .await
                .expect("claim");
            whist_test_support::shared()
                .sql(&format!(
                    "UPDATE whist.mandelboxes SET status = 'RUNNING' WHERE id = '{}'",
                    boxes[0].id
                ))
                .expect("running");
        }
        Self {
            name: name.to_owned(),
            hosts: ids,
            agents: HostAgents::start(db.clone(), name.to_owned()),
        }
    }

    async fn rows(&self, db: &HasuraClient) -> Vec<Instance> {
        db.execute(&ops::instances_in_region(&self.name))
            .await
            .expect("rows")
    }

    async fn sessions(&self, db: &HasuraClient) -> usize {
        let mut running = 0;
        for id in &self.hosts {
            running += common::boxes_on(db, id)
                .await
                .iter()
                .filter(|mandelbox| mandelbox.status == MandelboxStatus::Running)
                .count();
        }
        running
    }

    /// Every host's row and every session is still there.
    async fn assert_intact(&self, db: &HasuraClient, why: &str) {
        let rows = self.rows(db).await;
        for host in &self.hosts {
            assert!(
                rows.iter().any(|row| &row.id == host),
                "{why}: {host} gone: {rows:?}"
            );
        }
        assert_eq!(self.sessions(db).await, self.hosts.len(), "{why}: sessions");
    }
}

fn paused(region: &str, reason: &str) -> String {
    format!("whist_scaling_region_destruction_paused{{region=\"{region}\",reason=\"{reason}\"}}")
}

/// The count of passes in which `region` was paused for `reason`.
fn pauses(region: &str, reason: &str) -> String {
    format!("whist_scaling_destruction_pauses_total{{region=\"{region}\",reason=\"{reason}\"}}")
}

/// Waits for three more passes in which `region` stayed paused for `reason`, so what is asserted
/// next held through them: a count of passes, not a guess at how long they take.
async fn paused_for_several_passes(scaler: &Scaler, region: &str, reason: &str) {
    let before = scaler.metric(&pauses(region, reason)).await;
    eventually("three more paused passes", PATIENCE, || async {
        (scaler.metric(&pauses(region, reason)).await >= before + 3.0).then_some(())
    })
    .await;
}

/// Removes a tag from a machine in moto, as an operator's mistake would.
async fn remove_fleet_tag(id: &str, region: &str) {
    let moto = whist_test_support::moto::shared_moto();
    let body = format!(
        "Action=DeleteTags&Version=2016-11-15&ResourceId.1={id}&Tag.1.Key={}",
        tags::FLEET.replace(':', "%3A")
    );
    let response = reqwest::Client::new()
        .post(moto.endpoint())
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header(
            "Authorization",
            format!("AWS4-HMAC-SHA256 Credential=testing/20260101/{region}/ec2/aws4_request, SignedHeaders=host, Signature=0"),
        )
        .body(body)
        .send()
        .await
        .expect("moto answers");
    assert!(
        response.status().is_success(),
        "{:?}",
        response.text().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_of_another_environment_leaves_the_region_alone() {
    let name = "ca-central-1";
    let db = common::db();
    let region = LiveRegion::create(&db, name, 3).await;
    // The same database and cloud, the wrong environment (an operator's typo).
    let staging = Scaler::scaling_with(
        issuer().await,
        &[name],
        &unique("lease"),
        "staging",
        None,
        &["--environment", "staging"],
    )
    .await;
    eventually(
        "the region paused for the other fleet",
        PATIENCE,
        || async { (staging.metric(&paused(name, "foreign_fleet")).await == 1.0).then_some(()) },
    )
    .await;
    paused_for_several_passes(&staging, name, "foreign_fleet").await;
    region
        .assert_intact(&db, "another fleet's controller")
        .await;
    let launched = common::ec2()
        .list(name, (tags::FLEET, "whist-staging"))
        .await
        .expect("list");
    assert!(
        launched.is_empty(),
        "it launched its own buffer: {launched:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_lists_nothing_pauses_destruction_until_the_listing_returns() {
    let name = "eu-west-2";
    let db = common::db();
    let region = LiveRegion::create(&db, name, 3).await;
    let proxy =
        Ec2FaultProxy::start(&whist_test_support::moto::shared_moto().endpoint()).expect("proxy");
    proxy.set_mode(FaultMode::EmptyDescribe);
    let scaler = Scaler::scaling_with(
        issuer().await,
        &[name],
        &unique("lease"),
        "solo",
        Some(common::ec2_at(&proxy.endpoint())),
        &[],
    )
    .await;
    eventually(
        "the region paused for the empty listing",
        PATIENCE,
        || async { (scaler.metric(&paused(name, "empty_listing")).await == 1.0).then_some(()) },
    )
    .await;
    paused_for_several_passes(&scaler, name, "empty_listing").await;
    region.assert_intact(&db, "an empty listing").await;
    assert!(
        scaler
            .metric(&format!(
                "whist_scaling_destruction_pauses_total{{region=\"{name}\",reason=\"empty_listing\"}}"
            ))
            .await
            >= 2.0
    );

    // The listing comes back, and with it the region: one machine really went away meanwhile,
    // and its row goes after the grace (the others stay).
    let gone = region.hosts[0].clone();
    common::ec2()
        .terminate(name, std::slice::from_ref(&gone))
        .await
        .expect("terminate");
    proxy.set_mode(FaultMode::PassThrough);
    eventually("the pause lifted", PATIENCE, || async {
        (scaler.metric(&paused(name, "empty_listing")).await == 0.0).then_some(())
    })
    .await;
    eventually("the terminated machine's row deleted", PATIENCE, || async {
        (!region.rows(&db).await.iter().any(|row| row.id == gone)).then_some(())
    })
    .await;
    let rows = region.rows(&db).await;
    for kept in &region.hosts[1..] {
        assert!(rows.iter().any(|row| &row.id == kept), "{kept}: {rows:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_lost_most_hosts_pauses_destruction_until_they_are_back() {
    let name = "eu-west-3";
    let db = common::db();
    let region = LiveRegion::create(&db, name, 5).await;
    let proxy =
        Ec2FaultProxy::start(&whist_test_support::moto::shared_moto().endpoint()).expect("proxy");
    // 3 of 5 hosts (60%) missing from every answer, by tag or by id.
    proxy.set_mode(FaultMode::HideInstances(region.hosts[..3].to_vec()));
    let scaler = Scaler::scaling_with(
        issuer().await,
        &[name],
        &unique("lease"),
        "solo",
        Some(common::ec2_at(&proxy.endpoint())),
        &[],
    )
    .await;
    eventually("the region paused for the lost rows", PATIENCE, || async {
        (scaler.metric(&paused(name, "lost_rows")).await == 1.0).then_some(())
    })
    .await;
    paused_for_several_passes(&scaler, name, "lost_rows").await;
    region.assert_intact(&db, "a listing missing 60%").await;

    proxy.set_mode(FaultMode::PassThrough);
    eventually("the pause lifted", PATIENCE, || async {
        (scaler.metric(&paused(name, "lost_rows")).await == 0.0).then_some(())
    })
    .await;
    tokio::time::sleep(SEVERAL_PASSES).await;
    region.assert_intact(&db, "the listing back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_machine_the_cloud_reports_gone_loses_its_row_and_only_after_the_grace() {
    let name = "ap-northeast-1";
    let db = common::db();
    let region = LiveRegion::create(&db, name, 5).await;
    let _scaler = Scaler::scaling_with(
        issuer().await,
        &[name],
        &unique("lease"),
        "solo",
        None,
        &["--reconcile-grace", "4"],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    region.assert_intact(&db, "a healthy fleet").await;

    // One machine loses its fleet tag (still running); another is really terminated.
    let untagged = region.hosts[0].clone();
    let terminated = region.hosts[1].clone();
    remove_fleet_tag(&untagged, name).await;
    common::ec2()
        .terminate(name, std::slice::from_ref(&terminated))
        .await
        .expect("terminate");
    let ended = tokio::time::Instant::now();
    let listed = common::ec2()
        .list(name, (tags::FLEET, "whist-dev"))
        .await
        .expect("list");
    assert!(!listed.iter().any(|host| host.id == untagged));
    assert!(
        listed
            .iter()
            .any(|host| host.id == terminated && host.state == CloudState::Terminated)
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        region
            .rows(&db)
            .await
            .iter()
            .any(|row| row.id == terminated),
        "deleted before the grace, counted from when it was first seen gone"
    );
    eventually("the terminated machine's row deleted", PATIENCE, || async {
        (!region
            .rows(&db)
            .await
            .iter()
            .any(|row| row.id == terminated))
        .then_some(())
    })
    .await;
    assert!(ended.elapsed() >= Duration::from_secs(4));
    tokio::time::sleep(SEVERAL_PASSES).await;
    let rows = region.rows(&db).await;
    assert!(
        rows.iter().any(|row| row.id == untagged),
        "a machine merely missing from the listing keeps its row: {rows:?}"
    );
    for kept in &region.hosts[2..] {
        assert!(rows.iter().any(|row| &row.id == kept), "{kept}: {rows:?}");
    }
}

/// Most of a region's hosts falling silent at once is the hosts' network or the database: none
/// is reaped (each still serves a session) until they beat again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_hosts_falling_silent_at_once_are_not_reaped() {
    let name = "eu-south-1";
    let db = common::db();
    let region = LiveRegion::create(&db, name, 3).await;
    let scaler = Scaler::scaling(issuer().await, &[name], &unique("lease"), "solo").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Replacements for the silent hosts may launch, but never register: the region's hosts
    // that should beat stay the three.
    let image = region.rows(&db).await[0].image_id.clone();
    region.agents.never_boot.lock().expect("lock").push(image);
    region
        .agents
        .frozen
        .lock()
        .expect("lock")
        .extend(region.hosts[..2].iter().cloned());
    // Past the test settings' 5 s heartbeat timeout.
    eventually("reaping paused", PATIENCE, || async {
        (scaler.metric(&paused(name, "mass_heartbeat_loss")).await == 1.0).then_some(())
    })
    .await;
    paused_for_several_passes(&scaler, name, "mass_heartbeat_loss").await;
    region.assert_intact(&db, "two of three hosts silent").await;
    let running = common::cloud_hosts(name).await;
    for host in &region.hosts {
        assert!(
            running.iter().any(|machine| &machine.id == host),
            "{host} terminated"
        );
    }

    region.agents.frozen.lock().expect("lock").clear();
    eventually("the pause lifted", PATIENCE, || async {
        (scaler.metric(&paused(name, "mass_heartbeat_loss")).await == 0.0).then_some(())
    })
    .await;
    region.assert_intact(&db, "beating again").await;
}

/// Running machines of the fleet that mostly have no row mean the database lost rows (a
/// restore, a mistaken delete), not that their hosts left: none is terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_that_mostly_lack_rows_are_not_terminated() {
    let name = "sa-east-1";
    let db = common::db();
    let region = LiveRegion::create(&db, name, 1).await;
    // Three more machines of the fleet whose rows are gone.
    let orphans: Vec<String> = common::ec2()
        .launch(&LaunchRequest {
            region: name.to_owned(),
            image_id: unique("ami"),
            instance_type: common::INSTANCE_TYPE.to_owned(),
            count: 3,
            client_token: unique("token"),
            user_data: "#!/bin/sh\n".to_owned(),
            tags: [(tags::FLEET.to_owned(), "whist-dev".to_owned())].into(),
        })
        .await
        .expect("launch")
        .into_iter()
        .map(|host| host.id)
        .collect();
    // Old enough to look like hosts that drained and left (ready timeout 1 s, grace 2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let scaler = Scaler::scaling_configured(
        issuer().await,
        &[name],
        &unique("lease"),
        "solo",
        None,
        &[],
        whist_types::FleetSettings {
            instance_ready_timeout_seconds: 1,
            ..common::fast_settings()
        },
    )
    .await;
    eventually("the region paused", PATIENCE, || async {
        (scaler.metric(&paused(name, "unrecorded_machines")).await == 1.0).then_some(())
    })
    .await;
    paused_for_several_passes(&scaler, name, "unrecorded_machines").await;
    let running: Vec<String> = common::cloud_hosts(name)
        .await
        .into_iter()
        .map(|host| host.id)
        .collect();
    for orphan in &orphans {
        assert!(running.contains(orphan), "{orphan} terminated: {running:?}");
    }
    region.assert_intact(&db, "rows lost elsewhere").await;
}
