//! Upkeep: zygotes made and retired, boxes torn down and forgotten, the periodic resync that
//! repairs whatever events missed, and the drain.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use whist_types::{InstanceStatus, MandelboxId, MandelboxStatus};

use super::tasks::{InputDevices, ResyncView, ZygotePlan};
use super::transport::TransportError;
use super::{Agent, Drain, DrainReport, Phase, Tracked, adopt, later, tasks};
use crate::mandelbox::files::StartParams;
use crate::mandelbox::spec::BoxResources;
use crate::mandelbox::{self, BoxPaths, labels};

impl Agent {
    // ----- zygotes -----

    /// Free sessions this host should hold ready: its capacity minus what users hold now.
    pub(super) fn zygote_target(&self) -> i64 {
        if self.draining.is_some() {
            return 0;
        }
        let assigned = self
            .boxes
            .values()
            .filter(|tracked| tracked.phase.assigned() || tracked.held_user)
            .count() as i64;
        (self.total_capacity - assigned).max(0)
    }

    pub(super) fn reconcile_zygotes(&mut self) {
        if self.draining.is_some() || self.zygote_backoff_until.is_some() {
            return;
        }
        let have = self
            .boxes
            .values()
            .filter(|tracked| {
                matches!(
                    tracked.phase,
                    Phase::Creating | Phase::Waiting | Phase::Checking { .. }
                )
            })
            .count() as i64;
        for _ in have..self.zygote_target() {
            if let Err(error) = self.start_zygote() {
                tracing::warn!(%error, "no resources for another zygote");
                self.metrics.error("resources");
                break;
            }
        }
    }

    fn start_zygote(&mut self) -> Result<(), crate::resources::ResourceError> {
        let ports = self.ports.allocate()?;
        let tty = match self.ttys.allocate() {
            Ok(tty) => tty,
            Err(error) => {
                self.ports.release(ports);
                return Err(error);
            }
        };
        let gpu = match self.gpus.allocate() {
            Ok(gpu) => gpu,
            Err(error) => {
                self.ports.release(ports);
                self.ttys.release(tty);
                return Err(error);
            }
        };
        let id = MandelboxId::new_random();
        let server_session_id = mandelbox::new_server_session_id();
        let config = &self.config.mandelbox;
        let paths = BoxPaths::new(&config.whist_dir, &config.temp_dir, id, &server_session_id);
        let resources = BoxResources {
            ports,
            tty,
            gpu,
            input_devices: Vec::new(),
        };
        let aes_key = mandelbox::new_aes_key();
        let uinput_path = crate::resources::uinput::uinput_available(&config.uinput_path)
            .then(|| config.uinput_path.clone());
        let plan = ZygotePlan {
            id,
            app_column: config.app_column(),
            server_session_id,
            aes_key: aes_key.clone(),
            paths: paths.clone(),
            resources: resources.clone(),
            params: StartParams {
                ports,
                tty,
                // Only the box's own GPU is visible inside it, where it is number 0.
                gpu_index: 0,
                protocol_timeout: config.protocol_timeout,
            },
            uinput_path,
            config: self.config.clone(),
            features: self.features.clone(),
        };
        self.boxes.insert(
            id,
            Tracked::new(Phase::Creating, None, resources, aes_key, paths),
        );
        tokio::spawn(tasks::start_zygote(self.context(), plan));
        Ok(())
    }

    pub(super) fn on_zygote_started(
        &mut self,
        id: MandelboxId,
        container_id: String,
        input: Option<InputDevices>,
        took: Duration,
    ) {
        self.metrics.zygote_started(took);
        let draining = self.draining.is_some();
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        tracked.container_id = Some(container_id);
        tracked.input = input;
        tracked.enter(Phase::Waiting);
        tracing::info!(mandelbox.id = %id, took_ms = took.as_millis() as u64, "zygote ready");
        if draining {
            self.retire(id);
        }
    }

    pub(super) fn on_zygote_failed(
        &mut self,
        id: MandelboxId,
        container_id: Option<String>,
        error: &str,
    ) {
        let failures = self.metrics.zygote_failed();
        tracing::error!(mandelbox.id = %id, %error, failures, "zygote failed");
        match container_id {
            // Its container could not be removed: it stays held until a resync removes it.
            Some(container_id) => {
                if let Some(tracked) = self.boxes.get_mut(&id) {
                    tracked.container_id = Some(container_id);
                    tracked.enter(Phase::TearingDown {
                        reason: "zygote failed",
                    });
                }
            }
            None => self.forget(id),
        }
        let backoff = Duration::from_secs(1 << failures.min(6));
        self.zygote_backoff_until = Some(later(backoff));
    }

    pub(super) fn retire(&mut self, id: MandelboxId) {
        let context = self.context();
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        if !matches!(tracked.phase, Phase::Waiting) {
            return;
        }
        tracked.enter(Phase::Retiring);
        tokio::spawn(tasks::retire_zygote(context, id));
    }

    pub(super) fn on_retired(&mut self, id: MandelboxId, deleted: bool) {
        if deleted {
            // Requests parked meanwhile (Checking) are answered by the teardown.
            self.tear_down(id, "zygote retired");
        } else if let Some(tracked) = self.boxes.get_mut(&id)
            && matches!(tracked.phase, Phase::Retiring)
        {
            // A claim won the race (the live query will show the ALLOCATED row), or the delete's
            // answer was lost: the resync tells which.
            tracked.enter(Phase::Waiting);
            self.resync_due = Instant::now();
        }
    }

    // ----- endings -----

    pub(super) fn tear_down(&mut self, id: MandelboxId, reason: &'static str) {
        let context = self.context();
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        match std::mem::replace(&mut tracked.phase, Phase::TearingDown { reason }) {
            Phase::TearingDown { reason } => {
                tracked.phase = Phase::TearingDown { reason };
                return;
            }
            Phase::Creating => {
                // Phase A reports first; a draining host retires the zygote when it does.
                tracked.phase = Phase::Creating;
                return;
            }
            Phase::Checking { pending } => {
                for request in pending {
                    request.answer(Err(TransportError::Gone));
                }
            }
            Phase::Accepting { pending, .. } => {
                tracked.held_user = true;
                if let Some(request) = pending {
                    request.answer(Err(TransportError::Gone));
                }
            }
            old => tracked.held_user = old.assigned(),
        }
        tracked.since = Instant::now();
        tracked.ended.cancel();
        tracked.teardown_running = true;
        tracing::info!(mandelbox.id = %id, reason, "ending mandelbox");
        tokio::spawn(tasks::tear_down(context, id, tracked.container_id.clone()));
    }

    /// Runs the teardown again for a box whose last attempt did not finish.
    fn retry_tear_down(&mut self, id: MandelboxId) {
        let context = self.context();
        if let Some(tracked) = self.boxes.get_mut(&id)
            && matches!(tracked.phase, Phase::TearingDown { .. })
            && !tracked.teardown_running
        {
            tracked.teardown_running = true;
            tokio::spawn(tasks::tear_down(context, id, tracked.container_id.clone()));
        }
    }

    pub(super) fn on_torn_down(&mut self, id: MandelboxId, removed: bool, row_deleted: bool) {
        if let Some(tracked) = self.boxes.get_mut(&id) {
            tracked.teardown_running = false;
        }
        if !row_deleted {
            // The resync deletes rows without a box; the drain deletes any left with its own.
            self.metrics.error("delete_row");
        }
        if removed {
            self.forget(id);
            self.reconcile_zygotes();
        } else {
            // Resources stay held until the container is gone; the resync tries again.
            self.metrics.error("remove_container");
        }
    }

    /// Frees everything a box held; its container is gone.
    fn forget(&mut self, id: MandelboxId) {
        let Some(tracked) = self.boxes.remove(&id) else {
            return;
        };
        self.ports.release(tracked.resources.ports);
        self.ttys.release(tracked.resources.tty);
        if let Some(gpu) = tracked.resources.gpu {
            self.gpus.release(gpu);
        }
        drop(tracked.input);
        let paths = tracked.paths;
        tokio::task::spawn_blocking(move || paths.remove());
    }

    // ----- periodic work -----

    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        let connect_timeout = self.config.timeouts.connect;
        let stale: Vec<MandelboxId> = self
            .boxes
            .iter()
            .filter(|(_, tracked)| {
                matches!(tracked.phase, Phase::Connecting { .. })
                    && now.duration_since(tracked.since) > connect_timeout
            })
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            tracing::info!(mandelbox.id = %id, "client never sent json_transport; ending session");
            self.metrics.error("connect_timeout");
            self.tear_down(id, "client never connected");
        }

        if let Some(drain) = &mut self.draining
            && !drain.forced
            && now >= drain.deadline
        {
            drain.forced = true;
            let live: Vec<MandelboxId> = self.boxes.keys().copied().collect();
            tracing::warn!(
                sessions = live.len(),
                "drain deadline passed; stopping sessions"
            );
            for id in live {
                self.tear_down(id, "drain deadline");
            }
        }

        if self.zygote_backoff_until.is_some_and(|until| now >= until) {
            self.zygote_backoff_until = None;
            self.reconcile_zygotes();
        }
        if now >= self.resync_due && !self.resync_running {
            self.resync_running = true;
            self.resync_due = later(self.config.timeouts.resync_interval);
            tokio::spawn(tasks::resync(self.context()));
        }
        self.finish_drain_if_empty();
    }

    /// Repairs every difference between local state, rows and containers. Boxes that changed
    /// phase after the view's reads began are left for the next resync: the view may predate them.
    pub(super) fn on_resync(&mut self, view: ResyncView) {
        let Some(instance) = view.instance else {
            if !self
                .draining
                .as_ref()
                .is_some_and(|drain| drain.deleting_row)
            {
                self.begin_drain(true, "instance row deleted");
            }
            return;
        };
        if instance.instance.status == InstanceStatus::Draining {
            self.begin_drain(true, "instance row is DRAINING");
        }
        let assigned_rows = instance
            .mandelboxes
            .iter()
            .filter(|row| row.user_id.is_some())
            .count() as i64;
        self.total_capacity = i64::from(instance.instance.remaining_capacity) + assigned_rows;

        self.remove_untracked_containers(&view.containers);

        let running: HashMap<&str, bool> = view
            .containers
            .iter()
            .map(|container| (container.id.as_str(), container.running))
            .collect();
        let rows: HashMap<MandelboxId, &whist_types::Mandelbox> = instance
            .mandelboxes
            .iter()
            .map(|row| (row.id, row))
            .collect();
        let settled: Vec<MandelboxId> = self
            .boxes
            .iter()
            .filter(|(_, tracked)| tracked.since < view.started)
            .map(|(&id, _)| id)
            .collect();
        for id in settled {
            let Some(tracked) = self.boxes.get_mut(&id) else {
                continue;
            };
            let container_running = tracked
                .container_id
                .as_deref()
                .is_some_and(|container| running.get(container) == Some(&true));
            match (&tracked.phase, rows.get(&id)) {
                (Phase::Creating, _) => {}
                (Phase::TearingDown { .. }, _) => self.retry_tear_down(id),
                _ if !container_running => self.tear_down(id, "container not running"),
                (Phase::Retiring, _) => {}
                (_, None) => self.tear_down(id, "row deleted elsewhere"),
                (Phase::Waiting, Some(row)) => match (row.status, row.user_id.clone()) {
                    (MandelboxStatus::Allocated, _) => {
                        let row = (*row).clone();
                        self.on_allocated_row(&row);
                    }
                    // Our transition committed but its answer was lost: take the row's word.
                    (MandelboxStatus::Connecting, Some(user)) => {
                        tracked.enter(Phase::Connecting { user });
                    }
                    (MandelboxStatus::Running, Some(user)) => {
                        tracked.enter(Phase::Running { user });
                    }
                    _ => {}
                },
                _ => {}
            }
        }

        // Rows that no box of ours backs: delete them (capacity returns for assigned ones).
        for row in &instance.mandelboxes {
            if !self.boxes.contains_key(&row.id) {
                tracing::warn!(mandelbox.id = %row.id, status = %row.status, "deleting a row without a container");
                tokio::spawn(tasks::tear_down(self.context(), row.id, None));
            }
        }

        self.retire_surplus_zygotes();
        self.reconcile_zygotes();
    }

    /// Containers of this instance that nothing tracks (e.g. a crash mid-creation): removed.
    fn remove_untracked_containers(&self, containers: &[crate::runtime::ContainerInfo]) {
        for container in containers {
            let tracked = container
                .labels
                .get(labels::MANDELBOX_ID)
                .and_then(|id| id.parse::<MandelboxId>().ok())
                .is_some_and(|id| self.boxes.contains_key(&id));
            if tracked {
                continue;
            }
            tracing::warn!(container.id = %container.id, "removing an untracked container");
            let runtime = self.runtime.clone();
            let id = container.id.clone();
            let grace = self.config.timeouts.stop_grace;
            tokio::spawn(async move {
                if let Err(error) = runtime.remove(&id, grace).await {
                    tracing::warn!(container.id = %id, %error, "remove untracked container");
                }
            });
        }
    }

    /// More zygotes than free capacity (capacity was lowered): the surplus leaves.
    fn retire_surplus_zygotes(&mut self) {
        let target = self.zygote_target();
        let waiting: Vec<MandelboxId> = self
            .boxes
            .iter()
            .filter(|(_, tracked)| matches!(tracked.phase, Phase::Waiting))
            .map(|(&id, _)| id)
            .collect();
        let creating = self
            .boxes
            .values()
            .filter(|tracked| matches!(tracked.phase, Phase::Creating))
            .count() as i64;
        let surplus = (waiting.len() as i64 + creating - target).max(0) as usize;
        for id in waiting.into_iter().take(surplus) {
            self.retire(id);
        }
    }

    // ----- drain -----

    pub(super) fn begin_drain(&mut self, requested_by_fleet: bool, reason: &'static str) {
        if self.draining.is_some() {
            return;
        }
        tracing::info!(reason, "draining");
        self.draining = Some(Drain {
            deadline: later(self.config.timeouts.drain_deadline),
            forced: false,
            requested_by_fleet,
            deleting_row: false,
        });
        if !requested_by_fleet {
            tokio::spawn(tasks::mark_draining(self.context()));
        }
        let zygotes: Vec<MandelboxId> = self
            .boxes
            .iter()
            .filter(|(_, tracked)| matches!(tracked.phase, Phase::Waiting))
            .map(|(&id, _)| id)
            .collect();
        for id in zygotes {
            self.retire(id);
        }
        self.finish_drain_if_empty();
    }

    pub(super) fn finish_drain_if_empty(&mut self) {
        let Some(drain) = &mut self.draining else {
            return;
        };
        if drain.deleting_row || !self.boxes.is_empty() {
            return;
        }
        drain.deleting_row = true;
        tracing::info!("no mandelboxes left; deleting the instance row");
        tokio::spawn(tasks::delete_instance(self.context()));
    }

    pub(super) fn on_instance_deleted(&mut self, result: Result<(), String>) {
        let row_deleted = match result {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, "delete instance row");
                false
            }
        };
        let Some(drain) = &self.draining else {
            return;
        };
        self.finished = Some(DrainReport {
            forced: drain.forced,
            row_deleted,
            requested_by_fleet: drain.requested_by_fleet,
        });
    }

    pub(super) fn adopt(&mut self, adopted: adopt::Adopted) {
        let phase = match (&adopted.status, adopted.user.clone()) {
            (MandelboxStatus::Running, Some(user)) => Phase::Running { user },
            (MandelboxStatus::Connecting, Some(user)) => Phase::Connecting { user },
            // ALLOCATED rows are accepted when the live query first shows them.
            _ => Phase::Waiting,
        };
        tracing::info!(mandelbox.id = %adopted.id, phase = phase.name(), "adopted mandelbox");
        self.boxes.insert(
            adopted.id,
            Tracked::new(
                phase,
                Some(adopted.container_id),
                adopted.resources,
                adopted.aes_key,
                adopted.paths,
            ),
        );
    }
}

impl Tracked {
    pub(super) fn new(
        phase: Phase,
        container_id: Option<String>,
        resources: BoxResources,
        aes_key: String,
        paths: BoxPaths,
    ) -> Self {
        Self {
            phase,
            since: Instant::now(),
            container_id,
            resources,
            input: None,
            aes_key,
            paths,
            held_user: false,
            teardown_running: false,
            ended: CancellationToken::new(),
        }
    }
}
