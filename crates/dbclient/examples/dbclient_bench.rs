//! Foundation benchmarks: prints figures, asserts nothing. Run with `make bench`.
//!
//! - time for the local stack to come up with everything built;
//! - query and claim round trips (p50/p99), and claims per second with 32 concurrent claimers;
//! - live-query latency from a committed write to the subscriber seeing it, with the engine
//!   polling every second and with NOTIFY triggers pushing changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use whist_dbclient::{ClaimOutcome, HasuraClient, LiveOptions, live, ops};
use whist_test_support::bench::summary;
use whist_test_support::{Stack, StackOptions};
use whist_types::{InstanceStatus, MandelboxId, NewInstance, NewMandelbox};

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    println!("== stack start-up (everything built)");
    let mut startups = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let stack = Stack::start(&StackOptions::default())?;
        startups.push(started.elapsed());
        drop(stack);
    }
    println!("  start-up: {}", summary(&mut startups));

    let stack = Stack::start(&StackOptions::default())?;
    let client = stack.info().client();

    println!("== round trips (sequential)");
    let (_, boxes) = fleet(&client, 50, 12).await?;
    let mut reads = Vec::new();
    for _ in 0..500 {
        let started = Instant::now();
        client
            .execute(&ops::instances::instances_in_region("bench"))
            .await?;
        reads.push(started.elapsed());
    }
    println!(
        "  query (instances of a region, 50 rows): {}",
        summary(&mut reads)
    );
    let mut claims = Vec::new();
    for (n, mandelbox) in boxes.iter().take(500).enumerate() {
        let started = Instant::now();
        let outcome = client
            .claim_mandelbox(*mandelbox, &format!("seq-user-{n}"), "1")
            .await?;
        claims.push(started.elapsed());
        anyhow::ensure!(
            matches!(outcome, ClaimOutcome::Claimed(_)),
            "claim {n}: {outcome:?}"
        );
    }
    println!("  claim: {}", summary(&mut claims));

    println!("== 32 concurrent claimers");
    let (_, boxes) = fleet(&client, 200, 20).await?;
    let boxes = Arc::new(boxes);
    let started = Instant::now();
    let workers: Vec<_> = (0..32)
        .map(|worker| {
            let client = client.clone();
            let boxes = boxes.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for (n, mandelbox) in boxes.iter().enumerate().filter(|(n, _)| n % 32 == worker) {
                    let claim_started = Instant::now();
                    let outcome = client
                        .claim_mandelbox(*mandelbox, &format!("user-{n}"), "1")
                        .await;
                    latencies.push(claim_started.elapsed());
                    assert!(
                        matches!(outcome, Ok(ClaimOutcome::Claimed(_))),
                        "{outcome:?}"
                    );
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await?);
    }
    let elapsed = started.elapsed();
    println!(
        "  {} claims in {:.2} s = {:.0} claims/s; latency {}",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        summary(&mut latencies)
    );
    drop(stack);

    println!("== live-query latency, committed write to subscriber");
    for (label, notify) in [
        ("engine refresh 1 s, polling only", false),
        ("NOTIFY triggers (push)", true),
    ] {
        let options = StackOptions {
            notify_triggers: notify,
            subscription_refresh_seconds: 1,
            ..StackOptions::default()
        };
        let stack = Stack::start(&options)?;
        let client = stack.info().client();
        let mut latencies = live_latency(&client, 30).await?;
        println!("  {label}: {}", summary(&mut latencies));
    }
    println!("  (the engine takes whole seconds for its refresh, so 100 ms polling cannot be set;");
    println!("   the push path is what the local stack runs with)");
    Ok(())
}

/// ACTIVE instances in region `bench`, each full of WAITING boxes.
async fn fleet(
    client: &HasuraClient,
    instances: usize,
    boxes_each: usize,
) -> anyhow::Result<(Vec<String>, Vec<MandelboxId>)> {
    let capacity = i32::try_from(boxes_each)?;
    let rows: Vec<NewInstance> = (0..instances)
        .map(|_| NewInstance {
            id: format!("i-{}", uuid::Uuid::new_v4().simple()),
            provider: "AWS".into(),
            region: "bench".into(),
            image_id: "ami-bench".into(),
            client_sha: "bench".into(),
            instance_type: "g4dn.12xlarge".into(),
            remaining_capacity: capacity,
            status: InstanceStatus::Active,
            fleet: None,
        })
        .collect();
    client
        .execute(&ops::instances::insert_instances(&rows))
        .await?;
    let boxes: Vec<NewMandelbox> = rows
        .iter()
        .flat_map(|row| {
            (0..boxes_each)
                .map(|_| NewMandelbox::waiting(MandelboxId::new_random(), "CHROME", &row.id))
        })
        .collect();
    for chunk in boxes.chunks(500) {
        client
            .execute(&ops::mandelboxes::insert_mandelboxes(chunk))
            .await?;
    }
    Ok((
        rows.into_iter().map(|row| row.id).collect(),
        boxes.into_iter().map(|row| row.id).collect(),
    ))
}

/// Inserts a box `samples` times and measures until the live query shows it.
async fn live_latency(client: &HasuraClient, samples: usize) -> anyhow::Result<Vec<Duration>> {
    let (instances, _) = fleet(client, 1, 0).await?;
    let options = LiveOptions::default();
    let mut subscription = client.subscribe_with(
        live::queries::mandelboxes_on_instance(&instances[0]),
        options,
    );
    subscription
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("no first snapshot"))?;
    let mut latencies = Vec::new();
    for _ in 0..samples {
        let id = MandelboxId::new_random();
        // Spread writes over the refresh period so polling is sampled fairly.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..400))).await;
        let started = Instant::now();
        client
            .execute(&ops::mandelboxes::insert_mandelboxes(&[
                NewMandelbox::waiting(id, "CHROME", &instances[0]),
            ]))
            .await?;
        loop {
            let snapshot = tokio::time::timeout(Duration::from_secs(10), subscription.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
            if snapshot.added.iter().any(|row| row.id == id) {
                break;
            }
        }
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}
