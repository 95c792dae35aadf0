//! TLS to hosts by pinned certificate. A host makes its certificate itself at every start, so
//! no authority can vouch for it; instead the host publishes the certificate's SHA-256 on its
//! instance row (`host_service::http::tls::fingerprint`), and the `json_transport` proxy completes a handshake only with a server that
//! presents exactly that certificate. The caller's token and the session's key never reach
//! anything else, whatever answers at the host's address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// Clients kept, one per fingerprint; more are dropped and made again (hosts come and go).
const MAX_CLIENTS: usize = 4096;

/// HTTPS clients to hosts, one per pinned certificate.
#[derive(Debug)]
pub struct PinnedClients {
    timeout: Duration,
    clients: Mutex<HashMap<String, reqwest::Client>>,
}

impl PinnedClients {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A client that talks only to a server presenting the certificate whose SHA-256 is
    /// `fingerprint` (lower-case hex); `None` for a fingerprint that is not one.
    pub fn pinned_to(&self, fingerprint: &str) -> Option<reqwest::Client> {
        let pin = parse_fingerprint(fingerprint)?;
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(fingerprint) {
            return Some(client.clone());
        }
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        let client = build(pin, self.timeout);
        clients.insert(fingerprint.to_owned(), client.clone());
        Some(client)
    }
}

fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut pin = [0u8; 32];
    for (byte, pair) in pin.iter_mut().zip(text.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(pin)
}

fn build(pin: [u8; 32], timeout: Duration) -> reqwest::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCertificate {
        pin,
        provider: provider.clone(),
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        // A host answering with a redirect must not steer this service anywhere else.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("a client with a rustls configuration and timeouts always builds")
}

/// Accepts exactly one certificate, by its SHA-256, and checks the handshake's signatures with
/// it as any verifier would (the server proves it holds the certificate's key).
#[derive(Debug)]
struct PinnedCertificate {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if presented.as_ref() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_64_hex_digits() {
        // What a host publishes (`host_service::http::tls::fingerprint`): SHA-256, lower hex.
        let digest = ring::digest::digest(&ring::digest::SHA256, b"certificate");
        let fingerprint: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(fingerprint.len(), 64);
        assert!(parse_fingerprint(&fingerprint).is_some());
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63), &"a".repeat(66)] {
            assert!(parse_fingerprint(bad).is_none(), "{bad}");
        }
        let clients = PinnedClients::new(Duration::from_secs(1));
        assert!(clients.pinned_to("not a fingerprint").is_none());
        assert!(clients.pinned_to(&fingerprint).is_some());
    }
}
