//! Slow clients on a host's TLS `json_transport` listener: bodies sent a byte a second are cut
//! off at the body timeout, so they hold no connection, task or memory for long, while a
//! legitimate session on the same host starts as usual.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Host, HostOptions};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to the host that trusts exactly its certificate (HTTP/1.1).
async fn connect(host: &Host) -> TlsStream {
    let der = host
        .running
        .as_ref()
        .expect("started")
        .certificate_der
        .clone();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(der))
        .expect("trust the certificate");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(host.transport_addr.expect("started"))
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await
        .expect("TLS handshake")
}

/// Whether the host answered or closed the connection within `within`.
async fn ended_by_host(stream: &mut TlsStream, within: Duration) -> bool {
    let mut buffer = [0u8; 512];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buffer)).await,
        Ok(Ok(_) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_sent_a_byte_a_second_are_cut_off_at_the_body_timeout() {
    let host = Host::start(HostOptions {
        capacity: 2,
        extra_args: vec!["--body-read-timeout".into(), "2".into()],
        ..HostOptions::default()
    })
    .await;
    let token = host.issuer.token("slow-client");
    // 40 connections (bounded) that promise a 10 kB body and trickle it.
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut stream = connect(&host).await;
        let head = format!(
            "PUT /json_transport HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        slow.push(stream);
    }
    let started = Instant::now();
    // A byte a second each, for at most 4 s; a legitimate session starts meanwhile.
    let owner = common::unique("owner");
    let (session, _) = host.start_session(&owner).await;
    for _ in 0..4 {
        for stream in &mut slow {
            let _ = stream.write_all(b" ").await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut ended = 0;
    for stream in &mut slow {
        ended += u32::from(ended_by_host(stream, Duration::from_secs(2)).await);
    }
    eprintln!(
        "slow bodies: {ended} of {} cut off within {:?} (body timeout 2 s)",
        slow.len(),
        started.elapsed()
    );
    assert_eq!(ended, 40, "every slow body is cut off");
    assert!(
        host.rows()
            .await
            .iter()
            .any(|row| row.id == session && row.status == whist_types::MandelboxStatus::Running)
    );
}
