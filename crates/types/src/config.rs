//! Fleet configuration (the `config` schema), read by the scaling-service and the database.

use serde::{Deserialize, Serialize};

/// A row of `config.regions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionConfig {
    pub region: String,
    pub enabled: bool,
    /// Free mandelboxes on the current image to keep ready.
    pub desired_free_mandelboxes: i32,
    /// Instance types to launch, in order of preference.
    pub instance_types: Vec<String>,
    /// The IANA time zone of the region's buffer schedule (`config.region_schedules`).
    #[serde(default = "utc")]
    pub schedule_time_zone: String,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// The single row of `config.settings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSettings {
    pub mandelbox_limit_per_user: i32,
    pub scale_up_cooldown_seconds: i32,
    pub scale_down_cooldown_seconds: i32,
    pub scale_down_delay_seconds: i32,
    pub heartbeat_timeout_seconds: i32,
    pub instance_ready_timeout_seconds: i32,
    /// How long before a scheduled rise of a region's buffer its hosts are launched (they take
    /// minutes to boot); a scheduled fall waits for its hour.
    pub schedule_lead_seconds: i32,
}

impl FleetSettings {
    /// The settings a fresh database starts with: the column defaults of `config.settings`
    /// (migrations `1763856000001_fleet_config` and later; `tests/stack_settings.rs` checks they
    /// agree). The scaling-service uses them until it has read the row.
    pub const DEFAULT: Self = Self {
        mandelbox_limit_per_user: 3,
        scale_up_cooldown_seconds: 60,
        scale_down_cooldown_seconds: 300,
        scale_down_delay_seconds: 600,
        heartbeat_timeout_seconds: 180,
        instance_ready_timeout_seconds: 900,
        schedule_lead_seconds: 300,
    };
}

/// The deployment environment, which picks the commit hash an image upgrade waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    Local,
    Dev,
    Staging,
    Prod,
}

impl std::str::FromStr for Environment {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "local" | "localdev" => Ok(Self::Local),
            "dev" => Ok(Self::Dev),
            "staging" => Ok(Self::Staging),
            "prod" | "production" => Ok(Self::Prod),
            other => Err(format!(
                "unknown environment {other:?} (expected local, dev, staging or prod)"
            )),
        }
    }
}

impl Environment {
    /// The name mandelboxes see (`SENTRY_ENV`) and logs carry.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Dev => "dev",
            Self::Staging => "staging",
            Self::Prod => "prod",
        }
    }
}

impl std::fmt::Display for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The single row of `config.desktop_app_version`: the published client, per environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesktopAppVersion {
    pub id: i32,
    pub major: i32,
    pub minor: i32,
    pub micro: i32,
    pub dev_rc: i32,
    pub staging_rc: i32,
    pub dev_commit_hash: String,
    pub staging_commit_hash: String,
    pub prod_commit_hash: String,
}

impl DesktopAppVersion {
    /// The client commit published for an environment (local follows dev).
    pub fn commit_hash(&self, environment: Environment) -> &str {
        match environment {
            Environment::Local | Environment::Dev => &self.dev_commit_hash,
            Environment::Staging => &self.staging_commit_hash,
            Environment::Prod => &self.prod_commit_hash,
        }
    }

    /// The client version string as the client reports it, e.g. `3.0.1-dev-rc.4`.
    pub fn version(&self, environment: Environment) -> String {
        let base = format!("{}.{}.{}", self.major, self.minor, self.micro);
        match environment {
            Environment::Local | Environment::Dev => format!("{base}-dev-rc.{}", self.dev_rc),
            Environment::Staging => format!("{base}-staging-rc.{}", self.staging_rc),
            Environment::Prod => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version() -> DesktopAppVersion {
        DesktopAppVersion {
            id: 1,
            major: 3,
            minor: 0,
            micro: 1,
            dev_rc: 4,
            staging_rc: 2,
            dev_commit_hash: "dev".into(),
            staging_commit_hash: "staging".into(),
            prod_commit_hash: "prod".into(),
        }
    }

    #[test]
    fn each_environment_reads_its_own_commit_and_local_follows_dev() {
        let version = version();
        assert_eq!(version.commit_hash(Environment::Local), "dev");
        assert_eq!(version.commit_hash(Environment::Dev), "dev");
        assert_eq!(version.commit_hash(Environment::Staging), "staging");
        assert_eq!(version.commit_hash(Environment::Prod), "prod");
        assert_eq!(version.version(Environment::Dev), "3.0.1-dev-rc.4");
        assert_eq!(version.version(Environment::Prod), "3.0.1");
    }

    #[test]
    fn environment_names_parse_case_insensitively() {
        assert_eq!("PROD".parse(), Ok(Environment::Prod));
        assert_eq!("localdev".parse(), Ok(Environment::Local));
        assert!("qa".parse::<Environment>().is_err());
    }
}
