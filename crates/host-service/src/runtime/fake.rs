//! An in-memory container engine behind [`ContainerRuntime`], so the agent's rare paths (a
//! failed start, a teardown that fails, a container dying under a session, a broken event
//! stream) can be made to happen on purpose, on tokio's clock, without Docker.
//!
//! It keeps the engine's rules the agent depends on, and [`super::conformance`] holds it to the
//! same cases as [`super::docker::DockerRuntime`]: names are unique; a created container is not
//! running until started; an image the engine lacks fails the create as
//! [`RuntimeError::ImageMissing`]; listing filters by label and includes stopped containers;
//! removal succeeds when the container is already gone; a removed container reports `Died`
//! (if it ran) then `Destroyed` to every event stream whose label it carries.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use super::{ContainerEvent, ContainerInfo, ContainerRuntime, ContainerSpec, RuntimeError};

/// The calls of [`ContainerRuntime`], to script failures of and to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    Create,
    Start,
    Remove,
    List,
}

/// The in-memory engine. One per test.
#[derive(Debug)]
pub struct FakeRuntime {
    state: Mutex<State>,
    /// Every event, with the labels of its container, for the streams to filter.
    events: broadcast::Sender<(BTreeMap<String, String>, ContainerEvent)>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    images: HashSet<String>,
    containers: BTreeMap<String, Container>,
    failures: HashMap<Call, VecDeque<RuntimeError>>,
    calls: HashMap<Call, usize>,
}

#[derive(Debug, Clone)]
struct Container {
    spec: ContainerSpec,
    running: bool,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            state: Mutex::new(State::default()),
            events,
        }
    }
}

impl FakeRuntime {
    /// An engine that has `images` (any other image is missing).
    pub fn with_images<I: IntoIterator<Item = S>, S: Into<String>>(images: I) -> Self {
        let runtime = Self::default();
        runtime
            .lock()
            .images
            .extend(images.into_iter().map(Into::into));
        runtime
    }

    /// The next call of this kind fails with `error` (queued: several make several calls fail).
    pub fn fail_next(&self, call: Call, error: RuntimeError) {
        self.lock()
            .failures
            .entry(call)
            .or_default()
            .push_back(error);
    }

    /// How many times `call` was made (failed ones included).
    pub fn calls(&self, call: Call) -> usize {
        self.lock().calls.get(&call).copied().unwrap_or(0)
    }

    /// The containers that exist now, by id, with whether each runs.
    pub fn containers(&self) -> BTreeMap<String, (ContainerSpec, bool)> {
        self.lock()
            .containers
            .iter()
            .map(|(id, container)| (id.clone(), (container.spec.clone(), container.running)))
            .collect()
    }

    /// The container's process exits by itself (a crash, or the session ending inside it).
    pub fn exit(&self, id: &str, exit_code: i64) {
        let mut state = self.lock();
        if let Some(container) = state.containers.get_mut(id)
            && container.running
        {
            container.running = false;
            let labels = container.spec.labels.clone();
            drop(state);
            self.emit(
                labels,
                ContainerEvent::Died {
                    id: id.to_owned(),
                    exit_code: Some(exit_code),
                },
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the call and takes its scripted failure, if one is queued.
    fn begin(&self, call: Call) -> Result<MutexGuard<'_, State>, RuntimeError> {
        let mut state = self.lock();
        *state.calls.entry(call).or_default() += 1;
        match state.failures.get_mut(&call).and_then(VecDeque::pop_front) {
            Some(error) => Err(error),
            None => Ok(state),
        }
    }

    fn emit(&self, labels: BTreeMap<String, String>, event: ContainerEvent) {
        // No stream open is not an error: the engine does not keep events for late listeners.
        let _ = self.events.send((labels, event));
    }
}

fn refused(operation: &'static str, target: &str, message: &str) -> RuntimeError {
    RuntimeError::Refused {
        operation,
        target: target.to_owned(),
        message: message.to_owned(),
    }
}

impl ContainerRuntime for FakeRuntime {
    fn create(&self, spec: &ContainerSpec) -> BoxFuture<'_, Result<String, RuntimeError>> {
        let spec = spec.clone();
        Box::pin(async move {
            let mut state = self.begin(Call::Create)?;
            if !state.images.contains(&spec.image) {
                return Err(RuntimeError::ImageMissing(spec.image));
            }
            if state.containers.values().any(|c| c.spec.name == spec.name) {
                return Err(refused("create", &spec.name, "the name is in use"));
            }
            state.next_id += 1;
            let id = format!("{:064x}", state.next_id);
            state.containers.insert(
                id.clone(),
                Container {
                    spec,
                    running: false,
                },
            );
            Ok(id)
        })
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let mut state = self.begin(Call::Start)?;
            match state.containers.get_mut(id) {
                Some(container) => {
                    container.running = true;
                    Ok(())
                }
                None => Err(refused("start", id, "no such container")),
            }
        })
    }

    fn remove<'a>(
        &'a self,
        id: &'a str,
        _grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let mut state = self.begin(Call::Remove)?;
            let Some(container) = state.containers.remove(id) else {
                return Ok(());
            };
            drop(state);
            let labels = container.spec.labels;
            if container.running {
                self.emit(
                    labels.clone(),
                    ContainerEvent::Died {
                        id: id.to_owned(),
                        // Stopped by a signal, as a stop does.
                        exit_code: Some(137),
                    },
                );
            }
            self.emit(labels, ContainerEvent::Destroyed { id: id.to_owned() });
            Ok(())
        })
    }

    fn list<'a>(
        &'a self,
        label: (&'a str, &'a str),
    ) -> BoxFuture<'a, Result<Vec<ContainerInfo>, RuntimeError>> {
        Box::pin(async move {
            let state = self.begin(Call::List)?;
            Ok(state
                .containers
                .iter()
                .filter(|(_, c)| c.spec.labels.get(label.0).map(String::as_str) == Some(label.1))
                .map(|(id, c)| ContainerInfo {
                    id: id.clone(),
                    labels: c.spec.labels.clone(),
                    running: c.running,
                    env: c.spec.env.clone(),
                })
                .collect())
        })
    }

    fn events(
        &self,
        label: (&str, &str),
    ) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
        let (key, value) = (label.0.to_owned(), label.1.to_owned());
        let receiver = self.events.subscribe();
        futures::stream::unfold(receiver, move |mut receiver| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                loop {
                    match receiver.recv().await {
                        Ok((labels, event)) if labels.get(&key) == Some(&value) => {
                            return Some((Ok(event), receiver));
                        }
                        Ok(_) => {}
                        // A listener that fell behind lost events, as a broken engine stream
                        // does; the agent reopens it and resyncs.
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            let error = RuntimeError::Refused {
                                operation: "events",
                                target: "stream".to_owned(),
                                message: format!("{missed} events were missed"),
                            };
                            return Some((Err(error), receiver));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn behaves_like_the_docker_runtime() {
        let runtime = FakeRuntime::with_images([conformance::IMAGE]);
        conformance::all(&runtime, conformance::IMAGE).await;
    }

    #[tokio::test(start_paused = true)]
    async fn exits_and_scripted_failures() {
        let runtime = FakeRuntime::with_images([conformance::IMAGE]);
        let spec = conformance::spec("exits", conformance::IMAGE);
        let mut events = runtime.events(conformance::label(&spec));
        let id = runtime.create(&spec).await.expect("create");
        runtime.start(&id).await.expect("start");
        runtime.exit(&id, 3);
        assert_eq!(
            events
                .next()
                .await
                .expect("an event")
                .expect("not an error"),
            ContainerEvent::Died {
                id: id.clone(),
                exit_code: Some(3)
            }
        );
        assert!(!runtime.containers()[&id].1, "exited, not running");

        runtime.fail_next(
            Call::Remove,
            refused("remove", &id, "the engine is having a bad day"),
        );
        assert!(runtime.remove(&id, Duration::ZERO).await.is_err());
        assert_eq!(runtime.containers().len(), 1, "a failed removal keeps it");
        runtime.remove(&id, Duration::ZERO).await.expect("remove");
        assert_eq!(runtime.calls(Call::Remove), 2);
        assert!(runtime.containers().is_empty());
    }
}
