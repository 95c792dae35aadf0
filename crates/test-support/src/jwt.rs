//! A stand-in for the Auth0 tenant: an OIDC-style issuer on a loopback port that publishes a
//! JWKS and mints RS256 tokens, for tests of anything that verifies the project's JWTs.
//!
//! The two RSA keys are fixed test-only keys committed under `fixtures/` (ring cannot generate
//! RSA keys); everything published about them (`n`, `e`) is derived from the key files at start,
//! so the JWKS and the signatures cannot drift apart. Tokens are signed with `ring` directly
//! rather than with the `jsonwebtoken` crate the services verify with, so a bug shared by both
//! sides cannot hide itself, and so tests can put anything at all in a token's header.
//!
//! Key rotation follows what Auth0 does: after [`TestIssuer::rotate_key`] new tokens are signed
//! with the other key and the JWKS lists the new key *and* the previous one (tokens issued just
//! before the rotation stay verifiable until they expire); [`TestIssuer::retire_previous_key`]
//! then drops the previous key from the JWKS, as revoking it in Auth0 would.
//!
//! Besides the signing keys, the JWKS always carries two keys a verifier must skip: an EC P-256
//! key ([`EC_DECOY_KID`]) and an RSA key marked `"use": "enc"` ([`ENCRYPTION_DECOY_KID`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The audience every token from [`TestIssuer::token`] is issued for.
pub const TEST_AUDIENCE: &str = "https://api.whist.test";

/// The JWKS path, relative to the issuer URL (where Auth0 serves it).
pub const JWKS_PATH: &str = ".well-known/jwks.json";

/// Lifetime of tokens from [`TestIssuer::token`] and [`TestIssuer::claims`].
pub const TOKEN_LIFETIME_SECS: u64 = 3600;

/// `kid` of the EC key the JWKS publishes; verifiers that only take RS256 must ignore it.
pub const EC_DECOY_KID: &str = "whist-test-ec-decoy";

/// `kid` of an RSA key the JWKS publishes with `"use": "enc"`; verifiers must not accept
/// signatures by it. It is [`TestKey::Second`]'s key material, so a token signed with
/// `TestKey::Second` under this `kid` would verify if a verifier ignored `use`.
pub const ENCRYPTION_DECOY_KID: &str = "whist-test-rsa-enc-decoy";

/// The committed test-only RSA keys (PKCS#1 DER, 2048 bits). Never use them for anything real.
const FIRST_KEY_DER: &[u8] = include_bytes!("../fixtures/test-only-rsa-1.pkcs1.der");
const SECOND_KEY_DER: &[u8] = include_bytes!("../fixtures/test-only-rsa-2.pkcs1.der");

/// One of the issuer's two fixed RSA signing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestKey {
    /// The key tokens are signed with after start.
    First,
    /// The key tokens are signed with after one [`TestIssuer::rotate_key`].
    Second,
}

impl TestKey {
    /// The `kid` the JWKS publishes this key under.
    pub fn kid(self) -> &'static str {
        match self {
            TestKey::First => "whist-test-rsa-1",
            TestKey::Second => "whist-test-rsa-2",
        }
    }

    /// The other key.
    pub fn other(self) -> TestKey {
        match self {
            TestKey::First => TestKey::Second,
            TestKey::Second => TestKey::First,
        }
    }

    fn index(self) -> usize {
        match self {
            TestKey::First => 0,
            TestKey::Second => 1,
        }
    }
}

/// Which keys sign and which are published.
#[derive(Debug)]
struct KeyState {
    current: TestKey,
    /// In JWKS order: the current key first.
    published: Vec<TestKey>,
}

struct Shared {
    keys: [RsaKeyPair; 2],
    /// The EC decoy's public JWK, made once at start.
    ec_decoy: Value,
    state: Mutex<KeyState>,
    jwks_requests: AtomicUsize,
    jwks_unavailable: AtomicBool,
    rng: SystemRandom,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, KeyState> {
        // A test that panicked while holding the lock leaves consistent state behind: every
        // update is a single assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key(&self, key: TestKey) -> &RsaKeyPair {
        &self.keys[key.index()]
    }

    fn rsa_jwk(&self, key: TestKey, kid: &str, usage: &str, alg: &str) -> Value {
        let components: ring::rsa::PublicKeyComponents<Vec<u8>> = self.key(key).public().into();
        json!({
            "kty": "RSA",
            "use": usage,
            "alg": alg,
            "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(&components.n),
            "e": URL_SAFE_NO_PAD.encode(&components.e),
        })
    }

    fn jwks(&self) -> Value {
        let published = self.state().published.clone();
        let mut keys: Vec<Value> = published
            .into_iter()
            .map(|key| self.rsa_jwk(key, key.kid(), "sig", "RS256"))
            .collect();
        keys.push(self.ec_decoy.clone());
        keys.push(self.rsa_jwk(TestKey::Second, ENCRYPTION_DECOY_KID, "enc", "RSA-OAEP"));
        json!({ "keys": keys })
    }
}

/// A JWT issuer serving its JWKS on `http://127.0.0.1:<port>/.well-known/jwks.json`.
/// Dropping it stops the server and closes its open connections.
pub struct TestIssuer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestIssuer")
            .field("addr", &self.addr)
            .field("keys", &*self.shared.state())
            .finish_non_exhaustive()
    }
}

impl TestIssuer {
    /// Binds a loopback port and starts serving the JWKS on the current Tokio runtime.
    pub async fn start() -> anyhow::Result<TestIssuer> {
        let first = RsaKeyPair::from_der(FIRST_KEY_DER)
            .map_err(|e| anyhow::anyhow!("fixture test-only-rsa-1 is not a PKCS#1 key: {e}"))?;
        let second = RsaKeyPair::from_der(SECOND_KEY_DER)
            .map_err(|e| anyhow::anyhow!("fixture test-only-rsa-2 is not a PKCS#1 key: {e}"))?;
        let rng = SystemRandom::new();
        let ec_decoy = ec_decoy_jwk(&rng)?;
        let shared = Arc::new(Shared {
            keys: [first, second],
            ec_decoy,
            state: Mutex::new(KeyState {
                current: TestKey::First,
                published: vec![TestKey::First],
            }),
            jwks_requests: AtomicUsize::new(0),
            jwks_unavailable: AtomicBool::new(false),
            rng,
        });

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("bind the test issuer's loopback port")?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route(&format!("/{JWKS_PATH}"), get(serve_jwks))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(serve(listener, app));
        Ok(TestIssuer {
            addr,
            shared,
            server,
        })
    }

    /// The issuer URL, `http://127.0.0.1:<port>/`, exactly as it appears in tokens' `iss`.
    pub fn issuer(&self) -> url::Url {
        // A socket address always makes a valid URL; `expect` documents that.
        url::Url::parse(&format!("http://{}/", self.addr)).expect("a socket address is a URL")
    }

    /// Where the JWKS is served.
    pub fn jwks_url(&self) -> url::Url {
        self.issuer()
            .join(JWKS_PATH)
            .expect("a relative path joins onto an http URL")
    }

    /// The audience tokens are issued for ([`TEST_AUDIENCE`]).
    pub fn audience(&self) -> &str {
        TEST_AUDIENCE
    }

    /// The loopback address the JWKS is served on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The key new tokens are signed with.
    pub fn current_key(&self) -> TestKey {
        self.shared.state().current
    }

    /// The `kid` new tokens carry.
    pub fn current_kid(&self) -> &'static str {
        self.current_key().kid()
    }

    /// How many times the JWKS has been requested (served or refused), so tests can assert
    /// how often a verifier fetches it.
    pub fn jwks_requests(&self) -> usize {
        self.shared.jwks_requests.load(Ordering::SeqCst)
    }

    /// Makes the JWKS endpoint answer 503 (`true`) or serve normally again (`false`), to stand
    /// for an issuer outage.
    pub fn set_jwks_unavailable(&self, unavailable: bool) {
        self.shared
            .jwks_unavailable
            .store(unavailable, Ordering::SeqCst);
    }

    /// Switches signing to the other key. The JWKS then lists the new key first and still the
    /// previous one, as Auth0 does during a rotation.
    pub fn rotate_key(&self) {
        let mut state = self.shared.state();
        let previous = state.current;
        state.current = previous.other();
        state.published = vec![state.current, previous];
    }

    /// Stops publishing every key but the current one (revoking the previous key).
    pub fn retire_previous_key(&self) {
        let mut state = self.shared.state();
        state.published = vec![state.current];
    }

    /// The claims of a good token for `subject`: `iss`, `aud`, `sub`, `iat`, and `exp` one hour
    /// ahead; no `scope`. Tests edit this to make bad tokens.
    pub fn claims(&self, subject: &str) -> Value {
        let now = unix_now();
        json!({
            "iss": self.issuer().as_str(),
            "aud": TEST_AUDIENCE,
            "sub": subject,
            "iat": now,
            "exp": now + TOKEN_LIFETIME_SECS,
        })
    }

    /// A good token for `subject`, valid for an hour, signed with the current key.
    pub fn token(&self, subject: &str) -> String {
        self.token_with(&self.claims(subject), None)
    }

    /// A token with exactly `claims`, signed RS256 with the current key. The header carries
    /// `kid` when given, else the current key's `kid`.
    pub fn token_with(&self, claims: &Value, kid: Option<&str>) -> String {
        let key = self.current_key();
        let header = json!({ "alg": "RS256", "typ": "JWT", "kid": kid.unwrap_or(key.kid()) });
        self.sign(&header, claims, key)
    }

    /// A token with exactly `header` and `claims`, with an RS256 signature by `key` whatever
    /// the header says (so the header may lie about `alg` or `kid`, or lack them).
    pub fn sign(&self, header: &Value, claims: &Value, key: TestKey) -> String {
        let message = signing_input(header, claims);
        let key_pair = self.shared.key(key);
        let mut signature = vec![0; key_pair.public().modulus_len()];
        key_pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &self.shared.rng,
                message.as_bytes(),
                &mut signature,
            )
            .expect("signing with a fixture RSA key");
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// The algorithm-confusion attack: a token whose header says HS256 under the current key's
    /// `kid`, MACed with the current key's public modulus as the HMAC secret. A verifier that
    /// let the header pick the algorithm would accept it.
    pub fn hs256_token(&self, claims: &Value) -> String {
        let key = self.current_key();
        let header = json!({ "alg": "HS256", "typ": "JWT", "kid": key.kid() });
        let message = signing_input(&header, claims);
        let components: ring::rsa::PublicKeyComponents<Vec<u8>> =
            self.shared.key(key).public().into();
        let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &components.n);
        let tag = ring::hmac::sign(&mac_key, message.as_bytes());
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// An unsecured token (`"alg": "none"`, empty signature) under the current key's `kid`.
    pub fn unsigned_token(&self, claims: &Value) -> String {
        let header = json!({ "alg": "none", "typ": "JWT", "kid": self.current_kid() });
        format!("{}.", signing_input(&header, claims))
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task, so
        // nothing keeps answering on the port after the issuer is gone.
        self.server.abort();
    }
}

/// `base64url(header) "." base64url(claims)`, the part of a JWS that is signed.
fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A fresh EC P-256 public JWK (the private half is thrown away: nothing signs with it).
fn ec_decoy_jwk(rng: &SystemRandom) -> anyhow::Result<Value> {
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, rng)
        .map_err(|_| anyhow::anyhow!("generate the EC decoy key"))?;
    let key_pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), rng)
        .map_err(|e| anyhow::anyhow!("load the EC decoy key: {e}"))?;
    // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
    let point = key_pair.public_key().as_ref();
    anyhow::ensure!(
        point.len() == 65,
        "unexpected EC point length {}",
        point.len()
    );
    Ok(json!({
        "kty": "EC",
        "crv": "P-256",
        "use": "sig",
        "alg": "ES256",
        "kid": EC_DECOY_KID,
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..]),
    }))
}

async fn serve_jwks(State(shared): State<Arc<Shared>>) -> Response {
    shared.jwks_requests.fetch_add(1, Ordering::SeqCst);
    if shared.jwks_unavailable.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "issuer outage (test)").into_response();
    }
    Json(shared.jwks()).into_response()
}

/// Accept loop. Connections live in a `JoinSet` owned by this future, so aborting the task
/// that runs it ends them too.
async fn serve(listener: TcpListener, app: Router) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Transient (a reset before accept, or out of descriptors): try again shortly.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let builder = builder.clone();
        let service = TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            // A client hanging up mid-request is its own business.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// GETs the JWKS over a raw HTTP/1.1 connection (this crate has no HTTP client).
    async fn fetch_jwks(issuer: &TestIssuer) -> (u16, Value) {
        let mut stream = tokio::net::TcpStream::connect(issuer.addr())
            .await
            .expect("connect");
        stream
            .write_all(
                format!("GET /{JWKS_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        let response = String::from_utf8(response).expect("utf-8");
        let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn kids(jwks: &Value) -> Vec<&str> {
        jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k["kid"].as_str().expect("kid"))
            .collect()
    }

    fn part(token: &str, index: usize) -> Vec<u8> {
        let part = token.split('.').nth(index).expect("part");
        URL_SAFE_NO_PAD.decode(part).expect("base64url")
    }

    #[tokio::test]
    async fn jwks_keys_verify_the_tokens() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let (status, jwks) = fetch_jwks(&issuer).await;
        assert_eq!(status, 200);
        assert_eq!(
            kids(&jwks),
            [TestKey::First.kid(), EC_DECOY_KID, ENCRYPTION_DECOY_KID]
        );
        assert_eq!(issuer.jwks_requests(), 1);

        // The published n/e verify the token's signature: the derivation is right.
        let token = issuer.token("auth0|alice");
        let jwk = &jwks["keys"][0];
        let public = ring::rsa::PublicKeyComponents {
            n: URL_SAFE_NO_PAD
                .decode(jwk["n"].as_str().expect("n"))
                .expect("n"),
            e: URL_SAFE_NO_PAD
                .decode(jwk["e"].as_str().expect("e"))
                .expect("e"),
        };
        assert_eq!(public.n.len(), 256, "2048-bit modulus");
        let (message, _) = token.rsplit_once('.').expect("signed token");
        public
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                message.as_bytes(),
                &part(&token, 2),
            )
            .expect("signature verifies with the published key");

        let header: Value = serde_json::from_slice(&part(&token, 0)).expect("header");
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], TestKey::First.kid());
        let claims: Value = serde_json::from_slice(&part(&token, 1)).expect("claims");
        assert_eq!(claims["iss"], issuer.issuer().as_str());
        assert_eq!(claims["aud"], TEST_AUDIENCE);
        assert_eq!(claims["sub"], "auth0|alice");
    }

    #[tokio::test]
    async fn rotation_outage_and_drop() {
        let issuer = TestIssuer::start().await.expect("issuer");
        issuer.rotate_key();
        assert_eq!(issuer.current_kid(), TestKey::Second.kid());
        let header: Value = serde_json::from_slice(&part(&issuer.token("x"), 0)).expect("header");
        assert_eq!(header["kid"], TestKey::Second.kid());
        let (_, jwks) = fetch_jwks(&issuer).await;
        assert_eq!(
            &kids(&jwks)[..2],
            [TestKey::Second.kid(), TestKey::First.kid()]
        );
        issuer.retire_previous_key();
        let (_, jwks) = fetch_jwks(&issuer).await;
        assert_eq!(&kids(&jwks)[..1], [TestKey::Second.kid()]);
        assert!(!kids(&jwks).contains(&TestKey::First.kid()));

        issuer.set_jwks_unavailable(true);
        assert_eq!(fetch_jwks(&issuer).await.0, 503);
        assert_eq!(issuer.jwks_requests(), 3);

        let addr = issuer.addr();
        drop(issuer);
        // The abort lands when the runtime next gets to the server task.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "still listening after drop"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
