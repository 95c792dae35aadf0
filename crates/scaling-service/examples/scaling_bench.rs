//! scaling-service benchmarks: prints figures, asserts nothing. Run with `make bench-scaling`.
//!
//! - assignments per second and latency with 32 and 128 concurrent clients (real JWTs, the real
//!   assign), side by side with bare claims through the engine at the same concurrency over as
//!   many boxes (the ceiling an assign can approach), each followed by a consistency check of
//!   the database; once with the engine pushing live-query changes (NOTIFY), once polling them
//!   every second only, as Hasura does;
//! - a soak: 10^5 assigns over 50 regions while sessions end and boxes come back, then the same
//!   consistency check over all of them;
//! - from the database write that drops a region below its target to the launch call reaching the
//!   cloud (EC2 API from moto on loopback).
//!
//! `decide` alone is measured by `decide_bench`. `WHIST_BENCH_POLLING_ONLY=1` runs the polling
//! half of the assign figures only.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use scaling_service::config::Args;
use scaling_service::hosts::ec2::{Ec2Hosts, Ec2Options};
use scaling_service::hosts::{CloudHost, Described, HostError, HostHandler, LaunchRequest};
use scaling_service::{Running, StartOptions};
use whist_dbclient::{HasuraClient, ops};
use whist_test_support::bench::{quantile, summary};
use whist_test_support::jwt::TestIssuer;
use whist_test_support::{Stack, StackInfo, StackOptions};
use whist_types::{
    FleetSettings, InstanceStatus, MandelboxId, MandelboxStatus, NewInstance, NewMandelbox,
    RegionConfig,
};

/// The certificate fingerprint the benchmark's hosts publish (no TLS server presents it).
const BENCH_FINGERPRINT: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    whist_logging::init_from_env()?;
    let issuer = Arc::new(TestIssuer::start().await?);
    let moto = whist_test_support::moto::Moto::start()?;
    let ec2 = Arc::new(Ec2Hosts::new(Ec2Options {
        endpoint_url: Some(moto.endpoint()),
        credentials: Some(("bench".into(), "bench".into())),
        ..Ec2Options::default()
    }));
    {
        let polling = Stack::start(&StackOptions {
            notify_triggers: false,
            subscription_refresh_seconds: 1,
            ..StackOptions::default()
        })?;
        assignments(
            &polling,
            &issuer,
            ec2.clone(),
            "polling every second, no NOTIFY (as Hasura)",
        )
        .await?;
    }
    // `WHIST_BENCH_POLLING_ONLY=1` stops here: the Hasura-like half alone, for quick comparisons.
    if std::env::var_os("WHIST_BENCH_POLLING_ONLY").is_some() {
        return Ok(());
    }
    let stack = Stack::start(&StackOptions::default())?;
    let db = stack.info().client();

    assignments(&stack, &issuer, ec2.clone(), "pushing changes (NOTIFY)").await?;
    soak(&stack, &issuer, ec2.clone()).await?;

    println!("== database event → launch call");
    let recorder = Arc::new(Recording {
        inner: ec2.clone(),
        calls: Mutex::new(Vec::new()),
    });
    // One fresh region per round (moto knows only real region names), configured last so the
    // controller first sees it exactly at its target.
    const REGIONS: [&str; 10] = [
        "us-east-1",
        "us-east-2",
        "us-west-1",
        "us-west-2",
        "eu-west-1",
        "eu-west-2",
        "eu-central-1",
        "ap-southeast-1",
        "ap-southeast-2",
        "ap-northeast-1",
    ];
    let settings = FleetSettings {
        mandelbox_limit_per_user: 3,
        scale_up_cooldown_seconds: 0,
        scale_down_cooldown_seconds: 3600,
        scale_down_delay_seconds: 3600,
        heartbeat_timeout_seconds: 3600,
        instance_ready_timeout_seconds: 3600,
        schedule_lead_seconds: 0,
    };
    let managed = REGIONS.join(",");
    let leader = start(
        stack.info(),
        &issuer,
        recorder.clone(),
        &["--managed-regions", &managed, "--lease-seconds", "3"],
        Some(settings),
    )
    .await?;
    while !*leader.leader.borrow() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut samples = Vec::new();
    for (round, region) in REGIONS.iter().enumerate() {
        // The host first, under a target of 0; then the target of 2, which it meets exactly.
        let boxes = fleet_with_target(&db, region, 2, 0).await?;
        wait_loaded(&leader, region, boxes.len()).await;
        set_target(&db, region, 2).await?;
        while leader
            .fleet
            .current()
            .regions
            .get(*region)
            .is_none_or(|config| config.desired_free_mandelboxes != 2)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = recorder.calls.lock().map(|c| c.len()).unwrap_or(0);
        let written = Instant::now();
        db.claim_mandelbox(boxes[0], &format!("bench-{round}"), "1")
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let call = recorder
                .calls
                .lock()
                .ok()
                .and_then(|c| c.get(before).copied());
            if let Some(at) = call {
                samples.push(at.duration_since(written));
                break;
            }
            if Instant::now() > deadline {
                println!("  {region}: no launch within 10 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    println!(
        "  claim committed → RunInstances called: {}",
        summary(&mut samples)
    );
    leader.shutdown();
    leader.wait().await;
    Ok(())
}

/// Bare claims, then assigns, at 32 and 128 clients, each over a fresh region of 200 hosts with
/// 12 boxes each, on one stack.
async fn assignments(
    stack: &Stack,
    issuer: &Arc<TestIssuer>,
    cloud: Arc<Ec2Hosts>,
    mode: &str,
) -> anyhow::Result<()> {
    println!("== assignments, the engine {mode}");
    let db = stack.info().client();
    let api = api_replica(stack, issuer, cloud).await?;
    for clients in [32usize, 128] {
        let region = format!("bench-claim-{clients}-{}", uuid::Uuid::new_v4().simple());
        let boxes = fleet(&db, &region, 200, 12).await?;
        let bare = claim_load(&db, &boxes, clients).await;
        println!("  {clients:>3} claimers, bare claims:   {bare}");
        println!("      {}", consistency(&db, &region, bare.assigned).await?);
        let region = format!("bench-assign-{clients}-{}", uuid::Uuid::new_v4().simple());
        let boxes = fleet(&db, &region, 200, 12).await?;
        let report = assign_load(&api, issuer, &region, clients, boxes.len()).await?;
        println!("  {clients:>3} clients, assigns:        {report}");
        println!(
            "      assigns / bare claims: {:.2} (target ≥ 0.80); p99 {:.1} ms (target ≤ {} ms)",
            report.per_second / bare.per_second,
            quantile(&report.latencies, 0.99).as_secs_f64() * 1e3,
            if clients <= 32 { 50 } else { 200 }
        );
        // Where an assign's time goes: the decision inside the database, as its ledger row
        // records it; the rest is the service, the engine and the round trips.
        let inside = stack.info().sql(&format!(
            "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY decision_ms)::numeric, 2) || ' / ' || \
                    round(percentile_cont(0.99) WITHIN GROUP (ORDER BY decision_ms)::numeric, 2) \
             FROM whist.assign_ledger WHERE regions ? '{region}'"
        ))?;
        println!(
            "      the decision inside the database: p50 / p99 {} ms",
            inside.trim()
        );
        println!(
            "      {}",
            consistency(&db, &region, report.assigned).await?
        );
    }
    api.shutdown();
    api.wait().await;
    Ok(())
}

/// `clients` loops claiming the boxes in turn through the engine alone (the claim mutation,
/// no service in between), each claim for a fresh user.
async fn claim_load(db: &HasuraClient, boxes: &[MandelboxId], clients: usize) -> LoadReport {
    let boxes = Arc::new(boxes.to_vec());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (db, boxes, next) = (db.clone(), boxes.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let (mut assigned, mut refused) = (0, 0);
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&id) = boxes.get(n) else { break };
                    let sent = Instant::now();
                    let outcome = db.claim_mandelbox(id, &format!("claimer-{n}"), "1").await;
                    latencies.push(sent.elapsed());
                    match outcome {
                        Ok(whist_dbclient::ClaimOutcome::Claimed(_)) => assigned += 1,
                        _ => refused += 1,
                    }
                }
                (assigned, refused, latencies)
            })
        })
        .collect();
    LoadReport::gather(tasks, started).await
}

/// An API-only replica whose per-user allowance never gets in the measurement's way.
async fn api_replica(
    stack: &Stack,
    issuer: &TestIssuer,
    cloud: Arc<Ec2Hosts>,
) -> anyhow::Result<Running> {
    start(
        stack.info(),
        issuer,
        cloud,
        &["--api-only", "--assign-burst-per-user", "1000000"],
        None,
    )
    .await
}

async fn start(
    info: &StackInfo,
    issuer: &TestIssuer,
    hosts: Arc<dyn HostHandler>,
    extra: &[&str],
    settings: Option<FleetSettings>,
) -> anyhow::Result<Running> {
    let mut args: Vec<String> = [
        "scaling-service",
        "--environment",
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--hasura-url",
        &info.graphql_url,
        "--hasura-websocket-url",
        &info.websocket_url,
        "--hasura-admin-secret",
        &info.admin_secret,
        "--auth-issuer",
        issuer.issuer().as_str(),
        "--auth-audience",
        issuer.audience(),
        "--reconcile-grace",
        "3600",
        // The assign path is measured here, not the listener's limits: room for every client.
        "--max-connections",
        "1000",
        "--max-connections-per-peer",
        "1000",
        "--max-in-flight",
        "1000",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    let config = <Args as clap::Parser>::try_parse_from(args)?.validate()?;
    let running = scaling_service::start(
        config,
        hosts,
        StartOptions {
            settings,
            ..StartOptions::default()
        },
        Default::default(),
    )
    .await?;
    running.fleet.wait_complete(Duration::from_secs(20)).await;
    Ok(running)
}

/// `hosts` ACTIVE hosts with `boxes` WAITING mandelboxes each, in a fresh region.
async fn fleet(
    db: &HasuraClient,
    region: &str,
    hosts: usize,
    boxes: usize,
) -> anyhow::Result<Vec<MandelboxId>> {
    db.execute(&ops::set_region_config(&RegionConfig {
        region: region.to_owned(),
        enabled: true,
        desired_free_mandelboxes: 0,
        instance_types: vec!["g4dn.12xlarge".into()],
        schedule_time_zone: "UTC".into(),
    }))
    .await?;
    db.execute(&ops::set_image("AWS", region, "ami-bench", "bench-sha"))
        .await?;
    let instances: Vec<NewInstance> = (0..hosts)
        .map(|n| NewInstance {
            id: format!("i-{region}-{n}"),
            provider: "AWS".into(),
            region: region.to_owned(),
            image_id: "ami-bench".into(),
            client_sha: "bench-sha".into(),
            instance_type: "g4dn.12xlarge".into(),
            remaining_capacity: boxes as i32,
            status: InstanceStatus::PreConnection,
            fleet: Some("whist-dev".into()),
        })
        .collect();
    db.execute(&ops::insert_instances(&instances)).await?;
    for instance in &instances {
        db.execute(&ops::register_instance(
            &instance.id,
            "127.0.0.1",
            "bench-sha",
            BENCH_FINGERPRINT,
        ))
        .await?;
    }
    let rows: Vec<NewMandelbox> = instances
        .iter()
        .flat_map(|i| {
            (0..boxes).map(|_| NewMandelbox::waiting(MandelboxId::new_random(), "WHISTIUM", &i.id))
        })
        .collect();
    for chunk in rows.chunks(500) {
        db.execute(&ops::insert_mandelboxes(chunk)).await?;
    }
    Ok(rows.into_iter().map(|r| r.id).collect())
}

async fn fleet_with_target(
    db: &HasuraClient,
    region: &str,
    target: i32,
    initial_target: i32,
) -> anyhow::Result<Vec<MandelboxId>> {
    db.execute(&ops::set_image("AWS", region, "ami-bench", "bench-sha"))
        .await?;
    let id = format!("i-{}", uuid::Uuid::new_v4().simple());
    db.execute(&ops::insert_instances(&[NewInstance {
        id: id.clone(),
        provider: "AWS".into(),
        region: region.to_owned(),
        image_id: "ami-bench".into(),
        client_sha: "bench-sha".into(),
        instance_type: "g4dn.2xlarge".into(),
        remaining_capacity: target,
        status: InstanceStatus::PreConnection,
        fleet: Some("whist-dev".into()),
    }]))
    .await?;
    db.execute(&ops::register_instance(
        &id,
        "127.0.0.1",
        "bench-sha",
        BENCH_FINGERPRINT,
    ))
    .await?;
    let rows: Vec<NewMandelbox> = (0..target)
        .map(|_| NewMandelbox::waiting(MandelboxId::new_random(), "WHISTIUM", &id))
        .collect();
    db.execute(&ops::insert_mandelboxes(&rows)).await?;
    set_target(db, region, initial_target).await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

async fn set_target(db: &HasuraClient, region: &str, target: i32) -> anyhow::Result<()> {
    db.execute(&ops::set_region_config(&RegionConfig {
        region: region.to_owned(),
        enabled: true,
        desired_free_mandelboxes: target,
        instance_types: vec!["g4dn.2xlarge".into()],
        schedule_time_zone: "UTC".into(),
    }))
    .await?;
    Ok(())
}

const SOAK_ASSIGNS: usize = 100_000;
const SOAK_REGIONS: usize = 50;

/// 64 clients assign across 50 regions (4 hosts of 10 boxes each) until 10^5 sessions were
/// given (or 10 minutes passed); each session ends at once and its host makes a new box, as a
/// host does. Then every host must be whole again and the ledger must hold each session once.
async fn soak(stack: &Stack, issuer: &Arc<TestIssuer>, cloud: Arc<Ec2Hosts>) -> anyhow::Result<()> {
    println!(
        "== soak: {SOAK_ASSIGNS} assigns over {SOAK_REGIONS} regions, sessions ending as they come"
    );
    let db = stack.info().client();
    let api = api_replica(stack, issuer, cloud).await?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut regions = Vec::new();
    for n in 0..SOAK_REGIONS {
        let region = format!("bench-soak-{tag}-{n}");
        fleet(&db, &region, 4, 10).await?;
        regions.push(region);
    }
    let regions = Arc::new(regions);
    // The hosts beat as real ones do (a silent host gets no session after 90 s).
    let beating = tokio_util::sync::CancellationToken::new();
    let heartbeats = {
        let (db, stop, hosts) = (db.clone(), beating.clone(), {
            let mut hosts = Vec::new();
            for region in regions.iter() {
                hosts.extend(
                    db.execute(&ops::instances_in_region(region))
                        .await?
                        .into_iter()
                        .map(|i| i.id),
                );
            }
            hosts
        });
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                for host in &hosts {
                    let _ = db.execute(&ops::heartbeat(host)).await;
                }
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
            }
        })
    };
    let url = format!("http://{}/mandelbox/assign", api.addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let given = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(600);
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|client| {
            let (http, url, db, regions, given) =
                (http.clone(), url.clone(), db.clone(), regions.clone(), given.clone());
            let tokens: Vec<String> = (0..8)
                .map(|n| issuer.token(&format!("soak-{tag}-{client}-{n}")))
                .collect();
            tokio::spawn(async move {
                let (mut refused, mut latencies) = (0usize, Vec::new());
                let mut turn = client;
                while given.load(std::sync::atomic::Ordering::Relaxed) < SOAK_ASSIGNS
                    && Instant::now() < deadline
                {
                    turn += 1;
                    let region = &regions[turn % regions.len()];
                    let sent = Instant::now();
                    let reply = http
                        .post(&url)
                        .bearer_auth(&tokens[turn % tokens.len()])
                        .json(&serde_json::json!({"regions": [region], "client_commit_hash": "bench-sha"}))
                        .send()
                        .await;
                    latencies.push(sent.elapsed());
                    let Ok(reply) = reply else { refused += 1; continue };
                    if reply.status() != 200 {
                        refused += 1;
                        continue;
                    }
                    let body: serde_json::Value = reply.json().await.unwrap_or_default();
                    let Some(id) = body["mandelbox_id"].as_str().and_then(|id| id.parse().ok()) else {
                        refused += 1;
                        continue;
                    };
                    given.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // The session ends; its host removes the box and makes a new one.
                    if let Ok(Some(row)) = db.execute(&ops::delete_mandelbox(MandelboxId(id))).await {
                        let _ = db
                            .execute(&ops::insert_mandelboxes(&[NewMandelbox::waiting(
                                MandelboxId::new_random(),
                                "WHISTIUM",
                                &row.instance_id,
                            )]))
                            .await;
                    }
                }
                (refused, latencies)
            })
        })
        .collect();
    let (mut refused, mut latencies) = (0, Vec::new());
    for task in tasks {
        let (task_refused, task_latencies) = task.await?;
        refused += task_refused;
        latencies.extend(task_latencies);
    }
    beating.cancel();
    heartbeats.await?;
    let given = given.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "  {given} assigned, {refused} refused in {:.0} s ({:.0}/s); latency {}",
        started.elapsed().as_secs_f64(),
        given as f64 / started.elapsed().as_secs_f64(),
        summary(&mut latencies)
    );
    // Every host whole again (each session ended), ten WAITING boxes each, and the ledger
    // holding each given session once.
    let like = format!("bench-soak-{tag}-%");
    let check = stack.info().sql(&format!(
        "SELECT (SELECT count(*) FROM whist.instances WHERE region LIKE '{like}' AND remaining_capacity <> 10) || ' ' || \
                (SELECT count(*) FROM whist.mandelboxes m JOIN whist.instances i ON i.id = m.instance_id \
                   WHERE i.region LIKE '{like}' AND m.status = 'WAITING') || ' ' || \
                (SELECT count(*) FROM whist.assign_ledger WHERE region LIKE '{like}' AND outcome = 'ASSIGNED') || ' ' || \
                (SELECT count(DISTINCT mandelbox_id) FROM whist.assign_ledger WHERE region LIKE '{like}' AND outcome = 'ASSIGNED')"
    ))?;
    let numbers: Vec<usize> = check
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let hosts = SOAK_REGIONS * 4;
    let consistent = numbers == [0, hosts * 10, given, given];
    println!(
        "  consistency: {} of {hosts} hosts not whole, {} WAITING boxes of {}, ledger {} ASSIGNED rows ({} distinct boxes) for {given} answers → {}",
        numbers.first().copied().unwrap_or(usize::MAX),
        numbers.get(1).copied().unwrap_or(0),
        hosts * 10,
        numbers.get(2).copied().unwrap_or(0),
        numbers.get(3).copied().unwrap_or(0),
        if consistent {
            "consistent"
        } else {
            "INCONSISTENT"
        }
    );
    api.shutdown();
    api.wait().await;
    Ok(())
}

/// Until the replica's view shows the region's hosts ACTIVE with `boxes` capacity in all.
async fn wait_loaded(running: &Running, region: &str, boxes: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let fleet = running.fleet.current();
        let capacity: i32 = fleet
            .instances_in(region)
            .filter(|i| i.status == InstanceStatus::Active)
            .map(|i| i.remaining_capacity)
            .sum();
        if capacity as usize >= boxes {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct LoadReport {
    assigned: usize,
    refused: usize,
    per_second: f64,
    latencies: Vec<Duration>,
}

/// What one load loop returns: sessions given, refusals, each request's latency.
type LoopResult = (usize, usize, Vec<Duration>);

impl LoadReport {
    /// The loops' results together, per second of wall time since `started`.
    async fn gather(tasks: Vec<tokio::task::JoinHandle<LoopResult>>, started: Instant) -> Self {
        let mut report = Self {
            assigned: 0,
            refused: 0,
            per_second: 0.0,
            latencies: Vec::new(),
        };
        for task in tasks {
            if let Ok((assigned, refused, latencies)) = task.await {
                report.assigned += assigned;
                report.refused += refused;
                report.latencies.extend(latencies);
            }
        }
        report.per_second = report.assigned as f64 / started.elapsed().as_secs_f64();
        report
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut latencies = self.latencies.clone();
        write!(
            f,
            "{:.0}/s ({} given, {} refused); latency {}",
            self.per_second,
            self.assigned,
            self.refused,
            summary(&mut latencies)
        )
    }
}

/// `clients` loops, each assigning as fresh users until the region's boxes run out.
async fn assign_load(
    running: &Running,
    issuer: &TestIssuer,
    region: &str,
    clients: usize,
    boxes: usize,
) -> anyhow::Result<LoadReport> {
    let url = format!("http://{}/mandelbox/assign", running.addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    // Tokens are made beforehand: signing is the client's cost, not the service's.
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..boxes + clients)
            .map(|n| issuer.token(&format!("{region}-user-{n}")))
            .collect(),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, tokens, next, region) = (http.clone(), url.clone(), tokens.clone(), next.clone(), region.to_owned());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let (mut assigned, mut refused) = (0, 0);
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(token) = tokens.get(n) else { break };
                    let sent = Instant::now();
                    let response = http
                        .post(&url)
                        .bearer_auth(token)
                        .json(&serde_json::json!({"regions": [region], "client_commit_hash": "bench-sha"}))
                        .send()
                        .await;
                    latencies.push(sent.elapsed());
                    match response.map(|r| r.status().as_u16()) {
                        Ok(200) => assigned += 1,
                        _ => {
                            refused += 1;
                            break;
                        }
                    }
                }
                (assigned, refused, latencies)
            })
        })
        .collect();
    Ok(LoadReport::gather(tasks, started).await)
}

async fn consistency(db: &HasuraClient, region: &str, assigned: usize) -> anyhow::Result<String> {
    let instances = db.execute(&ops::instances_in_region(region)).await?;
    let mut allocated = Vec::new();
    let mut remaining = 0i64;
    for instance in &instances {
        remaining += i64::from(instance.remaining_capacity);
        for mandelbox in db
            .execute(&ops::mandelboxes_on_instance(&instance.id))
            .await?
        {
            if mandelbox.status == MandelboxStatus::Allocated {
                allocated.push(mandelbox.id);
            }
        }
    }
    let distinct: HashSet<_> = allocated.iter().collect();
    let total = instances.len() as i64 * 12;
    let consistent = allocated.len() == assigned
        && distinct.len() == allocated.len()
        && remaining == total - assigned as i64;
    Ok(format!(
        "consistency: {} ALLOCATED rows for {} answers, {} distinct, remaining capacity {} of {} → {}",
        allocated.len(),
        assigned,
        distinct.len(),
        remaining,
        total,
        if consistent {
            "consistent"
        } else {
            "INCONSISTENT"
        }
    ))
}

/// Delegates to the real EC2 handler and notes when each launch call is made.
#[derive(Debug)]
struct Recording {
    inner: Arc<Ec2Hosts>,
    calls: Mutex<Vec<Instant>>,
}

impl HostHandler for Recording {
    fn launch<'a>(
        &'a self,
        request: &'a LaunchRequest,
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(Instant::now());
        }
        self.inner.launch(request)
    }

    fn terminate<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.inner.terminate(region, ids)
    }

    fn wait_running<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.inner.wait_running(region, ids, timeout)
    }

    fn wait_terminated<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.inner.wait_terminated(region, ids, timeout)
    }

    fn list<'a>(
        &'a self,
        region: &'a str,
        tag: (&'a str, &'a str),
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        self.inner.list(region, tag)
    }

    fn describe<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Described, HostError>> {
        self.inner.describe(region, ids)
    }
}
