//! The fleet at a glance: regions, hosts and mandelboxes by state, read from the database.

use std::collections::BTreeMap;
use std::fmt;

use whist_dbclient::{DbError, HasuraClient, ops};
use whist_types::{Image, Instance, Mandelbox, MandelboxStatus, RegionConfig};

/// What the fleet's database says now.
#[derive(Debug, Clone, Default)]
pub struct FleetStatus {
    pub regions: Vec<RegionConfig>,
    pub images: Vec<Image>,
    pub instances: Vec<Instance>,
    pub mandelboxes: Vec<Mandelbox>,
}

impl FleetStatus {
    pub async fn read(db: &HasuraClient) -> Result<Self, DbError> {
        let (regions, images, instances, mandelboxes) = (
            ops::region_configs(),
            ops::images(),
            ops::instances(),
            ops::mandelboxes(),
        );
        let (regions, images, instances, mandelboxes) = tokio::try_join!(
            db.execute(&regions),
            db.execute(&images),
            db.execute(&instances),
            db.execute(&mandelboxes),
        )?;
        Ok(Self {
            regions,
            images,
            instances,
            mandelboxes,
        })
    }

    /// How many mandelboxes are in each state, fleet-wide.
    pub fn mandelboxes_by_status(&self) -> BTreeMap<String, usize> {
        count_by_status(self.mandelboxes.iter())
    }

    /// Mandelboxes that are WAITING, i.e. could be assigned now.
    pub fn waiting(&self) -> usize {
        self.mandelboxes
            .iter()
            .filter(|mandelbox| mandelbox.status == MandelboxStatus::Waiting)
            .count()
    }
}

fn count_by_status<'a>(
    mandelboxes: impl Iterator<Item = &'a Mandelbox>,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for mandelbox in mandelboxes {
        *counts.entry(mandelbox.status.to_string()).or_default() += 1;
    }
    counts
}

fn counts_text(counts: &BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(status, count)| format!("{status} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for FleetStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut regions: Vec<&str> = self.regions.iter().map(|r| r.region.as_str()).collect();
        // Hosts can be in a region that has no configuration row (being wound down).
        for instance in &self.instances {
            if !regions.contains(&instance.region.as_str()) {
                regions.push(&instance.region);
            }
        }
        if regions.is_empty() {
            return writeln!(f, "no regions are configured and no hosts exist");
        }
        for region in regions {
            match self.regions.iter().find(|config| config.region == region) {
                Some(config) => write!(
                    f,
                    "region {region}: {}, {} free mandelboxes wanted",
                    if config.enabled {
                        "enabled"
                    } else {
                        "disabled"
                    },
                    config.desired_free_mandelboxes
                )?,
                None => write!(f, "region {region}: not configured")?,
            }
            match self.images.iter().find(|image| image.region == region) {
                Some(image) => writeln!(
                    f,
                    ", image {} (commit {})",
                    image.image_id, image.client_sha
                )?,
                None => writeln!(f, ", no image")?,
            }
            let hosts: Vec<&Instance> = self
                .instances
                .iter()
                .filter(|instance| instance.region == region)
                .collect();
            if hosts.is_empty() {
                writeln!(f, "  no hosts")?;
            }
            for host in hosts {
                let boxes = count_by_status(
                    self.mandelboxes
                        .iter()
                        .filter(|mandelbox| mandelbox.instance_id == host.id),
                );
                writeln!(
                    f,
                    "  host {} {} {} {} assignable {}: mandelboxes {}",
                    host.id,
                    host.status,
                    host.ip().map_or("-".to_owned(), |ip| ip.to_string()),
                    host.instance_type,
                    host.remaining_capacity,
                    counts_text(&boxes)
                )?;
            }
        }
        let mut hosts_by_status: BTreeMap<String, usize> = BTreeMap::new();
        for instance in &self.instances {
            *hosts_by_status
                .entry(instance.status.to_string())
                .or_default() += 1;
        }
        writeln!(
            f,
            "total: hosts {}; mandelboxes {}",
            counts_text(&hosts_by_status),
            counts_text(&self.mandelboxes_by_status())
        )
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use whist_types::{InstanceStatus, MandelboxId};

    use super::*;

    fn instance(id: &str, region: &str, status: InstanceStatus) -> Instance {
        Instance {
            id: id.into(),
            provider: "AWS".into(),
            region: region.into(),
            image_id: "ami-1".into(),
            client_sha: "abc".into(),
            ip_addr: Some("127.0.1.1".into()),
            instance_type: "g4dn.2xlarge".into(),
            remaining_capacity: 1,
            status,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            fleet: None,
            heartbeat_at: Utc::now(),
            tls_fingerprint: None,
        }
    }

    fn mandelbox(instance_id: &str, status: MandelboxStatus) -> Mandelbox {
        Mandelbox {
            id: MandelboxId::new_random(),
            app: "WHISTIUM".into(),
            instance_id: instance_id.into(),
            user_id: None,
            session_id: None,
            status,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn shows_every_region_host_and_state_count() {
        let status = FleetStatus {
            regions: vec![RegionConfig {
                region: "us-east-1".into(),
                enabled: true,
                desired_free_mandelboxes: 2,
                instance_types: vec!["g4dn.2xlarge".into()],
                schedule_time_zone: "UTC".into(),
            }],
            images: vec![],
            instances: vec![
                instance("i-1", "us-east-1", InstanceStatus::Active),
                instance("i-2", "eu-west-1", InstanceStatus::Draining),
            ],
            mandelboxes: vec![
                mandelbox("i-1", MandelboxStatus::Waiting),
                mandelbox("i-1", MandelboxStatus::Running),
                mandelbox("i-2", MandelboxStatus::Running),
            ],
        };
        let text = status.to_string();
        assert!(
            text.contains("region us-east-1: enabled, 2 free mandelboxes wanted, no image"),
            "{text}"
        );
        assert!(text.contains("host i-1 ACTIVE 127.0.1.1 g4dn.2xlarge assignable 1: mandelboxes RUNNING 1, WAITING 1"), "{text}");
        assert!(text.contains("region eu-west-1: not configured"), "{text}");
        assert!(
            text.contains("total: hosts ACTIVE 1, DRAINING 1; mandelboxes RUNNING 2, WAITING 1"),
            "{text}"
        );
        assert_eq!(status.waiting(), 1);
    }

    #[test]
    fn an_empty_fleet_says_so() {
        assert_eq!(
            FleetStatus::default().to_string(),
            "no regions are configured and no hosts exist\n"
        );
    }
}
