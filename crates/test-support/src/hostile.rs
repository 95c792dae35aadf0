//! What hostile-input suites send: authorizations that must all be refused, and strings that
//! have broken parsers, queries and paths elsewhere. One list for both services, so neither
//! suite forgets a case the other has.

use serde_json::json;

use crate::jwt::TestIssuer;

/// Strings for every field a caller controls.
pub const STRINGS: &[&str] = &[
    "'; DROP TABLE whist.instances; --",
    "\" OR 1=1 --",
    "$id",
    "} } mutation { delete_whist_instances(where: {}) { affected_rows } } {",
    "[{\"_or\": [{\"id\": {\"_neq\": \"\"}}]}]",
    "../../../../etc/passwd",
    "<script>alert(1)</script>",
    "%00%0d%0aSet-Cookie: x=y",
    "${jndi:ldap://127.0.0.1/a}",
    "\u{202e}evil\u{0}nul\u{7f}",
    "ﷺ🧨",
];

/// `Authorization` header values (or none) that must each get 401 for a request `subject`
/// would be allowed to make: missing, malformed, forged, expired or meant for someone else.
pub fn refused_authorizations(
    issuer: &TestIssuer,
    subject: &str,
) -> Vec<(&'static str, Option<String>)> {
    let claims = || issuer.claims(subject);
    let edited = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut claims = claims();
        edit(&mut claims);
        format!("Bearer {}", issuer.token_with(&claims, None))
    };
    let key = issuer.current_key();
    let not_published = issuer.sign(
        &json!({ "alg": "RS256", "typ": "JWT", "kid": key.kid() }),
        &claims(),
        key.other(),
    );
    let valid = issuer.token(subject);
    vec![
        ("no header", None),
        ("an empty bearer", Some("Bearer ".to_owned())),
        (
            "the original client's `undefined`",
            Some("Bearer undefined".to_owned()),
        ),
        ("another scheme", Some(format!("Basic {valid}"))),
        ("three dots", Some("Bearer a.b.c".to_owned())),
        (
            "a truncated signature",
            Some(format!("Bearer {}", &valid[..valid.len() - 10])),
        ),
        (
            "alg none",
            Some(format!("Bearer {}", issuer.unsigned_token(&claims()))),
        ),
        (
            "HS256 keyed with the public key",
            Some(format!("Bearer {}", issuer.hs256_token(&claims()))),
        ),
        (
            "a key the issuer does not publish",
            Some(format!("Bearer {not_published}")),
        ),
        (
            "an unknown kid",
            Some(format!(
                "Bearer {}",
                issuer.token_with(&claims(), Some("nobody's-key"))
            )),
        ),
        (
            "expired",
            Some(edited(&|c| c["exp"] = json!(1_000_000_000))),
        ),
        (
            "another audience",
            Some(edited(&|c| c["aud"] = json!("someone-else"))),
        ),
        (
            "another issuer",
            Some(edited(&|c| {
                c["iss"] = json!("https://issuer.example.test/")
            })),
        ),
        (
            "no subject",
            Some(edited(&|c| {
                c.as_object_mut().map(|claims| claims.remove("sub"));
            })),
        ),
        (
            "8 kB of token",
            Some(format!("Bearer {}", "A".repeat(8000))),
        ),
    ]
}

/// Panics if an error body tells more than what the caller did wrong: addresses, the database,
/// a panic or a source path.
pub fn assert_no_internals(body: &serde_json::Value) {
    let text = body.to_string();
    for inside in [
        "http://",
        "https://",
        "hasura",
        "postgres",
        "panicked",
        "/src/",
        "tcp connect",
    ] {
        assert!(!text.to_ascii_lowercase().contains(inside), "{text}");
    }
}
