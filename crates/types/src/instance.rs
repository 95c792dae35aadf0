//! Hosts (`whist.instances`): one row per cloud instance in the fleet.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::mandelbox::Mandelbox;
use crate::status::string_enum;

/// The only provider the fleet runs on today; stored in `instances.provider` and `images.provider`.
pub const PROVIDER_AWS: &str = "AWS";

/// Where a host is in its life. The row is deleted when the host is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InstanceStatus {
    /// Launched by the scaling-service; the host has not registered yet.
    PreConnection,
    /// Registered and taking sessions.
    Active,
    /// Taking no new sessions; shuts down once its live sessions end.
    Draining,
}

string_enum!(InstanceStatus, "instance", {
    PreConnection => "PRE_CONNECTION",
    Active => "ACTIVE",
    Draining => "DRAINING",
});

/// A row of `whist.instances`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub provider: String,
    pub region: String,
    pub image_id: String,
    pub client_sha: String,
    /// Public IPv4 as Postgres `inet` text; may carry a prefix (`1.2.3.4/32`). Use [`Instance::ip`].
    pub ip_addr: Option<String>,
    pub instance_type: String,
    /// Mandelboxes that can still be assigned on this host (capacity minus assigned boxes).
    pub remaining_capacity: i32,
    pub status: InstanceStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The fleet that launched the host (its `whist:fleet` tag value); `None` for rows from
    /// before fleets were recorded, which no controller may delete.
    #[serde(default)]
    pub fleet: Option<String>,
    /// The host's last heartbeat, on the database clock (nothing else moves it).
    pub heartbeat_at: DateTime<Utc>,
    /// SHA-256 of the host's TLS certificate (DER, lower-case hex), published when it
    /// registers; the only certificate its `json_transport` may present.
    #[serde(default)]
    pub tls_fingerprint: Option<String>,
}

impl Instance {
    /// The host's address without any `inet` prefix length, if it has a usable one.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        host_address(self.ip_addr.as_deref()?)
    }
}

/// A host address from Postgres `inet` text (`10.0.0.5` or `10.0.0.5/32`), if it is a usable
/// one (not unspecified).
pub fn host_address(inet: &str) -> Option<std::net::IpAddr> {
    let address = inet.split_once('/').map_or(inet, |(address, _)| address);
    address
        .parse()
        .ok()
        .filter(|ip: &std::net::IpAddr| !ip.is_unspecified())
}

/// What the scaling-service writes when it launches a host (the row starts in PRE_CONNECTION).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewInstance {
    pub id: String,
    pub provider: String,
    pub region: String,
    pub image_id: String,
    pub client_sha: String,
    pub instance_type: String,
    pub remaining_capacity: i32,
    pub status: InstanceStatus,
    /// The launching fleet (see [`Instance::fleet`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
}

/// An instance together with its mandelboxes, as the nested `mandelboxes` relationship returns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceWithMandelboxes {
    #[serde(flatten)]
    pub instance: Instance,
    pub mandelboxes: Vec<Mandelbox>,
}

/// A mandelbox together with the instance it runs on, as the nested `instance` relationship
/// returns (one read where a box's host is needed, e.g. to reach it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MandelboxWithInstance {
    #[serde(flatten)]
    pub mandelbox: Mandelbox,
    pub instance: Instance,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(ip_addr: Option<&str>) -> Instance {
        Instance {
            id: "i-1".into(),
            provider: PROVIDER_AWS.into(),
            region: "us-east-1".into(),
            image_id: "ami-1".into(),
            client_sha: "abc".into(),
            ip_addr: ip_addr.map(str::to_owned),
            instance_type: "g4dn.2xlarge".into(),
            remaining_capacity: 2,
            status: InstanceStatus::Active,
            created_at: DateTime::UNIX_EPOCH,
            updated_at: DateTime::UNIX_EPOCH,
            fleet: None,
            heartbeat_at: DateTime::UNIX_EPOCH,
            tls_fingerprint: None,
        }
    }

    #[test]
    fn ip_accepts_plain_and_prefixed_inet_text() {
        assert_eq!(instance(Some("1.2.3.4")).ip(), Some([1, 2, 3, 4].into()));
        assert_eq!(instance(Some("1.2.3.4/32")).ip(), Some([1, 2, 3, 4].into()));
        assert_eq!(
            instance(Some("0.0.0.0")).ip(),
            None,
            "the launch placeholder is no address"
        );
        assert_eq!(instance(Some("garbage")).ip(), None);
        assert_eq!(instance(None).ip(), None);
    }

    #[test]
    fn status_round_trips_through_its_database_text() {
        for status in InstanceStatus::ALL {
            assert_eq!(status.as_str().parse::<InstanceStatus>(), Ok(*status));
        }
        assert!("RUNNING".parse::<InstanceStatus>().is_err());
    }

    #[test]
    fn row_decodes_from_engine_json() {
        let row: Instance = serde_json::from_value(serde_json::json!({
            "id": "i-1", "provider": "AWS", "region": "us-east-1", "image_id": "ami-1",
            "client_sha": "abc", "ip_addr": null, "instance_type": "g4dn.2xlarge",
            "remaining_capacity": 2, "status": "PRE_CONNECTION",
            "created_at": "2026-11-23T10:00:00.123456+00:00",
            "updated_at": "2026-11-23T10:00:00+00:00",
            "fleet": "whist-prod", "heartbeat_at": "2026-11-23T10:00:01+00:00"
        }))
        .expect("valid row");
        assert_eq!(row.status, InstanceStatus::PreConnection);
        assert_eq!(row.ip(), None);
        assert_eq!(row.fleet.as_deref(), Some("whist-prod"));
    }
}
