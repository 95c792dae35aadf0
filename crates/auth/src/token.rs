//! Reading a token's contents: the header before the signature is checked, and the claims
//! after.
//!
//! `jsonwebtoken` does the cryptography and the standard claim checks. What it leaves to us
//! lives here: insisting on RS256 and a `kid` with precise messages before any key is looked
//! up, the checks it does more loosely than we want (`iss`, `sub`, `scope`), and turning its
//! errors and the raw claims into [`AuthError`] and [`Claims`].

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use jsonwebtoken::errors::ErrorKind;
use serde::Deserialize;
use serde_json::Value;

use crate::AuthError;

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

/// The two header fields we look at, as raw JSON so a wrong type gets our message rather than
/// serde's.
#[derive(Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    kid: Option<Value>,
}

/// Reads the header far enough to insist on RS256 and a `kid`, with messages that say which.
pub(crate) fn checked_kid(token: &str) -> Result<String, AuthError> {
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

/// What failed, in words, for [`AuthError::InvalidToken`].
pub(crate) fn describe(error: &jsonwebtoken::errors::Error) -> String {
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

/// The checks `jsonwebtoken` does not do on the claims of a token whose signature it accepted,
/// and the conversion to [`Claims`]. `issuer` is the configured one.
pub(crate) fn claims_from(claims: Value, issuer: &url::Url) -> Result<Claims, AuthError> {
    let invalid = |message: &str| AuthError::InvalidToken(message.to_owned());
    // jsonwebtoken also accepts an `iss` array containing the issuer; a real issuer never
    // sends one, so insist on the exact string.
    match claims.get("iss") {
        Some(Value::String(iss)) if iss == issuer.as_str() => {}
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
