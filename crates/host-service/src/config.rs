//! Command-line and environment configuration, parsed once into a validated [`Config`].
//!
//! Every option is also an environment variable, so the systemd unit on a host can keep using an
//! `EnvironmentFile`. Durations are whole seconds on the command line.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use url::Url;
use whist_auth::JwtConfig;
use whist_service_config::{AuthRuleError, LimitArgs, SharedArgs, ZeroLimit};
use whist_types::Environment;

/// The commit this binary was built from; registration requires the instance row's `client_sha`
/// to be a prefix of it. Local builds call themselves `local_dev`, which the seed data matches.
pub const BUILD_COMMIT: &str = match option_env!("WHIST_GIT_COMMIT") {
    Some(commit) => commit,
    None => "local_dev",
};

/// The per-host agent of the session fleet.
#[derive(Debug, Clone, Parser)]
#[command(name = "host-service", version, about, args_override_self = true)]
pub struct Args {
    /// Environment (passed into every mandelbox as `SENTRY_ENV`; it also decides the power-off
    /// default), database and caller authentication, shared with the scaling-service.
    #[command(flatten)]
    pub shared: SharedArgs,

    /// Take this host's identity from the `--instance-*` options instead of the cloud metadata
    /// service. Nothing is fetched from the network that was not configured explicitly.
    #[arg(long, env = "WHIST_LOCAL", default_value_t = false)]
    pub local: bool,

    /// The EC2 instance metadata service (IMDSv2). Unused in local mode.
    #[arg(
        long,
        env = "WHIST_IMDS_ENDPOINT",
        default_value = "http://169.254.169.254/"
    )]
    pub imds_endpoint: Url,

    /// Local mode: this host's instance id (the instance row's primary key).
    #[arg(long, env = "WHIST_INSTANCE_ID", required_if_eq("local", "true"))]
    pub instance_id: Option<String>,

    /// Local mode: this host's instance type, e.g. g4dn.xlarge.
    #[arg(long, env = "WHIST_INSTANCE_TYPE", default_value = "g4dn.xlarge")]
    pub instance_type: String,

    /// Local mode: the machine image id recorded on the instance row.
    #[arg(long, env = "WHIST_IMAGE_ID", default_value = "local-image")]
    pub image_id: String,

    /// Local mode: the region recorded on the instance row.
    #[arg(long, env = "WHIST_REGION", default_value = "us-east-1")]
    pub region: String,

    /// Local mode: the address clients reach this host at.
    #[arg(long, env = "WHIST_PUBLIC_IP", default_value = "127.0.0.1")]
    pub public_ip: IpAddr,

    /// The commit this host runs; the instance row's `client_sha` must be a prefix of it.
    #[arg(long, env = "WHIST_HOST_COMMIT", default_value = BUILD_COMMIT)]
    pub host_commit: String,

    /// The Docker engine's unix socket.
    #[arg(
        long,
        env = "WHIST_DOCKER_SOCKET",
        default_value = "/var/run/docker.sock"
    )]
    pub docker_socket: PathBuf,

    /// The image every mandelbox runs.
    #[arg(
        long,
        env = "WHIST_MANDELBOX_IMAGE",
        default_value = "browsers/whistium:current-build"
    )]
    pub mandelbox_image: String,

    /// The application name: names containers (`browsers-whistium-<id>`) and, upper-cased last
    /// segment, the mandelbox rows' `app` column (`WHISTIUM`).
    #[arg(long, env = "WHIST_MANDELBOX_APP", default_value = "browsers/whistium")]
    pub mandelbox_app: String,

    /// Memory limit of one mandelbox, in bytes.
    #[arg(
        long,
        env = "WHIST_MANDELBOX_MEMORY_BYTES",
        default_value_t = 6_552_550_944
    )]
    pub mandelbox_memory_bytes: i64,

    /// Size of one mandelbox's /dev/shm, in bytes.
    #[arg(
        long,
        env = "WHIST_MANDELBOX_SHM_BYTES",
        default_value_t = 2_147_483_648
    )]
    pub mandelbox_shm_bytes: i64,

    /// Most processes one mandelbox may run.
    #[arg(long, env = "WHIST_MANDELBOX_PIDS_LIMIT", default_value_t = 4096)]
    pub mandelbox_pids_limit: i64,

    /// Seconds the in-box protocol waits for a client before ending the session (-1: never).
    /// Written to each box's `timeout` file.
    #[arg(
        long,
        env = "WHIST_PROTOCOL_TIMEOUT",
        default_value_t = 30,
        allow_negative_numbers = true
    )]
    pub protocol_timeout: i64,

    /// Directory of the per-mandelbox resource mappings.
    #[arg(long, env = "WHIST_DIR", default_value = "/whist")]
    pub whist_dir: PathBuf,

    /// Directory of the per-mandelbox sockets and logs.
    #[arg(long, env = "WHIST_TEMP_DIR", default_value = "/whist/temp")]
    pub temp_dir: PathBuf,

    /// The uinput device; virtual input devices are made only when it exists.
    #[arg(long, env = "WHIST_UINPUT_PATH", default_value = "/dev/uinput")]
    pub uinput_path: PathBuf,

    /// Look for NVIDIA GPUs through NVML (no library means no GPUs).
    #[arg(long, env = "GPU", default_value_t = false)]
    pub gpu: bool,

    /// Apply this AppArmor profile to mandelboxes when the host supports AppArmor; it is loaded
    /// from the copy built into this binary.
    #[arg(
        long,
        env = "WHIST_APPARMOR_PROFILE",
        default_value = "mandelbox-apparmor-profile"
    )]
    pub apparmor_profile: String,

    /// Address of the TLS endpoint that receives `json_transport`.
    #[arg(long, env = "WHIST_LISTEN", default_value = "0.0.0.0:4678")]
    pub listen: SocketAddr,

    /// Address of the plain-HTTP endpoint for /healthz, /readyz and /metrics.
    #[arg(long, env = "WHIST_OPS_LISTEN", default_value = "0.0.0.0:4679")]
    pub ops_listen: SocketAddr,

    /// What each listener allows (connections, timeouts, requests in flight).
    #[command(flatten)]
    pub limits: LimitArgs,

    /// `json_transport` requests one caller (a token's subject) may make per second,
    /// sustained. Past its allowance a caller gets 429 before its body is read.
    #[arg(long, env = "WHIST_TRANSPORT_RATE", default_value_t = 1.0)]
    pub transport_rate_per_user: f64,

    /// `json_transport` requests one caller may make at once (a client's retries fit well
    /// inside it).
    #[arg(long, env = "WHIST_TRANSPORT_BURST", default_value_t = 5)]
    pub transport_burst_per_user: u32,

    /// Seconds to wait at start-up for this host's instance row, which the scaling-service
    /// writes right after launching the machine.
    #[arg(long, env = "WHIST_REGISTRATION_WAIT", default_value_t = 60)]
    pub registration_wait: u64,

    /// Seconds a CONNECTING mandelbox waits for its client's `json_transport`.
    #[arg(long, env = "WHIST_CONNECT_TIMEOUT", default_value_t = 60)]
    pub connect_timeout: u64,

    /// Seconds `json_transport` waits for the box's readiness file before answering 504.
    #[arg(long, env = "WHIST_READY_TIMEOUT", default_value_t = 20)]
    pub ready_timeout: u64,

    /// Seconds between heartbeats (each is jittered by up to a tenth).
    #[arg(long, env = "WHIST_HEARTBEAT_INTERVAL", default_value_t = 30)]
    pub heartbeat_interval: u64,

    /// Seconds between full reconciliations of containers, rows and local state.
    #[arg(long, env = "WHIST_RESYNC_INTERVAL", default_value_t = 30)]
    pub resync_interval: u64,

    /// Seconds a drain waits for live sessions before stopping them.
    #[arg(long, env = "WHIST_DRAIN_DEADLINE", default_value_t = 1800)]
    pub drain_deadline: u64,

    /// Seconds Docker gives a container between SIGTERM and SIGKILL.
    #[arg(long, env = "WHIST_STOP_GRACE", default_value_t = 10)]
    pub stop_grace: u64,

    /// Command run after a drain completes, e.g. "shutdown now". Defaults to "shutdown now" in
    /// prod, staging and dev, and to nothing locally; an empty string disables it.
    #[arg(long, env = "WHIST_POWER_OFF_COMMAND")]
    pub power_off_command: Option<String>,
}

/// Where this host's identity comes from.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// Everything from configuration; no metadata service.
    Local(crate::metadata::HostIdentity),
    /// EC2's instance metadata service at this endpoint.
    Imds(Url),
}

/// The validated configuration the service runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub environment: Environment,
    pub identity: IdentitySource,
    pub host_commit: String,
    pub hasura: whist_dbclient::HasuraConfig,
    pub docker_socket: PathBuf,
    pub mandelbox: MandelboxConfig,
    pub gpu: bool,
    pub listen: SocketAddr,
    pub ops_listen: SocketAddr,
    pub limits: whist_serve::Limits,
    /// Each caller's `json_transport` allowance: sustained per second, and at once.
    pub transport_allowance: (f64, u32),
    /// `None` only in the local environment on loopback: tokens are then not checked.
    pub auth: Option<JwtConfig>,
    pub timeouts: Timeouts,
    pub power_off_command: Option<Vec<String>>,
}

/// How mandelboxes are made.
#[derive(Debug, Clone)]
pub struct MandelboxConfig {
    pub image: String,
    pub app: String,
    pub memory_bytes: i64,
    pub shm_bytes: i64,
    pub pids_limit: i64,
    pub protocol_timeout: i64,
    pub whist_dir: PathBuf,
    pub temp_dir: PathBuf,
    pub uinput_path: PathBuf,
    pub apparmor_profile: String,
}

impl MandelboxConfig {
    /// The `app` column of this host's mandelbox rows: `browsers/whistium` → `WHISTIUM`.
    pub fn app_column(&self) -> String {
        self.app
            .rsplit('/')
            .next()
            .unwrap_or(&self.app)
            .to_uppercase()
    }
}

/// Every deadline the lifecycle uses, in one place so they stay consistent with each other.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub registration_wait: Duration,
    pub connect: Duration,
    pub ready: Duration,
    pub heartbeat_interval: Duration,
    pub resync_interval: Duration,
    pub drain_deadline: Duration,
    pub stop_grace: Duration,
}

/// A configuration that parses but cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Auth(#[from] AuthRuleError),
    #[error(transparent)]
    Limit(#[from] ZeroLimit),
    #[error("--instance-id is required in local mode")]
    MissingInstanceId,
    #[error("--mandelbox-app must not be empty")]
    EmptyApp,
    #[error("--{0} must be at least one second")]
    ZeroDuration(&'static str),
    #[error("--transport-rate-per-user and --transport-burst-per-user must be positive")]
    NoTransportAllowance,
}

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.mandelbox_app.trim().is_empty() {
            return Err(ConfigError::EmptyApp);
        }
        for (name, seconds) in [
            ("connect-timeout", self.connect_timeout),
            ("ready-timeout", self.ready_timeout),
            ("heartbeat-interval", self.heartbeat_interval),
            ("resync-interval", self.resync_interval),
        ] {
            if seconds == 0 {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        let rate = self.transport_rate_per_user;
        if rate.is_nan() || rate <= 0.0 || self.transport_burst_per_user == 0 {
            return Err(ConfigError::NoTransportAllowance);
        }
        let identity = if self.local {
            let instance_id = self.instance_id.ok_or(ConfigError::MissingInstanceId)?;
            IdentitySource::Local(crate::metadata::HostIdentity {
                instance_id,
                instance_type: self.instance_type,
                image_id: self.image_id,
                region: self.region,
                public_ip: self.public_ip,
                name: None,
            })
        } else {
            IdentitySource::Imds(self.imds_endpoint)
        };
        // `json_transport` is the callers' endpoint; health and metrics are the operator's.
        let auth = self
            .shared
            .caller_auth(&[("--listen", self.listen)])?
            .jwt()
            .cloned();
        let environment = self.shared.environment;
        let power_off_command = match self.power_off_command {
            Some(command) => split_command(&command),
            None if environment == Environment::Local => None,
            None => split_command("shutdown now"),
        };
        Ok(Config {
            environment,
            identity,
            host_commit: self.host_commit,
            hasura: self.shared.hasura(),
            docker_socket: self.docker_socket,
            mandelbox: MandelboxConfig {
                image: self.mandelbox_image,
                app: self.mandelbox_app,
                memory_bytes: self.mandelbox_memory_bytes,
                shm_bytes: self.mandelbox_shm_bytes,
                pids_limit: self.mandelbox_pids_limit,
                protocol_timeout: self.protocol_timeout,
                whist_dir: self.whist_dir,
                temp_dir: self.temp_dir,
                uinput_path: self.uinput_path,
                apparmor_profile: self.apparmor_profile,
            },
            gpu: self.gpu,
            listen: self.listen,
            ops_listen: self.ops_listen,
            limits: self.limits.limits()?,
            transport_allowance: (self.transport_rate_per_user, self.transport_burst_per_user),
            auth,
            timeouts: Timeouts {
                registration_wait: Duration::from_secs(self.registration_wait),
                connect: Duration::from_secs(self.connect_timeout),
                ready: Duration::from_secs(self.ready_timeout),
                heartbeat_interval: Duration::from_secs(self.heartbeat_interval),
                resync_interval: Duration::from_secs(self.resync_interval),
                drain_deadline: Duration::from_secs(self.drain_deadline),
                stop_grace: Duration::from_secs(self.stop_grace),
            },
            power_off_command,
        })
    }
}

fn split_command(command: &str) -> Option<Vec<String>> {
    let words: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
    (!words.is_empty()).then_some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args =
            Args::try_parse_from(std::iter::once("host-service").chain(args.iter().copied()))
                .map_err(|error| error.to_string())?;
        args.validate().map_err(|error| error.to_string())
    }

    /// The local environment with `json_transport` on loopback, so tokens may go unchecked.
    fn local(extra: &[&str]) -> Result<Config, String> {
        let base = ["--environment", "local", "--listen", "127.0.0.1:4678"];
        parse(&[&base[..], extra].concat())
    }

    #[test]
    fn local_mode_takes_its_identity_from_options() {
        let config = local(&[
            "--local",
            "--instance-id",
            "i-local",
            "--region",
            "eu-west-1",
        ])
        .expect("valid");
        let IdentitySource::Local(identity) = config.identity else {
            panic!("local mode must not use the metadata service");
        };
        assert_eq!(identity.instance_id, "i-local");
        assert_eq!(identity.region, "eu-west-1");
        assert!(config.auth.is_none());
        assert!(config.power_off_command.is_none());
    }

    #[test]
    fn a_transport_allowance_of_nothing_is_refused() {
        let id = ["--local", "--instance-id", "i"];
        for bad in [
            ["--transport-rate-per-user", "0"],
            ["--transport-rate-per-user", "NaN"],
            ["--transport-burst-per-user", "0"],
        ] {
            let error = local(&[&id[..], &bad[..]].concat()).expect_err("no allowance");
            assert!(
                error.contains("--transport-rate-per-user"),
                "{bad:?}: {error}"
            );
        }
        let config = local(&id).expect("defaults");
        assert_eq!(config.transport_allowance, (1.0, 5));
    }

    #[test]
    fn local_mode_needs_an_instance_id() {
        assert!(local(&["--local"]).is_err());
    }

    #[test]
    fn the_environment_must_be_named() {
        let error = parse(&["--local", "--instance-id", "i"]).expect_err("no environment");
        assert!(error.contains("--environment"), "{error}");
    }

    /// Taking the identity from options (`--local`) says nothing about callers: only the local
    /// environment on loopback runs without tokens.
    #[test]
    fn local_identity_never_switches_tokens_off() {
        let error = parse(&["--environment", "dev", "--local", "--instance-id", "i"])
            .expect_err("dev needs an issuer");
        assert!(error.contains("--auth-issuer"), "{error}");
        let error = parse(&["--environment", "local", "--local", "--instance-id", "i"])
            .expect_err("0.0.0.0 by default");
        assert!(error.contains("--listen is 0.0.0.0:4678"), "{error}");
    }

    #[test]
    fn the_cloud_needs_an_issuer_and_powers_off_by_default() {
        let error = parse(&["--environment", "prod"]).expect_err("no issuer");
        assert!(error.contains("--auth-issuer"), "{error}");
        let config = parse(&[
            "--environment",
            "prod",
            "--auth-issuer",
            "https://auth.example.com/",
        ])
        .expect("valid");
        assert!(matches!(config.identity, IdentitySource::Imds(_)));
        assert_eq!(
            config.power_off_command,
            Some(vec!["shutdown".to_owned(), "now".to_owned()])
        );
        let config = parse(&[
            "--environment",
            "prod",
            "--auth-issuer",
            "https://auth.example.com/",
            "--power-off-command",
            "",
        ])
        .expect("valid");
        assert!(config.power_off_command.is_none());
    }

    #[test]
    fn negative_protocol_timeout_means_forever() {
        let config =
            local(&["--local", "--instance-id", "i", "--protocol-timeout", "-1"]).expect("valid");
        assert_eq!(config.mandelbox.protocol_timeout, -1);
    }

    #[test]
    fn zero_durations_are_refused() {
        let error =
            local(&["--local", "--instance-id", "i", "--ready-timeout", "0"]).expect_err("zero");
        assert!(error.contains("ready-timeout"), "{error}");
    }

    #[test]
    fn the_app_column_is_the_upper_cased_last_segment() {
        let config = local(&["--local", "--instance-id", "i"]).expect("valid");
        assert_eq!(config.mandelbox.app_column(), "WHISTIUM");
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
