//! A session's transitions: the claim seen in the database, the client's `json_transport`, the
//! box getting ready, and the rows and events that end it.

use whist_dbclient::Snapshot;
use whist_types::{Instance, InstanceStatus, Mandelbox, MandelboxId, MandelboxStatus};

use super::transport::{SessionReady, TransportError, TransportRequest};
use super::{Agent, Phase, tasks};
use crate::runtime::ContainerEvent;

/// Requests parked on one box while its row is read; more are refused as repeats.
const MAX_PARKED_REQUESTS: usize = 8;

impl Agent {
    pub(super) fn on_transport(&mut self, request: TransportRequest) {
        let id = request.id;
        let context = self.context();
        let Some(tracked) = self.boxes.get_mut(&id) else {
            request.answer(Err(TransportError::UnknownMandelbox));
            return;
        };
        match std::mem::replace(&mut tracked.phase, Phase::Creating) {
            // Unassigned as far as the live query said (or being retired while a claim may have
            // won): ask the database directly instead of refusing a request that may be right.
            Phase::Waiting | Phase::Retiring => {
                tracked.phase = Phase::Checking {
                    pending: vec![request],
                };
                tokio::spawn(tasks::check_row(context, id));
            }
            Phase::Checking { mut pending } => {
                if pending.len() < MAX_PARKED_REQUESTS {
                    pending.push(request);
                } else {
                    request.answer(Err(TransportError::Repeated));
                }
                tracked.phase = Phase::Checking { pending };
            }
            Phase::Accepting { user, pending } => {
                let pending = match pending {
                    Some(earlier) => {
                        let error = if request.may_use(&user) {
                            TransportError::Repeated
                        } else {
                            TransportError::NotYours
                        };
                        request.answer(Err(error));
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
                let mine = request.may_use(&user);
                tracked.phase = Phase::Connecting { user };
                if mine {
                    self.start_delivery(request);
                } else {
                    request.answer(Err(TransportError::NotYours));
                }
            }
            phase @ (Phase::Delivering { .. } | Phase::Running { .. }) => {
                let (Phase::Delivering { user } | Phase::Running { user }) = &phase else {
                    unreachable!("matched above");
                };
                let error = if request.may_use(user) {
                    TransportError::Repeated
                } else {
                    TransportError::NotYours
                };
                request.answer(Err(error));
                tracked.phase = phase;
            }
            phase @ (Phase::Creating | Phase::TearingDown { .. }) => {
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
            tracked.ended.clone(),
        ));
    }

    /// The caller's configuration was refused before anything reached the box: it waits for
    /// the owner's next `json_transport` as if this one had never come.
    pub(super) fn on_config_refused(&mut self, id: MandelboxId) {
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        if let Phase::Delivering { user } = &tracked.phase {
            let user = user.clone();
            tracked.enter(Phase::Connecting { user });
        }
    }

    pub(super) fn on_delivered(&mut self, id: MandelboxId, ok: bool) {
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        if !matches!(tracked.phase, Phase::Delivering { .. }) {
            return;
        }
        if !ok {
            self.tear_down(id, "session did not become ready");
            return;
        }
        let Phase::Delivering { user } = std::mem::replace(&mut tracked.phase, Phase::Creating)
        else {
            unreachable!("checked above");
        };
        self.metrics.session_ready(tracked.since.elapsed());
        tracked.enter(Phase::Running { user });
        tracing::info!(mandelbox.id = %id, "session running");
    }

    /// The row as the database has it, read for requests parked on a box in `Checking`.
    pub(super) fn on_row_checked(
        &mut self,
        id: MandelboxId,
        row: Result<Option<Mandelbox>, String>,
    ) {
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        if !matches!(tracked.phase, Phase::Checking { .. }) {
            // The live query got there first and the requests moved with the box.
            return;
        }
        let Phase::Checking { pending } = std::mem::replace(&mut tracked.phase, Phase::Waiting)
        else {
            unreachable!("checked above");
        };
        match row {
            Err(error) => {
                tracing::warn!(mandelbox.id = %id, %error, "read mandelbox row");
                answer_all(pending, &TransportError::Unavailable);
                self.after_back_to_waiting(id);
            }
            Ok(Some(row)) => match (row.status, row.user_id.clone()) {
                (MandelboxStatus::Allocated, _) => self.accept(id, &row, pending),
                // Our own accept committed but its answer was lost: take the row's word.
                (MandelboxStatus::Connecting, Some(user)) => {
                    tracked.enter(Phase::Connecting { user });
                    for request in pending {
                        self.on_transport(request);
                    }
                }
                (MandelboxStatus::Running, Some(user)) => {
                    tracked.enter(Phase::Running { user });
                    for request in pending {
                        self.on_transport(request);
                    }
                }
                (MandelboxStatus::Waiting, _) => {
                    answer_all(pending, &TransportError::NotYours);
                    self.after_back_to_waiting(id);
                }
                _ => {
                    answer_all(pending, &TransportError::Gone);
                    self.tear_down(id, "row is ending");
                }
            },
            Ok(None) => {
                answer_all(pending, &TransportError::UnknownMandelbox);
                self.tear_down(id, "row deleted elsewhere");
            }
        }
    }

    /// A box back in `Waiting` while the host drains is retired like any other zygote.
    fn after_back_to_waiting(&mut self, id: MandelboxId) {
        if self.draining.is_some() {
            self.retire(id);
        }
    }

    pub(super) fn on_mandelbox_rows(&mut self, snapshot: &Snapshot<Mandelbox>) {
        for row in snapshot.added.iter().chain(&snapshot.changed) {
            if row.status == MandelboxStatus::Allocated {
                self.on_allocated_row(row);
            }
        }
        for row in &snapshot.removed {
            let Some(tracked) = self.boxes.get(&row.id) else {
                continue;
            };
            // Retiring boxes lose their row by our own hand; the retirement's report follows.
            if !matches!(
                tracked.phase,
                Phase::Creating | Phase::Retiring | Phase::TearingDown { .. }
            ) {
                // Someone else deleted the row (e.g. the fleet reaping it): the box must go too.
                self.tear_down(row.id, "row deleted elsewhere");
            }
        }
    }

    pub(super) fn on_allocated_row(&mut self, row: &Mandelbox) {
        let Some(tracked) = self.boxes.get_mut(&row.id) else {
            return;
        };
        match std::mem::replace(&mut tracked.phase, Phase::Creating) {
            Phase::Waiting | Phase::Retiring => self.accept(row.id, row, Vec::new()),
            Phase::Checking { pending } => self.accept(row.id, row, pending),
            Phase::Creating => {
                // The row was claimed between its insert and our hearing of it: accept once the
                // zygote's report arrives, which the next resync does at the latest.
                tracked.phase = Phase::Creating;
                self.resync_due = tokio::time::Instant::now();
            }
            other => tracked.phase = other,
        }
    }

    /// An ALLOCATED row for a box of ours: move it to CONNECTING. Of the parked requests the
    /// first from the owner goes on; other owner requests are repeats, the rest are not theirs.
    pub(super) fn accept(
        &mut self,
        id: MandelboxId,
        row: &Mandelbox,
        parked: Vec<TransportRequest>,
    ) {
        let context = self.context();
        let Some(tracked) = self.boxes.get_mut(&id) else {
            answer_all(parked, &TransportError::UnknownMandelbox);
            return;
        };
        let user = row.user_id.clone().unwrap_or_default();
        let mut pending = None;
        for request in parked {
            if !request.may_use(&user) {
                request.answer(Err(TransportError::NotYours));
            } else if pending.is_none() {
                pending = Some(request);
            } else {
                request.answer(Err(TransportError::Repeated));
            }
        }
        tracked.enter(Phase::Accepting { user, pending });
        tokio::spawn(tasks::accept_allocation(context, id, tracked.paths.clone()));
        // A zygote became a session: replace it.
        self.reconcile_zygotes();
    }

    pub(super) fn on_accepted(&mut self, id: MandelboxId, row: Result<Option<Mandelbox>, String>) {
        let Some(tracked) = self.boxes.get_mut(&id) else {
            return;
        };
        if !matches!(tracked.phase, Phase::Accepting { .. }) {
            // Torn down meanwhile: that phase stays.
            return;
        }
        let Phase::Accepting { user, pending } =
            std::mem::replace(&mut tracked.phase, Phase::Creating)
        else {
            unreachable!("checked above");
        };
        match row {
            Ok(Some(_)) => {
                tracked.enter(Phase::Connecting { user });
                tracing::info!(mandelbox.id = %id, "session connecting");
                if let Some(request) = pending {
                    self.start_delivery(request);
                }
            }
            Ok(None) => {
                // Neither ALLOCATED nor CONNECTING any more: the assignment is over.
                tracked.phase = Phase::Accepting {
                    user,
                    pending: None,
                };
                if let Some(request) = pending {
                    request.answer(Err(TransportError::Gone));
                }
                self.tear_down(id, "assignment withdrawn");
            }
            Err(error) => {
                // The row is probably still ALLOCATED: the next resync accepts it again.
                tracing::warn!(mandelbox.id = %id, %error, "mark mandelbox CONNECTING");
                tracked.enter(Phase::Waiting);
                if let Some(request) = pending {
                    request.answer(Err(TransportError::Unavailable));
                }
                self.resync_due = tokio::time::Instant::now();
            }
        }
    }

    pub(super) fn on_instance_rows(&mut self, snapshot: &Snapshot<Instance>) {
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

    pub(super) fn on_container_event(&mut self, event: &ContainerEvent) {
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
}

fn answer_all(requests: Vec<TransportRequest>, error: &TransportError) {
    for request in requests {
        request.answer(Err(error.clone()));
    }
}
