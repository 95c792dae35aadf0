//! The API's listener under hostile clients, against the real binary on loopback: a flood of
//! idle connections past the process's file-descriptor limit, and header slowloris. A
//! legitimate client keeps being served throughout; every attack is bounded in count and time.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The API, API-only, with 256 file descriptors and a tight listener.
struct Api {
    child: Child,
    addr: SocketAddr,
}

impl Api {
    async fn start() -> Self {
        let stack = whist_test_support::shared();
        let port = common::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let binary = env!("CARGO_BIN_EXE_scaling-service");
        let child = Command::new("bash")
            .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\"", binary])
            .args([
                "--environment",
                "local",
                "--listen",
                &addr.to_string(),
                "--api-only",
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
        let api = Self { child, addr };
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
    for _ in 0..60 {
        let mut stream = connect_from([127, 0, 0, 4], api.addr)
            .await
            .expect("connect");
        stream
            .write_all(
                b"POST /mandelbox/assign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n{",
            )
            .await
            .expect("write");
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
