//! The slow parts of the lifecycle, run as tasks so the agent's loop never waits on Docker, the
//! database or a box. Each task reports back with one [`Done`] message.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use whist_dbclient::{DbError, HasuraClient, ops};
use whist_types::{InstanceWithMandelboxes, Mandelbox, MandelboxId, MandelboxStatus, NewMandelbox};

use super::transport::{SessionReady, TransportError, TransportRequest};
use crate::mandelbox::BoxPaths;
use crate::mandelbox::files::{self, StartParams};
use crate::mandelbox::spec::{self, BoxIdentity, BoxResources, HostFeatures};
use crate::resources::uinput::{self, UinputDevices};
use crate::runtime::{ContainerInfo, ContainerRuntime};

/// What a finished task reports to the agent.
#[derive(Debug)]
pub(crate) enum Done {
    ZygoteStarted {
        id: MandelboxId,
        container_id: String,
        input: Option<InputDevices>,
        took: Duration,
    },
    /// `container_id` is set when a container was made and could not be removed.
    ZygoteFailed {
        id: MandelboxId,
        container_id: Option<String>,
        error: String,
    },
    /// ALLOCATED → CONNECTING was attempted; `row` is the updated row when it succeeded.
    Accepted {
        id: MandelboxId,
        row: Result<Option<Mandelbox>, String>,
    },
    /// A `json_transport` arrived for a box still WAITING locally: its row as the database has
    /// it now (`None` when it is gone or unreadable).
    RowChecked {
        id: MandelboxId,
        row: Result<Option<Mandelbox>, String>,
    },
    /// The session's readiness and RUNNING write finished; the caller has its answer.
    Delivered {
        id: MandelboxId,
        ok: bool,
    },
    /// The caller's configuration could not be decoded; the box waits for a good one.
    ConfigRefused {
        id: MandelboxId,
    },
    /// The conditional delete of a zygote's WAITING row: `false` when a claim got there first.
    Retired {
        id: MandelboxId,
        deleted: bool,
    },
    /// The container is gone (`removed`) and the row deleted (`row_deleted`).
    TornDown {
        id: MandelboxId,
        removed: bool,
        row_deleted: bool,
    },
    Resynced(Box<Result<ResyncView, String>>),
    InstanceDeleted(Result<(), String>),
}

/// A box's virtual input devices and the task handing them to the box.
#[derive(Debug)]
pub(crate) struct InputDevices {
    /// Held, not read: dropping the last reference destroys the devices, which must live as long
    /// as the box.
    #[allow(dead_code)]
    pub devices: Arc<UinputDevices>,
    pub server: CancellationToken,
}

impl Drop for InputDevices {
    fn drop(&mut self) {
        self.server.cancel();
    }
}

/// A consistent view of this instance's row, its mandelbox rows and its containers.
#[derive(Debug)]
pub(crate) struct ResyncView {
    /// When the reads began: local changes after this are newer than the view.
    pub started: Instant,
    pub instance: Option<InstanceWithMandelboxes>,
    pub containers: Vec<ContainerInfo>,
}

/// What every task needs to reach the outside world.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub db: HasuraClient,
    pub runtime: Arc<dyn ContainerRuntime>,
    pub instance_id: String,
    pub done: mpsc::UnboundedSender<Done>,
    pub stop_grace: Duration,
    /// Cancelled when the agent exits; retry loops stop then.
    pub stopped: CancellationToken,
}

impl Context {
    fn report(&self, done: Done) {
        // The agent only stops listening once it exits; nothing is left to tell then.
        let _ = self.done.send(done);
    }

    /// Retries a database operation on transient errors (engine restarting) with backoff, until
    /// it succeeds, fails for good, `attempts` run out or the agent stops.
    async fn with_retries<T, F, Fut>(&self, attempts: u32, mut operation: F) -> Result<T, DbError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, DbError>>,
    {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match operation().await {
                Err(error) if error.is_transient() && attempt < attempts => {
                    tracing::debug!(%error, attempt, "database unavailable; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.stopped.cancelled() => return Err(error),
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// Everything a new zygote needs that the agent decided.
#[derive(Debug)]
pub(crate) struct ZygotePlan {
    pub id: MandelboxId,
    pub app_column: String,
    pub server_session_id: String,
    pub aes_key: String,
    pub paths: BoxPaths,
    pub resources: BoxResources,
    pub params: StartParams,
    pub uinput_path: Option<PathBuf>,
    pub config: Arc<crate::config::Config>,
    pub features: HostFeatures,
}

/// Phase A: files, input devices, container create and start, then the WAITING row. On failure
/// everything this task made is undone before it reports.
pub(crate) async fn start_zygote(context: Context, mut plan: ZygotePlan) {
    let started = Instant::now();
    let id = plan.id;
    let mut container_id = None;
    let mut input = None;
    let result = async {
        // The files go in while Docker creates the container; both must be done before start.
        let resources_dir = plan.paths.resources.clone();
        let params = plan.params;
        let logs_dir = plan.paths.logs.clone();
        let sockets_dir = plan.paths.sockets.clone();
        let files = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&logs_dir)?;
            std::fs::create_dir_all(&sockets_dir)?;
            files::write_start_params(&resources_dir, &params)
        });

        if let Some(uinput_path) = plan.uinput_path.take() {
            let devices = tokio::task::spawn_blocking(move || UinputDevices::create(&uinput_path))
                .await
                .map_err(|error| format!("create input devices: {error}"))?
                .map_err(|error| format!("create input devices: {error}"))?;
            let devices = Arc::new(devices);
            plan.resources.input_devices = devices
                .device_nodes()
                .iter()
                .map(|path| path.to_path_buf())
                .collect();
            let server = CancellationToken::new();
            tokio::spawn(serve_input_devices(
                devices.clone(),
                plan.paths.uinput_socket(),
                server.clone(),
                id,
            ));
            input = Some(InputDevices { devices, server });
        }

        let identity = BoxIdentity {
            id,
            instance_id: &context.instance_id,
            server_session_id: &plan.server_session_id,
            aes_key: &plan.aes_key,
            environment: plan.config.environment,
        };
        let spec = spec::container_spec(
            &plan.config.mandelbox,
            &plan.features,
            &identity,
            &plan.paths,
            &plan.resources,
        );
        let created = context
            .runtime
            .create(&spec)
            .await
            .map_err(|error| format!("create container: {error}"))?;
        container_id = Some(created.clone());
        files
            .await
            .map_err(|error| format!("write start parameters: {error}"))?
            .map_err(|error| format!("write start parameters: {error}"))?;
        context
            .runtime
            .start(&created)
            .await
            .map_err(|error| format!("start container: {error}"))?;
        let row = NewMandelbox::waiting(id, plan.app_column.clone(), context.instance_id.clone());
        let insert = ops::insert_mandelboxes(std::slice::from_ref(&row));
        context
            .with_retries(5, || context.db.execute(&insert))
            .await
            .map_err(|error| format!("insert WAITING row: {error}"))?;
        Ok::<_, String>(created)
    }
    .await;

    match result {
        Ok(container_id) => context.report(Done::ZygoteStarted {
            id,
            container_id,
            input,
            took: started.elapsed(),
        }),
        Err(error) => {
            if let Some(container_id) = container_id
                && let Err(remove_error) =
                    context.runtime.remove(&container_id, Duration::ZERO).await
            {
                // The resync will find and remove it; the agent keeps its resources until then.
                tracing::warn!(mandelbox.id = %id, %remove_error, "remove container of failed zygote");
                context.report(Done::ZygoteFailed {
                    id,
                    container_id: Some(container_id),
                    error,
                });
                return;
            }
            drop(input);
            plan.paths.remove();
            context.report(Done::ZygoteFailed {
                id,
                container_id: None,
                error,
            });
        }
    }
}

async fn serve_input_devices(
    devices: Arc<UinputDevices>,
    socket: PathBuf,
    cancel: CancellationToken,
    id: MandelboxId,
) {
    if let Err(error) = uinput::serve_device_fds(&devices.fds(), &socket, &cancel).await {
        tracing::warn!(mandelbox.id = %id, %error, "hand input devices to the box");
    }
}

/// Phase B, first step: the assignment the scaling-service made becomes CONNECTING.
pub(crate) async fn accept_allocation(context: Context, id: MandelboxId, paths: BoxPaths) {
    // CONNECTING is accepted as a source too, so a retry after a lost answer still succeeds.
    let operation = ops::transition_mandelbox(
        id,
        &context.instance_id,
        &[MandelboxStatus::Allocated, MandelboxStatus::Connecting],
        MandelboxStatus::Connecting,
    );
    let row = context
        .with_retries(5, || context.db.execute(&operation))
        .await
        .map_err(|error| error.to_string());
    let session_id = row
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .and_then(|row| row.session_id.clone());
    if let Some(session_id) = session_id {
        let dir = paths.resources.clone();
        let written =
            tokio::task::spawn_blocking(move || files::write_session_id(&dir, &session_id)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!(mandelbox.id = %id, "write session_id file");
        }
    }
    context.report(Done::Accepted { id, row });
}

/// Reads one mandelbox row (for a `json_transport` that arrived before the live query).
pub(crate) async fn check_row(context: Context, id: MandelboxId) {
    let read = ops::mandelbox_by_id(id);
    let row = context
        .with_retries(3, || context.db.execute(&read))
        .await
        .map(|row| row.filter(|row| row.instance_id == context.instance_id))
        .map_err(|error| error.to_string());
    context.report(Done::RowChecked { id, row });
}

/// Client configurations decoded at once on one host; a decode holds a blocking thread and up to
/// 64 MiB, so this bounds what many owners' large configurations can take together.
static DECODING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Phase B, second step: the client's config goes in, the box signals readiness, the row turns
/// RUNNING and the caller gets its ports and key.
///
/// Every exit reports to the agent before it answers the caller, and the agent takes reports
/// before new requests: a caller that retries at once (after a refused configuration, say) meets
/// the box in the phase the report put it in, never in the one before.
pub(crate) async fn deliver(
    context: Context,
    mut request: TransportRequest,
    dir: PathBuf,
    ready_timeout: Duration,
    ready: SessionReady,
    ended: CancellationToken,
) {
    let id = request.id;
    // The owner's configuration is decoded only now, off the async workers, a few at a time: a
    // decompression bomb costs its sender, not every other session on the host.
    let decoded = {
        let _permit = DECODING.acquire().await;
        let json_data = std::mem::take(&mut request.json_data);
        tokio::task::spawn_blocking(move || files::decode_client_config(&json_data)).await
    };
    let Ok(Ok(config)) = decoded else {
        context.report(Done::ConfigRefused { id });
        request.answer(Err(TransportError::BadConfig));
        return;
    };
    let written = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || files::write_client_config(&dir, &config)).await
    };
    if !matches!(written, Ok(Ok(()))) {
        context.report(Done::Delivered { id, ok: false });
        request.answer(Err(TransportError::Internal(
            "could not hand the configuration to the mandelbox".to_owned(),
        )));
        return;
    }
    let ready_in_time = tokio::select! {
        ready = files::wait_for_ready(&dir, ready_timeout) => ready,
        () = ended.cancelled() => {
            context.report(Done::Delivered { id, ok: false });
            request.answer(Err(TransportError::Gone));
            return;
        }
    };
    if !ready_in_time {
        context.report(Done::Delivered { id, ok: false });
        request.answer(Err(TransportError::NotReady(ready_timeout)));
        return;
    }
    // RUNNING is accepted as a source too, so a retry after a lost answer still succeeds.
    let operation = ops::transition_mandelbox(
        id,
        &context.instance_id,
        &[MandelboxStatus::Connecting, MandelboxStatus::Running],
        MandelboxStatus::Running,
    );
    match context
        .with_retries(5, || context.db.execute(&operation))
        .await
    {
        // The box may have ended while the row was written: never hand out its ports then.
        Ok(Some(_)) if ended.is_cancelled() => {
            context.report(Done::Delivered { id, ok: false });
            request.answer(Err(TransportError::Gone));
        }
        Ok(Some(_)) => {
            context.report(Done::Delivered { id, ok: true });
            request.answer(Ok(ready));
        }
        Ok(None) => {
            context.report(Done::Delivered { id, ok: false });
            request.answer(Err(TransportError::Gone));
        }
        Err(error) => {
            tracing::warn!(mandelbox.id = %id, %error, "mark mandelbox RUNNING");
            context.report(Done::Delivered { id, ok: false });
            request.answer(Err(TransportError::Unavailable));
        }
    }
}

/// Deletes a zygote's row only while it is still WAITING, so a claim racing the retirement wins.
pub(crate) async fn retire_zygote(context: Context, id: MandelboxId) {
    let operation = ops::delete_mandelbox_in(id, &[MandelboxStatus::Waiting]);
    let deleted = match context
        .with_retries(5, || context.db.execute(&operation))
        .await
    {
        Ok(row) => row.is_some(),
        Err(error) => {
            tracing::warn!(mandelbox.id = %id, %error, "delete WAITING row");
            false
        }
    };
    context.report(Done::Retired { id, deleted });
}

/// Ends a mandelbox: row DYING, container stopped and removed, row deleted (which returns the
/// capacity of an assigned box through the database).
pub(crate) async fn tear_down(context: Context, id: MandelboxId, container_id: Option<String>) {
    let dying = ops::transition_mandelbox(
        id,
        &context.instance_id,
        &[
            MandelboxStatus::Waiting,
            MandelboxStatus::Allocated,
            MandelboxStatus::Connecting,
            MandelboxStatus::Running,
        ],
        MandelboxStatus::Dying,
    );
    if let Err(error) = context.with_retries(3, || context.db.execute(&dying)).await {
        tracing::debug!(mandelbox.id = %id, %error, "mark mandelbox DYING");
    }
    let removed = match &container_id {
        None => true,
        Some(container_id) => {
            let mut removed = false;
            for attempt in 1..=3u64 {
                match context
                    .runtime
                    .remove(container_id, context.stop_grace)
                    .await
                {
                    Ok(()) => {
                        removed = true;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(mandelbox.id = %id, %error, attempt, "remove container");
                        tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                    }
                }
            }
            removed
        }
    };
    let delete = ops::delete_mandelbox(id);
    let row_deleted = match context
        .with_retries(30, || context.db.execute(&delete))
        .await
    {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!(mandelbox.id = %id, %error, "delete mandelbox row");
            false
        }
    };
    context.report(Done::TornDown {
        id,
        removed,
        row_deleted,
    });
}

/// Reads the instance with its mandelboxes (one consistent query) and this instance's
/// containers.
pub(crate) async fn resync(context: Context) {
    let started = Instant::now();
    let view = async {
        let read = ops::instance_with_mandelboxes(&context.instance_id);
        let instance = context
            .with_retries(3, || context.db.execute(&read))
            .await
            .map_err(|error| format!("read instance: {error}"))?;
        let containers = context
            .runtime
            .list((crate::mandelbox::labels::INSTANCE_ID, &context.instance_id))
            .await
            .map_err(|error| format!("list containers: {error}"))?;
        Ok(ResyncView {
            started,
            instance,
            containers,
        })
    }
    .await;
    context.report(Done::Resynced(Box::new(view)));
}

/// Marks this instance DRAINING (from a local decision, e.g. SIGTERM) so no more users are
/// assigned to it.
pub(crate) async fn mark_draining(context: Context) {
    let operation = ops::transition_instance(
        &context.instance_id,
        &[
            whist_types::InstanceStatus::PreConnection,
            whist_types::InstanceStatus::Active,
        ],
        whist_types::InstanceStatus::Draining,
    );
    if let Err(error) = context
        .with_retries(10, || context.db.execute(&operation))
        .await
    {
        tracing::warn!(%error, "mark instance DRAINING");
    }
}

/// The last step of a drain: this instance's row goes away, with any mandelbox row a failed
/// teardown left behind (no box of this host runs any more).
pub(crate) async fn delete_instance(context: Context) {
    let delete = ops::delete_instance_and_mandelboxes(&context.instance_id);
    let result = context
        .with_retries(20, || context.db.execute(&delete))
        .await
        .map(|_| ())
        .map_err(|error| error.to_string());
    context.report(Done::InstanceDeleted(result));
}
