//! Registration: the instance row the scaling-service created must describe this host; then it
//! turns ACTIVE with this host's address, full commit and TLS certificate fingerprint (the one
//! certificate its `json_transport` may present; a restarted host publishes its new one).
//!
//! A row already ACTIVE with the same identity is this host after a restart of the service, and
//! is resumed; a DRAINING row means the fleet wants this host gone, so it drains at once.

use std::time::Duration;

use tokio::time::Instant;
use whist_dbclient::{DbError, HasuraClient, ops};
use whist_types::{Instance, InstanceStatus};

use crate::metadata::HostIdentity;

#[derive(Debug)]
pub enum Registration {
    /// PRE_CONNECTION → ACTIVE now.
    Registered(Instance),
    /// Already ACTIVE as this host: the service restarted.
    Resumed(Instance),
    /// The fleet already asked this host to drain.
    Draining(Instance),
}

impl Registration {
    pub fn instance(&self) -> &Instance {
        match self {
            Self::Registered(instance) | Self::Resumed(instance) | Self::Draining(instance) => {
                instance
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("read the instance row")]
    Database(#[from] DbError),
    #[error("no instance row for {0}: the scaling-service creates it before the host boots")]
    NoRow(String),
    #[error("instance row's {field} is {row:?} but this host's is {host:?}")]
    Mismatch {
        field: &'static str,
        row: String,
        host: String,
    },
    #[error("instance row left PRE_CONNECTION while registering (now {0})")]
    Raced(String),
}

/// How often a host that found no instance row looks again.
const ROW_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// [`register`], waiting up to `wait` for the instance row to appear. The scaling-service inserts
/// the row only after the cloud's launch call has returned, so a host that boots quickly (every
/// host of the local fleet, a fast EC2 boot behind a slow database) can look before it exists.
pub async fn register_waiting_for_row(
    db: &HasuraClient,
    identity: &HostIdentity,
    host_commit: &str,
    tls_fingerprint: &str,
    wait: Duration,
) -> Result<Registration, RegistrationError> {
    let deadline = Instant::now() + wait;
    let mut logged = false;
    loop {
        match register(db, identity, host_commit, tls_fingerprint).await {
            Err(RegistrationError::NoRow(id)) if Instant::now() < deadline => {
                if !logged {
                    tracing::info!(instance.id = %id, ?wait, "no instance row yet; waiting for it");
                    logged = true;
                }
                tokio::time::sleep(ROW_POLL_INTERVAL).await;
            }
            other => return other,
        }
    }
}

pub async fn register(
    db: &HasuraClient,
    identity: &HostIdentity,
    host_commit: &str,
    tls_fingerprint: &str,
) -> Result<Registration, RegistrationError> {
    let id = &identity.instance_id;
    let row = db
        .execute(&ops::instance_by_id(id))
        .await?
        .ok_or_else(|| RegistrationError::NoRow(id.clone()))?;
    check(&row, identity, host_commit)?;
    let ip = identity.public_ip.to_string();
    match row.status {
        InstanceStatus::PreConnection => {
            match db
                .execute(&ops::register_instance(
                    id,
                    &ip,
                    host_commit,
                    tls_fingerprint,
                ))
                .await?
            {
                Some(instance) => Ok(Registration::Registered(instance)),
                None => {
                    let now = db.execute(&ops::instance_by_id(id)).await?;
                    let status = now.map_or("deleted".to_owned(), |row| row.status.to_string());
                    Err(RegistrationError::Raced(status))
                }
            }
        }
        InstanceStatus::Active => {
            if row.ip() != Some(identity.public_ip) {
                return Err(RegistrationError::Mismatch {
                    field: "ip_addr",
                    row: row.ip_addr.clone().unwrap_or_default(),
                    host: ip,
                });
            }
            Ok(Registration::Resumed(
                published(db, row, tls_fingerprint).await?,
            ))
        }
        // A draining host still answers the json_transport of sessions it was given.
        InstanceStatus::Draining => Ok(Registration::Draining(
            published(db, row, tls_fingerprint).await?,
        )),
    }
}

/// The row with this start's certificate fingerprint on it (a restart made a new certificate).
async fn published(
    db: &HasuraClient,
    row: Instance,
    tls_fingerprint: &str,
) -> Result<Instance, RegistrationError> {
    let id = row.id.clone();
    match db
        .execute(&ops::publish_certificate(&id, tls_fingerprint))
        .await?
    {
        Some(updated) => Ok(updated),
        None => {
            let now = db.execute(&ops::instance_by_id(&id)).await?;
            let status = now.map_or("deleted".to_owned(), |row| row.status.to_string());
            Err(RegistrationError::Raced(status))
        }
    }
}

/// The checks of the row against the host; the commit check lets a row name a short hash.
fn check(
    row: &Instance,
    identity: &HostIdentity,
    host_commit: &str,
) -> Result<(), RegistrationError> {
    let mismatch = |field, row: &str, host: &str| RegistrationError::Mismatch {
        field,
        row: row.to_owned(),
        host: host.to_owned(),
    };
    if row.image_id != identity.image_id {
        return Err(mismatch("image_id", &row.image_id, &identity.image_id));
    }
    if row.region != identity.region {
        return Err(mismatch("region", &row.region, &identity.region));
    }
    if row.instance_type != identity.instance_type {
        return Err(mismatch(
            "instance_type",
            &row.instance_type,
            &identity.instance_type,
        ));
    }
    if !whist_types::same_commit(&row.client_sha, host_commit) {
        return Err(mismatch("client_sha", &row.client_sha, host_commit));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> HostIdentity {
        HostIdentity {
            instance_id: "i-1".into(),
            instance_type: "g4dn.xlarge".into(),
            image_id: "ami-1".into(),
            region: "us-east-1".into(),
            public_ip: "203.0.113.7".parse().expect("ip"),
            name: None,
        }
    }

    fn row() -> Instance {
        Instance {
            id: "i-1".into(),
            provider: "AWS".into(),
            region: "us-east-1".into(),
            image_id: "ami-1".into(),
            client_sha: "abc123".into(),
            ip_addr: None,
            instance_type: "g4dn.xlarge".into(),
            remaining_capacity: 1,
            status: InstanceStatus::PreConnection,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            fleet: None,
            heartbeat_at: chrono::Utc::now(),
            tls_fingerprint: None,
        }
    }

    #[test]
    fn a_matching_row_with_a_commit_prefix_passes() {
        assert!(check(&row(), &identity(), "abc123def456").is_ok());
    }

    #[test]
    fn each_mismatch_is_named() {
        type Change = fn(&mut Instance);
        let cases: [(Change, &str); 4] = [
            (|row| row.image_id = "ami-2".into(), "image_id"),
            (|row| row.region = "eu-west-1".into(), "region"),
            (
                |row| row.instance_type = "g4dn.2xlarge".into(),
                "instance_type",
            ),
            (|row| row.client_sha = "fff".into(), "client_sha"),
        ];
        for (change, field) in cases {
            let mut row = row();
            change(&mut row);
            let error = check(&row, &identity(), "abc123def456").expect_err(field);
            assert!(error.to_string().contains(field), "{error}");
        }
        let mut empty = row();
        empty.client_sha.clear();
        assert!(check(&empty, &identity(), "abc").is_err());
    }
}
