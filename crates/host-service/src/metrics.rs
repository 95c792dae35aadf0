//! Prometheus metrics of the host, served as text on `/metrics`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Every phase a mandelbox can be in, so a phase with no boxes reads 0 rather than vanishing.
const PHASES: [&str; 9] = [
    "creating",
    "waiting",
    "checking",
    "accepting",
    "connecting",
    "delivering",
    "running",
    "retiring",
    "tearing_down",
];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    mandelboxes: Family<Labels, Gauge>,
    zygote_spinup: Histogram,
    session_ready: Histogram,
    errors: Family<Labels, Counter>,
    transport_requests: Family<Labels, Counter>,
    zygote_failures_in_a_row: AtomicU32,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("whist_host");
        let mandelboxes = Family::<Labels, Gauge>::default();
        registry.register(
            "mandelboxes",
            "Mandelboxes on this host by lifecycle phase",
            mandelboxes.clone(),
        );
        // 50 ms to ~100 s.
        let zygote_spinup = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        registry.register(
            "zygote_spinup_seconds",
            "Time to create and start a waiting mandelbox and record its row",
            zygote_spinup.clone(),
        );
        let session_ready = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "session_ready_seconds",
            "Time from a client's json_transport to its session being ready",
            session_ready.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register("errors", "Errors by kind", errors.clone());
        let transport_requests = Family::<Labels, Counter>::default();
        registry.register(
            "json_transport_requests",
            "json_transport requests by HTTP status",
            transport_requests.clone(),
        );
        for phase in PHASES {
            let _ = mandelboxes.get_or_create(&vec![("phase", phase.to_owned())]);
        }
        Self {
            registry,
            mandelboxes,
            zygote_spinup,
            session_ready,
            errors,
            transport_requests,
            zygote_failures_in_a_row: AtomicU32::new(0),
        }
    }

    pub fn set_mandelboxes(&self, counts: &HashMap<&'static str, i64>) {
        for phase in PHASES {
            self.mandelboxes
                .get_or_create(&vec![("phase", phase.to_owned())])
                .set(counts.get(phase).copied().unwrap_or(0));
        }
    }

    pub fn zygote_started(&self, took: Duration) {
        self.zygote_spinup.observe(took.as_secs_f64());
        self.zygote_failures_in_a_row.store(0, Ordering::Relaxed);
    }

    /// Records a failed zygote; returns how many failed in a row.
    pub fn zygote_failed(&self) -> u32 {
        self.error("zygote");
        self.zygote_failures_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            + 1
    }

    pub fn consecutive_zygote_failures(&self) -> u32 {
        self.zygote_failures_in_a_row.load(Ordering::Relaxed)
    }

    pub fn session_ready(&self, took: Duration) {
        self.session_ready.observe(took.as_secs_f64());
    }

    pub fn error(&self, kind: &'static str) {
        self.errors
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
    }

    pub fn transport_request(&self, status: u16) {
        self.transport_requests
            .get_or_create(&vec![("status", status.to_string())])
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_phase_and_counts_errors() {
        let metrics = Metrics::new();
        metrics.set_mandelboxes(&HashMap::from([("waiting", 3)]));
        metrics.error("zygote");
        metrics.transport_request(404);
        metrics.zygote_started(Duration::from_millis(300));
        let text = metrics.render();
        assert!(
            text.contains("whist_host_mandelboxes{phase=\"waiting\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("whist_host_mandelboxes{phase=\"running\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("whist_host_errors_total{kind=\"zygote\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("whist_host_json_transport_requests_total{status=\"404\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("whist_host_zygote_spinup_seconds_count 1"),
            "{text}"
        );
    }
}
