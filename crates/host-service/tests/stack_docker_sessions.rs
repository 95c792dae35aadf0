//! Sessions end to end on the real stack and the real Docker engine: registration, zygotes,
//! assignment, `json_transport`, the session's end and its replacement.

mod common;

use std::time::Duration;

use common::{Host, HostOptions, box_request, end_session, eventually};
use whist_types::{InstanceStatus, MandelboxStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_session_from_zygote_to_replacement() {
    let mut host = Host::start(HostOptions::default()).await;

    let instance = host.instance().await.expect("row");
    assert_eq!(instance.status, InstanceStatus::Active);
    assert_eq!(
        instance.ip().map(|ip| ip.to_string()),
        Some("127.0.0.1".into())
    );
    assert_eq!(instance.client_sha, "local-test-build");

    // Each zygote got its parameters before it started, and answers on its ports.
    let zygotes = host.wait_for_zygotes(2).await;
    for container in host.containers().await {
        let id = &container.labels[host_service::mandelbox::labels::MANDELBOX_ID];
        let dir = host
            .root
            .join("whist")
            .join(id)
            .join("mandelboxResourceMappings");
        for file in [
            "hostPort_for_my_32262_tcp",
            "tty",
            "gpu_index",
            "timeout",
            ".paramsReady",
        ] {
            assert!(dir.join(file).exists(), "{file} missing for {id}");
        }
        assert!(!dir.join("config.json").exists());
    }

    let user = common::unique("user");
    let (id, ports) = host.start_session(&user).await;
    assert!(zygotes.contains(&id));
    let dir = host
        .root
        .join("whist")
        .join(id.to_string())
        .join("mandelboxResourceMappings");
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    assert!(config.contains("Europe/Paris"));
    assert_eq!(
        std::fs::read_to_string(dir.join("session_id")).expect("session_id"),
        "1700000000000"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("hostPort_for_my_32262_tcp")).expect("port file"),
        ports.port_32262.to_string()
    );

    // The four host ports reach the box.
    for port in [ports.port_32261, ports.port_32262, ports.port_32273] {
        let reply = box_request(port, "status").expect("box answers");
        assert!(reply.contains("state=ready"), "{reply}");
        assert!(reply.contains("session=1700000000000"), "{reply}");
    }
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    udp.send_to(b"ping", ("127.0.0.1", ports.port_32263))
        .expect("send");
    let mut buffer = [0u8; 64];
    let (length, _) = udp.recv_from(&mut buffer).expect("udp echo");
    assert_eq!(&buffer[..length], b"whist:ping");

    // Free capacity is one now: one zygote, one session.
    host.wait_for_boxes(1, 1).await;
    assert_eq!(host.instance().await.expect("row").remaining_capacity, 1);

    // The session ends: the row goes, the capacity comes back, the container is removed.
    end_session(&ports);
    host.wait_for_row_gone(id).await;
    let zygotes_after = host.wait_for_zygotes(2).await;
    assert!(!zygotes_after.contains(&id));
    assert_eq!(host.instance().await.expect("row").remaining_capacity, 2);
    assert!(!dir.exists(), "the box's resource directory is removed");

    assert_eq!(host.stop().await, host_service::Exit::Drained);
    assert!(
        host.instance().await.is_none(),
        "the instance row is deleted"
    );
    assert!(host.containers().await.is_empty(), "no container is left");
    assert!(host.rows().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_container_is_cleaned_up_and_replaced() {
    let mut host = Host::start(HostOptions::default()).await;
    let user = common::unique("user");
    let (session, _ports) = host.start_session(&user).await;
    host.wait_for_boxes(1, 1).await;
    let containers = host.containers().await;
    let container_of = |id: whist_types::MandelboxId| {
        containers
            .iter()
            .find(|c| c.labels[host_service::mandelbox::labels::MANDELBOX_ID] == id.to_string())
            .map(|c| c.id.clone())
            .expect("container")
    };
    let zygote = host
        .rows()
        .await
        .into_iter()
        .find(|row| row.status == MandelboxStatus::Waiting)
        .expect("a zygote")
        .id;
    for id in [zygote, session] {
        let status = std::process::Command::new("docker")
            .args(["kill", &container_of(id)])
            .status()
            .expect("docker kill");
        assert!(status.success());
    }
    eventually(
        "both killed boxes to be gone",
        Duration::from_secs(30),
        || async {
            let rows = host.rows().await;
            (!rows.iter().any(|row| row.id == zygote || row.id == session)).then_some(())
        },
    )
    .await;
    host.wait_for_zygotes(2).await;
    assert_eq!(host.instance().await.expect("row").remaining_capacity, 2);
    assert_eq!(host.stop().await, host_service::Exit::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_are_served() {
    let mut host = Host::start(HostOptions {
        capacity: 1,
        ..HostOptions::default()
    })
    .await;
    assert_eq!(host.get_ops("/healthz").await.0, 200);
    eventually("readiness", Duration::from_secs(20), || async {
        (host.get_ops("/readyz").await.0 == 200).then_some(())
    })
    .await;
    let (status, metrics) = host.get_ops("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("whist_host_mandelboxes{phase=\"waiting\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("whist_host_zygote_spinup_seconds_count 1"),
        "{metrics}"
    );
    assert_eq!(host.stop().await, host_service::Exit::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_and_repeats_keep_capacity_and_containers_consistent() {
    let host = std::sync::Arc::new(
        Host::start(HostOptions {
            capacity: 4,
            ..HostOptions::default()
        })
        .await,
    );

    // Four users claim and connect at once; each sends its json_transport five times at once.
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let host = host.clone();
        sessions.push(tokio::spawn(async move {
            let user = common::unique("user");
            let id = host.claim(&user).await;
            let attempts: Vec<_> = (0..5)
                .map(|_| {
                    let host = host.clone();
                    let user = user.clone();
                    tokio::spawn(async move { host.transport(id, &user).await })
                })
                .collect();
            let mut ok = Vec::new();
            let mut statuses = Vec::new();
            for attempt in attempts {
                let (status, body) = attempt.await.expect("join");
                statuses.push(status.as_u16());
                if status == 200 {
                    ok.push(body);
                }
            }
            (id, ok, statuses)
        }));
    }
    let mut all_ports = Vec::new();
    for session in sessions {
        let (id, ok, statuses) = session.await.expect("join");
        assert_eq!(
            ok.len(),
            1,
            "exactly one json_transport wins for {id}: {statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 409),
            "{statuses:?}"
        );
        let ports: host_service::resources::HostPorts =
            serde_json::from_value(ok[0]["result"].clone()).expect("ports");
        all_ports.push(ports);
    }
    let mut distinct: Vec<u16> = all_ports
        .iter()
        .flat_map(|p| [p.port_32261, p.port_32262, p.port_32263, p.port_32273])
        .collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 16, "no two sessions share a host port");
    host.wait_for_boxes(0, 4).await;
    assert_eq!(host.instance().await.expect("row").remaining_capacity, 0);

    for ports in &all_ports {
        end_session(ports);
    }
    host.wait_for_zygotes(4).await;
    assert_eq!(host.instance().await.expect("row").remaining_capacity, 4);
    let mut host = std::sync::Arc::try_unwrap(host)
        .ok()
        .expect("only owner left");
    assert_eq!(host.stop().await, host_service::Exit::Drained);
    assert!(host.containers().await.is_empty());
}
