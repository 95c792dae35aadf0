//! JWT verification against a JWKS, for both services.
//!
//! Clients of `json_transport` present an Auth0 access token: an RS256-signed JWT whose `kid`
//! names one of the tenant's signing keys, published as a JWKS at
//! `<issuer>.well-known/jwks.json`. [`JwtVerifier`] keeps those keys in memory and checks a
//! token's signature, `exp`, `nbf`, `iss`, `aud` and `sub` against them.
//!
//! The verifier is self-contained (configuration in, [`Claims`] or [`AuthError`] out) so the
//! scaling service can use the same code for the same tokens.
//!
//! Key handling:
//! - Nothing is fetched when the verifier is made; the first [`JwtVerifier::verify`] fetches the
//!   JWKS, and [`JwtVerifier::spawn_periodic_refresh`] keeps it fresh.
//! - A token whose `kid` is not among the loaded keys makes the verifier fetch the JWKS once more
//!   (the issuer may have rotated keys), but never sooner than
//!   [`JwtConfig::min_refresh_interval`] after the previous fetch, so a flood of tokens with
//!   made-up `kid`s cannot turn into a flood of requests to the issuer. Concurrent verifies that
//!   miss share a single fetch.
//! - A failed fetch keeps the keys already loaded: an issuer outage must not lock out clients
//!   whose tokens we can still check.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header::AUTHORIZATION};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often [`JwtVerifier::spawn_periodic_refresh`] refetches the JWKS by default. Auth0
/// announces rotations well ahead and unknown `kid`s trigger a fetch anyway, so an hour only
/// bounds how long a revoked key stays trusted.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// Default clock-skew allowance for `exp` and `nbf`. Hosts and Auth0 both run NTP, so real skew
/// is well under a second; 30 s absorbs a host whose clock is briefly off (e.g. just after boot)
/// while keeping an expired token usable for at most half a minute.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Default shortest time between two JWKS fetches triggered by tokens.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Whole-request limit for one JWKS fetch (connect, headers and body). Verifies that need the
/// fetch wait for it, so it must be short.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A JWKS is a few kilobytes; anything far bigger is not one.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Tokens are a few hundred bytes to a few kilobytes; refuse to parse anything absurd.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The one signature algorithm accepted. Pinning it (rather than trusting the header's `alg`)
/// is what defeats `alg: none` and RS256→HS256 confusion.
const ALGORITHM: Algorithm = Algorithm::RS256;

/// Where tokens come from and whom they must be for.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The issuer, compared verbatim with the token's `iss` (Auth0's ends with `/`).
    pub issuer: url::Url,
    /// Must be one of the token's `aud` values.
    pub audience: String,
    /// Where the JWKS lives; `None` means `<issuer>.well-known/jwks.json`.
    pub jwks_url: Option<url::Url>,
    /// Period of [`JwtVerifier::spawn_periodic_refresh`] (clamped to at least one second).
    pub refresh_interval: Duration,
    /// Clock-skew allowance for `exp` and `nbf` (whole seconds are used).
    pub leeway: Duration,
    /// Shortest time between a JWKS fetch and one triggered by a token with an unknown `kid`.
    pub min_refresh_interval: Duration,
}

impl JwtConfig {
    /// A configuration with the defaults: JWKS at the issuer's well-known path, hourly refresh,
    /// [`DEFAULT_LEEWAY`] and [`DEFAULT_MIN_REFRESH_INTERVAL`].
    pub fn new(issuer: url::Url, audience: impl Into<String>) -> Self {
        JwtConfig {
            issuer,
            audience: audience.into(),
            jwks_url: None,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            leeway: DEFAULT_LEEWAY,
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
        }
    }

    /// The JWKS URL: the configured one, else `.well-known/jwks.json` under the issuer. An
    /// issuer without a trailing `/` is treated as a directory all the same, so that
    /// `https://tenant.auth0.com` does not lose its last path segment to `join`.
    pub fn resolved_jwks_url(&self) -> Result<url::Url, String> {
        if let Some(url) = &self.jwks_url {
            return Ok(url.clone());
        }
        let mut base = self.issuer.clone();
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        base.join(".well-known/jwks.json")
            .map_err(|e| format!("no JWKS URL can be made from issuer {}: {e}", self.issuer))
    }
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`: the Auth0 user id, never empty.
    pub subject: String,
    /// `scope`, split on spaces; empty when the token has none.
    pub scopes: Vec<String>,
    /// `exp`.
    pub expires_at: DateTime<Utc>,
}

impl Claims {
    /// Whether the token grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// Why a request is not authenticated.
///
/// Only [`AuthError::JwksUnavailable`] is the server's problem (HTTP 503); every other variant
/// is the client's (HTTP 401); see [`AuthError::status_code`]. The messages are meant for logs:
/// they say exactly what was wrong, which a client should usually not be told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("no Authorization header")]
    MissingToken,
    /// The `Authorization` header is not `Bearer <token>` (or the token is empty, `undefined`
    /// or `null`, which broken clients send).
    #[error("Authorization header is not `Bearer <token>`")]
    MalformedHeader,
    /// The token is not acceptable; the message says which check failed.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The token's `kid` is not in the issuer's JWKS, even after refetching it.
    #[error("token signed with unknown key `{kid}`")]
    UnknownKey {
        /// The `kid` from the token header.
        kid: String,
    },
    /// The JWKS could not be fetched or made no sense, so the token could not be checked.
    #[error("signing keys unavailable: {0}")]
    JwksUnavailable(String),
}

impl AuthError {
    /// The HTTP status to answer with: 503 when the keys are unavailable (retrying later may
    /// succeed and the client did nothing wrong), 401 otherwise.
    pub fn status_code(&self) -> StatusCode {
        match self {
            AuthError::JwksUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::MissingToken
            | AuthError::MalformedHeader
            | AuthError::InvalidToken(_)
            | AuthError::UnknownKey { .. } => StatusCode::UNAUTHORIZED,
        }
    }
}

/// The token from an `Authorization: Bearer <token>` header (scheme matched case-insensitively).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::MissingToken)?;
    // Two Authorization headers are ambiguous; picking one could let a proxy's check and ours
    // look at different tokens.
    if values.next().is_some() {
        return Err(AuthError::MalformedHeader);
    }
    let value = value.to_str().map_err(|_| AuthError::MalformedHeader)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MalformedHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedHeader);
    }
    let token = token.trim_start_matches(' ');
    if token.is_empty()
        || token == "undefined"
        || token == "null"
        || token.contains(|c: char| c.is_ascii_whitespace())
    {
        return Err(AuthError::MalformedHeader);
    }
    Ok(token)
}

/// Verifies JWTs against the issuer's JWKS. Cloning is cheap and clones share the keys.
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    config: JwtConfig,
    jwks_url: Result<url::Url, String>,
    http: reqwest::Client,
    validation: Validation,
    /// Keys by `kid`. Read on every verify, replaced whole on each successful fetch; the lock
    /// is never held across an await.
    keys: RwLock<Arc<HashMap<String, Arc<DecodingKey>>>>,
    /// Completed fetch attempts, successful or not. A verify that waited for the refresh lock
    /// compares it with what it saw before waiting, to use a fetch that finished meanwhile
    /// instead of starting another.
    fetches: AtomicU64,
    /// Held for the whole of a fetch, so there is at most one in flight.
    refresh: tokio::sync::Mutex<RefreshState>,
}

#[derive(Debug, Default)]
struct RefreshState {
    /// When the last fetch attempt finished.
    last_attempt: Option<Instant>,
    /// Why the last attempt failed; `None` after a success.
    last_error: Option<String>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<String> = self.keys().keys().cloned().collect();
        kids.sort();
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.inner.config.issuer.as_str())
            .field("audience", &self.inner.config.audience)
            .field("jwks_url", &self.inner.jwks_url)
            .field("kids", &kids)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for `config`. Makes no network call; `http` is used for JWKS fetches (each
    /// gets its own timeout, so the client need not have one).
    pub fn new(config: JwtConfig, http: reqwest::Client) -> Self {
        let mut validation = Validation::new(ALGORITHM);
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&[config.audience.as_str()]);
        let jwks_url = config.resolved_jwks_url();
        JwtVerifier {
            inner: Arc::new(Inner {
                config,
                jwks_url,
                http,
                validation,
                keys: RwLock::new(Arc::new(HashMap::new())),
                fetches: AtomicU64::new(0),
                refresh: tokio::sync::Mutex::new(RefreshState::default()),
            }),
        }
    }

    /// The configuration this verifier was made with.
    pub fn config(&self) -> &JwtConfig {
        &self.inner.config
    }

    /// Fetches the JWKS now and replaces the loaded keys with its RS256 signing keys. Waits for
    /// a fetch already in flight, then fetches anyway. On failure the loaded keys are kept.
    pub async fn refresh(&self) -> Result<(), AuthError> {
        let mut state = self.inner.refresh.lock().await;
        self.fetch_locked(&mut state).await
    }

    /// Checks `token` and returns its claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::InvalidToken(format!(
                "token is {} bytes; at most {MAX_TOKEN_BYTES} accepted",
                token.len()
            )));
        }
        let kid = checked_kid(token)?;
        let key = self.key_for(&kid).await?;
        let data = jsonwebtoken::decode::<Value>(token, &key, &self.inner.validation)
            .map_err(|e| AuthError::InvalidToken(describe(&e)))?;
        self.claims_from(data.claims)
    }

    /// Refreshes the JWKS every [`JwtConfig::refresh_interval`] until `cancel` fires, starting
    /// with one fetch right away so the first client does not wait for it and a misconfigured
    /// issuer shows up in the log at start. Failures are logged at warn and the old keys kept.
    pub fn spawn_periodic_refresh(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let verifier = self.clone();
        // `interval` panics on zero.
        let period = self
            .inner
            .config
            .refresh_interval
            .max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                tokio::select! {
                    () = cancel.cancelled() => break,
                    result = verifier.refresh() => match result {
                        Ok(()) => debug!(issuer = %verifier.inner.config.issuer, "JWKS refreshed"),
                        Err(error) => warn!(
                            issuer = %verifier.inner.config.issuer,
                            %error,
                            "periodic JWKS refresh failed; keeping the keys already loaded"
                        ),
                    },
                }
            }
        })
    }

    fn keys(&self) -> Arc<HashMap<String, Arc<DecodingKey>>> {
        // Writers only swap the Arc, so a poisoned lock still holds a consistent map.
        Arc::clone(
            &self
                .inner
                .keys
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn cached_key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        self.keys().get(kid).cloned()
    }

    /// The key for `kid`, fetching the JWKS when it is not loaded and the rate limit allows.
    async fn key_for(&self, kid: &str) -> Result<Arc<DecodingKey>, AuthError> {
        if let Some(key) = self.cached_key(kid) {
            return Ok(key);
        }
        let fetches_before = self.inner.fetches.load(Ordering::Acquire);
        let mut state = self.inner.refresh.lock().await;
        if let Some(key) = self.cached_key(kid) {
            return Ok(key);
        }
        let fetched_while_waiting = self.inner.fetches.load(Ordering::Acquire) != fetches_before;
        let fetched_recently = state
            .last_attempt
            .is_some_and(|at| at.elapsed() < self.inner.config.min_refresh_interval);
        if !fetched_while_waiting && !fetched_recently {
            // The outcome is recorded in `state` and reported below.
            let _ = self.fetch_locked(&mut state).await;
        }
        if let Some(key) = self.cached_key(kid) {
            return Ok(key);
        }
        // If the latest fetch failed we cannot tell a new key from a made-up one.
        match &state.last_error {
            Some(error) => Err(AuthError::JwksUnavailable(error.clone())),
            None => Err(AuthError::UnknownKey {
                kid: kid.to_owned(),
            }),
        }
    }

    /// Fetches the JWKS; the caller holds the refresh lock (`state`).
    async fn fetch_locked(&self, state: &mut RefreshState) -> Result<(), AuthError> {
        let outcome = self.fetch_jwks().await;
        state.last_attempt = Some(Instant::now());
        self.inner.fetches.fetch_add(1, Ordering::AcqRel);
        match outcome {
            Ok(keys) => {
                debug!(count = keys.len(), "loaded JWKS signing keys");
                *self
                    .inner
                    .keys
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
                state.last_error = None;
                Ok(())
            }
            Err(error) => {
                state.last_error = Some(error.clone());
                Err(AuthError::JwksUnavailable(error))
            }
        }
    }

    async fn fetch_jwks(&self) -> Result<HashMap<String, Arc<DecodingKey>>, String> {
        let url = self.inner.jwks_url.as_ref().map_err(Clone::clone)?;
        let mut response = self
            .inner
            .http
            .get(url.clone())
            .timeout(JWKS_FETCH_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("GET {url}: reading the body: {}", error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!(
                    "GET {url}: JWKS larger than {MAX_JWKS_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body).map_err(|e| format!("{url}: {e}"))
    }

    /// The checks `jsonwebtoken` does not do, and the conversion to [`Claims`].
    fn claims_from(&self, claims: Value) -> Result<Claims, AuthError> {
        let invalid = |message: &str| AuthError::InvalidToken(message.to_owned());
        // jsonwebtoken also accepts an `iss` array containing the issuer; a real issuer never
        // sends one, so insist on the exact string.
        match claims.get("iss") {
            Some(Value::String(iss)) if iss == self.inner.config.issuer.as_str() => {}
            _ => return Err(invalid("wrong issuer")),
        }
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            Some(Value::String(_)) => return Err(invalid("empty `sub`")),
            _ => return Err(invalid("missing required claim `sub`")),
        };
        let scopes = match claims.get("scope") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(scope)) => scope.split_whitespace().map(str::to_owned).collect(),
            // Scopes grant rights: a shape we do not understand is refused, not ignored.
            Some(_) => return Err(invalid("`scope` is not a string")),
        };
        let expires_at = claims
            .get("exp")
            .and_then(|exp| {
                exp.as_i64()
                    // jsonwebtoken accepts fractional seconds; so do we.
                    .or_else(|| exp.as_f64().map(|secs| secs.trunc() as i64))
            })
            .and_then(|secs| DateTime::from_timestamp(secs, 0))
            .ok_or_else(|| invalid("`exp` is not a representable time"))?;
        Ok(Claims {
            subject,
            scopes,
            expires_at,
        })
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    kid: Option<Value>,
}

/// Reads the header far enough to insist on RS256 and a `kid`, with messages that say which.
fn checked_kid(token: &str) -> Result<String, AuthError> {
    let invalid = |message: String| AuthError::InvalidToken(message);
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid(
            "not a JWS in compact form (three dot-separated parts)".into(),
        ));
    };
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|e| invalid(format!("header is not base64url: {e}")))?;
    let header: RawHeader = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("header is not a JSON object: {e}")))?;
    match header.alg {
        Some(Value::String(alg)) if alg == "RS256" => {}
        Some(Value::String(alg)) => {
            return Err(invalid(format!(
                "algorithm `{alg}` not allowed; only RS256 is accepted"
            )));
        }
        _ => return Err(invalid("header has no `alg`".into())),
    }
    match header.kid {
        Some(Value::String(kid)) if !kid.is_empty() => Ok(kid),
        _ => Err(invalid("header has no `kid`".into())),
    }
}

/// One JWKS entry, read leniently: keys we do not use may have any shape.
#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

/// The RS256 signing keys of a JWKS document, by `kid`. Keys of other types, algorithms or
/// uses are skipped (an issuer may publish encryption or EC keys next to its signing keys);
/// a document with no usable key at all is an error, since no token could then be verified.
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<DecodingKey>>, String> {
    #[derive(Deserialize)]
    struct RawJwks {
        keys: Vec<Value>,
    }
    let jwks: RawJwks =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = HashMap::new();
    for entry in jwks.keys {
        let Ok(jwk) = serde_json::from_value::<RawJwk>(entry) else {
            debug!("skipping a JWKS entry of unexpected shape");
            continue;
        };
        let usable = jwk.kty.as_deref() == Some("RSA")
            // `alg` and `use` are optional in a JWK; when present they must fit.
            && jwk.alg.as_deref().is_none_or(|alg| alg == "RS256")
            && jwk.usage.as_deref().is_none_or(|usage| usage == "sig");
        let (true, Some(kid), Some(n), Some(e)) = (usable, jwk.kid, jwk.n, jwk.e) else {
            continue;
        };
        if kid.is_empty() {
            continue;
        }
        match DecodingKey::from_rsa_components(&n, &e) {
            Ok(key) => {
                if keys.insert(kid.clone(), Arc::new(key)).is_some() {
                    warn!(%kid, "JWKS lists a kid twice; using the last");
                }
            }
            Err(error) => warn!(%kid, %error, "skipping a JWKS key with bad n/e"),
        }
    }
    if keys.is_empty() {
        return Err("JWKS has no RS256 signing keys".into());
    }
    Ok(keys)
}

/// What failed, in words, for [`AuthError::InvalidToken`].
fn describe(error: &jsonwebtoken::errors::Error) -> String {
    match error.kind() {
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::ExpiredSignature => "token has expired".into(),
        ErrorKind::ImmatureSignature => "token is not valid yet (`nbf`)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing required claim `{claim}`"),
        ErrorKind::InvalidAlgorithm => "algorithm not allowed; only RS256 is accepted".into(),
        _ => format!("malformed token: {error}"),
    }
}

/// `error` and its sources, because reqwest's own message rarely says what went wrong
/// ("error sending request" hides "connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;
    use whist_test_support::jwt::{EC_DECOY_KID, ENCRYPTION_DECOY_KID, TestIssuer, TestKey};

    fn config_for(issuer: &TestIssuer) -> JwtConfig {
        JwtConfig::new(issuer.issuer(), issuer.audience())
    }

    fn verifier_for(issuer: &TestIssuer) -> JwtVerifier {
        JwtVerifier::new(config_for(issuer), reqwest::Client::new())
    }

    fn invalid_message(result: Result<Claims, AuthError>) -> String {
        match result {
            Err(AuthError::InvalidToken(message)) => message,
            other => panic!("expected InvalidToken, got {other:?}"),
        }
    }

    fn now() -> i64 {
        Utc::now().timestamp()
    }

    #[test]
    fn jwks_url_defaults_to_the_well_known_path() {
        let config = JwtConfig::new(
            url::Url::parse("https://whist.us.auth0.com/").expect("url"),
            "aud",
        );
        assert_eq!(
            config.resolved_jwks_url().expect("jwks url").as_str(),
            "https://whist.us.auth0.com/.well-known/jwks.json"
        );
        let config = JwtConfig::new(
            url::Url::parse("https://login.example/tenant").expect("url"),
            "aud",
        );
        assert_eq!(
            config.resolved_jwks_url().expect("jwks url").as_str(),
            "https://login.example/tenant/.well-known/jwks.json"
        );
        let explicit = url::Url::parse("https://keys.example/jwks").expect("url");
        let config = JwtConfig {
            jwks_url: Some(explicit.clone()),
            ..config
        };
        assert_eq!(config.resolved_jwks_url().expect("jwks url"), explicit);
    }

    #[tokio::test]
    async fn good_token_is_accepted_and_the_first_verify_fetches_the_jwks() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        assert_eq!(issuer.jwks_requests(), 0, "construction must not fetch");

        let mut claims = issuer.claims("auth0|alice");
        claims["scope"] = json!("openid  json_transport:put");
        let claims = verifier
            .verify(&issuer.token_with(&claims, None))
            .await
            .expect("good token");
        assert_eq!(claims.subject, "auth0|alice");
        assert_eq!(claims.scopes, ["openid", "json_transport:put"]);
        assert!(claims.has_scope("json_transport:put"));
        assert!(claims.expires_at > Utc::now() + chrono::Duration::minutes(59));
        assert_eq!(issuer.jwks_requests(), 1);

        // Known kid: no further fetch.
        let claims = verifier
            .verify(&issuer.token("auth0|bob"))
            .await
            .expect("good token");
        assert!(claims.scopes.is_empty());
        assert_eq!(issuer.jwks_requests(), 1);
    }

    #[tokio::test]
    async fn audience_may_be_an_array() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let mut claims = issuer.claims("auth0|alice");
        claims["aud"] = json!(["https://other.example", issuer.audience()]);
        verifier
            .verify(&issuer.token_with(&claims, None))
            .await
            .expect("aud array containing ours");
    }

    #[tokio::test]
    async fn expired_token_is_rejected() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let mut claims = issuer.claims("auth0|alice");
        claims["iat"] = json!(now() - 7200);
        claims["exp"] = json!(now() - 3600);
        let message = invalid_message(verifier.verify(&issuer.token_with(&claims, None)).await);
        assert!(message.contains("expired"), "{message}");
    }

    #[tokio::test]
    async fn leeway_covers_small_clock_skew_only() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let mut claims = issuer.claims("auth0|alice");
        claims["exp"] = json!(now() - 5);
        verifier
            .verify(&issuer.token_with(&claims, None))
            .await
            .expect("expired 5 s ago is within the leeway");

        claims["exp"] = json!(now() + 3600);
        claims["nbf"] = json!(now() + 600);
        let message = invalid_message(verifier.verify(&issuer.token_with(&claims, None)).await);
        assert!(message.contains("nbf"), "{message}");
    }

    #[tokio::test]
    async fn missing_exp_is_rejected() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let mut claims = issuer.claims("auth0|alice");
        claims.as_object_mut().expect("claims object").remove("exp");
        let message = invalid_message(verifier.verify(&issuer.token_with(&claims, None)).await);
        assert!(message.contains("`exp`"), "{message}");
    }

    #[tokio::test]
    async fn wrong_audience_is_rejected() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let mut claims = issuer.claims("auth0|alice");
        claims["aud"] = json!("https://someone-else.example");
        let message = invalid_message(verifier.verify(&issuer.token_with(&claims, None)).await);
        assert!(message.contains("audience"), "{message}");

        claims.as_object_mut().expect("claims object").remove("aud");
        let message = invalid_message(verifier.verify(&issuer.token_with(&claims, None)).await);
        assert!(message.contains("`aud`"), "{message}");
    }

    #[tokio::test]
    async fn wrong_issuer_is_rejected() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let mut claims = issuer.claims("auth0|alice");
        claims["iss"] = json!("https://evil.example/");
        let message = invalid_message(verifier.verify(&issuer.token_with(&claims, None)).await);
        assert!(message.contains("issuer"), "{message}");

        // Exact string: no trailing-slash leniency, no arrays.
        claims["iss"] = json!(issuer.issuer().as_str().trim_end_matches('/'));
        let message = invalid_message(verifier.verify(&issuer.token_with(&claims, None)).await);
        assert!(message.contains("issuer"), "{message}");
        claims["iss"] = json!([issuer.issuer().as_str()]);
        let message = invalid_message(verifier.verify(&issuer.token_with(&claims, None)).await);
        assert!(message.contains("issuer"), "{message}");
    }

    #[tokio::test]
    async fn signature_by_another_key_under_a_published_kid_is_rejected() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let header = json!({ "alg": "RS256", "typ": "JWT", "kid": TestKey::First.kid() });
        let token = issuer.sign(&header, &issuer.claims("auth0|mallory"), TestKey::Second);
        let message = invalid_message(verifier.verify(&token).await);
        assert!(message.contains("signature"), "{message}");

        // A tampered payload under a good signature fails the same way.
        let good = issuer.token("auth0|alice");
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD.encode(issuer.claims("auth0|admin").to_string());
        parts[1] = &forged_claims;
        let message = invalid_message(verifier.verify(&parts.join(".")).await);
        assert!(message.contains("signature"), "{message}");
    }

    #[tokio::test]
    async fn keys_that_are_not_rs256_signing_keys_are_ignored() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = JwtVerifier::new(
            JwtConfig {
                min_refresh_interval: Duration::ZERO,
                ..config_for(&issuer)
            },
            reqwest::Client::new(),
        );
        verifier.refresh().await.expect("refresh");
        // The enc decoy is TestKey::Second's material: only `use` keeps this token out.
        let header = json!({ "alg": "RS256", "kid": ENCRYPTION_DECOY_KID });
        let token = issuer.sign(&header, &issuer.claims("auth0|alice"), TestKey::Second);
        assert_eq!(
            verifier.verify(&token).await,
            Err(AuthError::UnknownKey {
                kid: ENCRYPTION_DECOY_KID.into()
            })
        );
        let header = json!({ "alg": "RS256", "kid": EC_DECOY_KID });
        let token = issuer.sign(&header, &issuer.claims("auth0|alice"), TestKey::First);
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::UnknownKey { .. })
        ));
    }

    #[tokio::test]
    async fn unknown_kid_refetches_the_jwks_after_a_rotation() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = JwtVerifier::new(
            JwtConfig {
                min_refresh_interval: Duration::ZERO,
                ..config_for(&issuer)
            },
            reqwest::Client::new(),
        );
        let old_token = issuer.token("auth0|alice");
        verifier.verify(&old_token).await.expect("old key");
        assert_eq!(issuer.jwks_requests(), 1);

        issuer.rotate_key();
        assert_eq!(issuer.current_key(), TestKey::Second);
        let new_token = issuer.token("auth0|alice");
        verifier
            .verify(&new_token)
            .await
            .expect("new key after refetch");
        assert_eq!(issuer.jwks_requests(), 2);
        // During the rotation the old key is still published and still good.
        verifier
            .verify(&old_token)
            .await
            .expect("old key still published");
        assert_eq!(issuer.jwks_requests(), 2);

        // Once the issuer retires the old key, a refresh drops it.
        issuer.retire_previous_key();
        verifier.refresh().await.expect("refresh");
        assert_eq!(
            verifier.verify(&old_token).await,
            Err(AuthError::UnknownKey {
                kid: TestKey::First.kid().into()
            })
        );
        // That unknown kid triggered one more fetch (the rate limit is zero here).
        assert_eq!(issuer.jwks_requests(), 4);
    }

    #[tokio::test]
    async fn unknown_kids_refetch_at_most_once_per_interval() {
        let issuer = TestIssuer::start().await.expect("issuer");
        // Default 10 s rate limit.
        let verifier = verifier_for(&issuer);
        verifier
            .verify(&issuer.token("auth0|alice"))
            .await
            .expect("good token");
        assert_eq!(issuer.jwks_requests(), 1);

        // A flood of made-up kids, sequential and concurrent: no fetch within the interval.
        for i in 0..20 {
            let token = issuer.token_with(&issuer.claims("x"), Some(&format!("bogus-{i}")));
            assert!(matches!(
                verifier.verify(&token).await,
                Err(AuthError::UnknownKey { .. })
            ));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..20 {
            let verifier = verifier.clone();
            let token = issuer.token_with(&issuer.claims("x"), Some(&format!("flood-{i}")));
            tasks.spawn(async move { verifier.verify(&token).await });
        }
        while let Some(result) = tasks.join_next().await {
            assert!(matches!(
                result.expect("task"),
                Err(AuthError::UnknownKey { .. })
            ));
        }
        assert_eq!(issuer.jwks_requests(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_verifies_share_one_fetch() {
        let issuer = TestIssuer::start().await.expect("issuer");
        // No rate limit, so only the in-flight sharing keeps this to one fetch.
        let verifier = JwtVerifier::new(
            JwtConfig {
                min_refresh_interval: Duration::ZERO,
                ..config_for(&issuer)
            },
            reqwest::Client::new(),
        );
        let token = issuer.token("auth0|alice");
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let verifier = verifier.clone();
            let token = token.clone();
            tasks.spawn(async move { verifier.verify(&token).await });
        }
        while let Some(result) = tasks.join_next().await {
            result.expect("task").expect("good token");
        }
        assert_eq!(issuer.jwks_requests(), 1);
    }

    #[tokio::test]
    async fn algorithms_other_than_rs256_are_rejected() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let claims = issuer.claims("auth0|mallory");

        let message = invalid_message(verifier.verify(&issuer.hs256_token(&claims)).await);
        assert!(message.contains("HS256"), "{message}");
        let message = invalid_message(verifier.verify(&issuer.unsigned_token(&claims)).await);
        assert!(message.contains("none"), "{message}");
        // An RS256 signature under a header claiming RS512 is still refused.
        let header = json!({ "alg": "RS512", "kid": issuer.current_kid() });
        let token = issuer.sign(&header, &claims, issuer.current_key());
        let message = invalid_message(verifier.verify(&token).await);
        assert!(message.contains("RS512"), "{message}");
        // None of these needed the keys.
        assert_eq!(issuer.jwks_requests(), 0);
    }

    #[tokio::test]
    async fn header_without_kid_is_rejected() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let header = json!({ "alg": "RS256", "typ": "JWT" });
        let token = issuer.sign(&header, &issuer.claims("auth0|alice"), TestKey::First);
        let message = invalid_message(verifier.verify(&token).await);
        assert!(message.contains("kid"), "{message}");
    }

    #[tokio::test]
    async fn missing_or_empty_sub_is_rejected() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let mut claims = issuer.claims("auth0|alice");
        claims.as_object_mut().expect("claims object").remove("sub");
        let message = invalid_message(verifier.verify(&issuer.token_with(&claims, None)).await);
        assert!(message.contains("`sub`"), "{message}");

        let message = invalid_message(verifier.verify(&issuer.token("")).await);
        assert!(message.contains("`sub`"), "{message}");
    }

    #[tokio::test]
    async fn non_string_scope_is_rejected() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        let mut claims = issuer.claims("auth0|alice");
        claims["scope"] = json!(["admin"]);
        let message = invalid_message(verifier.verify(&issuer.token_with(&claims, None)).await);
        assert!(message.contains("scope"), "{message}");
    }

    #[tokio::test]
    async fn garbage_tokens_are_invalid() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = verifier_for(&issuer);
        for garbage in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!!.e30.",
            "e30.e30.",
            "bnVsbA.e30.",
        ] {
            assert!(
                matches!(
                    verifier.verify(garbage).await,
                    Err(AuthError::InvalidToken(_))
                ),
                "{garbage:?}"
            );
        }
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(
            verifier.verify(&huge).await,
            Err(AuthError::InvalidToken(_))
        ));
        assert_eq!(issuer.jwks_requests(), 0);
    }

    #[tokio::test]
    async fn unreachable_issuer_is_jwks_unavailable() {
        // A port that was free a moment ago: connection refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let issuer_url = url::Url::parse(&format!("http://127.0.0.1:{port}/")).expect("url");
        let verifier = JwtVerifier::new(
            JwtConfig::new(issuer_url, "https://api.whist.test"),
            reqwest::Client::new(),
        );
        // Any well-formed RS256 token with a kid will do: the key lookup fails first.
        let issuer = TestIssuer::start().await.expect("issuer");
        let token = issuer.token("auth0|alice");
        let error = verifier.verify(&token).await.expect_err("no keys");
        assert!(
            matches!(&error, AuthError::JwksUnavailable(m) if m.contains("127.0.0.1")),
            "{error:?}"
        );
        assert_eq!(error.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        // Within the rate limit the failure is remembered, not retried.
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::JwksUnavailable(_))
        ));
        assert!(matches!(
            verifier.refresh().await,
            Err(AuthError::JwksUnavailable(_))
        ));
    }

    #[tokio::test]
    async fn issuer_outage_keeps_loaded_keys() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = JwtVerifier::new(
            JwtConfig {
                min_refresh_interval: Duration::ZERO,
                ..config_for(&issuer)
            },
            reqwest::Client::new(),
        );
        verifier.refresh().await.expect("refresh");
        issuer.set_jwks_unavailable(true);
        let error = verifier.refresh().await.expect_err("outage");
        assert!(
            matches!(&error, AuthError::JwksUnavailable(m) if m.contains("503")),
            "{error:?}"
        );
        verifier
            .verify(&issuer.token("auth0|alice"))
            .await
            .expect("loaded key still good");
        // A kid we do not have cannot be told from a new one while the issuer is down.
        let token = issuer.token_with(&issuer.claims("x"), Some("maybe-new"));
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::JwksUnavailable(_))
        ));
        issuer.set_jwks_unavailable(false);
        assert_eq!(
            verifier.verify(&token).await,
            Err(AuthError::UnknownKey {
                kid: "maybe-new".into()
            })
        );
    }

    #[tokio::test]
    async fn periodic_refresh_fetches_until_cancelled() {
        let issuer = TestIssuer::start().await.expect("issuer");
        let verifier = JwtVerifier::new(
            JwtConfig {
                refresh_interval: Duration::from_secs(1),
                ..config_for(&issuer)
            },
            reqwest::Client::new(),
        );
        let cancel = CancellationToken::new();
        let task = verifier.spawn_periodic_refresh(cancel.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        while issuer.jwks_requests() < 2 {
            assert!(Instant::now() < deadline, "no second periodic fetch");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("task stops on cancel")
            .expect("task did not panic");
        // Keys came from the periodic fetch: verify needs none of its own.
        let before = issuer.jwks_requests();
        verifier
            .verify(&issuer.token("auth0|alice"))
            .await
            .expect("good token");
        assert_eq!(issuer.jwks_requests(), before);
    }

    #[test]
    fn jwks_parsing_skips_what_it_cannot_use() {
        let good = json!({ "kty": "RSA", "kid": "k1", "n": "xjlCRBqkOaQ", "e": "AQAB" });
        let body = json!({ "keys": [
            good,
            { "kty": "RSA", "kid": "k2", "use": "enc", "n": "xjlCRBqkOaQ", "e": "AQAB" },
            { "kty": "RSA", "kid": "k3", "alg": "RS512", "n": "xjlCRBqkOaQ", "e": "AQAB" },
            { "kty": "RSA", "n": "xjlCRBqkOaQ", "e": "AQAB" },
            { "kty": "RSA", "kid": "k5", "e": "AQAB" },
            { "kty": "EC", "kid": "k6", "crv": "P-256", "x": "AA", "y": "AA" },
            { "kty": "oct", "kid": "k7", "k": "c2VjcmV0" },
            { "kty": 7, "kid": ["odd"] },
            "not even an object",
        ]});
        let keys = parse_jwks(body.to_string().as_bytes()).expect("one good key");
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["k1"]);

        let only_bad = json!({ "keys": [{ "kty": "EC", "kid": "k6" }] });
        assert!(parse_jwks(only_bad.to_string().as_bytes()).is_err());
        assert!(parse_jwks(b"<html>").is_err());
        assert!(parse_jwks(b"{}").is_err());
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                AUTHORIZATION,
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        headers
    }

    #[test]
    fn bearer_token_parsing() {
        assert_eq!(
            bearer_token(&headers(&["Bearer abc.def.ghi"])),
            Ok("abc.def.ghi")
        );
        assert_eq!(bearer_token(&headers(&["bearer abc"])), Ok("abc"));
        assert_eq!(bearer_token(&headers(&["BEARER   abc  "])), Ok("abc"));
        assert_eq!(
            bearer_token(&HeaderMap::new()),
            Err(AuthError::MissingToken)
        );
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Bearer undefined",
            "Bearer null",
            "Basic dXNlcjpwYXNz",
            "Token abc",
            "Bearerabc",
            "Bearer a b",
        ] {
            assert_eq!(
                bearer_token(&headers(&[bad])),
                Err(AuthError::MalformedHeader),
                "{bad:?}"
            );
        }
        assert_eq!(
            bearer_token(&headers(&["Bearer a", "Bearer b"])),
            Err(AuthError::MalformedHeader)
        );
        let mut non_utf8 = HeaderMap::new();
        non_utf8.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff").expect("opaque header value"),
        );
        assert_eq!(bearer_token(&non_utf8), Err(AuthError::MalformedHeader));
    }

    #[test]
    fn status_codes() {
        assert_eq!(
            AuthError::JwksUnavailable("down".into()).status_code(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        for error in [
            AuthError::MissingToken,
            AuthError::MalformedHeader,
            AuthError::InvalidToken("expired".into()),
            AuthError::UnknownKey { kid: "k".into() },
        ] {
            assert_eq!(error.status_code(), StatusCode::UNAUTHORIZED, "{error}");
        }
    }
}
