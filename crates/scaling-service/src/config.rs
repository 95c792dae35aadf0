//! Process configuration (clap; every option is also an environment variable). The fleet's own
//! configuration (regions, targets, limits, cooldowns) lives in the database and applies live.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use whist_auth::JwtConfig;
use whist_service_config::{AuthRuleError, LimitArgs, SharedArgs, ZeroLimit};
use whist_types::Environment;

/// The fleet controller and assign API.
#[derive(Debug, Clone, Parser)]
#[command(name = "scaling-service", version, about, args_override_self = true)]
pub struct Args {
    /// Environment, database and caller authentication (shared with the host-service).
    #[command(flatten)]
    pub shared: SharedArgs,

    /// Address of the HTTP API (Heroku sets `PORT`; see `--port`).
    #[arg(long, env = "WHIST_LISTEN", default_value = "0.0.0.0:7730")]
    pub listen: SocketAddr,

    /// Overrides the port of `--listen` (Heroku's router tells the process its port this way).
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,

    /// What the API's listener allows (connections, timeouts, requests in flight).
    #[command(flatten)]
    pub limits: LimitArgs,

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

    /// Seconds a host's machine must have been reported gone (terminated, or unknown to the
    /// cloud when asked by id), counted from when it was first seen so, before its row is
    /// deleted; also how long a launched machine may lack a row before it is recorded.
    #[arg(long, env = "WHIST_RECONCILE_GRACE", default_value_t = 120)]
    pub reconcile_grace: u64,

    /// The most hosts one pass may terminate or whose rows it may delete, as a share of the
    /// region's hosts (at least one host a pass).
    #[arg(long, env = "WHIST_MAX_DESTROY_SHARE", default_value_t = 0.1)]
    pub max_destroy_share: f64,

    /// The share of a region's rows that may be missing from the cloud's listing before
    /// reconciliation distrusts the listing and pauses everything destructive in that region
    /// (an empty listing while rows exist always pauses).
    #[arg(long, env = "WHIST_LISTING_LOSS_THRESHOLD", default_value_t = 0.5)]
    pub listing_loss_threshold: f64,

    /// The share of a region's hosts that may stop sending heartbeats at once and still be
    /// reaped; more pauses reaping in that region (the hosts' network or the database, not that
    /// many deaths). Two silent hosts are never "at once" below this share.
    #[arg(long, env = "WHIST_HEARTBEAT_LOSS_THRESHOLD", default_value_t = 0.5)]
    pub heartbeat_loss_threshold: f64,

    /// Seconds one cloud action (a launch, a termination, a listing) may take with all its
    /// retries; it is abandoned after that.
    #[arg(long, env = "WHIST_CLOUD_ACTION_DEADLINE", default_value_t = 60)]
    pub cloud_action_deadline: u64,

    /// Attempts one cloud call gets (the first included) while it is throttled or fails in
    /// transport, within `--cloud-action-deadline`.
    #[arg(long, env = "WHIST_CLOUD_CALL_ATTEMPTS", default_value_t = 4)]
    pub cloud_call_attempts: u32,

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
    pub limits: whist_serve::Limits,
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
    pub max_destroy_share: f64,
    pub listing_loss_threshold: f64,
    pub heartbeat_loss_threshold: f64,
    pub cloud: CloudBudget,
    pub ec2_endpoint: Option<String>,
    pub ec2_subnet: Option<String>,
    pub ec2_security_groups: Vec<String>,
    pub ec2_instance_profile: Option<String>,
    pub user_data: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Auth(#[from] AuthRuleError),
    #[error(transparent)]
    Limit(#[from] ZeroLimit),
    #[error("--{0} must be positive")]
    NotPositive(&'static str),
    #[error("--{0} must be a share between 0 and 1")]
    NotAShare(&'static str),
    #[error("read --user-data-file {path}: {source}")]
    UserData {
        path: String,
        source: std::io::Error,
    },
}

/// How long cloud work may take: one budget for every call, applied at one layer (the host
/// handler's retries) under one deadline per action (the executor's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloudBudget {
    pub action_deadline: Duration,
    pub call_attempts: u32,
}

impl Default for CloudBudget {
    fn default() -> Self {
        Self {
            action_deadline: Duration::from_secs(60),
            call_attempts: 4,
        }
    }
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
        if self.cloud_action_deadline == 0 || self.cloud_call_attempts == 0 {
            return Err(ConfigError::NotPositive(
                "cloud-action-deadline/cloud-call-attempts",
            ));
        }
        for (name, share) in [
            ("max-destroy-share", self.max_destroy_share),
            ("listing-loss-threshold", self.listing_loss_threshold),
            ("heartbeat-loss-threshold", self.heartbeat_loss_threshold),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(ConfigError::NotAShare(name));
            }
        }
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
        let auth = self
            .shared
            .caller_auth(&[("--listen", listen)])?
            .jwt()
            .cloned();
        let replica_id = self.replica_id.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!(
                "{}-{}",
                host.trim(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
        Ok(Config {
            environment: self.shared.environment,
            listen,
            limits: self.limits.limits()?,
            hasura: self.shared.hasura(),
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
            max_destroy_share: self.max_destroy_share,
            listing_loss_threshold: self.listing_loss_threshold,
            heartbeat_loss_threshold: self.heartbeat_loss_threshold,
            cloud: CloudBudget {
                action_deadline: Duration::from_secs(self.cloud_action_deadline),
                call_attempts: self.cloud_call_attempts,
            },
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

    const LOCAL: [&str; 4] = ["--environment", "local", "--listen", "127.0.0.1:7730"];

    fn local(extra: &[&str]) -> Result<Config, String> {
        parse(&[&LOCAL[..], extra].concat())
    }

    #[test]
    fn heroku_port_overrides_the_listen_port() {
        let config = local(&["--port", "5000"]).expect("valid");
        assert_eq!(config.listen.port(), 5000);
    }

    #[test]
    fn the_environment_must_be_named() {
        let error = parse(&[]).expect_err("no environment");
        assert!(error.contains("--environment"), "{error}");
    }

    #[test]
    fn local_without_an_issuer_listens_only_on_loopback() {
        let error = parse(&["--environment", "local"]).expect_err("0.0.0.0 by default");
        assert!(
            error.contains("--auth-issuer") && error.contains("--listen"),
            "{error}"
        );
        assert!(local(&[]).expect("loopback").auth.is_none());
        // Heroku's PORT moves the port, never the address.
        let error = parse(&["--environment", "local", "--port", "5000"]).expect_err("open");
        assert!(error.contains("0.0.0.0:5000"), "{error}");
    }

    #[test]
    fn outside_local_an_issuer_is_required() {
        let error = parse(&["--environment", "prod"]).expect_err("no issuer");
        assert!(error.contains("--auth-issuer"));
        let config = parse(&[
            "--environment",
            "prod",
            "--auth-issuer",
            "https://a.example/",
        ])
        .expect("valid");
        assert!(config.auth.is_some());
    }

    #[test]
    fn zero_intervals_and_bad_shares_are_refused() {
        assert!(local(&["--lease-seconds", "0"]).is_err());
        assert!(local(&["--assign-burst-per-user", "0"]).is_err());
        assert!(local(&["--cloud-call-attempts", "0"]).is_err());
        assert!(local(&["--max-destroy-share", "1.5"]).is_err());
        assert!(local(&["--listing-loss-threshold", "-0.1"]).is_err());
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
