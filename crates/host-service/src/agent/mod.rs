//! The agent: one task that owns every mandelbox on this host and every resource they hold.
//!
//! It reacts to five sources in one `select!`: commands from the HTTP layer, reports of the tasks
//! it started, the live query of this instance's mandelbox rows, the live query of its instance
//! row, and Docker's container events. A periodic resync compares rows, containers and local state
//! and repairs any difference, so a missed event delays convergence but never breaks it.
//!
//! Each mandelbox moves through [`Phase`]s. The transitions a session makes are in `sessions.rs`,
//! those of upkeep (zygotes, resync, teardown, drain) in `upkeep.rs`; both are `impl Agent` blocks
//! over the state defined here. Slow work (Docker, database, waiting for a box) runs in [`tasks`]
//! and comes back as a [`tasks::Done`], which `on_done` below dispatches.

pub mod adopt;
mod events;
mod sessions;
pub(crate) mod tasks;
#[cfg(test)]
mod tests;
pub mod transport;
mod upkeep;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use whist_dbclient::{HasuraClient, LiveOptions, Subscription, live};
use whist_types::{Instance, Mandelbox, MandelboxId};

use self::events::DockerEvents;
use self::tasks::{Context, Done, InputDevices};
use self::transport::{TransportError, TransportRequest};
use crate::config::Config;
use crate::mandelbox::BoxPaths;
use crate::mandelbox::spec::{BoxResources, HostFeatures};
use crate::metrics::Metrics;
use crate::resources::gpus::GpuSlots;
use crate::resources::ports::PortAllocator;
use crate::resources::ttys::TtyAllocator;
use crate::runtime::ContainerRuntime;

/// Where one mandelbox is in its life, as this host sees it.
#[derive(Debug)]
enum Phase {
    /// Phase A is running: container and row are being made.
    Creating,
    /// A zygote: running, row WAITING, nobody assigned.
    Waiting,
    /// `json_transport`s arrived while the box looked unassigned; its row is being read.
    Checking { pending: Vec<TransportRequest> },
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
    /// A teardown task is running for this box.
    teardown_running: bool,
    /// Cancelled when the box's teardown begins, so a delivery waiting on it answers at once.
    ended: CancellationToken,
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
    // The caller's span (the host's identity) follows the agent's logs.
    let join = tokio::spawn(tracing::Instrument::in_current_span(agent.run(shutdown)));
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
                // In this order: what finished is taken into account before new requests (a
                // task reports before it answers its caller, see `tasks::deliver`).
                biased;
                () = shutdown.cancelled(), if !shutdown_seen => {
                    shutdown_seen = true;
                    self.begin_drain(false, "shutdown requested");
                }
                Some(done) = self.done.recv() => self.on_done(done),
                Some(command) = self.commands.recv() => self.on_command(command),
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

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Transport(request) => self.on_transport(request),
        }
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::ZygoteStarted {
                id,
                container_id,
                input,
                took,
            } => self.on_zygote_started(id, container_id, input, took),
            Done::ZygoteFailed {
                id,
                container_id,
                error,
            } => self.on_zygote_failed(id, container_id, &error),
            Done::Accepted { id, row } => self.on_accepted(id, row),
            Done::RowChecked { id, row } => self.on_row_checked(id, row),
            Done::Delivered { id, ok } => self.on_delivered(id, ok),
            Done::ConfigRefused { id } => self.on_config_refused(id),
            Done::Retired { id, deleted } => self.on_retired(id, deleted),
            Done::TornDown {
                id,
                removed,
                row_deleted,
            } => self.on_torn_down(id, removed, row_deleted),
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
            Done::InstanceDeleted(result) => self.on_instance_deleted(result),
        }
    }
}

/// `now + duration`, saturating far in the future instead of overflowing on absurd settings.
fn later(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
