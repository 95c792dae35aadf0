//! The options both services share, parsed by each binary with `#[command(flatten)]`, and the
//! one rule that decides whether callers' tokens are checked.
//!
//! The rule: tokens go unchecked only when the operator said `--environment local` *and* every
//! caller-facing listener is on a loopback address. Nothing else switches authentication off,
//! and a missing option never does: without `--environment` neither binary starts, and without
//! `--auth-issuer` a service outside that one case refuses to start and names the option.

use std::net::SocketAddr;
use std::time::Duration;

use url::Url;
use whist_auth::JwtConfig;
use whist_dbclient::HasuraConfig;
use whist_types::Environment;

/// The largest request body either service reads, the same for a `json_transport` sent to a
/// host directly and one proxied by the scaling-service (413 past it). A client's
/// configuration carries browser data; a few megabytes is generous.
pub const MAX_REQUEST_BODY_BYTES: usize = 8 * 1024 * 1024;

/// The audience the clients' tokens carry unless told otherwise.
pub const DEFAULT_AUDIENCE: &str = "https://api.fractal.co";

/// Environment, database and caller-authentication options, the same in both services.
#[derive(Debug, Clone, clap::Args)]
pub struct SharedArgs {
    /// Deployment environment: local, dev, staging or prod. Required: it names the fleet this
    /// service belongs to (tags, rows, the published client it follows), and only `local`
    /// allows running without token checks.
    #[arg(long, env = "APP_ENV")]
    pub environment: Environment,

    /// Hasura's GraphQL HTTP endpoint.
    #[arg(
        long,
        env = "HASURA_URL",
        default_value = "http://127.0.0.1:8080/v1/graphql"
    )]
    pub hasura_url: Url,

    /// Hasura's websocket endpoint for live queries; derived from `--hasura-url` when absent.
    #[arg(long, env = "HASURA_WEBSOCKET_URL")]
    pub hasura_websocket_url: Option<Url>,

    /// Hasura's admin secret.
    #[arg(long, env = "HASURA_ADMIN_SECRET", hide_env_values = true)]
    pub hasura_admin_secret: Option<String>,

    /// Issuer of the clients' JWTs (its JWKS is `<issuer>.well-known/jwks.json` unless
    /// `--auth-jwks-url` says otherwise). Required unless the environment is `local` and every
    /// caller-facing listener is on loopback.
    #[arg(long, env = "WHIST_AUTH_ISSUER")]
    pub auth_issuer: Option<Url>,

    /// Audience the clients' JWTs must carry.
    #[arg(long, env = "WHIST_AUTH_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub auth_audience: String,

    /// JWKS location when it is not under the issuer.
    #[arg(long, env = "WHIST_AUTH_JWKS_URL")]
    pub auth_jwks_url: Option<Url>,

    /// Seconds between periodic refetches of the JWKS; bounds how long a key the issuer has
    /// stopped publishing (revoked) is still trusted. At least 1.
    #[arg(
        long,
        env = "WHIST_AUTH_JWKS_REFRESH",
        default_value_t = DEFAULT_JWKS_REFRESH_SECS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub auth_jwks_refresh: u64,
}

/// Default of `--auth-jwks-refresh`: the auth crate's default refresh interval, in seconds.
pub const DEFAULT_JWKS_REFRESH_SECS: u64 = whist_auth::DEFAULT_REFRESH_INTERVAL.as_secs();

/// What each caller-facing listener allows (see `whist-serve`): both services take the same
/// options with the same defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Connections open at once on a listener; past it, new ones are closed at once (keep it
    /// under the process's file-descriptor limit).
    #[arg(long, env = "WHIST_MAX_CONNECTIONS", default_value_t = whist_serve::Limits::default().max_connections)]
    pub max_connections: usize,

    /// Connections open at once from one address.
    #[arg(long, env = "WHIST_MAX_CONNECTIONS_PER_PEER", default_value_t = whist_serve::Limits::default().max_connections_per_peer)]
    pub max_connections_per_peer: usize,

    /// Requests handled at once; past it the answer is 503 with `Retry-After`.
    #[arg(long, env = "WHIST_MAX_IN_FLIGHT", default_value_t = whist_serve::Limits::default().max_in_flight)]
    pub max_in_flight: usize,

    /// Seconds a client has to send a request's headers (and a TLS handshake).
    #[arg(long, env = "WHIST_HEADER_READ_TIMEOUT", default_value_t = whist_serve::Limits::default().header_read.as_secs())]
    pub header_read_timeout: u64,

    /// Seconds a client has to send a request's body.
    #[arg(long, env = "WHIST_BODY_READ_TIMEOUT", default_value_t = whist_serve::Limits::default().body_read.as_secs())]
    pub body_read_timeout: u64,

    /// Seconds one request may take in all.
    #[arg(long, env = "WHIST_REQUEST_TIMEOUT", default_value_t = whist_serve::Limits::default().request.as_secs())]
    pub request_timeout: u64,
}

/// Why the listener limits cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{0} must be positive")]
pub struct ZeroLimit(pub &'static str);

impl LimitArgs {
    pub fn limits(&self) -> Result<whist_serve::Limits, ZeroLimit> {
        for (name, value) in [
            ("max-connections", self.max_connections as u64),
            (
                "max-connections-per-peer",
                self.max_connections_per_peer as u64,
            ),
            ("max-in-flight", self.max_in_flight as u64),
            ("header-read-timeout", self.header_read_timeout),
            ("body-read-timeout", self.body_read_timeout),
            ("request-timeout", self.request_timeout),
        ] {
            if value == 0 {
                return Err(ZeroLimit(name));
            }
        }
        let seconds = std::time::Duration::from_secs;
        Ok(whist_serve::Limits {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            max_in_flight: self.max_in_flight,
            handshake: seconds(self.header_read_timeout),
            header_read: seconds(self.header_read_timeout),
            body_read: seconds(self.body_read_timeout),
            request: seconds(self.request_timeout),
        })
    }
}

/// How callers are identified.
#[derive(Debug, Clone)]
pub enum CallerAuth {
    /// Every caller presents a token signed by the issuer.
    Tokens(Box<JwtConfig>),
    /// Callers name themselves: local development on loopback only.
    Unchecked,
}

impl CallerAuth {
    pub fn jwt(&self) -> Option<&JwtConfig> {
        match self {
            Self::Tokens(config) => Some(config),
            Self::Unchecked => None,
        }
    }
}

/// Why the shared options cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthRuleError {
    #[error(
        "--auth-issuer is required with --environment {environment}: callers' tokens go unchecked only in the local environment"
    )]
    IssuerRequired { environment: Environment },
    #[error(
        "--auth-issuer is required: {option} is {addr}, not a loopback address, and callers' tokens go unchecked only on loopback"
    )]
    IssuerRequiredOffLoopback {
        option: &'static str,
        addr: SocketAddr,
    },
}

impl SharedArgs {
    /// The database connection these options describe.
    pub fn hasura(&self) -> HasuraConfig {
        let mut hasura =
            HasuraConfig::new(self.hasura_url.clone(), self.hasura_admin_secret.clone());
        hasura.websocket_url = self.hasura_websocket_url.clone();
        hasura
    }

    /// Applies the rule. `listeners` are the caller-facing addresses with the option that sets
    /// each (`("--listen", addr)`); operational endpoints (health, metrics) are not callers'.
    pub fn caller_auth(
        &self,
        listeners: &[(&'static str, SocketAddr)],
    ) -> Result<CallerAuth, AuthRuleError> {
        if let Some(issuer) = &self.auth_issuer {
            return Ok(CallerAuth::Tokens(Box::new(JwtConfig {
                jwks_url: self.auth_jwks_url.clone(),
                refresh_interval: Duration::from_secs(self.auth_jwks_refresh),
                ..JwtConfig::new(issuer.clone(), self.auth_audience.clone())
            })));
        }
        if self.environment != Environment::Local {
            return Err(AuthRuleError::IssuerRequired {
                environment: self.environment,
            });
        }
        if let Some(&(option, addr)) = listeners.iter().find(|(_, addr)| !addr.ip().is_loopback()) {
            return Err(AuthRuleError::IssuerRequiredOffLoopback { option, addr });
        }
        Ok(CallerAuth::Unchecked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        shared: SharedArgs,
    }

    fn shared(args: &[&str]) -> Result<SharedArgs, String> {
        Probe::try_parse_from(std::iter::once("probe").chain(args.iter().copied()))
            .map(|probe| probe.shared)
            .map_err(|error| error.to_string())
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    #[test]
    fn the_environment_has_no_default() {
        let error = shared(&[]).expect_err("no environment");
        assert!(error.contains("--environment"), "{error}");
    }

    /// Every combination of environment, issuer and listener address.
    #[test]
    fn tokens_go_unchecked_only_in_local_on_loopback() {
        let loopback = [("--listen", addr("127.0.0.1:7730"))];
        let loopback_range = [("--listen", addr("127.0.1.7:4678"))];
        let ipv6_loopback = [("--listen", addr("[::1]:7730"))];
        let open = [("--listen", addr("0.0.0.0:7730"))];
        let mixed = [
            ("--listen", addr("127.0.0.1:4678")),
            ("--other", addr("10.1.2.3:4678")),
        ];
        for environment in ["local", "dev", "staging", "prod"] {
            for listeners in [
                &loopback[..],
                &loopback_range[..],
                &ipv6_loopback[..],
                &open[..],
                &mixed[..],
            ] {
                let all_loopback = listeners.iter().all(|(_, a)| a.ip().is_loopback());
                let without = shared(&["--environment", environment])
                    .expect("parses")
                    .caller_auth(listeners);
                let with = shared(&[
                    "--environment",
                    environment,
                    "--auth-issuer",
                    "https://auth.example.com/",
                ])
                .expect("parses")
                .caller_auth(listeners);
                assert!(
                    matches!(with, Ok(CallerAuth::Tokens(_))),
                    "{environment} {listeners:?}: an issuer always means tokens"
                );
                match without {
                    Ok(CallerAuth::Unchecked) => assert!(
                        environment == "local" && all_loopback,
                        "{environment} {listeners:?} must not run unchecked"
                    ),
                    Ok(CallerAuth::Tokens(_)) => panic!("tokens without an issuer"),
                    Err(error) => {
                        assert!(environment != "local" || !all_loopback);
                        assert!(error.to_string().contains("--auth-issuer"), "{error}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_refusal_names_the_listener() {
        let error = shared(&["--environment", "local"])
            .expect("parses")
            .caller_auth(&[("--listen", addr("0.0.0.0:7730"))])
            .expect_err("open listener");
        assert!(
            error.to_string().contains("--listen is 0.0.0.0:7730"),
            "{error}"
        );
    }

    #[test]
    fn the_jwks_location_is_carried() {
        let auth = shared(&[
            "--environment",
            "prod",
            "--auth-issuer",
            "https://auth.example.com/",
            "--auth-jwks-url",
            "https://keys.example.com/jwks.json",
        ])
        .expect("parses")
        .caller_auth(&[])
        .expect("tokens");
        let jwt = auth.jwt().expect("tokens");
        assert_eq!(
            jwt.jwks_url.as_ref().map(Url::as_str),
            Some("https://keys.example.com/jwks.json")
        );
        assert_eq!(jwt.audience, DEFAULT_AUDIENCE);
        assert_eq!(jwt.refresh_interval, whist_auth::DEFAULT_REFRESH_INTERVAL);
    }

    fn refresh_of(args: &[&str]) -> Result<Duration, String> {
        let base = [
            "--environment",
            "prod",
            "--auth-issuer",
            "https://auth.example.com/",
        ];
        let args: Vec<&str> = base.iter().chain(args).copied().collect();
        let auth = shared(&args)?.caller_auth(&[]).map_err(|e| e.to_string())?;
        Ok(auth.jwt().expect("tokens").refresh_interval)
    }

    #[test]
    fn the_jwks_refresh_period_is_carried_and_never_zero() {
        assert_eq!(
            DEFAULT_JWKS_REFRESH_SECS,
            whist_auth::DEFAULT_REFRESH_INTERVAL.as_secs()
        );
        assert_eq!(refresh_of(&[]), Ok(whist_auth::DEFAULT_REFRESH_INTERVAL));
        assert_eq!(
            refresh_of(&["--auth-jwks-refresh", "1"]),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(
            refresh_of(&["--auth-jwks-refresh", "300"]),
            Ok(Duration::from_secs(300))
        );
        for bad in ["0", "-1", "1.5", "soon", ""] {
            let arg = format!("--auth-jwks-refresh={bad}");
            let error = refresh_of(&[&arg]).expect_err(bad);
            assert!(error.contains("--auth-jwks-refresh"), "{bad}: {error}");
        }
    }
}
