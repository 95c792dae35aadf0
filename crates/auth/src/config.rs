//! What a verifier is told: the issuer, the audience, where the keys live and how often to
//! refetch them.
//!
//! This is plain data with its defaults, kept apart from the verifier so the services can build
//! and test their configuration without touching keys or the network.

use std::time::Duration;

/// How often [`JwtVerifier::spawn_periodic_refresh`] refetches the JWKS by default. Auth0
/// announces rotations well ahead and unknown `kid`s trigger a fetch anyway, so an hour only
/// bounds how long a revoked key stays trusted.
///
/// [`JwtVerifier::spawn_periodic_refresh`]: crate::JwtVerifier::spawn_periodic_refresh
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// Default clock-skew allowance for `exp` and `nbf`. Hosts and Auth0 both run NTP, so real skew
/// is well under a second; 30 s absorbs a host whose clock is briefly off (e.g. just after boot)
/// while keeping an expired token usable for at most half a minute.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Default shortest time between two JWKS fetches triggered by tokens.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

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
    ///
    /// [`JwtVerifier::spawn_periodic_refresh`]: crate::JwtVerifier::spawn_periodic_refresh
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
