//! Leader election: several replicas serve the API, exactly one scales. The leader holds a lease
//! row in the database and renews it every third of its length; another replica takes it over
//! only after it expired. A leader that cannot renew steps down before its lease runs out, so
//! two replicas never believe they lead at once (given clocks within a third of a lease).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use whist_dbclient::{HasuraClient, ops};

use crate::metrics::Metrics;

/// Runs the election for lease `name` until `stop`; the receiver says whether this replica
/// leads now.
pub fn spawn(
    db: HasuraClient,
    name: String,
    replica: String,
    lease: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> watch::Receiver<bool> {
    let (leading_tx, leading) = watch::channel(false);
    let lease_length = chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(15));
    tokio::spawn(async move {
        let mut held_until: Option<chrono::DateTime<Utc>> = None;
        let mut created = false;
        loop {
            let now = Utc::now();
            let operation = ops::acquire_lease(&name, &replica, now, now + lease_length);
            // A renewal may take at most a third of the lease, so a hung request cannot keep a
            // replica believing it leads past its lease.
            match tokio::time::timeout(lease / 3, db.execute(&operation)).await {
                Ok(Ok(Some(lease))) => held_until = Some(lease.expires_at),
                Ok(Ok(None)) => {
                    held_until = None;
                    if !created {
                        // Leases other than the seeded one are created on first use.
                        created = true;
                        if let Err(error) = db.execute(&ops::create_lease(&name)).await
                            && !matches!(error, whist_dbclient::DbError::ConstraintViolation { .. })
                        {
                            tracing::warn!(%error, lease = name, "create the lease row");
                        }
                    }
                }
                Ok(Err(error)) => tracing::warn!(%error, "renew the leader lease"),
                Err(_) => tracing::warn!("renewing the leader lease timed out"),
            }
            // Step down a third of a lease before it runs out when renewals fail.
            let margin = lease_length / 3;
            let leading = held_until.is_some_and(|until| Utc::now() + margin < until);
            if *leading_tx.borrow() != leading {
                tracing::info!(replica, leading, "leadership changed");
                metrics.set_leader(leading);
                leading_tx.send_replace(leading);
            }
            tokio::select! {
                () = tokio::time::sleep(lease / 3) => {}
                () = stop.cancelled() => break,
            }
        }
        if *leading_tx.borrow() {
            leading_tx.send_replace(false);
            metrics.set_leader(false);
            if let Err(error) = db.execute(&ops::release_lease(&name, &replica)).await {
                tracing::warn!(%error, "release the leader lease");
            }
        }
    });
    leading
}
