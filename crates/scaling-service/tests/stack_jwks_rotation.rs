//! The scaling-service keeps its signing keys fresh: after the issuer rotates its key and stops
//! publishing the old one, tokens signed by the old key are refused within a few refresh periods
//! (without anything else making the verifier refetch), and tokens with made-up `kid`s do not
//! make it fetch the JWKS more often than its minimum interval. Black-box, through the real
//! service in process; the issuer is on loopback.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Scaler, assign_body, unique};
use serde_json::{Value, json};
use whist_test_support::jwt::{TestIssuer, TestKey};

/// The auth crate's default shortest time between two token-triggered JWKS fetches.
const MIN_REFRESH_INTERVAL: Duration = whist_auth::DEFAULT_MIN_REFRESH_INTERVAL;

/// A good token for a fresh user, signed by `key` under `key`'s `kid`.
fn token_signed_by(issuer: &TestIssuer, key: TestKey) -> String {
    token_with_kid(issuer, key, key.kid())
}

/// A good token for a fresh user, signed by `key` under `kid` (which may be made up).
fn token_with_kid(issuer: &TestIssuer, key: TestKey, kid: &str) -> String {
    let header = json!({ "alg": "RS256", "typ": "JWT", "kid": kid });
    issuer.sign(&header, &issuer.claims(&unique("auth0|rotation")), key)
}

/// `POST /mandelbox/assign` with `token`; the status and body. The region does not exist, so a
/// token that passes gets an assign refusal, never a session.
async fn assign_with(scaler: &Scaler, token: &str) -> (u16, Value) {
    let response = scaler
        .http
        .post(scaler.url("/mandelbox/assign"))
        .bearer_auth(token)
        .json(&assign_body(&[&unique("no-such-region")], "no-such-commit"))
        .send()
        .await
        .expect("answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Whether the answer is past authentication: anything but 401, and not the 503 that says the
/// keys could not be fetched (which would not tell a good token from a bad one).
fn accepted(status: u16, body: &Value) -> bool {
    let keys_unavailable = body["error"]
        .as_str()
        .is_some_and(|error| error.starts_with("signing keys unavailable"));
    status != 401 && !keys_unavailable
}

async fn scaler(issuer: &Arc<TestIssuer>, extra: &[&str]) -> Scaler {
    let mut args = vec!["--api-only"];
    args.extend_from_slice(extra);
    Scaler::start(issuer.clone(), &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_key_is_refused_after_the_periodic_refresh() {
    let issuer = Arc::new(TestIssuer::start().await.expect("issuer"));
    let scaler = scaler(&issuer, &["--auth-jwks-refresh", "1"]).await;

    let (status, body) = assign_with(&scaler, &token_signed_by(&issuer, TestKey::First)).await;
    assert!(
        accepted(status, &body),
        "key 1 before rotation: {status} {body}"
    );

    // Key 2 signs from now on and key 1 is no longer published (revoked).
    issuer.rotate_key();
    issuer.retire_previous_key();
    assert_eq!(issuer.current_key(), TestKey::Second);
    let rotated_at = Instant::now();
    let fetches_at_rotation = issuer.jwks_requests();

    // Only key-1 tokens until they are refused: their `kid` is loaded, so nothing but the
    // periodic refresh can make the verifier drop it (a key-2 token would trigger a fetch of
    // its own).
    let mut last = (0, Value::Null);
    while rotated_at.elapsed() < Duration::from_secs(8) {
        last = assign_with(&scaler, &token_signed_by(&issuer, TestKey::First)).await;
        if last.0 == 401 {
            break;
        }
        assert!(
            accepted(last.0, &last.1),
            "key 1 is either still trusted or refused: {} {}",
            last.0,
            last.1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last.0,
        401,
        "a token signed by the retired key is still accepted {:?} after the rotation: {}",
        rotated_at.elapsed(),
        last.1
    );
    assert!(
        issuer.jwks_requests() > fetches_at_rotation,
        "the JWKS was refetched"
    );

    // The new key is trusted, and the old one stays refused.
    let (status, body) = assign_with(&scaler, &token_signed_by(&issuer, TestKey::Second)).await;
    assert!(
        accepted(status, &body),
        "key 2 after rotation: {status} {body}"
    );
    let (status, body) = assign_with(&scaler, &issuer.token(&unique("auth0|current"))).await;
    assert!(
        accepted(status, &body),
        "the issuer's current token: {status} {body}"
    );
    let (status, body) = assign_with(&scaler, &token_signed_by(&issuer, TestKey::First)).await;
    assert_eq!(status, 401, "key 1 after rotation: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_fetches_at_most_once_per_minimum_interval() {
    let issuer = Arc::new(TestIssuer::start().await.expect("issuer"));
    // The default (hourly) period: every fetch during the flood is one the tokens caused.
    let scaler = scaler(&issuer, &[]).await;

    // The periodic refresh fetches once at start.
    common::eventually("the JWKS fetch at start", Duration::from_secs(10), || {
        let issuer = issuer.clone();
        async move { (issuer.jwks_requests() >= 1).then_some(()) }
    })
    .await;
    let (status, body) = assign_with(&scaler, &token_signed_by(&issuer, TestKey::First)).await;
    assert!(accepted(status, &body), "a good token: {status} {body}");

    let before = issuer.jwks_requests();
    let flood_started = Instant::now();
    for round in 0..5 {
        let requests: Vec<_> = (0..20)
            .map(|n| {
                let scaler_http = scaler.http.clone();
                let url = scaler.url("/mandelbox/assign");
                let token =
                    token_with_kid(&issuer, TestKey::First, &format!("made-up-kid-{round}-{n}"));
                tokio::spawn(async move {
                    scaler_http
                        .post(url)
                        .bearer_auth(token)
                        .json(&assign_body(&["no-such-region"], "no-such-commit"))
                        .send()
                        .await
                        .expect("answers")
                        .status()
                        .as_u16()
                })
            })
            .collect();
        for request in requests {
            assert_eq!(request.await.expect("join"), 401, "an unknown kid");
        }
    }
    let elapsed = flood_started.elapsed();
    let fetched = issuer.jwks_requests() - before;
    // At most one fetch per started minimum interval (the first may come at once if the start
    // fetch was that long ago).
    let allowed = 1 + (elapsed.as_secs_f64() / MIN_REFRESH_INTERVAL.as_secs_f64()).floor() as usize;
    assert!(
        fetched <= allowed,
        "{fetched} JWKS fetches for 100 unknown kids in {elapsed:?} (at most {allowed})"
    );

    // Good tokens still pass after the flood.
    let (status, body) = assign_with(&scaler, &token_signed_by(&issuer, TestKey::First)).await;
    assert!(
        accepted(status, &body),
        "a good token after the flood: {status} {body}"
    );
}
