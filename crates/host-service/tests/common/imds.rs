//! A small EC2 instance metadata service (IMDSv2) on loopback: a session token from
//! `PUT /latest/api/token` (which must carry a TTL header), required on every read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};

#[derive(Debug)]
pub struct Imds {
    pub addr: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
}

impl Imds {
    /// Serves `fields` (paths under `latest/meta-data/`, e.g. `instance-id`).
    pub async fn start(fields: HashMap<String, String>) -> Self {
        let token = format!("token-{}", uuid::Uuid::new_v4().simple());
        let state = Arc::new((token, fields));
        let router = axum::Router::new()
            .route("/latest/api/token", put(issue_token))
            .route("/latest/meta-data/{*path}", get(read_field))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind imds");
        let addr = listener.local_addr().expect("addr");
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await
                .expect("imds serves");
        });
        Self { addr, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Shared = Arc<(String, HashMap<String, String>)>;

async fn issue_token(State(state): State<Shared>, headers: HeaderMap) -> (StatusCode, String) {
    if headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u32>().ok())
        .is_none_or(|ttl| ttl == 0 || ttl > 21600)
    {
        return (StatusCode::BAD_REQUEST, String::new());
    }
    (StatusCode::OK, state.0.clone())
}

async fn read_field(
    State(state): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    let token = headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|value| value.to_str().ok());
    if token != Some(state.0.as_str()) {
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    match state.1.get(&path) {
        Some(value) => (StatusCode::OK, value.clone()),
        None => (StatusCode::NOT_FOUND, String::new()),
    }
}
