//! A scaling-service under test: the real service in process against the shared stack, the EC2
//! API from moto on loopback, and a token issuer on loopback. Each test works in its own regions.

#![allow(dead_code, unused_imports)]

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use clap::Parser;
use scaling_service::config::Args;
use scaling_service::hosts::ec2::{Ec2Hosts, Ec2Options};
use scaling_service::{Running, StartOptions};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use whist_dbclient::{HasuraClient, LiveOptions, ops};
use whist_test_support::jwt::TestIssuer;
use whist_types::{
    Instance, InstanceStatus, MandelboxId, MandelboxStatus, NewInstance, NewMandelbox, RegionConfig,
};

/// The certificate fingerprint test hosts publish (no TLS server presents it).
pub const TEST_FINGERPRINT: &str =
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

pub const INSTANCE_TYPE: &str = "g4dn.2xlarge";

pub fn db() -> HasuraClient {
    whist_logging::init_for_tests();
    whist_test_support::shared().client()
}

pub use whist_test_support::{eventually, unique};

pub fn fast_live_options() -> LiveOptions {
    LiveOptions {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(5),
        keep_alive_interval: Duration::from_secs(2),
        keep_alive_retries: 1,
    }
}

/// EC2 on the shared moto server, with static test credentials: never the real AWS.
pub fn ec2() -> Arc<Ec2Hosts> {
    ec2_at(&whist_test_support::moto::shared_moto().endpoint())
}

/// EC2 at `endpoint` (a fault proxy in front of moto), with static test credentials.
pub fn ec2_at(endpoint: &str) -> Arc<Ec2Hosts> {
    Arc::new(Ec2Hosts::new(Ec2Options {
        endpoint_url: Some(endpoint.to_owned()),
        credentials: Some(("testing".into(), "testing".into())),
        poll_interval: Duration::from_millis(200),
        ..Ec2Options::default()
    }))
}

pub struct Scaler {
    pub settings: Option<whist_types::FleetSettings>,
    pub db: HasuraClient,
    pub issuer: Arc<TestIssuer>,
    pub running: Option<Running>,
    pub shutdown: CancellationToken,
    pub http: reqwest::Client,
    pub extra_args: Vec<String>,
    /// The cloud this scaler uses; the shared moto when `None`.
    pub hosts: Option<Arc<dyn scaling_service::hosts::HostHandler>>,
}

impl Scaler {
    pub async fn start(issuer: Arc<TestIssuer>, extra_args: &[&str]) -> Self {
        let db = db();
        let mut scaler = Self {
            settings: None,
            db,
            issuer,
            running: None,
            shutdown: CancellationToken::new(),
            http: reqwest::Client::new(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            hosts: None,
        };
        scaler.launch().await;
        scaler
    }

    pub fn args(&self) -> Vec<String> {
        let stack = whist_test_support::shared();
        let mut args: Vec<String> = [
            "scaling-service",
            "--environment",
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--hasura-url",
            &stack.graphql_url,
            "--hasura-websocket-url",
            &stack.websocket_url,
            "--hasura-admin-secret",
            &stack.admin_secret,
            "--auth-issuer",
            self.issuer.issuer().as_str(),
            "--auth-audience",
            self.issuer.audience(),
            "--assign-burst-per-user",
            "5",
            "--resync-interval",
            "1",
            "--lease-seconds",
            "3",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(self.extra_args.iter().cloned());
        args
    }

    pub async fn launch(&mut self) {
        self.shutdown = CancellationToken::new();
        let config = Args::try_parse_from(self.args())
            .expect("arguments parse")
            .validate()
            .expect("valid configuration");
        let hosts = self.hosts.clone().unwrap_or_else(|| ec2());
        let running = scaling_service::start(
            config,
            hosts,
            StartOptions {
                live: Some(fast_live_options()),
                settings: self.settings.clone(),
                ..StartOptions::default()
            },
            self.shutdown.clone(),
        )
        .await
        .expect("starts");
        assert!(
            running.fleet.wait_complete(Duration::from_secs(20)).await,
            "the fleet view loads"
        );
        self.running = Some(running);
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
            running.wait().await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.running.as_ref().expect("running").addr
        )
    }

    pub async fn assign_as(&self, user: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url("/mandelbox/assign"))
            .bearer_auth(self.issuer.token(user))
            .json(&body)
            .send()
            .await
            .expect("answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub fn is_leader(&self) -> bool {
        *self.running.as_ref().expect("running").leader.borrow()
    }

    /// The value of one sample of `/metrics` (`name{labels}` as written there), 0 if absent.
    async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Whether `/metrics` has a line for `sample` at all.
    pub async fn metric_present(&self, sample: &str) -> bool {
        self.metrics_text()
            .await
            .lines()
            .any(|line| line.starts_with(sample))
    }

    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Scaler {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Takes every row of region `name` away (its mandelboxes first): AWS region names are shared by
/// runs of a test, so each starts from an empty region.
pub fn clean_region(name: &str) {
    whist_test_support::shared()
        .sql(&format!(
            "DELETE FROM whist.mandelboxes WHERE instance_id IN (SELECT id FROM whist.instances WHERE region = '{name}');
             DELETE FROM whist.instances WHERE region = '{name}';"
        ))
        .expect("clean region");
}

/// Enables region `name` with `desired` free sessions on the test instance type.
pub async fn configure_region(db: &HasuraClient, name: &str, desired: i32) {
    db.execute(&ops::set_region_config(&RegionConfig {
        region: name.to_owned(),
        enabled: true,
        desired_free_mandelboxes: desired,
        instance_types: vec![INSTANCE_TYPE.into()],
        schedule_time_zone: "UTC".into(),
    }))
    .await
    .expect("region config");
}

/// A region with a configuration, an image, and (optionally) ACTIVE hosts with WAITING boxes.
pub struct Region {
    pub name: String,
    pub image_id: String,
    pub client_sha: String,
}

impl Region {
    pub async fn create(db: &HasuraClient, desired_free: i32, enabled: bool) -> Self {
        let region = Self {
            name: unique("region"),
            image_id: unique("ami"),
            client_sha: unique("sha"),
        };
        db.execute(&ops::set_region_config(&RegionConfig {
            region: region.name.clone(),
            enabled,
            desired_free_mandelboxes: desired_free,
            instance_types: vec![INSTANCE_TYPE.into()],
            schedule_time_zone: "UTC".into(),
        }))
        .await
        .expect("region config");
        db.execute(&ops::set_image(
            "AWS",
            &region.name,
            &region.image_id,
            &region.client_sha,
        ))
        .await
        .expect("image");
        region
    }

    /// Writes `count` ACTIVE hosts with `boxes_each` WAITING mandelboxes, as registered hosts
    /// would. Returns their ids.
    pub async fn active_hosts(
        &self,
        db: &HasuraClient,
        count: usize,
        boxes_each: usize,
        image_id: &str,
    ) -> Vec<String> {
        let ids: Vec<String> = (0..count).map(|_| unique("i")).collect();
        let rows: Vec<NewInstance> = ids
            .iter()
            .map(|id| NewInstance {
                id: id.clone(),
                provider: "AWS".into(),
                region: self.name.clone(),
                image_id: image_id.to_owned(),
                client_sha: self.client_sha.clone(),
                instance_type: if boxes_each > 2 {
                    "g4dn.12xlarge"
                } else {
                    INSTANCE_TYPE
                }
                .into(),
                remaining_capacity: boxes_each as i32,
                status: InstanceStatus::PreConnection,
                fleet: Some("whist-dev".into()),
            })
            .collect();
        db.execute(&ops::insert_instances(&rows))
            .await
            .expect("instances");
        for id in &ids {
            register(db, id, boxes_each, &self.client_sha).await;
        }
        ids
    }

    pub async fn instances(&self, db: &HasuraClient) -> Vec<Instance> {
        db.execute(&ops::instances_in_region(&self.name))
            .await
            .expect("instances")
    }
}

/// Does what a booting host-service does to its row: ACTIVE with an address, then one WAITING
/// box per free session.
pub async fn register(db: &HasuraClient, id: &str, boxes: usize, client_sha: &str) {
    db.execute(&ops::register_instance(
        id,
        "127.0.0.1",
        client_sha,
        TEST_FINGERPRINT,
    ))
    .await
    .expect("register");
    let rows: Vec<NewMandelbox> = (0..boxes)
        .map(|_| NewMandelbox::waiting(MandelboxId::new_random(), "WHISTIUM", id))
        .collect();
    if !rows.is_empty() {
        db.execute(&ops::insert_mandelboxes(&rows))
            .await
            .expect("zygotes");
    }
}

pub fn assign_body(regions: &[&str], commit: &str) -> Value {
    json!({ "regions": regions, "client_commit_hash": commit, "session_id": Utc::now().timestamp_millis() })
}

pub async fn boxes_on(db: &HasuraClient, instance: &str) -> Vec<whist_types::Mandelbox> {
    db.execute(&ops::mandelboxes_on_instance(instance))
        .await
        .expect("boxes")
}

pub fn is_allocated(status: MandelboxStatus) -> bool {
    status == MandelboxStatus::Allocated
}

/// Settings that make the controller act within a test's patience.
pub fn fast_settings() -> whist_types::FleetSettings {
    whist_types::FleetSettings {
        mandelbox_limit_per_user: 3,
        scale_up_cooldown_seconds: 1,
        scale_down_cooldown_seconds: 0,
        scale_down_delay_seconds: 1,
        heartbeat_timeout_seconds: 5,
        instance_ready_timeout_seconds: 60,
        schedule_lead_seconds: 0,
    }
}

impl Scaler {
    /// A scaling replica owning `regions` under its own lease (so tests never share a leader).
    pub async fn scaling(
        issuer: Arc<TestIssuer>,
        regions: &[&str],
        lease: &str,
        replica: &str,
    ) -> Self {
        Self::scaling_with(issuer, regions, lease, replica, None, &[]).await
    }

    /// [`Scaler::scaling`] on its own cloud (`None`: the shared moto) with more options.
    pub async fn scaling_with(
        issuer: Arc<TestIssuer>,
        regions: &[&str],
        lease: &str,
        replica: &str,
        hosts: Option<Arc<dyn scaling_service::hosts::HostHandler>>,
        more_args: &[&str],
    ) -> Self {
        Self::scaling_configured(
            issuer,
            regions,
            lease,
            replica,
            hosts,
            more_args,
            fast_settings(),
        )
        .await
    }

    /// [`Scaler::scaling_with`] deciding with `settings`.
    pub async fn scaling_configured(
        issuer: Arc<TestIssuer>,
        regions: &[&str],
        lease: &str,
        replica: &str,
        hosts: Option<Arc<dyn scaling_service::hosts::HostHandler>>,
        more_args: &[&str],
        settings: whist_types::FleetSettings,
    ) -> Self {
        whist_test_support::shared()
            .sql(&format!(
                "INSERT INTO config.leases (name) VALUES ('{lease}') ON CONFLICT DO NOTHING"
            ))
            .expect("lease row");
        let mut scaler = Self {
            settings: Some(settings),
            db: db(),
            issuer,
            running: None,
            shutdown: CancellationToken::new(),
            http: reqwest::Client::new(),
            extra_args: vec![
                "--managed-regions".into(),
                regions.join(","),
                "--lease-name".into(),
                lease.into(),
                "--replica-id".into(),
                replica.into(),
                "--reconcile-grace".into(),
                "2".into(),
            ]
            .into_iter()
            .chain(more_args.iter().map(|arg| (*arg).to_owned()))
            .collect(),
            hosts,
        };
        scaler.launch().await;
        scaler
    }
}

/// Plays the hosts of `region`: registers every PRE_CONNECTION row (as its host-service would,
/// with one WAITING box per free session) and heartbeats every ACTIVE or DRAINING row, except
/// the hosts listed in `frozen` (dead machines) and images in `never_boot`.
pub struct HostAgents {
    pub frozen: Arc<std::sync::Mutex<Vec<String>>>,
    pub never_boot: Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl HostAgents {
    pub fn start(db: HasuraClient, region: String) -> Self {
        let frozen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let never_boot = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let stop = CancellationToken::new();
        let (f, n, s) = (frozen.clone(), never_boot.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let instances = db
                    .execute(&ops::instances_in_region(&region))
                    .await
                    .unwrap_or_default();
                for instance in instances {
                    if f.lock().expect("lock").contains(&instance.id) {
                        continue;
                    }
                    match instance.status {
                        InstanceStatus::PreConnection => {
                            if n.lock().expect("lock").contains(&instance.image_id) {
                                continue;
                            }
                            let capacity = instance.remaining_capacity.max(0) as usize;
                            register(&db, &instance.id, capacity, &instance.client_sha).await;
                        }
                        _ => {
                            let _ = db.execute(&ops::heartbeat(&instance.id)).await;
                        }
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = s.cancelled() => return,
                }
            }
        });
        Self {
            frozen,
            never_boot,
            stop,
        }
    }
}

impl Drop for HostAgents {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Our machines in `region` that moto reports running or pending.
pub async fn cloud_hosts(region: &str) -> Vec<scaling_service::hosts::CloudHost> {
    use scaling_service::hosts::{CloudState, HostHandler};
    ec2()
        .list(
            region,
            (scaling_service::executor::tags::FLEET, "whist-dev"),
        )
        .await
        .expect("list")
        .into_iter()
        .filter(|h| matches!(h.state, CloudState::Pending | CloudState::Running))
        .collect()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}
