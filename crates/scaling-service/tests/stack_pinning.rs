//! The `json_transport` proxy sends the caller's token and relays the session's key only to the
//! certificate the host published on its instance row: a server at the host's address with any
//! other certificate, or a row without one, gets no request at all. The stand-in host is the
//! host-service's own TLS server, on a loopback address at the hosts' port.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Region, Scaler, assign_body, unique};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use whist_test_support::jwt::TestIssuer;

/// A TLS server at `ip:4678` presenting a fresh certificate and answering `json_transport` with
/// a fixed session; counts the requests that reach it.
struct StandInHost {
    fingerprint: String,
    requests: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl StandInHost {
    async fn start(ip: IpAddr) -> Self {
        let tls = host_service::http::tls::self_signed(&[ip.to_string()]).expect("certificate");
        let fingerprint = host_service::http::tls::fingerprint(&tls.certificate_der);
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let app = axum::Router::new().route(
            "/json_transport",
            axum::routing::put(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { axum::Json(json!({"result": {"port_32262": 40000, "aes_key": "k"}})) }
            }),
        );
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(
            ip,
            scaling_service::http::HOST_TRANSPORT_PORT,
        ))
        .await
        .expect("bind the hosts' port on a loopback address of this test");
        let stop = CancellationToken::new();
        tokio::spawn(host_service::http::tls::serve_tls(
            listener,
            tls.server_config,
            app,
            whist_serve::Limits::default(),
            stop.clone(),
            Duration::from_secs(1),
        ));
        Self {
            fingerprint,
            requests,
            stop,
        }
    }
}

impl Drop for StandInHost {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A loopback address no other test of this binary uses (the port is fixed: 4678).
fn loopback(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 46, n])
}

async fn set_row(db: &whist_dbclient::HasuraClient, host: &str, ip: IpAddr, pin: Option<&str>) {
    let pin = pin.map_or("NULL".to_owned(), |pin| format!("'{pin}'"));
    whist_test_support::shared()
        .sql(&format!(
            "UPDATE whist.instances SET ip_addr = '{ip}', tls_fingerprint = {pin} WHERE id = '{host}'"
        ))
        .expect("row");
    let _ = db;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_published_certificate_gets_the_request() {
    let issuer = Arc::new(TestIssuer::start().await.expect("issuer"));
    let scaler = Scaler::start(issuer, &["--api-only"]).await;
    let region = Region::create(&scaler.db, 0, true).await;
    let hosts = region
        .active_hosts(&scaler.db, 1, 3, &region.image_id)
        .await;
    let ip = loopback(1);
    let host = StandInHost::start(ip).await;
    let impostor = host_service::http::tls::self_signed(&[ip.to_string()]).expect("certificate");
    let other_fingerprint = host_service::http::tls::fingerprint(&impostor.certificate_der);
    let owner = unique("owner");
    let transport = |mandelbox: String| {
        let http = scaler.http.clone();
        let token = scaler.issuer.token(&owner);
        let url = scaler.url("/json_transport");
        async move {
            let response = http
                .put(url)
                .bearer_auth(token)
                .json(&json!({"mandelbox_id": mandelbox, "json_data": "{}"}))
                .send()
                .await
                .expect("answer");
            (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            )
        }
    };

    // The row pins another certificate than the one the host's address presents.
    set_row(&scaler.db, &hosts[0], ip, Some(&other_fingerprint)).await;
    common::eventually(
        "the row's address in the fleet view",
        Duration::from_secs(20),
        || {
            let fleet = scaler.running.as_ref().expect("running").fleet.current();
            let id = hosts[0].clone();
            async move {
                fleet
                    .instances
                    .iter()
                    .any(|i| i.id == id && i.ip() == Some(ip))
                    .then_some(())
            }
        },
    )
    .await;
    let (status, body) = scaler
        .assign_as(&owner, assign_body(&[&region.name], &region.client_sha))
        .await;
    assert_eq!(status, 200, "{body}");
    let mandelbox = body["mandelbox_id"].as_str().expect("id").to_owned();
    let (status, reply) = transport(mandelbox.clone()).await;
    assert_eq!(status, 502, "{reply}");
    assert_eq!(
        host.requests.load(Ordering::SeqCst),
        0,
        "the impostor got nothing"
    );

    // No published certificate at all: nothing is sent either.
    set_row(&scaler.db, &hosts[0], ip, None).await;
    let (status, reply) = transport(mandelbox.clone()).await;
    assert_eq!(status, 502, "{reply}");
    assert!(reply.contains("certificate"), "{reply}");
    assert_eq!(host.requests.load(Ordering::SeqCst), 0);

    // The published certificate: the request arrives and its answer comes back.
    set_row(&scaler.db, &hosts[0], ip, Some(&host.fingerprint)).await;
    let (status, reply) = transport(mandelbox).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("aes_key"), "{reply}");
    assert_eq!(host.requests.load(Ordering::SeqCst), 1);
}
