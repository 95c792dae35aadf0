//! The API under hostile clients, against the real binary on loopback, authenticating as in
//! the cloud (`dev`, a token issuer): forged, malformed and missing tokens, oversized and
//! malformed bodies, hostile strings in every field, a flood of idle connections past the
//! process's file-descriptor limit, and header and body slowloris. A legitimate client keeps
//! being served throughout; nothing is assigned or written that a good request did not ask
//! for; every attack is bounded in count and time.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Region, boxes_on, unique};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use whist_test_support::hostile::{self, assert_no_internals};
use whist_test_support::jwt::TestIssuer;
use whist_types::MandelboxStatus;

/// The API, API-only, in `dev` with a token issuer, 256 file descriptors and a tight listener.
struct Api {
    child: Child,
    addr: SocketAddr,
    issuer: Arc<TestIssuer>,
    http: reqwest::Client,
}

impl Api {
    async fn start() -> Self {
        let stack = whist_test_support::shared();
        let issuer = Arc::new(TestIssuer::start().await.expect("issuer"));
        let port = common::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let binary = env!("CARGO_BIN_EXE_scaling-service");
        let child = Command::new("bash")
            .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\"", binary])
            .args([
                "--environment",
                "dev",
                "--listen",
                &addr.to_string(),
                "--api-only",
                "--auth-issuer",
                issuer.issuer().as_str(),
                "--auth-audience",
                issuer.audience(),
            ])
            .args(["--hasura-url", &stack.graphql_url])
            .args(["--hasura-websocket-url", &stack.websocket_url])
            .args(["--hasura-admin-secret", &stack.admin_secret])
            .args([
                "--max-connections",
                "150",
                "--max-connections-per-peer",
                "64",
            ])
            .args(["--header-read-timeout", "2", "--body-read-timeout", "2"])
            .env_remove("APP_ENV")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let api = Self {
            child,
            addr,
            issuer,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
        };
        common::eventually("the API to answer", Duration::from_secs(30), || async {
            api.healthz().await.then_some(())
        })
        .await;
        api
    }

    /// A legitimate client: a fresh connection from 127.0.0.1, one request.
    async fn healthz(&self) -> bool {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .expect("client");
        client
            .get(format!("http://{}/healthz", self.addr))
            .send()
            .await
            .is_ok_and(|response| response.status() == 200)
    }
}

impl Api {
    /// A request to `path` (`POST` for assign, `PUT` for `json_transport`) with a raw body.
    async fn send(&self, path: &str, authorization: Option<&str>, body: String) -> (u16, Value) {
        let url = format!("http://{}{path}", self.addr);
        let request = if path == "/json_transport" {
            self.http.put(url)
        } else {
            self.http.post(url)
        };
        let mut request = request
            .header("content-type", "application/json")
            .body(body);
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let response = request.send().await.expect("the API answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    /// A request as a fresh user with a good token (every user has its own allowance).
    async fn send_as_someone(&self, path: &str, body: String) -> (u16, Value) {
        let token = format!("Bearer {}", self.issuer.token(&unique("someone")));
        self.send(path, Some(&token), body).await
    }
}

/// A region with one ACTIVE host of two WAITING boxes.
async fn region_with_a_host() -> (Region, String) {
    let db = common::db();
    let region = Region::create(&db, 0, true).await;
    let hosts = region.active_hosts(&db, 1, 2, &region.image_id).await;
    (region, hosts[0].clone())
}

async fn waiting_boxes(host: &str) -> usize {
    boxes_on(&common::db(), host)
        .await
        .iter()
        .filter(|row| row.status == MandelboxStatus::Waiting)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_malformed_and_missing_tokens_get_401_and_assign_nothing() {
    let api = Api::start().await;
    let (region, host) = region_with_a_host().await;
    let user = unique("user");
    let assign = common::assign_body(&[&region.name], &region.client_sha).to_string();
    let transport =
        json!({ "mandelbox_id": uuid::Uuid::new_v4().to_string(), "json_data": "{}" }).to_string();
    for (case, authorization) in hostile::refused_authorizations(&api.issuer, &user) {
        for (path, body) in [
            ("/mandelbox/assign", &assign),
            ("/json_transport", &transport),
        ] {
            let (status, reply) = api.send(path, authorization.as_deref(), body.clone()).await;
            assert_eq!(status, 401, "{path}, {case}: {reply}");
            assert_no_internals(&reply);
        }
    }
    assert_eq!(waiting_boxes(&host).await, 2, "no refused caller got a box");

    // The user's good token gets one (once the binary's fleet view has the host).
    let token = format!("Bearer {}", api.issuer.token(&user));
    let assigned = common::eventually(
        "a good token to assign",
        Duration::from_secs(20),
        || async {
            let (status, reply) = api
                .send("/mandelbox/assign", Some(&token), assign.clone())
                .await;
            (status == 200).then_some(reply)
        },
    )
    .await;
    assert!(assigned["mandelbox_id"].is_string(), "{assigned}");
    assert_eq!(waiting_boxes(&host).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_malformed_and_hostile_bodies_get_a_4xx_and_change_no_row() {
    let api = Api::start().await;
    let (region, host) = region_with_a_host().await;
    let oversized = format!(
        "{{\"regions\":[\"{}\"]}}",
        "a".repeat(whist_service_config::MAX_REQUEST_BODY_BYTES)
    );
    for path in ["/mandelbox/assign", "/json_transport"] {
        let (status, _) = api.send_as_someone(path, oversized.clone()).await;
        assert_eq!(status, 413, "{path}: the hosts' limit");
        for (case, body) in [
            ("not JSON", "{{{".to_owned()),
            ("an array", "[]".to_owned()),
            (
                "a wrong type",
                json!({ "regions": "x", "mandelbox_id": 7 }).to_string(),
            ),
            (
                "nested a thousand deep",
                format!("{}{}", "[".repeat(1000), "]".repeat(1000)),
            ),
        ] {
            let (status, reply) = api.send_as_someone(path, body).await;
            assert_eq!(status, 400, "{path}, {case}: {reply}");
            assert_no_internals(&reply);
        }
    }

    // Every field a caller controls, each hostile string in turn: a 4xx, or a business refusal
    // (the values travel as GraphQL variables, never inside a document).
    let mut bodies = Vec::new();
    for text in hostile::STRINGS {
        bodies.push(("/mandelbox/assign", json!({ "regions": [text, region.name], "client_commit_hash": region.client_sha, "user_id": text })));
        bodies.push(("/mandelbox/assign", json!({ "regions": [region.name], "client_commit_hash": text, "user_email": text, "version": text })));
        bodies.push((
            "/json_transport",
            json!({ "mandelbox_id": text, "json_data": text, "ip": text }),
        ));
    }
    let mut assigned = 0;
    for (path, body) in bodies {
        let (status, reply) = api.send_as_someone(path, body.to_string()).await;
        let code = reply["error"].as_str().unwrap_or_default();
        let business = status == 503
            && [
                "COMMIT_HASH_MISMATCH",
                "NO_INSTANCE_AVAILABLE",
                "REGION_NOT_ENABLED",
            ]
            .contains(&code);
        assert!(
            (400..500).contains(&status) || business || status == 200,
            "{path} {body}: {status} {reply}"
        );
        assert_no_internals(&reply);
        assigned += usize::from(status == 200);
    }

    // No row written or deleted: the region's one host, and its two boxes less those that real
    // region names in the hostile lists were assigned.
    let db = common::db();
    assert_eq!(region.instances(&db).await.len(), 1);
    assert_eq!(boxes_on(&db, &host).await.len(), 2);
    assert_eq!(waiting_boxes(&host).await, 2 - assigned);
    assert!(api.healthz().await);
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection from another loopback address (the attacker's).
async fn connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(to).await
}

/// Whether the server closed the connection (EOF or reset) within `within`.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 256];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_past_the_descriptor_limit_leaves_legitimate_clients_served() {
    let api = Api::start().await;
    // 400 idle connections (bounded), far past the process's 256 descriptors.
    let mut flood = Vec::new();
    for _ in 0..400 {
        if let Ok(stream) = connect_from([127, 0, 0, 2], api.addr).await {
            flood.push(stream);
        }
    }
    let mut served = 0;
    for _ in 0..10 {
        served += u32::from(api.healthz().await);
    }
    assert_eq!(
        served, 10,
        "the legitimate client was refused during the flood"
    );
    // The connections past the per-address cap were closed at once by the server.
    let mut closed = 0;
    for stream in flood.iter_mut().rev().take(100) {
        closed += u32::from(closed_by_server(stream, Duration::from_millis(200)).await);
    }
    assert!(
        closed >= 90,
        "only {closed} of the excess connections were closed"
    );
    drop(flood);
    assert!(api.healthz().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_slowloris_is_cut_off_at_the_header_timeout() {
    let api = Api::start().await;
    // 60 connections (within the per-address cap) that start a request and never finish it.
    let mut slow = Vec::new();
    for _ in 0..60 {
        let mut stream = connect_from([127, 0, 0, 3], api.addr)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("write");
        slow.push(stream);
    }
    let started = Instant::now();
    // One byte a second, for at most 5 s, while a legitimate client is served.
    for _ in 0..5 {
        for stream in &mut slow {
            let _ = stream.write_all(b"a").await;
        }
        assert!(
            api.healthz().await,
            "the legitimate client waited on the slow ones"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut closed = 0;
    for stream in &mut slow {
        closed += u32::from(closed_by_server(stream, Duration::from_secs(1)).await);
    }
    eprintln!(
        "slowloris: {closed} of {} cut off within {:?} (header timeout 2 s)",
        slow.len(),
        started.elapsed()
    );
    assert_eq!(closed, 60, "every slow request is cut off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_slowloris_is_cut_off_at_the_body_timeout() {
    let api = Api::start().await;
    // 60 requests (within the per-address cap) that promise a body and trickle it.
    let mut slow = Vec::new();
    for n in 0..60 {
        let mut stream = connect_from([127, 0, 0, 4], api.addr)
            .await
            .expect("connect");
        // Each its own caller, so every one reaches the body read.
        let token = api.issuer.token(&format!("slow-{n}"));
        let head = format!(
            "POST /mandelbox/assign HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        slow.push(stream);
    }
    let started = Instant::now();
    for _ in 0..4 {
        for stream in &mut slow {
            let _ = stream.write_all(b" ").await;
        }
        assert!(
            api.healthz().await,
            "the legitimate client waited on the slow ones"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut answered = 0;
    for stream in &mut slow {
        answered += u32::from(closed_by_server_or_answered(stream, Duration::from_secs(2)).await);
    }
    eprintln!(
        "body slowloris: {answered} of {} cut off within {:?} (body timeout 2 s)",
        slow.len(),
        started.elapsed()
    );
    assert_eq!(answered, 60, "every slow body is cut off");
}

/// Whether the server answered (any bytes) or closed the connection within `within`.
async fn closed_by_server_or_answered(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 256];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buffer)).await,
        Ok(Ok(_) | Err(_))
    )
}
