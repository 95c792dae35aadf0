//! [`JwtVerifier`]: the in-memory key cache, the rules for refetching it, and `verify`, which
//! ties the header, key and claim checks together.
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
//!
//! This is the crate's only stateful, concurrent code, kept in one file so the locking can be
//! read as a whole; what a JWKS document or a token contains is left to the `jwks` and `token`
//! modules.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::jwks::{KeysByKid, fetch_jwks};
use crate::token::{checked_kid, claims_from, describe};
use crate::{AuthError, Claims, JwtConfig};

/// Tokens are a few hundred bytes to a few kilobytes; refuse to parse anything absurd.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The one signature algorithm accepted. Pinning it (rather than trusting the header's `alg`)
/// is what defeats `alg: none` and RS256→HS256 confusion.
const ALGORITHM: Algorithm = Algorithm::RS256;

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
    keys: RwLock<Arc<KeysByKid>>,
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
                keys: RwLock::new(Arc::new(KeysByKid::new())),
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
        claims_from(data.claims, &self.inner.config.issuer)
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

    fn keys(&self) -> Arc<KeysByKid> {
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
        let outcome = self.fetch_keys().await;
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

    /// One fetch of the configured JWKS. A JWKS URL that could not be made from the issuer is
    /// reported here, on use, so that making a verifier cannot fail.
    async fn fetch_keys(&self) -> Result<KeysByKid, String> {
        let url = self.inner.jwks_url.as_ref().map_err(Clone::clone)?;
        fetch_jwks(&self.inner.http, url).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use chrono::Utc;
    use http::StatusCode;
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
}
