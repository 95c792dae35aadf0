//! Polling until machines run ([`HostHandler::wait_running`]) or are gone
//! ([`HostHandler::wait_terminated`]).
//!
//! No production code waits on the cloud: the executor records what it launched and learns the
//! rest from the hosts' own registration and from later listings and describes. These waiters
//! serve tests and benchmarks, which want to block until EC2 (moto) has caught up: the cases in
//! `hosts/conformance.rs` (built only for tests and the `fake` feature, and run against this
//! handler by `tests/moto_ec2.rs`) call them, and the wrapping handlers in
//! `tests/moto_controller_faults.rs` and `examples/scaling_bench.rs` forward them. They stay
//! compiled in and public all the same: they are methods of the [`HostHandler`] trait, which
//! every handler (this one, the fake, the local fleet's) implements whole, and examples and
//! integration tests link the library without `cfg(test)`. Gating them would mean gating trait
//! methods and every implementation, for two small functions.
//!
//! [`HostHandler`]: crate::hosts::HostHandler
//! [`HostHandler::wait_running`]: crate::hosts::HostHandler::wait_running
//! [`HostHandler::wait_terminated`]: crate::hosts::HostHandler::wait_terminated

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::super::{CloudState, HostError};
use super::Ec2Hosts;
use super::describe::Seen;

/// What the poll makes of one machine.
enum Judgement {
    Done,
    Wait,
    /// It will never get to the awaited state; waiting ends with this error.
    Never(HostError),
}

impl Ec2Hosts {
    pub(super) async fn wait_running_inner(
        &self,
        region: &str,
        ids: &[String],
        timeout: Duration,
    ) -> Result<(), HostError> {
        self.wait_for(region, ids, timeout, "hosts to run", |id, host| {
            // Absent: EC2's view lags a launch by a moment.
            let Some(seen) = host else {
                return Judgement::Wait;
            };
            match seen.host.state {
                CloudState::Running => Judgement::Done,
                CloudState::Pending | CloudState::Unknown => Judgement::Wait,
                CloudState::ShuttingDown
                | CloudState::Terminated
                | CloudState::Stopping
                | CloudState::Stopped => Judgement::Never(not_running(id, seen)),
            }
        })
        .await
    }

    pub(super) async fn wait_terminated_inner(
        &self,
        region: &str,
        ids: &[String],
        timeout: Duration,
    ) -> Result<(), HostError> {
        self.wait_for(region, ids, timeout, "hosts to terminate", |_, host| {
            // Absent: terminated long enough ago that EC2 forgot it (or never launched).
            match host.map(|seen| seen.host.state) {
                None | Some(CloudState::Terminated) => Judgement::Done,
                Some(_) => Judgement::Wait,
            }
        })
        .await
    }

    /// Polls until `judge` finds every machine in `ids` done (absent ones are passed as
    /// `None`), or finds one that will never get there.
    async fn wait_for(
        &self,
        region: &str,
        ids: &[String],
        timeout: Duration,
        what: &'static str,
        judge: impl Fn(&str, Option<&Seen>) -> Judgement,
    ) -> Result<(), HostError> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client(region).await;
        let deadline = Instant::now() + timeout;
        loop {
            match self.describe_ids(&client, region, ids).await {
                Ok(seen) => {
                    let by_id: HashMap<&str, &Seen> = seen
                        .iter()
                        .map(|seen| (seen.host.id.as_str(), seen))
                        .collect();
                    let mut waiting = Vec::new();
                    for id in ids {
                        match judge(id, by_id.get(id.as_str()).copied()) {
                            Judgement::Done => {}
                            Judgement::Wait => waiting.push(id.as_str()),
                            Judgement::Never(error) => return Err(error),
                        }
                    }
                    if waiting.is_empty() {
                        return Ok(());
                    }
                    if Instant::now() >= deadline {
                        tracing::warn!(region, ?waiting, "timed out waiting for {what}");
                        return Err(HostError::Timeout(timeout, what));
                    }
                }
                // A failing API is waited out until the deadline; a refusal is final.
                Err(error) if !error.is_retryable() => return Err(error),
                Err(error) => {
                    if Instant::now() >= deadline {
                        tracing::warn!(region, %error, "timed out waiting for {what}");
                        return Err(HostError::Timeout(timeout, what));
                    }
                    tracing::debug!(region, %error, "describing hosts failed; polling on");
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(self.options.poll_interval.min(left)).await;
        }
    }
}

/// Why a machine awaited as running will never run. Capacity shortages say so, so that the
/// caller may try elsewhere; other client-side reasons (a bad snapshot, a volume limit) are
/// refusals; the rest (someone terminated or stopped it) is a failure worth another launch.
fn not_running(id: &str, seen: &Seen) -> HostError {
    let reason = seen.state_reason.as_deref().unwrap_or("no reason given");
    let detail = format!(
        "instance {id} is {:?} instead of running: {reason}",
        seen.host.state
    );
    if reason.contains("InsufficientInstanceCapacity") {
        HostError::InsufficientCapacity(detail)
    } else if reason.starts_with("Client.")
        && !reason.starts_with("Client.UserInitiatedShutdown")
        && !reason.starts_with("Client.InstanceInitiatedShutdown")
    {
        HostError::Refused(detail)
    } else {
        HostError::Failed(detail)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::super::CloudHost;
    use super::*;

    #[test]
    fn machines_that_will_never_run_are_named() {
        let host = |reason: &str| Seen {
            host: CloudHost {
                id: "i-1".to_owned(),
                region: "us-east-1".to_owned(),
                image_id: "ami-1".to_owned(),
                instance_type: "g4dn.xlarge".to_owned(),
                state: CloudState::Terminated,
                tags: BTreeMap::new(),
                launched_at: None,
            },
            client_token: None,
            state_reason: Some(reason.to_owned()),
        };
        let error = not_running("i-1", &host("Server.InsufficientInstanceCapacity"));
        assert_eq!(error.kind(), "capacity");
        assert!(error.to_string().contains("i-1"), "{error}");
        assert_eq!(
            not_running("i-1", &host("Client.InvalidSnapshot.NotFound")).kind(),
            "refused"
        );
        assert_eq!(
            not_running("i-1", &host("Client.UserInitiatedShutdown")).kind(),
            "failed"
        );
    }
}
