//! Leader election: several replicas serve the API, exactly one scales, and it can prove it.
//!
//! The leader holds a lease row in the database and renews it every third of its length. The
//! database decides on its own clock who holds the lease, and bumps the lease's generation
//! whenever it changes hands (migration `fleet_safety`). What this replica learns from each
//! renewal becomes a [`Term`]:
//! - its **fence** (lease, holder, generation), which every write of the term carries, so the
//!   database refuses an old leader's writes once a new term began;
//! - its **deadline** on this process's monotonic clock: the lease's length as the database
//!   counted it, measured from *before* the renewal was sent, less a third of a lease. The term
//!   is cancelled when the deadline passes, so a leader stops, and cancels its cloud calls in
//!   flight, before its lease can expire, even when frozen or cut off (a stopped process's
//!   monotonic clock keeps running, so a resumed leader finds its term over);
//! - the **database's clock** (its offset from this host's), so decisions about heartbeats and
//!   ages never depend on this host's clock.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use whist_dbclient::{DbError, Fence, HasuraClient, ops};
use whist_types::Lease;

use crate::metrics::Metrics;

/// One term of leadership: what an action needs to prove it may still act.
#[derive(Debug, Clone)]
pub struct Term {
    /// Tells terms apart, also two of the same generation (a renewal after a local end).
    id: u64,
    fence: Fence,
    deadline: watch::Receiver<Instant>,
    cancel: CancellationToken,
    /// The database's clock minus this host's, as the last renewal measured it.
    clock_offset: chrono::Duration,
    /// How much longer than the deadline the database keeps the lease.
    margin: Duration,
}

/// The term ended (its deadline passed, or the replica stepped down or stops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the leader term ended")]
pub struct TermEnded;

impl Term {
    /// A term that holds until `deadline` (tests of the executor and controller).
    pub fn until(fence: Fence, deadline: Instant) -> (Self, TermHandle) {
        let (deadline_tx, deadline_rx) = watch::channel(deadline);
        let cancel = CancellationToken::new();
        static TERMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let term = Self {
            id: TERMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            fence,
            deadline: deadline_rx,
            cancel: cancel.clone(),
            clock_offset: chrono::Duration::zero(),
            margin: Duration::ZERO,
        };
        tokio::spawn(watch_deadline(term.clone()));
        (
            term,
            TermHandle {
                deadline: deadline_tx,
                cancel,
            },
        )
    }

    /// Whether `other` is this very term.
    pub fn is(&self, other: &Term) -> bool {
        self.id == other.id
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    pub fn generation(&self) -> i64 {
        self.fence.generation
    }

    /// Whether this term may still act. Checked synchronously right before every cloud call.
    pub fn is_valid(&self) -> bool {
        !self.cancel.is_cancelled() && Instant::now() < *self.deadline.borrow()
    }

    pub fn check(&self) -> Result<(), TermEnded> {
        if self.is_valid() {
            Ok(())
        } else {
            Err(TermEnded)
        }
    }

    /// Runs `work` while the term lasts: it is dropped (its cloud call cancelled) when the term
    /// ends first.
    pub async fn run<F: Future>(&self, work: F) -> Result<F::Output, TermEnded> {
        self.check()?;
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => Err(TermEnded),
            output = work => Ok(output),
        }
    }

    /// Resolves when the term ends.
    pub async fn ended(&self) {
        self.cancel.cancelled().await;
    }

    /// How long the term may still act.
    pub fn time_left(&self) -> Duration {
        if self.cancel.is_cancelled() {
            return Duration::ZERO;
        }
        self.deadline
            .borrow()
            .saturating_duration_since(Instant::now())
    }

    /// How long the lease still holds in the database, conservatively: the most the end of a
    /// term may wait for its writes to land.
    pub fn lease_left(&self) -> Duration {
        (*self.deadline.borrow() + self.margin).saturating_duration_since(Instant::now())
    }

    /// Now on the database's clock (as of the last renewal's measurement).
    pub fn db_now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }
}

/// The election's side of a term: it extends the deadline on renewals and ends the term.
#[derive(Debug)]
pub struct TermHandle {
    deadline: watch::Sender<Instant>,
    cancel: CancellationToken,
}

impl TermHandle {
    pub fn extend(&self, deadline: Instant) {
        self.deadline.send_replace(deadline);
    }

    pub fn end(&self) {
        self.cancel.cancel();
    }
}

impl Drop for TermHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Cancels the term once its deadline passes; renewals move the deadline.
async fn watch_deadline(term: Term) {
    let mut deadline = term.deadline.clone();
    loop {
        let until = *deadline.borrow_and_update();
        tokio::select! {
            () = term.cancel.cancelled() => return,
            () = tokio::time::sleep_until(until) => {
                if Instant::now() >= *deadline.borrow() {
                    term.cancel.cancel();
                    return;
                }
            }
            changed = deadline.changed() => if changed.is_err() {
                // The election is gone without ending the term: end it at the deadline.
                tokio::time::sleep_until(until).await;
                term.cancel.cancel();
                return;
            },
        }
    }
}

/// The running election.
#[derive(Debug)]
pub struct Election {
    /// The current term, while this replica leads.
    pub terms: watch::Receiver<Option<Term>>,
    /// Finishes after the lease was handed back (bounded) once `stop` fired.
    pub finished: tokio::task::JoinHandle<()>,
}

/// What the election needs.
#[derive(Debug, Clone)]
pub struct ElectionOptions {
    pub name: String,
    pub replica: String,
    pub lease: Duration,
}

/// Runs the election for the lease until `stop`.
pub fn spawn(
    db: HasuraClient,
    options: ElectionOptions,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Election {
    let (terms_tx, terms) = watch::channel(None);
    let finished = tokio::spawn(elect(db, options, metrics, terms_tx, stop));
    Election { terms, finished }
}

async fn elect(
    db: HasuraClient,
    options: ElectionOptions,
    metrics: Arc<Metrics>,
    terms: watch::Sender<Option<Term>>,
    stop: CancellationToken,
) {
    let ElectionOptions {
        name,
        replica,
        lease,
    } = options;
    let lease_seconds = u32::try_from(lease.as_secs().max(1)).unwrap_or(u32::MAX);
    // A term stops a third of a lease before the database would let another replica take over;
    // a renewal may take at most that long, so a hung request cannot stretch a term.
    let margin = lease / 3;
    let mut current: Option<TermHandle> = None;
    let mut created = false;
    loop {
        let sent = Instant::now();
        let sent_wall = Utc::now();
        let answer = tokio::time::timeout(
            margin,
            db.execute(&ops::acquire_lease(&name, &replica, lease_seconds)),
        )
        .await;
        let received = Instant::now();
        match answer {
            Ok(Ok(Some(held))) => {
                let deadline = sent + lease_length(&held) - margin.min(lease_length(&held));
                let live = current.as_ref().is_some_and(|handle| {
                    !handle.cancel.is_cancelled()
                        && terms
                            .borrow()
                            .as_ref()
                            .is_some_and(|term| term.generation() == held.generation)
                });
                if live {
                    if let Some(handle) = &current {
                        handle.extend(deadline);
                    }
                } else {
                    let offset = clock_offset(&held, sent_wall, received - sent);
                    let (mut term, handle) = Term::until(
                        Fence {
                            lease: name.clone(),
                            holder: replica.clone(),
                            generation: held.generation,
                        },
                        deadline,
                    );
                    term.clock_offset = offset;
                    term.margin = margin;
                    tracing::info!(replica, generation = held.generation, "leading: a new term");
                    current = Some(handle);
                    terms.send_replace(Some(term));
                }
            }
            Ok(Ok(None)) => {
                // Another replica holds it: any term of ours is over (the database moved on).
                if let Some(handle) = current.take() {
                    handle.end();
                }
                if !created {
                    // Leases other than the seeded one are created on first use.
                    created = true;
                    if let Err(error) = db.execute(&ops::create_lease(&name)).await
                        && !matches!(error, DbError::ConstraintViolation { .. })
                    {
                        tracing::warn!(%error, lease = name, "create the lease row");
                    }
                }
            }
            // The term's deadline stands: a failed renewal ends it there, not sooner.
            Ok(Err(error)) => tracing::warn!(%error, "renew the leader lease"),
            Err(_) => tracing::warn!("renewing the leader lease timed out"),
        }
        let leading = current
            .as_ref()
            .is_some_and(|handle| !handle.cancel.is_cancelled());
        if !leading && terms.borrow().is_some() {
            tracing::info!(replica, "no longer leading");
            current = None;
            terms.send_replace(None);
        }
        metrics.set_leader(leading);
        let ended = async {
            match &current {
                Some(handle) => handle.cancel.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(sent + lease / 3) => {}
            // A term that ended on its deadline is reported at once, not at the next renewal.
            () = ended => {}
            () = stop.cancelled() => break,
        }
    }
    // Stopping: end the term (its actions were stopped by the caller first), then hand the
    // lease back so another replica takes over at once rather than after it expires.
    let held = current.take().is_some();
    terms.send_replace(None);
    metrics.set_leader(false);
    if held {
        match tokio::time::timeout(margin, db.execute(&ops::release_lease(&name, &replica))).await {
            Ok(Ok(_)) => tracing::info!(replica, "leader lease released"),
            Ok(Err(error)) => tracing::warn!(%error, "release the leader lease"),
            Err(_) => tracing::warn!("releasing the leader lease timed out"),
        }
    }
}

/// The lease's remaining length as the database counted it when it wrote the lease.
fn lease_length(lease: &Lease) -> Duration {
    (lease.expires_at - lease.renewed_at)
        .to_std()
        .unwrap_or(Duration::ZERO)
}

/// The database's clock minus this host's: the database stamped `renewed_at` somewhere during
/// the round trip; its middle is the best guess.
fn clock_offset(lease: &Lease, sent: DateTime<Utc>, round_trip: Duration) -> chrono::Duration {
    let middle = sent + chrono::Duration::from_std(round_trip / 2).unwrap_or_default();
    lease.renewed_at - middle
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence() -> Fence {
        Fence {
            lease: "scaling".into(),
            holder: "a".into(),
            generation: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_term_ends_at_its_deadline_and_cancels_work_in_flight() {
        let (term, _handle) = Term::until(fence(), Instant::now() + Duration::from_secs(10));
        assert!(term.is_valid());
        let work = term.run(tokio::time::sleep(Duration::from_secs(60)));
        let started = Instant::now();
        assert_eq!(work.await, Err(TermEnded));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(!term.is_valid());
        assert_eq!(term.time_left(), Duration::ZERO);
        assert_eq!(
            term.run(async {}).await,
            Err(TermEnded),
            "nothing starts after"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_move_the_deadline() {
        let (term, handle) = Term::until(fence(), Instant::now() + Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(8)).await;
        handle.extend(Instant::now() + Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(term.is_valid(), "extended");
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::yield_now().await;
        assert!(!term.is_valid());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_handle_ends_the_term() {
        let (term, handle) = Term::until(fence(), Instant::now() + Duration::from_secs(10));
        drop(handle);
        assert!(!term.is_valid());
        assert_eq!(term.run(async {}).await, Err(TermEnded));
    }

    /// A deadline that already passed (a replica frozen after its check, then resumed) fails
    /// the synchronous check before any call is made.
    #[tokio::test(start_paused = true)]
    async fn a_past_deadline_fails_the_check_before_the_watchdog_runs() {
        let (term, _handle) = Term::until(fence(), Instant::now() + Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(1));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(term.check(), Err(TermEnded));
    }

    #[test]
    fn the_lease_length_comes_from_the_database_stamps() {
        let renewed_at = Utc::now() - chrono::Duration::hours(3);
        let lease = Lease {
            name: "scaling".into(),
            holder: Some("a".into()),
            generation: 4,
            expires_at: renewed_at + chrono::Duration::seconds(15),
            renewed_at,
        };
        assert_eq!(lease_length(&lease), Duration::from_secs(15));
        // This host's clock is three hours ahead of the database's.
        let offset = clock_offset(&lease, Utc::now(), Duration::from_millis(2));
        assert!(
            (offset + chrono::Duration::hours(3)).num_seconds().abs() <= 1,
            "{offset}"
        );
    }
}
