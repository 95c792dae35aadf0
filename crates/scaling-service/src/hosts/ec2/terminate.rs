//! Terminating machines with TerminateInstances.
//!
//! EC2 refuses a whole TerminateInstances call when a single id in it is unknown, and a machine
//! the fleet wants gone may well have vanished already. So a refused call is narrowed to the ids
//! EC2 still reports as not terminated and sent again, a bounded number of times.

use aws_sdk_ec2::error::ProvideErrorMetadata;

use super::super::{CloudState, HostError};
use super::Ec2Hosts;
use super::errors::sdk_error;

/// EC2 accepts at most 1000 ids per TerminateInstances.
const TERMINATE_CHUNK: usize = 1000;

impl Ec2Hosts {
    pub(super) async fn terminate_inner(
        &self,
        region: &str,
        ids: &[String],
    ) -> Result<(), HostError> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client(region).await;
        for chunk in ids.chunks(TERMINATE_CHUNK) {
            let mut pending: Vec<String> = chunk.to_vec();
            // EC2 refuses the whole call when one id does not exist: narrow to those that do
            // and try again. Bounded, in case the view and the call keep disagreeing.
            for _ in 0..self.options.call_attempts.max(1) {
                if pending.is_empty() {
                    break;
                }
                let result = self
                    .retrying("TerminateInstances", || {
                        let call = client
                            .terminate_instances()
                            .set_instance_ids(Some(pending.clone()));
                        async move {
                            match call.send().await {
                                Ok(_) => Ok(true),
                                Err(error)
                                    if error.code() == Some("InvalidInstanceID.NotFound") =>
                                {
                                    Ok(false)
                                }
                                Err(error) => Err(sdk_error("TerminateInstances", error)),
                            }
                        }
                    })
                    .await?;
                if result {
                    tracing::info!(region, ids = ?pending, "terminating hosts");
                    pending.clear();
                    break;
                }
                let existing = self.describe_ids(&client, region, &pending).await?;
                pending = existing
                    .into_iter()
                    .filter(|seen| seen.host.state != CloudState::Terminated)
                    .map(|seen| seen.host.id)
                    .collect();
                tracing::info!(region, ids = ?pending, "some hosts to terminate were already gone");
            }
            if !pending.is_empty() {
                return Err(HostError::Failed(format!(
                    "TerminateInstances kept reporting unknown instances among {pending:?}"
                )));
            }
        }
        Ok(())
    }
}
