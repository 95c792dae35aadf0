//! A self-signed TLS certificate made in process, and the TLS accept loop that serves the
//! host's HTTP surface with it.
//!
//! The host has no name a public CA would vouch for, so it makes a fresh ECDSA P-256 key and a
//! self-signed certificate at start and publishes its SHA-256 ([`fingerprint`]) on its instance
//! row; the scaling-service's proxy pins exactly that certificate. Nothing is written to disk.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{Datelike, Days, Utc};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The certificate's subject common name.
pub const COMMON_NAME: &str = "whist host-service";

/// How long a generated certificate is valid. Hosts are replaced long before a year is up, and
/// a new certificate is made on every start anyway.
const VALIDITY_DAYS: u64 = 365;

/// Why a certificate or TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Without a subject alternative name no client could match the certificate.
    #[error("a certificate needs at least one subject alternative name")]
    NoSubjectAltNames,
    /// An entry is neither an IP address nor a valid DNS name.
    #[error("`{name}` is neither an IP address nor a valid DNS name")]
    InvalidSubjectAltName {
        /// The offending entry.
        name: String,
    },
    /// Generating the ECDSA key failed.
    #[error("generate the certificate key: {0}")]
    KeyGeneration(#[source] rcgen::Error),
    /// Building or signing the certificate failed.
    #[error("make the self-signed certificate: {0}")]
    Certificate(#[source] rcgen::Error),
    /// rustls refused the certificate, key or protocol versions.
    #[error("build the TLS server configuration: {0}")]
    ServerConfig(#[source] rustls::Error),
}

/// A freshly made certificate and a server configuration presenting it.
#[derive(Debug)]
pub struct SelfSigned {
    /// The certificate, DER-encoded, for clients to pin.
    pub certificate_der: Vec<u8>,
    /// Presents the certificate; offers ALPN `h2` and `http/1.1`.
    pub server_config: Arc<rustls::ServerConfig>,
}

/// Makes a P-256 key and a self-signed certificate for `subject_alt_names` (each an IP address,
/// which becomes an IP SAN, or else a DNS name), valid from yesterday for a year, and a rustls
/// server configuration using ring.
pub fn self_signed(subject_alt_names: &[String]) -> Result<SelfSigned, TlsError> {
    if subject_alt_names.is_empty() {
        return Err(TlsError::NoSubjectAltNames);
    }
    let sans = subject_alt_names
        .iter()
        .map(|name| san(name))
        .collect::<Result<Vec<_>, _>>()?;

    let key_pair =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(TlsError::KeyGeneration)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, COMMON_NAME);
    params.distinguished_name = distinguished_name;
    // Starting yesterday tolerates clients whose clocks run behind ours.
    let today = Utc::now().date_naive();
    let start = today.checked_sub_days(Days::new(1)).unwrap_or(today);
    let end = today
        .checked_add_days(Days::new(VALIDITY_DAYS))
        .unwrap_or(today);
    params.not_before = rcgen::date_time_ymd(start.year(), month(start), day(start));
    params.not_after = rcgen::date_time_ymd(end.year(), month(end), day(end));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let certificate = params
        .self_signed(&key_pair)
        .map_err(TlsError::Certificate)?;
    let certificate_der = certificate.der().to_vec();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));

    // Explicit provider: the process default may be unset (or another crate's choice).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ServerConfig)?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(certificate_der.clone())], key_der)
        .map_err(TlsError::ServerConfig)?;
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(SelfSigned {
        certificate_der,
        server_config: Arc::new(server_config),
    })
}

/// The SHA-256 of a certificate (DER), lower-case hex: what the host publishes on its row and
/// what its clients pin.
pub fn fingerprint(certificate_der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, certificate_der)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn san(name: &str) -> Result<SanType, TlsError> {
    let invalid = || TlsError::InvalidSubjectAltName {
        name: name.to_owned(),
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // rcgen only checks for ASCII; a name clients could never match is a configuration error
    // better reported now.
    DnsName::try_from(name).map_err(|_| invalid())?;
    Ok(SanType::DnsName(name.try_into().map_err(|_| invalid())?))
}

// chrono's month and day always fit in a u8.
fn month(date: chrono::NaiveDate) -> u8 {
    u8::try_from(date.month()).unwrap_or(1)
}

fn day(date: chrono::NaiveDate) -> u8 {
    u8::try_from(date.day()).unwrap_or(1)
}

/// Serves `app` over TLS on `listener` (HTTP/1.1 and HTTP/2, by ALPN) until `shutdown` fires,
/// within `limits` (see `whist-serve`), then gives open connections up to `grace` to finish.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    limits: whist_serve::Limits,
    shutdown: CancellationToken,
    grace: Duration,
) -> std::io::Result<()> {
    let app = whist_serve::bounded(app, &limits);
    whist_serve::serve(listener, app, Some(tls), limits, shutdown, grace).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::AsyncWriteExt;

    struct Running {
        addr: std::net::SocketAddr,
        certificate_der: Vec<u8>,
        shutdown: CancellationToken,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start_app(sans: &[&str], app: axum::Router, grace: Duration) -> Running {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let tls = self_signed(&sans).expect("certificate");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_tls(
            listener,
            tls.server_config,
            app,
            whist_serve::Limits::default(),
            shutdown.clone(),
            grace,
        ));
        Running {
            addr,
            certificate_der: tls.certificate_der,
            shutdown,
            server,
        }
    }

    async fn start(
        sans: &[&str],
    ) -> (
        std::net::SocketAddr,
        Vec<u8>,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let app = axum::Router::new().route("/ping", get(|| async { "pong" }));
        let running = start_app(sans, app, Duration::from_secs(5)).await;
        (
            running.addr,
            running.certificate_der,
            running.shutdown,
            running.server,
        )
    }

    /// A router whose `/slow` handler says when it starts, then answers after `delay`.
    fn slow_app(delay: Duration) -> (axum::Router, Arc<tokio::sync::Notify>) {
        let entered = Arc::new(tokio::sync::Notify::new());
        let signal = Arc::clone(&entered);
        let app = axum::Router::new().route(
            "/slow",
            get(move || {
                let signal = Arc::clone(&signal);
                async move {
                    signal.notify_one();
                    tokio::time::sleep(delay).await;
                    "slow pong"
                }
            }),
        );
        (app, entered)
    }

    fn client(certificate_der: &[u8]) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_der(certificate_der).expect("certificate"),
            )
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    #[tokio::test]
    async fn serves_https_on_an_ip_san() {
        let (addr, der, shutdown, server) = start(&["127.0.0.1", "localhost"]).await;
        let client = client(&der);
        let response = client
            .get(format!("https://127.0.0.1:{}/ping", addr.port()))
            .send()
            .await
            .expect("request over TLS");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        assert_eq!(response.text().await.expect("body"), "pong");

        // A client that does not trust the certificate is refused.
        let untrusting = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .build()
            .expect("client");
        assert!(
            untrusting
                .get(format!("https://127.0.0.1:{}/ping", addr.port()))
                .send()
                .await
                .is_err()
        );

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server returns after shutdown")
            .expect("no panic")
            .expect("no error");
    }

    #[tokio::test]
    async fn speaks_http2_by_alpn() {
        // reqwest is built without HTTP/2 here, so talk to the server by hand: negotiate `h2`,
        // send the HTTP/2 preface and an empty SETTINGS frame, and expect the server's SETTINGS.
        use tokio::io::AsyncReadExt;
        let (addr, der, shutdown, server) = start(&["127.0.0.1"]).await;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(der.clone()))
            .expect("trust the certificate");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let server_name =
            rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
        let mut tls = connector
            .connect(server_name, tcp)
            .await
            .expect("TLS handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("preface");
        // Frame header: length 0 (3 bytes), type 4 = SETTINGS, flags 0, stream 0.
        tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .expect("settings");
        let mut frame_header = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut frame_header))
            .await
            .expect("server answers in time")
            .expect("read a frame header");
        assert_eq!(frame_header[3], 4, "first server frame is SETTINGS");
        drop(tls);

        shutdown.cancel();
        server.await.expect("no panic").expect("no error");
    }

    #[tokio::test]
    async fn garbage_and_silent_peers_do_not_stop_the_server() {
        let (addr, der, shutdown, server) = start(&["127.0.0.1"]).await;
        // Plain HTTP on the TLS port, and a peer that connects and hangs up.
        let mut plain = tokio::net::TcpStream::connect(addr).await.expect("connect");
        plain
            .write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02garbage")
            .await
            .expect("write");
        drop(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        // One that stays silent and open while others are served.
        let _silent = tokio::net::TcpStream::connect(addr).await.expect("connect");

        let client = client(&der);
        for _ in 0..3 {
            let response = client
                .get(format!("https://127.0.0.1:{}/ping", addr.port()))
                .send()
                .await
                .expect("request after garbage");
            assert_eq!(response.text().await.expect("body"), "pong");
        }
        drop(plain);

        shutdown.cancel();
        // The silent peer is mid-handshake: shutdown abandons it rather than wait.
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("server returns promptly")
            .expect("no panic")
            .expect("no error");
    }

    #[tokio::test]
    async fn shutdown_lets_a_request_in_flight_finish() {
        let (app, entered) = slow_app(Duration::from_millis(500));
        let running = start_app(&["127.0.0.1"], app, Duration::from_secs(5)).await;
        let client = client(&running.certificate_der);
        let url = format!("https://127.0.0.1:{}/slow", running.addr.port());
        let in_flight = tokio::spawn(async move { client.get(url).send().await });
        entered.notified().await;
        running.shutdown.cancel();
        let response = in_flight
            .await
            .expect("no panic")
            .expect("in-flight request completes");
        assert_eq!(response.text().await.expect("body"), "slow pong");
        tokio::time::timeout(Duration::from_secs(5), running.server)
            .await
            .expect("server returns")
            .expect("no panic")
            .expect("no error");
        // And nothing is accepted any more.
        assert!(tokio::net::TcpStream::connect(running.addr).await.is_err());
    }

    #[tokio::test]
    async fn grace_period_bounds_shutdown() {
        let (app, entered) = slow_app(Duration::from_secs(3600));
        let running = start_app(&["127.0.0.1"], app, Duration::from_millis(300)).await;
        let client = client(&running.certificate_der);
        let url = format!("https://127.0.0.1:{}/slow", running.addr.port());
        let hanging = tokio::spawn(async move { client.get(url).send().await });
        entered.notified().await;
        let cancelled_at = std::time::Instant::now();
        running.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(3), running.server)
            .await
            .expect("server returns after the grace period")
            .expect("no panic")
            .expect("no error");
        assert!(cancelled_at.elapsed() >= Duration::from_millis(300));
        assert!(
            hanging.await.expect("no panic").is_err(),
            "the hanging request's connection is dropped"
        );
    }

    #[test]
    fn certificate_names_and_errors() {
        let made = self_signed(&[
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "host-1.whist.test".to_owned(),
        ])
        .expect("certificate");
        assert!(!made.certificate_der.is_empty());
        assert_eq!(
            made.server_config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(matches!(self_signed(&[]), Err(TlsError::NoSubjectAltNames)));
        assert!(matches!(
            self_signed(&["not a name".to_owned()]),
            Err(TlsError::InvalidSubjectAltName { .. })
        ));
        // Each call makes a new key, so a new certificate.
        let again = self_signed(&["127.0.0.1".to_owned()]).expect("certificate");
        assert_ne!(made.certificate_der, again.certificate_der);
    }
}
