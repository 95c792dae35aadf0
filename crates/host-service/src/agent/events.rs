//! Docker's container events for this instance, as one stream that never ends: when the engine
//! closes it or fails, the next call waits a capped backoff and reopens it. The agent resyncs after
//! each break, since events may have been missed meanwhile.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::mandelbox::labels;
use crate::runtime::{ContainerEvent, ContainerRuntime, RuntimeError};

/// Docker's event stream, reopened with backoff whenever it ends or fails.
pub(crate) struct DockerEvents {
    runtime: Arc<dyn ContainerRuntime>,
    instance_id: String,
    stream: Option<BoxStream<'static, Result<ContainerEvent, RuntimeError>>>,
    retry_at: Option<tokio::time::Instant>,
    failures: u32,
    pub(crate) live: bool,
}

impl DockerEvents {
    pub(crate) fn new(runtime: Arc<dyn ContainerRuntime>, instance_id: String) -> Self {
        let mut events = Self {
            runtime,
            instance_id,
            stream: None,
            retry_at: None,
            failures: 0,
            live: false,
        };
        events.open();
        events
    }

    fn open(&mut self) {
        self.stream = Some(
            self.runtime
                .events((labels::INSTANCE_ID, &self.instance_id)),
        );
        self.live = true;
    }

    /// The next event, or the error that broke the stream (it is reopened on the next call).
    pub(crate) async fn next(&mut self) -> Result<ContainerEvent, RuntimeError> {
        if let Some(at) = self.retry_at {
            tokio::time::sleep_until(at).await;
            self.retry_at = None;
            self.open();
        }
        let stream = self.stream.as_mut().expect("opened above");
        let error = match stream.next().await {
            Some(Ok(event)) => {
                self.failures = 0;
                return Ok(event);
            }
            Some(Err(error)) => error,
            None => RuntimeError::Refused {
                operation: "events",
                target: "stream".to_owned(),
                message: "the engine closed the event stream".to_owned(),
            },
        };
        self.stream = None;
        self.live = false;
        self.failures += 1;
        let delay = Duration::from_millis(100 << self.failures.min(7));
        self.retry_at = Some(tokio::time::Instant::now() + delay);
        Err(error)
    }
}
