//! The host's life around its sessions: drains (asked by the fleet, by a signal, past their
//! deadline), registration refusals, fake GPUs, metadata from IMDS, and the engine restarting
//! under a live session.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Host, HostOptions, end_session, eventually};
use host_service::Exit;
use whist_dbclient::ops;
use whist_types::{InstanceStatus, MandelboxStatus, NewInstance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_without_sessions_removes_everything_then_powers_off() {
    let mut host = Host::prepare(HostOptions::default()).await;
    let marker = host.root.join("powered-off");
    host.options.extra_args = vec![
        "--power-off-command".into(),
        format!("touch {}", marker.display()),
    ];
    host.launch().await.expect("starts");
    host.wait_for_zygotes(2).await;
    assert!(!marker.exists());
    assert_eq!(host.stop().await, Exit::Drained);
    assert!(marker.exists(), "the power-off command ran after the drain");
    assert!(host.instance().await.is_none());
    assert!(host.rows().await.is_empty());
    assert!(host.containers().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_the_fleet_asks_for_waits_for_the_live_session() {
    let mut host = Host::start(HostOptions::default()).await;
    let user = common::unique("user");
    let (id, ports) = host.start_session(&user).await;
    host.wait_for_boxes(1, 1).await;

    host.db
        .execute(&ops::transition_instance(
            &host.instance_id,
            &[InstanceStatus::Active],
            InstanceStatus::Draining,
        ))
        .await
        .expect("drain")
        .expect("was active");

    // The zygote goes; the session stays, and the instance row stays while it runs.
    host.wait_for_boxes(0, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = host.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id, id);
    assert_eq!(rows[0].status, MandelboxStatus::Running);
    assert!(host.instance().await.is_some());

    end_session(&ports);
    assert_eq!(host.exited().await, Exit::Drained);
    assert!(host.instance().await.is_none());
    assert!(host.containers().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_deadline_stops_the_sessions() {
    let mut host = Host::start(HostOptions {
        capacity: 1,
        extra_args: vec!["--drain-deadline".into(), "2".into()],
        ..HostOptions::default()
    })
    .await;
    let user = common::unique("user");
    host.start_session(&user).await;
    // A signal starts this drain: the host marks its own row DRAINING first.
    host.running.as_ref().expect("running").shutdown();
    eventually(
        "the row to be DRAINING",
        Duration::from_secs(10),
        || async {
            host.instance()
                .await
                .is_none_or(|row| row.status == InstanceStatus::Draining)
                .then_some(())
        },
    )
    .await;
    assert_eq!(host.exited().await, Exit::DrainForced);
    assert!(host.instance().await.is_none());
    assert!(host.containers().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_refuses_a_row_that_does_not_describe_this_host() {
    let mut host = Host::prepare(HostOptions::default()).await;
    host.options.extra_args = vec!["--instance-type".into(), "g4dn.12xlarge".into()];
    let exit = host.launch().await.expect_err("refused");
    let Exit::RegistrationRefused(message) = &exit else {
        panic!("expected a refusal, got {exit:?}");
    };
    assert!(message.contains("instance_type"), "{message}");
    assert_eq!(exit.code(), 4);
    assert_eq!(
        host.instance().await.expect("row").status,
        InstanceStatus::PreConnection,
        "a refused host changes nothing"
    );

    host.options.extra_args = vec![
        "--instance-id".into(),
        common::unique("i-missing"),
        "--registration-wait".into(),
        "1".into(),
    ];
    let exit = host.launch().await.expect_err("refused");
    assert!(matches!(exit, Exit::RegistrationRefused(ref m) if m.contains("no instance row")));
}

/// The scaling-service writes the row only after the cloud's launch call returns, so a host may
/// look first: it waits for the row instead of giving up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_boots_before_its_row_exists_registers_once_it_appears() {
    let mut host = Host::prepare(HostOptions::default()).await;
    let row = host.instance().await.expect("row");
    assert!(
        host.db
            .execute(&ops::delete_instance(&host.instance_id))
            .await
            .expect("delete row")
    );
    let db = host.db.clone();
    let reinsert = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        db.execute(&ops::insert_instances(&[NewInstance {
            id: row.id,
            provider: row.provider,
            region: row.region,
            image_id: row.image_id,
            client_sha: row.client_sha,
            instance_type: row.instance_type,
            remaining_capacity: row.remaining_capacity,
            status: InstanceStatus::PreConnection,
            fleet: None,
        }]))
        .await
        .expect("insert the row late");
    });
    host.launch().await.expect("registers once the row exists");
    reinsert.await.expect("join");
    assert_eq!(
        host.instance().await.expect("row").status,
        InstanceStatus::Active
    );
    host.wait_for_zygotes(HostOptions::default().capacity as usize)
        .await;
    assert_eq!(host.stop().await, Exit::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_already_draining_at_registration_exits_without_zygotes() {
    let mut host = Host::prepare(HostOptions::default()).await;
    whist_test_support::shared()
        .sql(&format!(
            "UPDATE whist.instances SET status = 'DRAINING' WHERE id = '{}'",
            host.instance_id
        ))
        .expect("sql");
    host.launch().await.expect("starts");
    assert_eq!(host.exited().await, Exit::Drained);
    assert!(host.containers().await.is_empty());
    assert!(host.instance().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_gpus_take_three_mandelboxes_each() {
    let mut host = Host::start(HostOptions {
        capacity: 5,
        gpus: Some(2),
        ..HostOptions::default()
    })
    .await;
    let mut per_gpu: HashMap<String, usize> = HashMap::new();
    for container in host.containers().await {
        let gpu = container.labels[host_service::mandelbox::labels::GPU_INDEX].clone();
        *per_gpu.entry(gpu).or_default() += 1;
        assert!(
            container
                .env
                .iter()
                .any(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES=")),
            "{:?}",
            container.env
        );
    }
    let mut counts: Vec<usize> = per_gpu.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, [2, 3], "least-loaded first, at most three per GPU");
    assert_eq!(host.stop().await, Exit::Drained);

    // More capacity than GPU slots: the host runs what its GPUs allow and says so.
    let mut host = Host::prepare(HostOptions {
        capacity: 4,
        gpus: Some(1),
        ..HostOptions::default()
    })
    .await;
    host.launch().await.expect("starts");
    host.wait_for_zygotes(3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host.rows().await.len(), 3);
    let (_, metrics) = host.get_ops("/metrics").await;
    assert!(
        metrics.contains("whist_host_errors_total{kind=\"resources\"}"),
        "{metrics}"
    );
    assert_eq!(host.stop().await, Exit::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_comes_from_the_metadata_service_outside_local_mode() {
    let mut host = Host::prepare(HostOptions {
        capacity: 1,
        ..HostOptions::default()
    })
    .await;
    let imds = common::imds::Imds::start(HashMap::from([
        ("instance-id".to_owned(), host.instance_id.clone()),
        ("instance-type".to_owned(), common::INSTANCE_TYPE.to_owned()),
        ("ami-id".to_owned(), common::IMAGE_ID.to_owned()),
        ("placement/region".to_owned(), host.region.clone()),
        ("public-ipv4".to_owned(), "127.0.0.9".to_owned()),
        (
            "tags/instance/Name".to_owned(),
            "host-under-test".to_owned(),
        ),
    ]))
    .await;
    // The same configuration as the other tests, but the identity comes from IMDS.
    let mut config = host.config();
    config.identity =
        host_service::config::IdentitySource::Imds(imds.endpoint().parse().expect("url"));
    let running = host_service::start(
        config,
        host_service::StartOptions {
            live: Some(common::fast_live_options()),
            gpus: None,
        },
        host.shutdown.clone(),
    )
    .await
    .expect("starts");
    assert_eq!(running.identity.name.as_deref(), Some("host-under-test"));
    assert_eq!(running.identity.public_ip.to_string(), "127.0.0.9");
    host.running = Some(running);
    host.wait_for_zygotes(1).await;
    let row = host.instance().await.expect("row");
    assert_eq!(row.ip().map(|ip| ip.to_string()), Some("127.0.0.9".into()));
    assert_eq!(host.stop().await, Exit::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_reads_need_the_session_token_and_name_missing_fields() {
    let imds = common::imds::Imds::start(HashMap::from([(
        "instance-id".to_owned(),
        "i-abc".to_owned(),
    )]))
    .await;
    let endpoint = imds.endpoint().parse().expect("url");
    let error = host_service::metadata::from_imds(&endpoint)
        .await
        .expect_err("fields are missing");
    assert!(error.to_string().contains("public-ipv4"), "{error}");

    let raw = reqwest::get(format!("{}latest/meta-data/instance-id", imds.endpoint()))
        .await
        .expect("answers");
    assert_eq!(raw.status(), 401, "the test service enforces IMDSv2 tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_the_engine_restarting_and_ends_cleanly_after() {
    let stack = whist_test_support::shared();
    let log = std::env::temp_dir().join(format!("{}.log", common::unique("engine")));
    let mut engine = stack.start_private_engine(log).expect("private engine");
    let mut host = Host::prepare(HostOptions::default()).await;
    host.options.extra_args = vec![
        "--hasura-url".into(),
        engine.graphql_url(),
        "--hasura-websocket-url".into(),
        engine.websocket_url(),
    ];
    host.launch().await.expect("starts");
    host.wait_for_zygotes(2).await;
    let user = common::unique("user");
    let (id, ports) = host.start_session(&user).await;

    // The engine goes away mid-session; the session ends while it is down.
    engine.stop();
    end_session(&ports);
    tokio::time::sleep(Duration::from_secs(2)).await;
    engine.restart().expect("engine restarts");

    host.wait_for_row_gone(id).await;
    host.wait_for_zygotes(2).await;
    assert_eq!(host.instance().await.expect("row").remaining_capacity, 2);

    // Live queries reconnected: a new assignment is picked up.
    let (second, second_ports) = host.start_session(&user).await;
    assert_ne!(second, id);
    end_session(&second_ports);
    assert_eq!(host.stop().await, Exit::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_changed_by_the_fleet_are_followed() {
    let mut host = Host::start(HostOptions {
        capacity: 3,
        ..HostOptions::default()
    })
    .await;
    let user = common::unique("user");
    let (session, _ports) = host.start_session(&user).await;
    host.wait_for_boxes(2, 1).await;

    // The fleet deletes a live session's row: its container goes, its capacity comes back.
    host.db
        .execute(&ops::delete_mandelbox(session))
        .await
        .expect("delete")
        .expect("existed");
    eventually(
        "the session's container to go",
        Duration::from_secs(30),
        || async {
            let containers = host.containers().await;
            (!containers.iter().any(|c| {
                c.labels[host_service::mandelbox::labels::MANDELBOX_ID] == session.to_string()
            }))
            .then_some(())
        },
    )
    .await;
    host.wait_for_zygotes(3).await;

    // The fleet lowers the free capacity: the surplus zygote is retired at the next resync.
    whist_test_support::shared()
        .sql(&format!(
            "UPDATE whist.instances SET remaining_capacity = 1 WHERE id = '{}'",
            host.instance_id
        ))
        .expect("sql");
    host.wait_for_zygotes(1).await;
    assert_eq!(host.stop().await, Exit::Drained);
}
