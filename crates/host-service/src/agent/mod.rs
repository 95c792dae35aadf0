//! The agent: one task that owns every mandelbox on this host and every resource they hold.
//!
//! It reacts to five sources in one `select!`: commands from the HTTP layer, reports of the tasks
//! it started, the live query of this instance's mandelbox rows, the live query of its instance
//! row, and Docker's container events. A periodic resync compares rows, containers and local state
//! and repairs any difference, so a missed event delays convergence but never breaks it.
//!
//! Each mandelbox moves through [`Phase`]s; all transitions are in this file. Slow work (Docker,
//! database, waiting for a box) runs in [`tasks`] and comes back as a [`tasks::Done`].

pub mod adopt;
mod events;
pub(crate) mod tasks;
pub mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use whist_dbclient::{HasuraClient, LiveOptions, Snapshot, Subscription, live};
use whist_types::{Instance, InstanceStatus, Mandelbox, MandelboxId, MandelboxStatus};

use self::events::DockerEvents;
use self::tasks::{Context, Done, InputDevices, ResyncView, ZygotePlan};
use self::transport::{SessionReady, TransportError, TransportRequest};
use crate::config::Config;
use crate::mandelbox::files::StartParams;
use crate::mandelbox::spec::{BoxResources, HostFeatures};
use crate::mandelbox::{self, BoxPaths, labels};
use crate::metrics::Metrics;
use crate::resources::gpus::GpuSlots;
use crate::resources::ports::PortAllocator;
use crate::resources::ttys::TtyAllocator;
use crate::runtime::{ContainerEvent, ContainerRuntime};

/// Where one mandelbox is in its life, as this host sees it.
#[derive(Debug)]
enum Phase {
    /// Phase A is running: container and row are being made.
    Creating,
    /// A zygote: running, row WAITING, nobody assigned.
    Waiting,
    /// A `json_transport` arrived while the box looked unassigned; its row is being read.
    Checking { pending: TransportRequest },
    /// The row was ALLOCATED; it is being moved to CONNECTING.
    Accepting {
        user: String,
        pending: Option<TransportRequest>,
    },
    /// Row CONNECTING: waiting for the client's `json_transport`.
    Connecting { user: String },
    /// The client's configuration is in; waiting for the box to be ready.
    Delivering { user: String },
    /// A live session.
    Running { user: String },
    /// A zygote leaving: its WAITING row is being deleted (unless a claim wins).
    Retiring,
    /// Container being stopped and removed, row deleted.
    TearingDown { reason: &'static str },
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Waiting => "waiting",
            Self::Checking { .. } => "checking",
            Self::Accepting { .. } => "accepting",
            Self::Connecting { .. } => "connecting",
            Self::Delivering { .. } => "delivering",
            Self::Running { .. } => "running",
            Self::Retiring => "retiring",
            Self::TearingDown { .. } => "tearing_down",
        }
    }

    /// Whether a user holds this box (its row carries a user, so it counts against capacity).
    fn assigned(&self) -> bool {
        matches!(
            self,
            Self::Accepting { .. }
                | Self::Connecting { .. }
                | Self::Delivering { .. }
                | Self::Running { .. }
        )
    }
}

/// One mandelbox and everything it holds.
#[derive(Debug)]
struct Tracked {
    phase: Phase,
    since: Instant,
    container_id: Option<String>,
    resources: BoxResources,
    input: Option<InputDevices>,
    aes_key: String,
    paths: BoxPaths,
    /// Whether the row had a user when teardown began (for the zygote target).
    held_user: bool,
}

impl Tracked {
    fn enter(&mut self, phase: Phase) {
        tracing::debug!(
            from = self.phase.name(),
            to = phase.name(),
            "mandelbox phase"
        );
        self.phase = phase;
        self.since = Instant::now();
    }
}

/// What the rest of the service can see of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentStatus {
    pub draining: bool,
    pub mandelboxes_live: bool,
    pub instance_live: bool,
    pub docker_events_live: bool,
    /// Consecutive zygote failures; above a few the host cannot make sessions.
    pub zygote_failures: u32,
}

impl AgentStatus {
    pub fn ready(&self) -> bool {
        !self.draining
            && self.mandelboxes_live
            && self.instance_live
            && self.docker_events_live
            && self.zygote_failures < 3
    }
}

/// How the agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Live sessions were stopped because the drain deadline passed.
    pub forced: bool,
    /// The instance row was deleted.
    pub row_deleted: bool,
    /// The drain was asked for by the fleet (row DRAINING or gone), not by a local signal.
    pub requested_by_fleet: bool,
}

/// Messages from the HTTP layer.
#[derive(Debug)]
pub enum Command {
    Transport(TransportRequest),
}

/// A cloneable handle to the agent.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<AgentStatus>,
}

impl AgentHandle {
    /// Hands a `json_transport` to the agent; the reply comes through the request's channel.
    pub async fn transport(&self, request: TransportRequest) {
        if let Err(mpsc::error::SendError(Command::Transport(request))) =
            self.commands.send(Command::Transport(request)).await
        {
            request.answer(Err(TransportError::Draining));
        }
    }

    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }
}

/// Everything the agent starts with.
#[derive(Debug)]
pub struct AgentParts {
    pub config: Arc<Config>,
    pub instance: Instance,
    pub db: HasuraClient,
    pub runtime: Arc<dyn ContainerRuntime>,
    pub features: HostFeatures,
    pub ports: PortAllocator,
    pub ttys: TtyAllocator,
    pub gpus: GpuSlots,
    pub metrics: Arc<Metrics>,
    /// Boxes that survived a restart of the service (see [`adopt`]).
    pub adopted: Vec<adopt::Adopted>,
    /// The fleet already asked this host to drain (its row was DRAINING at registration).
    pub draining: bool,
    pub live_options: LiveOptions,
}

pub fn spawn(
    parts: AgentParts,
    shutdown: CancellationToken,
) -> (AgentHandle, tokio::task::JoinHandle<DrainReport>) {
    let (commands, command_rx) = mpsc::channel(256);
    let (status_tx, status) = watch::channel(AgentStatus::default());
    let agent = Agent::new(parts, command_rx, status_tx);
    let join = tokio::spawn(agent.run(shutdown));
    (AgentHandle { commands, status }, join)
}

struct Agent {
    config: Arc<Config>,
    instance_id: String,
    db: HasuraClient,
    runtime: Arc<dyn ContainerRuntime>,
    features: HostFeatures,
    ports: PortAllocator,
    ttys: TtyAllocator,
    gpus: GpuSlots,
    metrics: Arc<Metrics>,
    live_options: LiveOptions,

    boxes: HashMap<MandelboxId, Tracked>,
    /// Sessions this instance can hold: its remaining capacity plus the boxes assigned on it.
    /// The zygote target is this minus the boxes assigned now.
    total_capacity: i64,

    commands: mpsc::Receiver<Command>,
    done_tx: mpsc::UnboundedSender<Done>,
    done: mpsc::UnboundedReceiver<Done>,
    status: watch::Sender<AgentStatus>,
    tasks_stopped: CancellationToken,

    draining: Option<Drain>,
    zygote_backoff_until: Option<Instant>,
    resync_due: Instant,
    resync_running: bool,
    finished: Option<DrainReport>,
}

#[derive(Debug)]
struct Drain {
    deadline: Instant,
    forced: bool,
    requested_by_fleet: bool,
    deleting_row: bool,
}

impl Agent {
    fn new(
        parts: AgentParts,
        commands: mpsc::Receiver<Command>,
        status: watch::Sender<AgentStatus>,
    ) -> Self {
        let (done_tx, done) = mpsc::unbounded_channel();
        let assigned = parts
            .adopted
            .iter()
            .filter(|adopted| adopted.user.is_some())
            .count() as i64;
        let mut agent = Self {
            instance_id: parts.instance.id.clone(),
            total_capacity: i64::from(parts.instance.remaining_capacity) + assigned,
            config: parts.config,
            db: parts.db,
            runtime: parts.runtime,
            features: parts.features,
            ports: parts.ports,
            ttys: parts.ttys,
            gpus: parts.gpus,
            metrics: parts.metrics,
            live_options: parts.live_options,
            boxes: HashMap::new(),
            commands,
            done_tx,
            done,
            status,
            tasks_stopped: CancellationToken::new(),
            draining: None,
            zygote_backoff_until: None,
            resync_due: Instant::now(),
            resync_running: false,
            finished: None,
        };
        for adopted in parts.adopted {
            agent.adopt(adopted);
        }
        if parts.draining {
            agent.begin_drain(true, "instance was DRAINING at registration");
        }
        agent
    }

    fn context(&self) -> Context {
        Context {
            db: self.db.clone(),
            runtime: self.runtime.clone(),
            instance_id: self.instance_id.clone(),
            done: self.done_tx.clone(),
            stop_grace: self.config.timeouts.stop_grace,
            stopped: self.tasks_stopped.clone(),
        }
    }

    async fn run(mut self, shutdown: CancellationToken) -> DrainReport {
        let mut mandelbox_rows = self.db.subscribe_with(
            live::queries::mandelboxes_on_instance(&self.instance_id),
            self.live_options.clone(),
        );
        let mut instance_rows = self.db.subscribe_with(
            live::queries::instance(&self.instance_id),
            self.live_options.clone(),
        );
        let mut events = DockerEvents::new(self.runtime.clone(), self.instance_id.clone());
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown_seen = false;

        self.reconcile_zygotes();
        while self.finished.is_none() {
            tokio::select! {
                () = shutdown.cancelled(), if !shutdown_seen => {
                    shutdown_seen = true;
                    self.begin_drain(false, "shutdown requested");
                }
                Some(command) = self.commands.recv() => self.on_command(command),
                Some(done) = self.done.recv() => self.on_done(done),
                Some(snapshot) = mandelbox_rows.next() => self.on_mandelbox_rows(&snapshot),
                Some(snapshot) = instance_rows.next() => self.on_instance_rows(&snapshot),
                event = events.next() => match event {
                    Ok(event) => self.on_container_event(&event),
                    Err(error) => {
                        tracing::warn!(%error, "docker event stream broke; reopening");
                        // Events may have been missed while it was down.
                        self.resync_due = Instant::now();
                    }
                },
                _ = tick.tick() => self.on_tick(),
            }
            self.publish_status(&mandelbox_rows, &instance_rows, events.live);
        }
        self.tasks_stopped.cancel();
        self.finished
            .take()
            .expect("the loop ends only when finished")
    }

    fn publish_status(
        &self,
        mandelbox_rows: &Subscription<Mandelbox>,
        instance_rows: &Subscription<Instance>,
        docker_events_live: bool,
    ) {
        let status = AgentStatus {
            draining: self.draining.is_some(),
            mandelboxes_live: mandelbox_rows.state() == whist_dbclient::ConnectionState::Live,
            instance_live: instance_rows.state() == whist_dbclient::ConnectionState::Live,
            docker_events_live,
            zygote_failures: self.metrics.consecutive_zygote_failures(),
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for tracked in self.boxes.values() {
            *counts.entry(tracked.phase.name()).or_default() += 1;
        }
        self.metrics.set_mandelboxes(&counts);
    }

    // ----- commands -----

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Transport(request) => self.on_transport(request),
        }
    }

    fn on_transport(&mut self, request: TransportRequest) {
        let id = request.id;
        let Some(tracked) = self.boxes.get_mut(&id) else {
            request.answer(Err(TransportError::UnknownMandelbox));
            return;
        };
        match std::mem::replace(&mut tracked.phase, Phase::Creating) {
            Phase::Waiting => {
                // The live query has not shown the assignment yet: ask the database directly.
                tracked.phase = Phase::Checking { pending: request };
                tokio::spawn(tasks::check_row(self.context(), id));
            }
            Phase::Accepting { user, pending } => {
                let pending = match pending {
                    Some(earlier) => {
                        request.answer(Err(TransportError::Repeated));
                        Some(earlier)
                    }
                    None if !request.may_use(&user) => {
                        request.answer(Err(TransportError::NotYours));
                        None
                    }
                    None => Some(request),
                };
                tracked.phase = Phase::Accepting { user, pending };
            }
            Phase::Connecting { user } => {
                if request.may_use(&user) {
                    tracked.phase = Phase::Connecting { user };
                    self.start_delivery(request);
                } else {
                    request.answer(Err(TransportError::NotYours));
                    tracked.phase = Phase::Connecting { user };
                }
            }
            phase @ (Phase::Delivering { .. } | Phase::Running { .. } | Phase::Checking { .. }) => {
                let owner = match &phase {
                    Phase::Delivering { user } | Phase::Running { user } => Some(user.as_str()),
                    _ => None,
                };
                let error = match owner {
                    Some(user) if !request.may_use(user) => TransportError::NotYours,
                    _ => TransportError::Repeated,
                };
                request.answer(Err(error));
                tracked.phase = phase;
            }
            phase @ (Phase::Creating | Phase::Retiring | Phase::TearingDown { .. }) => {
                request.answer(Err(TransportError::UnknownMandelbox));
                tracked.phase = phase;
            }
        }
    }

    fn start_delivery(&mut self, request: TransportRequest) {
        let id = request.id;
        let context = self.context();
        let Some(tracked) = self.boxes.get_mut(&id) else {
            request.answer(Err(TransportError::UnknownMandelbox));
            return;
        };
        let Phase::Connecting { user } = &tracked.phase else {
            request.answer(Err(TransportError::Repeated));
            return;
        };
        let user = user.clone();
        tracked.enter(Phase::Delivering { user });
        let ready = SessionReady {
            ports: tracked.resources.ports,
            aes_key: tracked.aes_key.clone(),
        };
        tokio::spawn(tasks::deliver(
            context,
            request,
            tracked.paths.resources.clone(),
            self.config.timeouts.ready,
            ready,
        ));
    }

    // ----- task reports -----

    fn on_done(&mut self, done: Done) {
        match done {
            Done::ZygoteStarted {
                id,
                container_id,
                input,
                took,
            } => {
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
            Done::ZygoteFailed { id, error } => {
                let failures = self.metrics.zygote_failed();
                tracing::error!(mandelbox.id = %id, %error, failures, "zygote failed");
                let keep_resources = error.contains("is still present");
                if keep_resources {
                    // Its container could not be removed: resync removes it, then frees.
                    if let Some(tracked) = self.boxes.get_mut(&id) {
                        tracked.enter(Phase::TearingDown {
                            reason: "zygote failed",
                        });
                    }
                } else {
                    self.forget(id);
                }
                let backoff = Duration::from_secs(1 << failures.min(6));
                self.zygote_backoff_until = Some(Instant::now() + backoff);
            }
            Done::Accepted { id, row } => self.on_accepted(id, row),
            Done::RowChecked { id, row } => self.on_row_checked(id, row),
            Done::Delivered { id, ok } => {
                let Some(tracked) = self.boxes.get_mut(&id) else {
                    return;
                };
                if !matches!(tracked.phase, Phase::Delivering { .. }) {
                    return;
                }
                if ok {
                    let Phase::Delivering { user } =
                        std::mem::replace(&mut tracked.phase, Phase::Creating)
                    else {
                        unreachable!("checked above");
                    };
                    self.metrics.session_ready(tracked.since.elapsed());
                    tracked.enter(Phase::Running { user });
                    tracing::info!(mandelbox.id = %id, "session running");
                } else {
                    self.tear_down(id, "session did not become ready");
                }
            }
            Done::Retired { id, deleted } => {
                if deleted {
                    self.tear_down(id, "zygote retired");
                } else if let Some(tracked) = self.boxes.get_mut(&id)
                    && matches!(tracked.phase, Phase::Retiring)
                {
                    // A claim won the race: the live query will show the ALLOCATED row.
                    tracked.enter(Phase::Waiting);
                    self.resync_due = Instant::now();
                }
            }
            Done::TornDown {
                id,
                removed,
                row_deleted,
            } => {
                if !row_deleted {
                    self.metrics.error("delete_row");
                }
                if removed {
                    self.forget(id);
                    self.reconcile_zygotes();
                } else {
                    self.metrics.error("remove_container");
                    // The resync retries the removal; resources stay held until it succeeds.
                }
            }
            Done::Resynced(view) => {
                self.resync_running = false;
                match *view {
                    Ok(view) => self.on_resync(view),
                    Err(error) => {
                        self.metrics.error("resync");
                        tracing::warn!(%error, "resync failed");
                    }
                }
            }
            Done::InstanceDeleted(result) => {
                let row_deleted = match result {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::error!(%error, "delete instance row");
                        false
                    }
                };
                let drain = self
                    .draining
                    .as_ref()
                    .expect("the row is deleted only when draining");
                self.finished = Some(DrainReport {
                    forced: drain.forced,
                    row_deleted,
                    requested_by_fleet: drain.requested_by_fleet,
                });
            }
        }
    }

    fn on_accepted(&mut self, id: MandelboxId, row: Option<Mandelbox>) {
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        let Phase::Accepting { user, pending } =
            std::mem::replace(&mut tracked.phase, Phase::Creating)
        else {
            // Torn down meanwhile; the phase is already right.
            tracked.phase = Phase::TearingDown {
                reason: "ended while accepting",
            };
            return;
        };
        match row {
            Some(_) => {
                tracked.enter(Phase::Connecting { user });
                tracing::info!(mandelbox.id = %id, "session connecting");
                if let Some(request) = pending {
                    self.start_delivery(request);
                }
            }
            None => {
                // The row was not ALLOCATED any more; the next resync says what it is.
                tracked.enter(Phase::Waiting);
                if let Some(request) = pending {
                    request.answer(Err(TransportError::UnknownMandelbox));
                }
                self.resync_due = Instant::now();
            }
        }
    }

    fn on_row_checked(&mut self, id: MandelboxId, row: Option<Mandelbox>) {
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        if !matches!(tracked.phase, Phase::Checking { .. }) {
            // The live query got there first and the request moved with the box.
            return;
        }
        let Phase::Checking { pending } = std::mem::replace(&mut tracked.phase, Phase::Waiting)
        else {
            unreachable!("checked above");
        };
        match row {
            Some(row) if row.status == MandelboxStatus::Allocated => {
                self.accept(id, &row, Some(pending));
            }
            Some(row) if row.status == MandelboxStatus::Waiting => {
                pending.answer(Err(TransportError::NotYours));
            }
            _ => pending.answer(Err(TransportError::UnknownMandelbox)),
        }
    }

    // ----- live queries and events -----

    fn on_mandelbox_rows(&mut self, snapshot: &Snapshot<Mandelbox>) {
        for row in snapshot.added.iter().chain(&snapshot.changed) {
            if row.status == MandelboxStatus::Allocated {
                self.on_allocated_row(row);
            }
        }
        for row in &snapshot.removed {
            let Some(tracked) = self.boxes.get(&row.id) else {
                continue;
            };
            if matches!(
                tracked.phase,
                Phase::Waiting
                    | Phase::Connecting { .. }
                    | Phase::Delivering { .. }
                    | Phase::Running { .. }
            ) {
                // Someone else deleted the row (e.g. the fleet reaping it): the box must go too.
                self.tear_down(row.id, "row deleted elsewhere");
            }
        }
    }

    fn on_allocated_row(&mut self, row: &Mandelbox) {
        let Some(tracked) = self.boxes.get_mut(&row.id) else {
            return;
        };
        match std::mem::replace(&mut tracked.phase, Phase::Creating) {
            Phase::Waiting | Phase::Retiring => self.accept(row.id, row, None),
            Phase::Checking { pending } => self.accept(row.id, row, Some(pending)),
            other => tracked.phase = other,
        }
    }

    /// An ALLOCATED row for a box of ours: move it to CONNECTING.
    fn accept(&mut self, id: MandelboxId, row: &Mandelbox, pending: Option<TransportRequest>) {
        let context = self.context();
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        let user = row.user_id.clone().unwrap_or_default();
        let pending = match pending {
            Some(request) if !request.may_use(&user) => {
                request.answer(Err(TransportError::NotYours));
                None
            }
            other => other,
        };
        tracked.enter(Phase::Accepting { user, pending });
        tokio::spawn(tasks::accept_allocation(context, id, tracked.paths.clone()));
        // A zygote became a session: replace it.
        self.reconcile_zygotes();
    }

    fn on_instance_rows(&mut self, snapshot: &Snapshot<Instance>) {
        match snapshot.rows.iter().find(|row| row.id == self.instance_id) {
            Some(row) if row.status == InstanceStatus::Draining => {
                self.begin_drain(true, "instance row is DRAINING");
            }
            Some(_) => {}
            None => {
                if self
                    .draining
                    .as_ref()
                    .is_some_and(|drain| drain.deleting_row)
                {
                    return;
                }
                tracing::warn!("instance row is gone; draining");
                self.begin_drain(true, "instance row deleted");
            }
        }
    }

    fn on_container_event(&mut self, event: &ContainerEvent) {
        let container = event.container_id();
        let Some((&id, tracked)) = self
            .boxes
            .iter()
            .find(|(_, tracked)| tracked.container_id.as_deref() == Some(container))
        else {
            return;
        };
        if matches!(tracked.phase, Phase::TearingDown { .. }) {
            return;
        }
        if let ContainerEvent::Died { exit_code, .. } = event {
            tracing::info!(mandelbox.id = %id, ?exit_code, phase = tracked.phase.name(), "container exited");
        }
        self.tear_down(id, "container exited");
    }

    // ----- periodic work -----

    fn on_tick(&mut self) {
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
            let live: Vec<MandelboxId> = self
                .boxes
                .iter()
                .filter(|(_, tracked)| !matches!(tracked.phase, Phase::TearingDown { .. }))
                .map(|(&id, _)| id)
                .collect();
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
            self.resync_due = now + self.config.timeouts.resync_interval;
            tokio::spawn(tasks::resync(self.context()));
        }
        self.finish_drain_if_empty();
    }

    fn on_resync(&mut self, view: ResyncView) {
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

        // Containers of ours that nothing tracks: leaked (e.g. a crash mid-creation). Remove.
        for container in &view.containers {
            let tracked = container
                .labels
                .get(labels::MANDELBOX_ID)
                .and_then(|id| id.parse::<MandelboxId>().ok())
                .is_some_and(|id| self.boxes.contains_key(&id));
            if !tracked {
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

        // Boxes whose container died or vanished without an event reaching us.
        let running: HashMap<&str, bool> = view
            .containers
            .iter()
            .map(|container| (container.id.as_str(), container.running))
            .collect();
        let vanished: Vec<MandelboxId> = self
            .boxes
            .iter()
            .filter(|(_, tracked)| {
                // A box that changed phase after the reads began may be newer than the view.
                tracked.since < view.started
                    && !matches!(tracked.phase, Phase::Creating)
                    && tracked
                        .container_id
                        .as_deref()
                        .is_some_and(|container| running.get(container) != Some(&true))
            })
            .map(|(&id, _)| id)
            .collect();
        for id in vanished {
            if let Some(tracked) = self.boxes.get_mut(&id)
                && matches!(tracked.phase, Phase::TearingDown { .. })
            {
                // A teardown whose removal failed: try again.
                let container_id = tracked.container_id.clone();
                tokio::spawn(tasks::tear_down(self.context(), id, container_id));
                continue;
            }
            self.tear_down(id, "container not running");
        }

        // Rows that no box of ours backs: delete them (capacity returns for assigned ones).
        for row in &instance.mandelboxes {
            match self.boxes.get(&row.id) {
                None => {
                    tracing::warn!(mandelbox.id = %row.id, status = %row.status, "deleting a row without a container");
                    tokio::spawn(tasks::tear_down(self.context(), row.id, None));
                }
                Some(tracked) => {
                    if row.status == MandelboxStatus::Allocated
                        && matches!(tracked.phase, Phase::Waiting)
                    {
                        self.on_allocated_row(row);
                    }
                }
            }
        }

        // More zygotes than free capacity (capacity was lowered): retire the surplus.
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
        self.reconcile_zygotes();
    }

    // ----- zygotes -----

    /// Free sessions this host should hold ready: its capacity minus what users hold now.
    fn zygote_target(&self) -> i64 {
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

    fn reconcile_zygotes(&mut self) {
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
            Tracked {
                phase: Phase::Creating,
                since: Instant::now(),
                container_id: None,
                resources,
                input: None,
                aes_key,
                paths,
                held_user: false,
            },
        );
        tokio::spawn(tasks::start_zygote(self.context(), plan));
        Ok(())
    }

    fn retire(&mut self, id: MandelboxId) {
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        if !matches!(tracked.phase, Phase::Waiting) {
            return;
        }
        tracked.enter(Phase::Retiring);
        tokio::spawn(tasks::retire_zygote(self.context(), id));
    }

    // ----- endings -----

    fn tear_down(&mut self, id: MandelboxId, reason: &'static str) {
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        match std::mem::replace(&mut tracked.phase, Phase::TearingDown { reason }) {
            Phase::TearingDown { reason } => {
                tracked.phase = Phase::TearingDown { reason };
                return;
            }
            Phase::Creating => {
                // Phase A reports first; its container is removed when it does.
                tracked.phase = Phase::Creating;
                return;
            }
            Phase::Checking { pending } => pending.answer(Err(TransportError::Gone)),
            Phase::Accepting {
                pending: Some(pending),
                ..
            } => pending.answer(Err(TransportError::Gone)),
            old => tracked.held_user = old.assigned(),
        }
        tracked.since = Instant::now();
        tracing::info!(mandelbox.id = %id, reason, "ending mandelbox");
        let container_id = tracked.container_id.clone();
        tokio::spawn(tasks::tear_down(self.context(), id, container_id));
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

    fn begin_drain(&mut self, requested_by_fleet: bool, reason: &'static str) {
        if self.draining.is_some() {
            return;
        }
        tracing::info!(reason, "draining");
        self.draining = Some(Drain {
            deadline: Instant::now() + self.config.timeouts.drain_deadline,
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

    fn finish_drain_if_empty(&mut self) {
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

    fn adopt(&mut self, adopted: adopt::Adopted) {
        let phase = match (&adopted.status, adopted.user.clone()) {
            (MandelboxStatus::Running, Some(user)) => Phase::Running { user },
            (MandelboxStatus::Connecting, Some(user)) => Phase::Connecting { user },
            // ALLOCATED rows are accepted when the live query first shows them.
            _ => Phase::Waiting,
        };
        tracing::info!(mandelbox.id = %adopted.id, phase = phase.name(), "adopted mandelbox");
        self.boxes.insert(
            adopted.id,
            Tracked {
                phase,
                since: Instant::now(),
                container_id: Some(adopted.container_id),
                resources: adopted.resources,
                input: None,
                aes_key: adopted.aes_key,
                paths: adopted.paths,
                held_user: false,
            },
        );
    }
}
