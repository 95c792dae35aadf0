//! Process configuration (clap; every option is also an environment variable). The fleet's own
//! configuration (regions, targets, limits, cooldowns) lives in the database and applies live.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use url::Url;
use whist_auth::JwtConfig;
use whist_types::Environment;

/// The fleet controller and assign API.
#[derive(Debug, Clone, Parser)]
#[command(name = "scaling-service", version, about, args_override_self = true)]
pub struct Args {
    /// Deployment environment: local, dev, staging or prod. Picks the published client commit an
    /// image upgrade waits for, and tags launched hosts.
    #[arg(long, env = "APP_ENV", default_value = "local")]
    pub environment: Environment,

    /// Address of the HTTP API (Heroku sets `PORT`; see `--port`).
    #[arg(long, env = "WHIST_LISTEN", default_value = "0.0.0.0:7730")]
    pub listen: SocketAddr,

    /// Overrides the port of `--listen` (Heroku's router tells the process its port this way).
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,

    /// Hasura's GraphQL HTTP endpoint.
    #[arg(
        long,
        env = "HASURA_URL",
        default_value = "http://127.0.0.1:8080/v1/graphql"
    )]
    pub hasura_url: Url,

    /// Hasura's websocket endpoint; derived from `--hasura-url` when absent.
    #[arg(long, env = "HASURA_WEBSOCKET_URL")]
    pub hasura_websocket_url: Option<Url>,

    /// Hasura's admin secret.
    #[arg(long, env = "HASURA_ADMIN_SECRET", hide_env_values = true)]
    pub hasura_admin_secret: Option<String>,

    /// Issuer of the clients' JWTs. Required outside local mode; without it callers name
    /// themselves with `user_id` in the body.
    #[arg(long, env = "WHIST_AUTH_ISSUER")]
    pub auth_issuer: Option<Url>,

    /// Audience the clients' JWTs must carry.
    #[arg(
        long,
        env = "WHIST_AUTH_AUDIENCE",
        default_value = "https://api.fractal.co"
    )]
    pub auth_audience: String,

    /// Assign requests one user may make per second (sustained).
    #[arg(long, env = "WHIST_ASSIGN_RATE", default_value_t = 1.0)]
    pub assign_rate_per_user: f64,

    /// Assign requests one user may make at once.
    #[arg(long, env = "WHIST_ASSIGN_BURST", default_value_t = 10)]
    pub assign_burst_per_user: u32,

    /// Seconds the `json_transport` proxy waits for the host (the host itself waits up to 20 s
    /// for the box to be ready).
    #[arg(long, env = "WHIST_PROXY_TIMEOUT", default_value_t = 30)]
    pub proxy_timeout: u64,

    /// Serve the API only; never take part in scaling (for extra API replicas).
    #[arg(long, env = "WHIST_API_ONLY", default_value_t = false)]
    pub api_only: bool,

    /// Scale only these regions (comma-separated); all regions when empty. Lets separate
    /// controllers own separate sets of regions.
    #[arg(long, env = "WHIST_MANAGED_REGIONS", value_delimiter = ',')]
    pub managed_regions: Vec<String>,

    /// The lease row replicas compete for (`config.leases.name`); controllers of different
    /// region sets use different leases.
    #[arg(long, env = "WHIST_LEASE_NAME", default_value = "scaling")]
    pub lease_name: String,

    /// This replica's name in the leader lease; defaults to the host name plus a random suffix.
    #[arg(long, env = "WHIST_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Seconds a leader lease lasts; it is renewed every third of that.
    #[arg(long, env = "WHIST_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,

    /// Seconds between full reconciliations of the cloud with the database.
    #[arg(long, env = "WHIST_RESYNC_INTERVAL", default_value_t = 60)]
    pub resync_interval: u64,

    /// Seconds a launched host may be missing from the cloud's listings or from the database
    /// before reconciliation records or removes it.
    #[arg(long, env = "WHIST_RECONCILE_GRACE", default_value_t = 120)]
    pub reconcile_grace: u64,

    /// EC2 API endpoint override (e.g. a local emulator); the SDK's default otherwise.
    #[arg(long, env = "WHIST_EC2_ENDPOINT")]
    pub ec2_endpoint: Option<String>,

    /// Subnet hosts are launched into.
    #[arg(long, env = "WHIST_EC2_SUBNET")]
    pub ec2_subnet: Option<String>,

    /// Security groups of launched hosts (comma-separated).
    #[arg(long, env = "WHIST_EC2_SECURITY_GROUPS", value_delimiter = ',')]
    pub ec2_security_groups: Vec<String>,

    /// Instance profile (ARN) of launched hosts.
    #[arg(long, env = "WHIST_EC2_INSTANCE_PROFILE")]
    pub ec2_instance_profile: Option<String>,

    /// File with the boot script of launched hosts; a built-in script that starts host-service
    /// otherwise.
    #[arg(long, env = "WHIST_USER_DATA_FILE")]
    pub user_data_file: Option<std::path::PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub environment: Environment,
    pub listen: SocketAddr,
    pub hasura: whist_dbclient::HasuraConfig,
    pub auth: Option<JwtConfig>,
    pub assign_rate_per_user: f64,
    pub assign_burst_per_user: u32,
    pub proxy_timeout: Duration,
    pub api_only: bool,
    pub managed_regions: Vec<String>,
    pub lease_name: String,
    pub replica_id: String,
    pub lease: Duration,
    pub resync_interval: Duration,
    pub reconcile_grace: Duration,
    pub ec2_endpoint: Option<String>,
    pub ec2_subnet: Option<String>,
    pub ec2_security_groups: Vec<String>,
    pub ec2_instance_profile: Option<String>,
    pub user_data: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--auth-issuer is required outside local mode")]
    MissingAuthIssuer,
    #[error("--{0} must be positive")]
    NotPositive(&'static str),
    #[error("read --user-data-file {path}: {source}")]
    UserData {
        path: String,
        source: std::io::Error,
    },
}

/// The boot script of a host when none is configured: start the host-service with the
/// environment this fleet runs in. The image carries the binary and its unit file.
const DEFAULT_USER_DATA: &str =
    "#!/bin/bash\nset -euo pipefail\nsystemctl enable --now host-service.service\n";

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        for (name, value) in [
            ("lease-seconds", self.lease_seconds),
            ("resync-interval", self.resync_interval),
            ("proxy-timeout", self.proxy_timeout),
        ] {
            if value == 0 {
                return Err(ConfigError::NotPositive(name));
            }
        }
        if self.assign_rate_per_user <= 0.0 || self.assign_burst_per_user == 0 {
            return Err(ConfigError::NotPositive("assign-rate/assign-burst"));
        }
        let auth = match self.auth_issuer {
            Some(issuer) => Some(JwtConfig::new(issuer, self.auth_audience)),
            None if self.environment == Environment::Local => None,
            None => return Err(ConfigError::MissingAuthIssuer),
        };
        let user_data = match &self.user_data_file {
            Some(path) => {
                std::fs::read_to_string(path).map_err(|source| ConfigError::UserData {
                    path: path.display().to_string(),
                    source,
                })?
            }
            None => DEFAULT_USER_DATA.to_owned(),
        };
        let mut listen = self.listen;
        if let Some(port) = self.port {
            listen.set_port(port);
        }
        let mut hasura =
            whist_dbclient::HasuraConfig::new(self.hasura_url, self.hasura_admin_secret);
        hasura.websocket_url = self.hasura_websocket_url;
        let replica_id = self.replica_id.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!(
                "{}-{}",
                host.trim(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
        Ok(Config {
            environment: self.environment,
            listen,
            hasura,
            auth,
            assign_rate_per_user: self.assign_rate_per_user,
            assign_burst_per_user: self.assign_burst_per_user,
            proxy_timeout: Duration::from_secs(self.proxy_timeout),
            api_only: self.api_only,
            managed_regions: self.managed_regions,
            lease_name: self.lease_name,
            replica_id,
            lease: Duration::from_secs(self.lease_seconds),
            resync_interval: Duration::from_secs(self.resync_interval),
            reconcile_grace: Duration::from_secs(self.reconcile_grace),
            ec2_endpoint: self.ec2_endpoint,
            ec2_subnet: self.ec2_subnet,
            ec2_security_groups: self.ec2_security_groups,
            ec2_instance_profile: self.ec2_instance_profile,
            user_data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Args::try_parse_from(std::iter::once("scaling-service").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn heroku_port_overrides_the_listen_port() {
        let config = parse(&["--port", "5000"]).expect("valid");
        assert_eq!(config.listen.port(), 5000);
    }

    #[test]
    fn outside_local_an_issuer_is_required() {
        let error = parse(&["--environment", "prod"]).expect_err("no issuer");
        assert!(error.contains("--auth-issuer"));
        assert!(
            parse(&[
                "--environment",
                "prod",
                "--auth-issuer",
                "https://a.example/"
            ])
            .is_ok()
        );
    }

    #[test]
    fn zero_intervals_are_refused() {
        assert!(parse(&["--lease-seconds", "0"]).is_err());
        assert!(parse(&["--assign-burst-per-user", "0"]).is_err());
    }

    /// docs/operations.md is the operator's reference: every option and its variable are there.
    #[test]
    fn the_operations_guide_documents_every_option() {
        whist_test_support::docs::assert_options_documented(
            &<Args as clap::CommandFactory>::command(),
            include_str!("../../../docs/operations.md"),
            true,
        );
    }
}
