//! What every [`ContainerRuntime`] must do, as cases any implementation can be run through:
//! [`super::docker::DockerRuntime`] on the real engine (`tests/docker_runtime.rs`) and
//! [`super::fake::FakeRuntime`] in memory. A fake that passes them behaves like Docker wherever
//! the agent relies on it.
//!
//! Every container a case makes carries a label value of its own, so cases sharing one engine
//! never see each other's containers, and each case removes what it made.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;

use super::{ContainerEvent, ContainerRuntime, ContainerSpec, RuntimeError};
use crate::resources::HostPorts;

/// The image the in-memory engine is given; the Docker run passes the reference mandelbox.
pub const IMAGE: &str = "whist/conformance:fake";
/// The label key the cases create with and list by.
pub const LABEL: &str = "whist-runtime-conformance";

/// How long an event may take to arrive from a real engine.
const EVENT_WAIT: Duration = Duration::from_secs(20);

/// A container of `image` with a unique name and label value. Host port 0 lets the engine pick
/// free ports, so nothing collides with anything else on the machine.
pub fn spec(name: &str, image: &str) -> ContainerSpec {
    let unique = format!("{name}-{}", uuid::Uuid::new_v4().simple());
    ContainerSpec {
        name: format!("whist-conformance-{unique}"),
        image: image.to_owned(),
        labels: BTreeMap::from([(LABEL.to_owned(), unique)]),
        env: vec!["WHIST_CONFORMANCE=1".to_owned()],
        ports: HostPorts {
            port_32261: 0,
            port_32262: 0,
            port_32263: 0,
            port_32273: 0,
        },
        binds: Vec::new(),
        devices: Vec::new(),
        capabilities: Vec::new(),
        memory_bytes: 256 * 1024 * 1024,
        shm_bytes: 16 * 1024 * 1024,
        pids_limit: 64,
        cpu_shares: 256,
        tmpfs: Vec::new(),
        security_options: Vec::new(),
    }
}

/// The label that finds exactly the containers made from `spec`.
pub fn label(spec: &ContainerSpec) -> (&str, &str) {
    (LABEL, spec.labels[LABEL].as_str())
}

/// Every case, one after another.
pub async fn all(runtime: &dyn ContainerRuntime, image: &str) {
    a_container_runs_only_once_started(runtime, image).await;
    names_are_unique(runtime, image).await;
    a_missing_image_is_reported_as_missing(runtime).await;
    listing_filters_by_label(runtime, image).await;
    removal_succeeds_when_already_gone(runtime, image).await;
    removal_is_reported_to_event_streams(runtime, image).await;
}

pub async fn a_container_runs_only_once_started(runtime: &dyn ContainerRuntime, image: &str) {
    let spec = spec("start", image);
    let id = runtime.create(&spec).await.expect("create");
    let listed = runtime.list(label(&spec)).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, id);
    assert!(!listed[0].running, "created, not started");
    assert_eq!(listed[0].labels.get(LABEL), spec.labels.get(LABEL));
    assert_eq!(listed[0].env_value("WHIST_CONFORMANCE"), Some("1"));

    runtime.start(&id).await.expect("start");
    let listed = runtime.list(label(&spec)).await.expect("list");
    assert!(listed[0].running, "{listed:?}");
    runtime.remove(&id, Duration::ZERO).await.expect("remove");
}

pub async fn names_are_unique(runtime: &dyn ContainerRuntime, image: &str) {
    let spec = spec("name", image);
    let id = runtime.create(&spec).await.expect("create");
    let again = runtime.create(&spec).await;
    assert!(
        matches!(again, Err(RuntimeError::Refused { .. })),
        "{again:?}"
    );
    runtime.remove(&id, Duration::ZERO).await.expect("remove");
}

pub async fn a_missing_image_is_reported_as_missing(runtime: &dyn ContainerRuntime) {
    let spec = spec("missing", "whist/absent-image:never-built");
    let created = runtime.create(&spec).await;
    assert!(
        matches!(created, Err(RuntimeError::ImageMissing(_))),
        "{created:?}"
    );
    assert!(runtime.list(label(&spec)).await.expect("list").is_empty());
}

pub async fn listing_filters_by_label(runtime: &dyn ContainerRuntime, image: &str) {
    let (ours, theirs) = (spec("ours", image), spec("theirs", image));
    let our_id = runtime.create(&ours).await.expect("create ours");
    let their_id = runtime.create(&theirs).await.expect("create theirs");
    let listed = runtime.list(label(&ours)).await.expect("list");
    let ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, [our_id.as_str()]);
    assert!(
        runtime
            .list((LABEL, "nobody-has-this"))
            .await
            .expect("list")
            .is_empty()
    );
    for id in [&our_id, &their_id] {
        runtime.remove(id, Duration::ZERO).await.expect("remove");
    }
}

pub async fn removal_succeeds_when_already_gone(runtime: &dyn ContainerRuntime, image: &str) {
    let spec = spec("gone", image);
    let id = runtime.create(&spec).await.expect("create");
    runtime.start(&id).await.expect("start");
    runtime.remove(&id, Duration::ZERO).await.expect("remove");
    assert!(runtime.list(label(&spec)).await.expect("list").is_empty());
    runtime
        .remove(&id, Duration::ZERO)
        .await
        .expect("remove again");
    runtime
        .remove(&"0".repeat(64), Duration::ZERO)
        .await
        .expect("remove what never was");
}

pub async fn removal_is_reported_to_event_streams(runtime: &dyn ContainerRuntime, image: &str) {
    let spec = spec("events", image);
    let mut events = runtime.events(label(&spec));
    // A real engine's stream starts when it is first polled; nothing is due yet.
    let quiet = tokio::time::timeout(Duration::from_millis(500), events.next()).await;
    assert!(
        quiet.is_err(),
        "an event before anything happened: {quiet:?}"
    );
    // Someone else's container: its events must not reach this stream.
    let other = self::spec("other", image);
    let other_id = runtime.create(&other).await.expect("create other");
    runtime
        .remove(&other_id, Duration::ZERO)
        .await
        .expect("remove other");

    let id = runtime.create(&spec).await.expect("create");
    runtime.start(&id).await.expect("start");
    runtime.remove(&id, Duration::ZERO).await.expect("remove");
    let mut seen = Vec::new();
    while !seen.contains(&ContainerEvent::Destroyed { id: id.clone() }) {
        let event = tokio::time::timeout(EVENT_WAIT, events.next())
            .await
            .expect("events within the wait")
            .expect("the stream stays open")
            .expect("not an error");
        seen.push(event);
    }
    assert!(
        seen.iter().all(|event| event.container_id() == id),
        "{seen:?}"
    );
    assert!(
        matches!(seen.first(), Some(ContainerEvent::Died { .. })),
        "a running container dies before it is destroyed: {seen:?}"
    );
}
