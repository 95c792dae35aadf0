//! Prometheus metrics of the scaling-service, served as text on `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    target: Family<Labels, Gauge>,
    free: Family<Labels, Gauge>,
    hosts: Family<Labels, Gauge>,
    assign_latency: Histogram,
    assign_outcomes: Family<Labels, Counter>,
    launched: Family<Labels, Counter>,
    terminated: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    upgrades: Family<Labels, Counter>,
    leader: Gauge,
    paused: Family<Labels, Gauge>,
    pauses: Family<Labels, Counter>,
    deferred: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("whist_scaling");
        let target = Family::<Labels, Gauge>::default();
        registry.register(
            "region_target_free",
            "Desired free mandelboxes per region",
            target.clone(),
        );
        let free = Family::<Labels, Gauge>::default();
        registry.register(
            "region_free",
            "Free mandelboxes on the current image per region (booting hosts included)",
            free.clone(),
        );
        let hosts = Family::<Labels, Gauge>::default();
        registry.register("region_hosts", "Hosts per region and status", hosts.clone());
        // 1 ms to ~16 s.
        let assign_latency = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "assign_latency_seconds",
            "Time to answer POST /mandelbox/assign",
            assign_latency.clone(),
        );
        let assign_outcomes = Family::<Labels, Counter>::default();
        registry.register(
            "assign_outcomes",
            "Assign answers by outcome",
            assign_outcomes.clone(),
        );
        let launched = Family::<Labels, Counter>::default();
        registry.register(
            "hosts_launched",
            "Hosts launched per region",
            launched.clone(),
        );
        let terminated = Family::<Labels, Counter>::default();
        registry.register(
            "hosts_terminated",
            "Hosts terminated per region and reason",
            terminated.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register("errors", "Errors by kind", errors.clone());
        let upgrades = Family::<Labels, Counter>::default();
        registry.register(
            "image_upgrades",
            "Image upgrades per region by outcome",
            upgrades.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica runs the scaling",
            leader.clone(),
        );
        let paused = Family::<Labels, Gauge>::default();
        registry.register(
            "region_destruction_paused",
            "1 while nothing is terminated or deleted in a region, by reason (a listing that does not match the rows, hosts of another fleet)",
            paused.clone(),
        );
        let pauses = Family::<Labels, Counter>::default();
        registry.register(
            "destruction_pauses",
            "Passes in which a region's destructive work was paused, by reason",
            pauses.clone(),
        );
        let deferred = Family::<Labels, Counter>::default();
        registry.register(
            "destruction_deferred",
            "Terminations and deletions left for a later pass by the per-pass budget",
            deferred.clone(),
        );
        Self {
            registry,
            paused,
            pauses,
            deferred,
            target,
            free,
            hosts,
            assign_latency,
            assign_outcomes,
            launched,
            terminated,
            errors,
            upgrades,
            leader,
        }
    }

    pub fn region(
        &self,
        region: &str,
        target: u32,
        free: i64,
        hosts_by_status: &[(&'static str, i64)],
    ) {
        let labels = vec![("region", region.to_owned())];
        self.target.get_or_create(&labels).set(i64::from(target));
        self.free.get_or_create(&labels).set(free);
        for (status, count) in hosts_by_status {
            self.hosts
                .get_or_create(&vec![
                    ("region", region.to_owned()),
                    ("status", (*status).to_owned()),
                ])
                .set(*count);
        }
    }

    pub fn assigned(&self, outcome: &str, took: Duration) {
        self.assign_latency.observe(took.as_secs_f64());
        self.assign_outcomes
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    pub fn launched(&self, region: &str, count: u32) {
        self.launched
            .get_or_create(&vec![("region", region.to_owned())])
            .inc_by(u64::from(count));
    }

    pub fn terminated(&self, region: &str, reason: &str) {
        self.terminated
            .get_or_create(&vec![
                ("region", region.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    pub fn upgrade(&self, region: &str, outcome: &str) {
        self.upgrades
            .get_or_create(&vec![
                ("region", region.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
    }

    /// Records whether reconciliation paused `region`'s destructive work this pass, and why.
    pub fn destruction_paused(&self, region: &str, reason: Option<&'static str>) {
        for known in crate::executor::Suspicion::LABELS {
            self.region_paused(region, known, reason == Some(known));
        }
    }

    /// Records whether `region` is paused for `reason` now (counted each time it is).
    pub fn region_paused(&self, region: &str, reason: &'static str, paused: bool) {
        let labels = vec![("region", region.to_owned()), ("reason", reason.to_owned())];
        if paused {
            self.pauses.get_or_create(&labels).inc();
        }
        self.paused.get_or_create(&labels).set(i64::from(paused));
    }

    pub fn deferred(&self, region: &str) {
        self.deferred
            .get_or_create(&vec![("region", region.to_owned())])
            .inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
