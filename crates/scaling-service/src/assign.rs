//! Assigning a user to a mandelbox: regions in the client's order, the fullest matching host
//! first, one atomic claim per box (the database refuses double allocation, full or draining
//! hosts and users at their limit), and a retry on the next box when a claim loses a race.
//!
//! Boxes this replica is claiming or has claimed are reserved in memory until the live query
//! shows them taken, so concurrent requests here try different boxes instead of racing for one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use whist_dbclient::{ClaimOutcome, HasuraClient, ops};
use whist_types::{
    Environment, Image, Instance, InstanceStatus, MandelboxId, MandelboxStatus, same_commit,
};

use crate::fleet::{Fleet, FleetView};

/// The commit hash a developer's client sends; the local environment takes any commit as the
/// region's, other environments compare it like any other.
pub const LOCAL_DEV_COMMIT: &str = "local_dev";

/// How long a reservation outlives the claim that made it; by then the live query has caught up.
const RESERVATION_TTL: Duration = Duration::from_secs(60);

/// The body of `POST /mandelbox/assign`. Unknown keys are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AssignRequest {
    /// Regions ordered by the client's latency to them.
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub client_commit_hash: String,
    /// For logs only; never trusted.
    #[serde(default)]
    pub user_email: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub session_id: Option<i64>,
    /// Honoured only when the service runs without token checks (local development).
    #[serde(default)]
    pub user_id: Option<String>,
}

/// A successful assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    pub ip: String,
    pub mandelbox_id: MandelboxId,
    #[serde(skip)]
    pub region: String,
}

/// The business refusals, each with the code clients switch on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.code())]
pub enum AssignError {
    UserAlreadyActive,
    RegionNotEnabled,
    NoInstanceAvailable,
    CommitHashMismatch,
    ServiceUnavailable,
}

impl AssignError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::UserAlreadyActive => "USER_ALREADY_ACTIVE",
            Self::RegionNotEnabled => "REGION_NOT_ENABLED",
            Self::NoInstanceAvailable => "NO_INSTANCE_AVAILABLE",
            Self::CommitHashMismatch => "COMMIT_HASH_MISMATCH",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Assigner {
    db: HasuraClient,
    fleet: FleetView,
    environment: Environment,
    reserved: Arc<Mutex<HashMap<MandelboxId, Instant>>>,
}

impl Assigner {
    pub fn new(db: HasuraClient, fleet: FleetView, environment: Environment) -> Self {
        Self {
            db,
            fleet,
            environment,
            reserved: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(user))]
    pub async fn assign(
        &self,
        request: &AssignRequest,
        user: &str,
    ) -> Result<Assignment, AssignError> {
        let fleet = self.fleet.current();
        if !fleet.complete {
            // Before the first results arrive, every region would look unknown.
            return Err(AssignError::ServiceUnavailable);
        }
        let regions = enabled_regions(&fleet, &request.regions);
        if regions.is_empty() {
            return Err(AssignError::RegionNotEnabled);
        }
        let session_id = request
            .session_id
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis())
            .to_string();
        // Capacity that only another client build could use means the client must update;
        // capacity for this build that is all taken means there is simply none left; hosts that
        // run no build of the region's image row are a configuration error, said as such.
        let (mut matching_seen, mut mismatching_seen, mut misconfigured_seen) =
            (false, false, false);
        for region in regions {
            let Some(image) = fleet.images.get(region) else {
                continue;
            };
            let hosts = match match_region(
                &fleet,
                image,
                &request.client_commit_hash,
                self.environment,
            ) {
                RegionMatch::OtherBuild => {
                    mismatching_seen = true;
                    continue;
                }
                RegionMatch::HostsRunNoBuildOfTheImage => {
                    misconfigured_seen = true;
                    tracing::error!(
                        region,
                        image = %image.image_id,
                        client_sha = %image.client_sha,
                        "the region's image row names a commit none of its ACTIVE hosts runs: nothing can be assigned there until the row or the hosts are fixed"
                    );
                    continue;
                }
                RegionMatch::Hosts(hosts) => hosts,
            };
            matching_seen = true;
            for instance in hosts {
                if let Some(assignment) = self.claim_on(&fleet, instance, user, &session_id).await?
                {
                    return Ok(assignment);
                }
            }
        }
        Err(if matching_seen {
            AssignError::NoInstanceAvailable
        } else if misconfigured_seen {
            AssignError::ServiceUnavailable
        } else if mismatching_seen {
            AssignError::CommitHashMismatch
        } else {
            AssignError::NoInstanceAvailable
        })
    }

    /// Tries the instance's WAITING boxes until one claim wins; `None` when none is left.
    async fn claim_on(
        &self,
        fleet: &Fleet,
        instance: &Instance,
        user: &str,
        session_id: &str,
    ) -> Result<Option<Assignment>, AssignError> {
        let Some(waiting) = fleet.waiting.get(&instance.id) else {
            return Ok(None);
        };
        for &id in waiting {
            if !self.reserve(id) {
                continue;
            }
            match self.db.claim_mandelbox(id, user, session_id).await {
                Ok(ClaimOutcome::Claimed(_)) => {
                    let Some(ip) = instance.ip() else {
                        tracing::error!(instance.id = %instance.id, "ACTIVE instance without an address");
                        return Err(AssignError::ServiceUnavailable);
                    };
                    return Ok(Some(Assignment {
                        ip: ip.to_string(),
                        mandelbox_id: id,
                        region: instance.region.clone(),
                    }));
                }
                Ok(ClaimOutcome::NotWaiting) => continue,
                Ok(
                    ClaimOutcome::InstanceFull { .. } | ClaimOutcome::InstanceNotAccepting { .. },
                ) => {
                    self.release(id);
                    return Ok(None);
                }
                Ok(ClaimOutcome::UserAtLimit { .. }) => {
                    self.release(id);
                    return Err(AssignError::UserAlreadyActive);
                }
                Err(error) => {
                    // The claim may have committed with its answer lost: if the box is this
                    // user's now, it is theirs to use rather than a leak until the host reaps it.
                    if let Ok(Some(row)) = self.db.execute(&ops::mandelbox_by_id(id)).await
                        && row.user_id.as_deref() == Some(user)
                        && row.status == MandelboxStatus::Allocated
                        && let Some(ip) = instance.ip()
                    {
                        return Ok(Some(Assignment {
                            ip: ip.to_string(),
                            mandelbox_id: id,
                            region: instance.region.clone(),
                        }));
                    }
                    self.release(id);
                    tracing::warn!(%error, "claim failed");
                    return Err(AssignError::ServiceUnavailable);
                }
            }
        }
        Ok(None)
    }

    /// Reserves a box for one claim attempt; `false` if another request here has it.
    fn reserve(&self, id: MandelboxId) -> bool {
        let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if reserved.len() > 4096 {
            reserved.retain(|_, at| now.duration_since(*at) < RESERVATION_TTL);
        }
        match reserved.get(&id) {
            Some(at) if now.duration_since(*at) < RESERVATION_TTL => false,
            _ => {
                reserved.insert(id, now);
                true
            }
        }
    }

    fn release(&self, id: MandelboxId) {
        self.reserved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// The requested regions that are enabled, in the client's order, each once.
fn enabled_regions<'a>(fleet: &Fleet, requested: &'a [String]) -> Vec<&'a str> {
    let mut regions: Vec<&str> = Vec::new();
    for region in requested {
        let enabled = fleet
            .regions
            .get(region)
            .is_some_and(|config| config.enabled);
        if enabled && !regions.contains(&region.as_str()) {
            regions.push(region);
        }
    }
    regions
}

/// How a region stands for a client's build.
#[derive(Debug, PartialEq, Eq)]
enum RegionMatch<'a> {
    /// The region runs another build than the client's: the client must update.
    OtherBuild,
    /// The region's ACTIVE hosts on its image all run builds its image row does not name.
    HostsRunNoBuildOfTheImage,
    /// The hosts to try, fullest first (perhaps none with room).
    Hosts(Vec<&'a Instance>),
}

/// The one commit rule ([`same_commit`]) applied to a region: the client's build against the
/// image row's, then the hosts' against both. Only the local environment accepts any client
/// build (`local_dev` or whatever a developer's client sends) as the region's.
fn match_region<'a>(
    fleet: &'a Fleet,
    image: &'a Image,
    client_commit: &str,
    environment: Environment,
) -> RegionMatch<'a> {
    let client = if environment == Environment::Local {
        image.client_sha.as_str()
    } else {
        client_commit
    };
    if !same_commit(&image.client_sha, client) {
        return RegionMatch::OtherBuild;
    }
    let on_image = || {
        fleet
            .instances_in(&image.region)
            .filter(|i| i.status == InstanceStatus::Active && i.image_id == image.image_id)
    };
    let runs_the_build = |i: &Instance| {
        same_commit(&i.client_sha, &image.client_sha) && same_commit(&i.client_sha, client)
    };
    if on_image().next().is_some() && !on_image().any(runs_the_build) {
        return RegionMatch::HostsRunNoBuildOfTheImage;
    }
    RegionMatch::Hosts(
        candidates(fleet, &image.region, &image.image_id)
            .into_iter()
            .filter(|i| runs_the_build(i))
            .collect(),
    )
}

/// ACTIVE instances on the region's current image with free capacity and WAITING boxes, fullest
/// first (so sessions pack onto few hosts and idle ones can be drained).
fn candidates<'a>(fleet: &'a Fleet, region: &'a str, image_id: &str) -> Vec<&'a Instance> {
    let mut instances: Vec<&Instance> = fleet
        .instances_in(region)
        .filter(|i| {
            i.status == InstanceStatus::Active
                && i.ip().is_some()
                && i.image_id == image_id
                && i.remaining_capacity > 0
                && fleet.waiting.get(&i.id).is_some_and(|w| !w.is_empty())
        })
        .collect();
    instances.sort_by(|a, b| {
        a.remaining_capacity
            .cmp(&b.remaining_capacity)
            .then_with(|| a.id.cmp(&b.id))
    });
    instances
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Utc;
    use whist_types::{Image, RegionConfig};

    use super::*;

    fn instance(id: &str, region: &str, image: &str, remaining: i32) -> Instance {
        Instance {
            id: id.into(),
            provider: "AWS".into(),
            region: region.into(),
            image_id: image.into(),
            client_sha: "sha".into(),
            ip_addr: Some("10.0.0.1".into()),
            instance_type: "g4dn.12xlarge".into(),
            remaining_capacity: remaining,
            status: InstanceStatus::Active,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            fleet: None,
            heartbeat_at: Utc::now(),
            tls_fingerprint: None,
        }
    }

    fn fleet() -> Fleet {
        let instances = vec![
            instance("a", "east", "ami-new", 5),
            instance("b", "east", "ami-new", 2),
            instance("c", "east", "ami-old", 1),
            instance("d", "east", "ami-new", 0),
            instance("e", "west", "ami-new", 3),
        ];
        let waiting = instances
            .iter()
            .map(|i| (i.id.clone(), vec![MandelboxId::new_random()]))
            .collect();
        let region = |name: &str, enabled| RegionConfig {
            region: name.into(),
            enabled,
            desired_free_mandelboxes: 2,
            instance_types: vec!["g4dn.2xlarge".into()],
        };
        let image = |region: &str| Image {
            provider: "AWS".into(),
            region: region.into(),
            image_id: "ami-new".into(),
            client_sha: "sha".into(),
            updated_at: Utc::now(),
        };
        Fleet {
            instances: Arc::new(instances),
            waiting: Arc::new(waiting),
            images: Arc::new(BTreeMap::from([
                ("east".into(), image("east")),
                ("west".into(), image("west")),
            ])),
            regions: Arc::new(BTreeMap::from([
                ("east".into(), region("east", true)),
                ("west".into(), region("west", true)),
                ("north".into(), region("north", false)),
            ])),
            ..Fleet::default()
        }
    }

    #[test]
    fn regions_keep_the_clients_order_and_drop_disabled_or_unknown_ones() {
        let fleet = fleet();
        let requested: Vec<String> = ["north", "west", "mars", "east", "west"]
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(enabled_regions(&fleet, &requested), ["west", "east"]);
        assert!(enabled_regions(&fleet, &[]).is_empty());
    }

    #[test]
    fn candidates_are_current_image_with_capacity_fullest_first() {
        let fleet = fleet();
        let ids: Vec<&str> = candidates(&fleet, "east", "ami-new")
            .iter()
            .map(|i| i.id.as_str())
            .collect();
        assert_eq!(ids, ["b", "a"], "old image and full hosts are skipped");
    }

    fn image(client_sha: &str) -> Image {
        Image {
            provider: "AWS".into(),
            region: "east".into(),
            image_id: "ami-new".into(),
            client_sha: client_sha.into(),
            updated_at: Utc::now(),
        }
    }

    fn ids(matched: RegionMatch<'_>) -> Vec<String> {
        match matched {
            RegionMatch::Hosts(hosts) => hosts.iter().map(|i| i.id.clone()).collect(),
            other => panic!("expected hosts, got {other:?}"),
        }
    }

    #[test]
    fn one_commit_rule_for_the_image_the_hosts_and_the_client() {
        let mut fleet = fleet();
        // Hosts register with their full commit; the image row may hold an abbreviation.
        let full = "sha0123456789";
        fleet.instances = Arc::new(
            fleet
                .instances
                .iter()
                .cloned()
                .map(|mut i| {
                    i.client_sha = full.into();
                    i
                })
                .collect(),
        );
        for (row, client) in [("sha0123", full), (full, full), ("sha0123", "sha0123")] {
            let row_image = image(row);
            let matched = match_region(&fleet, &row_image, client, Environment::Prod);
            assert_eq!(ids(matched), ["b", "a"], "row {row}, client {client}");
        }
        let abbreviated = image("sha0123");
        assert_eq!(
            match_region(&fleet, &abbreviated, "sha9999999", Environment::Prod),
            RegionMatch::OtherBuild
        );
        // An image row no host's commit matches is a configuration error, not a full region.
        let other = image("other");
        assert_eq!(
            match_region(&fleet, &other, "other", Environment::Prod),
            RegionMatch::HostsRunNoBuildOfTheImage
        );
    }

    #[test]
    fn local_dev_is_the_regions_build_only_in_the_local_environment() {
        let fleet = fleet();
        assert_eq!(
            ids(match_region(
                &fleet,
                &image("sha"),
                LOCAL_DEV_COMMIT,
                Environment::Local
            )),
            ["b", "a"]
        );
        assert_eq!(
            ids(match_region(
                &fleet,
                &image("sha"),
                "anything",
                Environment::Local
            )),
            ["b", "a"]
        );
        for environment in [Environment::Dev, Environment::Staging, Environment::Prod] {
            assert_eq!(
                match_region(&fleet, &image("sha"), LOCAL_DEV_COMMIT, environment),
                RegionMatch::OtherBuild,
                "{environment}"
            );
        }
    }

    #[test]
    fn error_codes_are_the_contract() {
        assert_eq!(AssignError::UserAlreadyActive.code(), "USER_ALREADY_ACTIVE");
        assert_eq!(AssignError::RegionNotEnabled.code(), "REGION_NOT_ENABLED");
        assert_eq!(
            AssignError::NoInstanceAvailable.code(),
            "NO_INSTANCE_AVAILABLE"
        );
        assert_eq!(
            AssignError::CommitHashMismatch.code(),
            "COMMIT_HASH_MISMATCH"
        );
        assert_eq!(
            AssignError::ServiceUnavailable.code(),
            "SERVICE_UNAVAILABLE"
        );
    }
}
