//! One leader at a time, provably, with the real binary: a leader frozen past its lease or cut
//! off from the database mid-launch never acts again once a new term began, a deficit is
//! launched exactly once, and a clean stop hands the lease over at once. Two scaling-service
//! processes share the stack and moto (both on loopback), each test under its own lease and
//! AWS region.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, unique};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use scaling_service::executor::tags;
use scaling_service::hosts::{CloudHost, HostHandler};
use whist_dbclient::{HasuraClient, ops};
use whist_test_support::faults::{CuttableProxy, Ec2FaultProxy, FaultMode};

const PATIENCE: Duration = Duration::from_secs(60);
const FLEET: &str = "whist-local";

/// A scaling-service process; killed when dropped. Its log is kept in a file for the asserts.
struct Replica {
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct ReplicaOptions {
    replica: String,
    lease: String,
    lease_seconds: u32,
    region: String,
    graphql_url: String,
    websocket_url: String,
    ec2_endpoint: String,
}

impl Replica {
    fn spawn(options: &ReplicaOptions) -> Self {
        let stack = whist_test_support::shared();
        let dir = std::env::temp_dir().join(unique("replica"));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("scaling-service.log");
        let file = std::fs::File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_scaling-service"))
            .args(["--environment", "local", "--listen", "127.0.0.1:0"])
            .args(["--hasura-url", &options.graphql_url])
            .args(["--hasura-websocket-url", &options.websocket_url])
            .args(["--hasura-admin-secret", &stack.admin_secret])
            .args([
                "--lease-name",
                &options.lease,
                "--replica-id",
                &options.replica,
            ])
            .args(["--lease-seconds", &options.lease_seconds.to_string()])
            .args(["--managed-regions", &options.region])
            .args(["--resync-interval", "1", "--reconcile-grace", "2"])
            .args(["--ec2-endpoint", &options.ec2_endpoint])
            // Static test credentials; never the real metadata service or files.
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("RUST_LOG", "info")
            .env_remove("APP_ENV")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawn scaling-service");
        Self {
            child,
            log,
            _dir: TempDir(dir),
        }
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        kill(pid, signal).expect("signal");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit code (SIGKILL after 30 s).
    async fn stop(mut self) -> Option<i32> {
        self.signal(Signal::SIGTERM);
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(holder, generation)` of the lease, as the database has it.
fn holder(lease: &str) -> Option<(String, i64)> {
    let row = whist_test_support::shared()
        .sql(&format!(
            "SELECT coalesce(holder, '') || ' ' || generation FROM config.leases WHERE name = '{lease}' AND expires_at > now()"
        ))
        .expect("lease");
    let (holder, generation) = row.trim().split_once(' ')?;
    (!holder.is_empty()).then(|| (holder.to_owned(), generation.parse().expect("generation")))
}

async fn wait_holder(lease: &str, replica: &str) -> i64 {
    eventually(
        &format!("{replica} to hold the lease"),
        PATIENCE,
        || async {
            holder(lease)
                .filter(|(holder, _)| holder == replica)
                .map(|(_, generation)| generation)
        },
    )
    .await
}

/// A fresh region wanting nothing yet, with an image; no machine or row of the fleet left in
/// it from an earlier run.
async fn region(db: &HasuraClient, name: &str) -> (String, String) {
    let ec2 = common::ec2();
    let old: Vec<String> = ec2
        .list(name, (tags::FLEET, FLEET))
        .await
        .expect("list")
        .into_iter()
        .map(|host| host.id)
        .collect();
    ec2.terminate(name, &old).await.expect("clean machines");
    common::clean_region(name);
    let image_id = unique("ami");
    let client_sha = unique("sha");
    set_desired(db, name, 0).await;
    db.execute(&ops::set_image("AWS", name, &image_id, &client_sha))
        .await
        .expect("image");
    (image_id, client_sha)
}

async fn set_desired(db: &HasuraClient, name: &str, desired: i32) {
    common::configure_region(db, name, desired).await;
}

/// Every machine of the fleet in `region` that was not terminated before the test.
async fn machines(region: &str) -> Vec<CloudHost> {
    common::ec2()
        .list(region, (tags::FLEET, FLEET))
        .await
        .expect("list")
        .into_iter()
        .filter(|host| host.state != scaling_service::hosts::CloudState::Terminated)
        .collect()
}

async fn rows(db: &HasuraClient, region: &str) -> Vec<whist_types::Instance> {
    db.execute(&ops::instances_in_region(region))
        .await
        .expect("rows")
}

fn generation_of(host: &CloudHost) -> i64 {
    host.tags
        .get(tags::TERM)
        .and_then(|value| value.parse().ok())
        .expect("launches carry their term")
}

/// A replica straight on the stack and moto.
fn direct(replica: &str, lease: &str, lease_seconds: u32, region: &str) -> ReplicaOptions {
    let stack = whist_test_support::shared();
    ReplicaOptions {
        replica: replica.to_owned(),
        lease: lease.to_owned(),
        lease_seconds,
        region: region.to_owned(),
        graphql_url: stack.graphql_url.clone(),
        websocket_url: stack.websocket_url.clone(),
        ec2_endpoint: whist_test_support::moto::shared_moto().endpoint(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_never_acts_again_and_the_deficit_is_launched_once() {
    let name = "ap-south-1";
    let db = common::db();
    region(&db, name).await;
    let lease = unique("lease");
    let a = Replica::spawn(&direct("a", &lease, 3, name));
    wait_holder(&lease, "a").await;
    let b = Replica::spawn(&direct("b", &lease, 3, name));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Frozen for two lease lengths while the region needs two hosts (4 sessions, 2 a host).
    a.signal(Signal::SIGSTOP);
    let frozen = tokio::time::Instant::now();
    set_desired(&db, name, 4).await;
    let new_generation = wait_holder(&lease, "b").await;
    eventually("the new leader's launch", PATIENCE, || async {
        (machines(name).await.len() == 2 && rows(&db, name).await.len() == 2).then_some(())
    })
    .await;
    tokio::time::sleep_until(frozen + Duration::from_secs(6)).await;
    a.signal(Signal::SIGCONT);

    // The old leader wakes to a view of the deficit; its term is over, so nothing happens.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let launched = machines(name).await;
    assert_eq!(
        launched.len(),
        2,
        "the deficit of 2 launched once: {launched:?}"
    );
    assert!(
        launched
            .iter()
            .all(|host| generation_of(host) == new_generation),
        "every machine is the new term's: {launched:?}"
    );
    assert_eq!(rows(&db, name).await.len(), 2);
    assert_eq!(
        holder(&lease).map(|(holder, _)| holder).as_deref(),
        Some("b")
    );
    let a_log = a.log();
    assert!(!a_log.contains("launched hosts"), "{a_log}");
    assert_eq!(b.stop().await, Some(0));
    assert_eq!(a.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_mid_launch_loses_nothing_and_nothing_is_launched_twice() {
    let name = "eu-north-1";
    let db = common::db();
    region(&db, name).await;
    let lease = unique("lease");
    let stack = whist_test_support::shared();
    let engine: std::net::SocketAddr = url::Url::parse(&stack.graphql_url)
        .expect("url")
        .socket_addrs(|| None)
        .expect("address")[0];
    let cut = CuttableProxy::start(engine).expect("database proxy");
    let swap = |url: &str| url.replace(&engine.to_string(), &cut.addr().to_string());
    let slow_ec2 = Ec2FaultProxy::start(&whist_test_support::moto::shared_moto().endpoint())
        .expect("ec2 proxy");
    // The launch is in flight long enough to lose the database under it.
    slow_ec2.set_mode(FaultMode::DelayActions {
        actions: vec!["RunInstances".into()],
        delay: Duration::from_millis(1500),
    });
    let a = Replica::spawn(&ReplicaOptions {
        graphql_url: swap(&stack.graphql_url),
        websocket_url: swap(&stack.websocket_url),
        ec2_endpoint: slow_ec2.endpoint(),
        ..direct("a", &lease, 6, name)
    });
    let old_generation = wait_holder(&lease, "a").await;
    let b = Replica::spawn(&direct("b", &lease, 6, name));
    tokio::time::sleep(Duration::from_secs(1)).await;

    set_desired(&db, name, 4).await;
    eventually("the leader's launch in flight", PATIENCE, || async {
        (slow_ec2.calls("RunInstances") > 0).then_some(())
    })
    .await;
    cut.cut();
    let new_generation = wait_holder(&lease, "b").await;
    assert!(new_generation > old_generation);
    // The new term starts by recording what the old one launched but could not record.
    eventually("the old term's machines recorded", PATIENCE, || async {
        let rows = rows(&db, name).await;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    cut.restore();
    tokio::time::sleep(Duration::from_secs(6)).await;

    let launched = machines(name).await;
    assert_eq!(
        launched.len(),
        2,
        "the deficit of 2 launched once: {launched:?}"
    );
    assert!(
        launched
            .iter()
            .all(|host| generation_of(host) == old_generation),
        "only the old term launched, before the new one began: {launched:?}"
    );
    let recorded = rows(&db, name).await;
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert!(
        recorded
            .iter()
            .all(|row| row.fleet.as_deref() == Some(FLEET)
                && launched.iter().any(|host| host.id == row.id))
    );
    assert_eq!(
        holder(&lease).map(|(holder, _)| holder).as_deref(),
        Some("b")
    );
    assert_eq!(b.stop().await, Some(0));
    assert_eq!(a.stop().await, Some(0));
}

/// A clean stop releases the lease, so the standby takes over at once rather than after the
/// lease would have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_hands_the_lease_over_at_once() {
    let name = "af-south-1";
    let lease = unique("lease");
    let a = Replica::spawn(&direct("a", &lease, 30, name));
    wait_holder(&lease, "a").await;
    let b = Replica::spawn(&direct("b", &lease, 30, name));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopped = tokio::time::Instant::now();
    assert_eq!(a.stop().await, Some(0));
    wait_holder(&lease, "b").await;
    eprintln!(
        "handover after a clean stop: {:?} (lease 30 s)",
        stopped.elapsed()
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "took {:?}: the lease was not handed back",
        stopped.elapsed()
    );
    assert_eq!(b.stop().await, Some(0));
}
