//! Decision benchmark: prints figures, asserts nothing. Run with
//! `cargo run --release -p scaling-service --example decide_bench`.
//!
//! Builds 50 regions of 200 hosts each (a mix of busy and idle hosts on the current image, hosts on
//! an old image, draining and booting hosts, a few dead ones, some regions upgrading or disabled)
//! and times one full pass of `BufferAlgorithm::decide` over every region.

use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use scaling_service::algorithm::{
    BufferAlgorithm, HostView, ImageRef, RegionSnapshot, ScalingAlgorithm, ScalingSettings,
    UpgradeState, UpgradeView,
};
use whist_types::{InstanceStatus, capacity_of};

const REGIONS: usize = 50;
const HOSTS_PER_REGION: usize = 200;
const WARM_UP: usize = 20;
const ITERATIONS: usize = 200;

fn main() {
    let now = Utc::now();
    let mut rng = fastrand::Rng::with_seed(42);
    let regions: Vec<RegionSnapshot> = (0..REGIONS).map(|n| region(&mut rng, n, now)).collect();
    let hosts: usize = regions.iter().map(|region| region.hosts.len()).sum();
    let algorithm = BufferAlgorithm::new();

    let mut actions = 0;
    for _ in 0..WARM_UP {
        actions = pass(&algorithm, &regions, now);
    }
    let mut passes = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let started = Instant::now();
        black_box(pass(&algorithm, &regions, now));
        passes.push(started.elapsed());
    }
    passes.sort();

    let at = |quantile: f64| {
        let index = ((passes.len() as f64 - 1.0) * quantile).round() as usize;
        passes[index]
    };
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    let per_region_us = |duration: Duration| duration.as_secs_f64() * 1e6 / REGIONS as f64;
    println!(
        "== decide: {REGIONS} regions x {HOSTS_PER_REGION} hosts = {hosts} hosts, {actions} actions per pass, {ITERATIONS} passes after {WARM_UP} warm-up"
    );
    println!(
        "  full pass: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        ms(at(0.50)),
        ms(at(0.99)),
        ms(at(1.0))
    );
    println!(
        "  per region: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        per_region_us(at(0.50)),
        per_region_us(at(0.99)),
        per_region_us(at(1.0))
    );
}

/// One decision for every region; the number of actions.
fn pass(algorithm: &BufferAlgorithm, regions: &[RegionSnapshot], now: DateTime<Utc>) -> usize {
    regions
        .iter()
        .map(|region| algorithm.decide(black_box(region), now).len())
        .sum()
}

fn image(image_id: &str, client_sha: &str) -> ImageRef {
    ImageRef {
        image_id: image_id.to_owned(),
        client_sha: client_sha.to_owned(),
    }
}

fn region(rng: &mut fastrand::Rng, n: usize, now: DateTime<Utc>) -> RegionSnapshot {
    let minutes = chrono::Duration::minutes;
    let seconds = chrono::Duration::seconds;
    let types = ["g4dn.12xlarge", "g4dn.4xlarge", "g4dn.2xlarge"];
    // Every tenth region upgrades (half of those already published), two are disabled.
    let upgrading = n % 10 == 3;
    let upgrade = upgrading.then(|| UpgradeView {
        image: image("ami-new", "sha-new"),
        state: if n % 20 == 3 {
            UpgradeState::Shielded
        } else {
            UpgradeState::Pending
        },
        deadline: now + minutes(30),
    });
    let hosts = (0..HOSTS_PER_REGION)
        .map(|h| {
            let instance_type = types[rng.usize(..types.len())];
            let capacity = capacity_of(instance_type);
            let full = i32::try_from(capacity).unwrap_or(i32::MAX);
            let roll = rng.u32(..100);
            let (image_id, status, remaining) = match roll {
                // Busy hosts on the current image.
                0..50 => ("ami-current", InstanceStatus::Active, rng.i32(0..full)),
                // Idle hosts on the current image.
                50..65 => ("ami-current", InstanceStatus::Active, full),
                // Hosts on an old image, half of them idle.
                65..75 => ("ami-old", InstanceStatus::Active, rng.i32(0..=full)),
                // Draining, half of them idle.
                75..85 => ("ami-old", InstanceStatus::Draining, rng.i32(0..=full)),
                // Booting.
                85..95 => ("ami-current", InstanceStatus::PreConnection, full),
                // Shielded hosts where upgrading, else more busy ones.
                _ if upgrading => ("ami-new", InstanceStatus::Active, rng.i32(0..=full)),
                _ => ("ami-current", InstanceStatus::Active, rng.i32(0..full)),
            };
            // One host in fifty has a stale heartbeat.
            let heartbeat_at = if rng.u32(..50) == 0 {
                now - minutes(5)
            } else {
                now - seconds(rng.i64(0..30))
            };
            HostView {
                id: format!("i-{n:02}{h:04}{:08x}", rng.u32(..)),
                image_id: image_id.to_owned(),
                instance_type: instance_type.to_owned(),
                status,
                capacity,
                remaining,
                // Booting hosts launched in the last 20 minutes (some past the ready timeout).
                created_at: if status == InstanceStatus::PreConnection {
                    now - minutes(rng.i64(0..20))
                } else {
                    now - minutes(rng.i64(20..600))
                },
                heartbeat_at,
                owned: true,
                idle_since: (remaining >= full).then(|| now - seconds(rng.i64(0..3600))),
            }
        })
        .collect();
    RegionSnapshot {
        region: format!("region-{n:02}"),
        enabled: !(n == 17 || n == 41),
        desired_free: rng.u32(10..60),
        schedule: scaling_service::algorithm::BufferSchedule::default(),
        instance_types: types.iter().map(|&t| t.to_owned()).collect(),
        unavailable_types: Vec::new(),
        current_image: Some(image("ami-current", "sha-current")),
        upgrade,
        published_client_sha: Some(
            if n % 40 == 3 {
                "sha-new"
            } else {
                "sha-current"
            }
            .to_owned(),
        ),
        hosts,
        settings: ScalingSettings {
            scale_up_cooldown: minutes(1),
            scale_down_cooldown: minutes(5),
            scale_down_delay: minutes(10),
            heartbeat_timeout: minutes(2),
            instance_ready_timeout: minutes(15),
            schedule_lead: chrono::Duration::zero(),
        },
        last_scale_up: n.is_multiple_of(3).then(|| now - seconds(30)),
        last_scale_down: n.is_multiple_of(4).then(|| now - minutes(10)),
    }
}
