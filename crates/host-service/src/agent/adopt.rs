//! After a restart of the service: every container and row of this instance is either adopted
//! (a running container whose row is live, with resources that can be claimed again) or cleaned
//! up (container removed, row deleted). Nothing is left behind and nothing is started twice.

use std::collections::HashMap;
use std::time::Duration;

use whist_dbclient::{DbError, HasuraClient, ops};
use whist_types::{Mandelbox, MandelboxId, MandelboxStatus};

use crate::config::MandelboxConfig;
use crate::mandelbox::spec::{self, BoxResources};
use crate::mandelbox::{BoxPaths, labels};
use crate::resources::gpus::GpuSlots;
use crate::resources::ports::PortAllocator;
use crate::resources::ttys::TtyAllocator;
use crate::runtime::{ContainerInfo, ContainerRuntime, RuntimeError};

/// A mandelbox that outlived the previous run of the service.
#[derive(Debug)]
pub struct Adopted {
    pub id: MandelboxId,
    pub container_id: String,
    pub status: MandelboxStatus,
    pub user: Option<String>,
    pub resources: BoxResources,
    pub aes_key: String,
    pub paths: BoxPaths,
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("read this instance's mandelboxes")]
    Rows(#[source] DbError),
    #[error("list this instance's containers")]
    Containers(#[source] RuntimeError),
}

/// The allocators adoption claims resources from.
#[derive(Debug)]
pub struct Allocators<'a> {
    pub ports: &'a mut PortAllocator,
    pub ttys: &'a mut TtyAllocator,
    pub gpus: &'a mut GpuSlots,
}

pub async fn reconcile(
    db: &HasuraClient,
    runtime: &dyn ContainerRuntime,
    instance_id: &str,
    config: &MandelboxConfig,
    allocators: Allocators<'_>,
    stop_grace: Duration,
) -> Result<Vec<Adopted>, AdoptError> {
    let containers = runtime
        .list((labels::INSTANCE_ID, instance_id))
        .await
        .map_err(AdoptError::Containers)?;
    let rows: HashMap<MandelboxId, Mandelbox> = db
        .execute(&ops::mandelboxes_on_instance(instance_id))
        .await
        .map_err(AdoptError::Rows)?
        .into_iter()
        .map(|row| (row.id, row))
        .collect();

    let Allocators { ports, ttys, gpus } = allocators;
    let mut adopted = Vec::new();
    for container in &containers {
        match try_adopt(container, &rows, config) {
            Some(candidate) if claim(&candidate.resources, ports, ttys, gpus) => {
                adopted.push(candidate);
            }
            _ => {
                tracing::info!(container.id = %container.id, "removing a container left by an earlier run");
                if let Err(error) = runtime.remove(&container.id, stop_grace).await {
                    tracing::warn!(container.id = %container.id, %error, "remove leftover container");
                }
            }
        }
    }

    for row in rows.values() {
        if adopted.iter().any(|adopted| adopted.id == row.id) {
            continue;
        }
        tracing::info!(mandelbox.id = %row.id, status = %row.status, "deleting a row left by an earlier run");
        if let Err(error) = db.execute(&ops::delete_mandelbox(row.id)).await {
            tracing::warn!(mandelbox.id = %row.id, %error, "delete leftover row");
        }
    }

    remove_orphan_directories(config, &adopted);
    Ok(adopted)
}

fn try_adopt(
    container: &ContainerInfo,
    rows: &HashMap<MandelboxId, Mandelbox>,
    config: &MandelboxConfig,
) -> Option<Adopted> {
    if !container.running {
        return None;
    }
    let id: MandelboxId = container.labels.get(labels::MANDELBOX_ID)?.parse().ok()?;
    let row = rows.get(&id)?;
    if !matches!(
        row.status,
        MandelboxStatus::Waiting
            | MandelboxStatus::Allocated
            | MandelboxStatus::Connecting
            | MandelboxStatus::Running
    ) {
        return None;
    }
    let ports = spec::parse_ports(container.labels.get(labels::HOST_PORTS)?)?;
    let tty = container.labels.get(labels::TTY)?.parse().ok()?;
    let gpu = match container.labels.get(labels::GPU_INDEX) {
        Some(index) => Some(index.parse().ok()?),
        None => None,
    };
    let server_session_id = container.labels.get(labels::SERVER_SESSION_ID)?;
    let aes_key = container.env_value("WHIST_AES_KEY")?.to_owned();
    let paths = BoxPaths::new(&config.whist_dir, &config.temp_dir, id, server_session_id);
    if !paths.resources.is_dir() {
        return None;
    }
    Some(Adopted {
        id,
        container_id: container.id.clone(),
        status: row.status,
        user: row.user_id.clone(),
        resources: BoxResources {
            ports,
            tty,
            gpu,
            // The devices live on in the box, which holds their descriptors.
            input_devices: Vec::new(),
        },
        aes_key,
        paths,
    })
}

/// Claims an adopted box's resources; all or none.
fn claim(
    resources: &BoxResources,
    ports: &mut PortAllocator,
    ttys: &mut TtyAllocator,
    gpus: &mut GpuSlots,
) -> bool {
    if ports.claim(resources.ports).is_err() {
        return false;
    }
    if ttys.claim(resources.tty).is_err() {
        ports.release(resources.ports);
        return false;
    }
    if let Some(gpu) = resources.gpu
        && gpus.claim(gpu).is_err()
    {
        ports.release(resources.ports);
        ttys.release(resources.tty);
        return false;
    }
    true
}

/// Per-mandelbox directories (named by a mandelbox id) that no adopted box uses.
fn remove_orphan_directories(config: &MandelboxConfig, adopted: &[Adopted]) {
    for parent in [&config.whist_dir, &config.temp_dir] {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|name| name.parse::<MandelboxId>().ok())
            else {
                continue;
            };
            if adopted.iter().any(|adopted| adopted.id == id) {
                continue;
            }
            if let Err(error) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), %error, "remove leftover directory");
            }
        }
    }
}
