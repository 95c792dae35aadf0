//! Fetching the issuer's JWKS document and turning it into decoding keys.
//!
//! This module only knows how to make one request and read one document; when to fetch, how to
//! share a fetch and what to keep when a fetch fails is the verifier's business. Keeping the two
//! apart lets the parsing be tested on plain bytes, with no issuer running.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use serde_json::Value;
use tracing::{debug, warn};

/// Whole-request limit for one JWKS fetch (connect, headers and body). Verifies that need the
/// fetch wait for it, so it must be short.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A JWKS is a few kilobytes; anything far bigger is not one.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Decoding keys by `kid`, as the verifier looks them up. `Arc`s so a verify can hold on to its
/// key while a refresh replaces the map.
pub(crate) type KeysByKid = HashMap<String, Arc<DecodingKey>>;

/// GETs the JWKS at `url` with `http` and returns its RS256 signing keys. The error is a
/// sentence naming the URL, ready for [`crate::AuthError::JwksUnavailable`].
pub(crate) async fn fetch_jwks(
    http: &reqwest::Client,
    url: &url::Url,
) -> Result<KeysByKid, String> {
    let mut response = http
        .get(url.clone())
        .timeout(JWKS_FETCH_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("GET {url}: HTTP {status}"));
    }
    // Read chunk by chunk so an oversized body is refused before it is all in memory.
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
fn parse_jwks(body: &[u8]) -> Result<KeysByKid, String> {
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
    use serde_json::json;

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
}
