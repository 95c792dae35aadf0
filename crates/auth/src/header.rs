//! Getting the token out of a request's `Authorization` header.
//!
//! This is the only part of the crate that looks at HTTP requests; it is strict about the
//! header's shape because a lenient parser here is where a proxy and this service could come to
//! disagree about which token a request carries.

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::AuthError;

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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
}
