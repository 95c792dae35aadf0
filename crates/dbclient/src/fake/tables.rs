//! The fake's tables and the operations it serves, each with the rule the database enforces
//! for it (see the migrations under `deploy/hasura/migrations`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use whist_types::{
    FleetSettings, Instance, InstanceStatus, Lease, Mandelbox, MandelboxId, MandelboxStatus,
};

use crate::Fence;

/// Why the database refused a request: the GraphQL error it answers with.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    /// A trigger's `RAISE … USING ERRCODE = '23514'`, as Hasura reports a CHECK violation.
    fn check(message: String) -> Self {
        Self {
            code: "permission-error",
            message: format!("Check constraint violation. {message}"),
        }
    }

    fn unique(message: String) -> Self {
        Self {
            code: "constraint-violation",
            message: format!("Uniqueness violation. {message}"),
        }
    }

    fn foreign_key(message: String) -> Self {
        Self {
            code: "constraint-violation",
            message: format!("Foreign key violation. {message}"),
        }
    }

    fn invalid(message: String) -> Self {
        Self {
            code: "validation-failed",
            message,
        }
    }
}

type Answer = Result<Value, Refusal>;

/// The column default of `config.settings.assign_heartbeat_max_age_seconds`: a host silent for
/// longer is given no sessions.
const ASSIGN_HEARTBEAT_MAX_AGE_SECONDS: i64 = 90;

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Tables {
    instances: BTreeMap<String, Instance>,
    mandelboxes: BTreeMap<MandelboxId, Mandelbox>,
    leases: BTreeMap<String, Lease>,
    /// How far the database's clock is ahead of this machine's (moved by the tests).
    clock_ahead: chrono::Duration,
}

/// Reads a variable, or refuses the request as the engine refuses a missing one.
fn var<T: DeserializeOwned>(variables: &Value, name: &str) -> Result<T, Refusal> {
    let value = variables.get(name).cloned().unwrap_or(Value::Null);
    serde_json::from_value(value)
        .map_err(|error| Refusal::invalid(format!("variable {name:?}: {error}")))
}

/// `mandelboxes_user_matches_status`: a waiting box belongs to nobody, a box in a session to
/// someone.
fn check_user_matches_status(row: &Mandelbox) -> Result<(), Refusal> {
    let matches = match row.status {
        MandelboxStatus::Waiting => row.user_id.is_none(),
        MandelboxStatus::Dying => true,
        _ => row.user_id.is_some(),
    };
    if matches {
        Ok(())
    } else {
        Err(Refusal::check(format!(
            "new row for relation \"mandelboxes\" violates check constraint \"mandelboxes_user_matches_status\" ({} {})",
            row.id, row.status
        )))
    }
}

fn rows<T: serde::Serialize>(rows: impl IntoIterator<Item = T>) -> Value {
    Value::Array(
        rows.into_iter()
            .map(|row| serde_json::to_value(row).expect("rows serialise"))
            .collect(),
    )
}

/// An `update_…`/`delete_…` answer: `{affected_rows, returning}`.
fn mutated<T: serde::Serialize>(changed: Vec<T>) -> Value {
    json!({ "affected_rows": changed.len(), "returning": rows(changed) })
}

impl Tables {
    /// `now()` on the database's clock.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_ahead
    }

    pub(crate) fn advance_clock(&mut self, by: chrono::Duration) {
        self.clock_ahead += by;
    }

    pub(crate) fn answer(&mut self, name: &str, variables: &Value) -> Answer {
        // A fenced write carries the fence's variables; its check runs first, as the first root
        // field of the mutation does.
        let fenced = variables.get("fence_generation").is_some();
        if fenced {
            self.check_fence(variables)?;
        }
        let mut data = match name {
            "LeaseCheck" => json!({}),
            "CreateLease" => {
                let name: String = var(variables, "name")?;
                if self.leases.contains_key(&name) {
                    return Err(Refusal::unique(format!(
                        "duplicate key value violates unique constraint \"leases_pkey\" ({name})"
                    )));
                }
                self.leases.insert(
                    name.clone(),
                    Lease {
                        name,
                        holder: None,
                        generation: 0,
                        expires_at: DateTime::<Utc>::UNIX_EPOCH,
                        renewed_at: DateTime::<Utc>::UNIX_EPOCH,
                    },
                );
                json!({ "insert_config_leases": { "affected_rows": 1 } })
            }
            "AcquireLease" => {
                let name: String = var(variables, "name")?;
                let holder: String = var(variables, "holder")?;
                let seconds: i64 = var(variables, "lease_seconds")?;
                let changed: Vec<_> = self
                    .acquire_lease(&name, &holder, seconds)
                    .into_iter()
                    .collect();
                json!({ "update_config_leases": mutated(changed) })
            }
            "ReleaseLease" => {
                let name: String = var(variables, "name")?;
                let holder: String = var(variables, "holder")?;
                let now = self.now();
                let changed: Vec<_> = match self.leases.get_mut(&name) {
                    Some(lease) if lease.holder.as_deref() == Some(holder.as_str()) => {
                        // Free at once, same generation: the next holder bumps it.
                        lease.holder = None;
                        lease.expires_at = DateTime::<Utc>::UNIX_EPOCH;
                        lease.renewed_at = now;
                        vec![lease.clone()]
                    }
                    _ => Vec::new(),
                };
                json!({ "update_config_leases": mutated(changed) })
            }
            "InstanceById" => {
                let id: String = var(variables, "id")?;
                json!({ "whist_instances_by_pk": self.instances.get(&id) })
            }
            "InstanceWithMandelboxes" => {
                let id: String = var(variables, "id")?;
                let row = self.instances.get(&id).map(|instance| {
                    let mut row = serde_json::to_value(instance).expect("rows serialise");
                    row["mandelboxes"] = rows(self.boxes_on(&id));
                    row
                });
                json!({ "whist_instances_by_pk": row })
            }
            "Instances" => json!({ "whist_instances": rows(self.instances.values()) }),
            "InstancesInRegion" => {
                let region: String = var(variables, "region")?;
                let matching = self.instances.values().filter(|row| row.region == region);
                json!({ "whist_instances": rows(matching) })
            }
            "MandelboxById" => {
                let id: MandelboxId = var(variables, "id")?;
                json!({ "whist_mandelboxes_by_pk": self.mandelboxes.get(&id) })
            }
            "MandelboxWithInstance" => {
                let id: MandelboxId = var(variables, "id")?;
                let row = self.mandelboxes.get(&id).map(|mandelbox| {
                    let mut row = serde_json::to_value(mandelbox).expect("rows serialise");
                    row["instance"] = json!(self.instances.get(&mandelbox.instance_id));
                    row
                });
                json!({ "whist_mandelboxes_by_pk": row })
            }
            "Mandelboxes" => json!({ "whist_mandelboxes": rows(self.mandelboxes()) }),
            "MandelboxesOnInstance" => {
                let id: String = var(variables, "instance_id")?;
                json!({ "whist_mandelboxes": rows(self.boxes_on(&id)) })
            }
            "MandelboxesOfUser" => {
                let user: String = var(variables, "user_id")?;
                let matching = self
                    .mandelboxes()
                    .into_iter()
                    .filter(|row| row.user_id.as_deref() == Some(user.as_str()));
                json!({ "whist_mandelboxes": rows(matching) })
            }
            "InsertMandelboxes" => {
                json!({ "insert_whist_mandelboxes": { "affected_rows": self.insert_mandelboxes(variables)? } })
            }
            "ClaimMandelbox" => {
                let id: MandelboxId = var(variables, "id")?;
                let user: String = var(variables, "user_id")?;
                let session: String = var(variables, "session_id")?;
                let changed = match self.mandelboxes.get(&id) {
                    Some(row) if row.status == MandelboxStatus::Waiting => {
                        let mut row = row.clone();
                        row.status = MandelboxStatus::Allocated;
                        row.user_id = Some(user);
                        row.session_id = Some(session);
                        vec![self.update_mandelbox(row)?]
                    }
                    _ => Vec::new(),
                };
                json!({ "update_whist_mandelboxes": mutated(changed) })
            }
            "TransitionMandelbox" => {
                let id: MandelboxId = var(variables, "id")?;
                let instance: String = var(variables, "instance_id")?;
                let from: Vec<MandelboxStatus> = var(variables, "from")?;
                let to: MandelboxStatus = var(variables, "to")?;
                let changed = match self.mandelboxes.get(&id) {
                    Some(row) if row.instance_id == instance && from.contains(&row.status) => {
                        let mut row = row.clone();
                        row.status = to;
                        vec![self.update_mandelbox(row)?]
                    }
                    _ => Vec::new(),
                };
                json!({ "update_whist_mandelboxes": mutated(changed) })
            }
            "DeleteMandelbox" => {
                let id: MandelboxId = var(variables, "id")?;
                let deleted: Vec<_> = self.delete_mandelbox(id).into_iter().collect();
                json!({ "delete_whist_mandelboxes": mutated(deleted) })
            }
            "DeleteMandelboxIn" => {
                let id: MandelboxId = var(variables, "id")?;
                let statuses: Vec<MandelboxStatus> = var(variables, "statuses")?;
                let matches = self
                    .mandelboxes
                    .get(&id)
                    .is_some_and(|row| statuses.contains(&row.status));
                let deleted: Vec<_> = if matches {
                    self.delete_mandelbox(id).into_iter().collect()
                } else {
                    Vec::new()
                };
                json!({ "delete_whist_mandelboxes": mutated(deleted) })
            }
            "Heartbeat" => {
                let id: String = var(variables, "id")?;
                let now = self.now();
                let found = self.update_instance(&id, |row| row.heartbeat_at = now);
                json!({ "update_whist_instances": { "affected_rows": u64::from(found) } })
            }
            "TransitionInstance" => {
                let id: String = var(variables, "id")?;
                let from: Vec<InstanceStatus> = var(variables, "from")?;
                let to: InstanceStatus = var(variables, "to")?;
                let changed = self.update_instance_where(
                    &id,
                    |row| from.contains(&row.status),
                    |row| row.status = to,
                );
                json!({ "update_whist_instances": mutated(changed) })
            }
            "DrainIdleInstance" => {
                let id: String = var(variables, "id")?;
                let capacity: i32 = var(variables, "capacity")?;
                let fleet: String = var(variables, "fleet")?;
                let changed = self.update_instance_where(
                    &id,
                    |row| {
                        row.fleet.as_deref() == Some(fleet.as_str())
                            && row.status == InstanceStatus::Active
                            && row.remaining_capacity == capacity
                    },
                    |row| row.status = InstanceStatus::Draining,
                );
                json!({ "update_whist_instances": mutated(changed) })
            }
            "InsertInstances" => {
                let objects: Vec<Value> = var(variables, "objects")?;
                let count = objects.len();
                for object in objects {
                    self.insert_instance(object)?;
                }
                json!({ "insert_whist_instances": { "affected_rows": count } })
            }
            "DeleteInstanceAndMandelboxes" => {
                let id: String = var(variables, "id")?;
                let boxes = self.boxes_on(&id).len();
                let deleted = self.delete_instance(&id).is_some();
                json!({
                    "delete_whist_mandelboxes": { "affected_rows": boxes },
                    "delete_whist_instances": { "affected_rows": u64::from(deleted) },
                })
            }
            "DeleteFleetInstance" => {
                let id: String = var(variables, "id")?;
                let fleet: String = var(variables, "fleet")?;
                let ours = self
                    .instances
                    .get(&id)
                    .is_some_and(|row| row.fleet.as_deref() == Some(fleet.as_str()));
                let boxes = if ours { self.boxes_on(&id).len() } else { 0 };
                let deleted = ours && self.delete_instance(&id).is_some();
                json!({
                    "delete_whist_mandelboxes": { "affected_rows": boxes },
                    "delete_whist_instances": { "affected_rows": u64::from(deleted) },
                })
            }
            other => {
                return Err(Refusal::invalid(format!(
                    "the fake database does not serve operation {other:?}"
                )));
            }
        };
        if fenced {
            data["fence"] = json!({ "affected_rows": 0 });
        }
        Ok(data)
    }

    /// The rows a live query delivers now (the value of its root field).
    pub(crate) fn live(&self, name: &str, variables: &Value) -> Result<Value, String> {
        let text = |name: &str| {
            variables
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("variable {name:?} missing"))
        };
        Ok(match name {
            "LiveInstances" => rows(self.instances.values()),
            "LiveInstance" => rows(self.instances.get(&text("id")?)),
            // Ordered by id, as their documents ask.
            "LiveMandelboxes" => rows(self.mandelboxes.values()),
            "LiveMandelboxesOnInstance" => {
                let instance = text("instance_id")?;
                rows(
                    self.mandelboxes
                        .values()
                        .filter(|row| row.instance_id == instance),
                )
            }
            other => {
                return Err(format!(
                    "the fake database does not serve live query {other:?}"
                ));
            }
        })
    }

    // ---- rules ----

    fn check_fence(&self, variables: &Value) -> Result<(), Refusal> {
        let lease: String = var(variables, "fence_lease")?;
        let holder: String = var(variables, "fence_holder")?;
        let generation: i64 = var(variables, "fence_generation")?;
        let holds = self.leases.get(&lease).is_some_and(|row| {
            row.holder.as_deref() == Some(holder.as_str())
                && row.generation == generation
                && row.expires_at > self.now()
        });
        if holds {
            Ok(())
        } else {
            Err(Refusal::check(format!(
                "lease_lost: {holder} does not hold lease {lease} in generation {generation}"
            )))
        }
    }

    /// `config.leases_decide`: the holder renews; anyone takes a free or expired lease (a new
    /// generation); a live lease of another holder is left alone.
    fn acquire_lease(&mut self, name: &str, holder: &str, seconds: i64) -> Option<Lease> {
        let now = self.now();
        let lease = self.leases.get_mut(name)?;
        let renewing = lease.holder.as_deref() == Some(holder);
        let live = lease.expires_at > now;
        if !renewing && live {
            return None;
        }
        // A new holder, or the same one after its lease lapsed: a new term.
        if !renewing || !live {
            lease.generation += 1;
            lease.holder = Some(holder.to_owned());
        }
        lease.expires_at = now + chrono::Duration::seconds(seconds);
        lease.renewed_at = now;
        Some(lease.clone())
    }

    fn insert_mandelboxes(&mut self, variables: &Value) -> Result<usize, Refusal> {
        let objects: Vec<Value> = var(variables, "objects")?;
        let count = objects.len();
        let now = self.now();
        for object in objects {
            let mut object = object;
            object["created_at"] = json!(now);
            object["updated_at"] = json!(now);
            for optional in ["user_id", "session_id"] {
                if object.get(optional).is_none() {
                    object[optional] = Value::Null;
                }
            }
            let row: Mandelbox = serde_json::from_value(object)
                .map_err(|error| Refusal::invalid(format!("objects: {error}")))?;
            if self.mandelboxes.contains_key(&row.id) {
                return Err(Refusal::unique(format!(
                    "duplicate key value violates unique constraint \"mandelboxes_pkey\" ({})",
                    row.id
                )));
            }
            if !self.instances.contains_key(&row.instance_id) {
                return Err(Refusal::foreign_key(format!(
                    "insert on table \"mandelboxes\" violates foreign key constraint (instance {})",
                    row.instance_id
                )));
            }
            check_user_matches_status(&row)?;
            let row = self.apply_assignment(None, row)?;
            self.mandelboxes.insert(row.id, row);
        }
        Ok(count)
    }

    fn insert_instance(&mut self, object: Value) -> Result<(), Refusal> {
        let mut object = object;
        let now = self.now();
        for (column, default) in [
            ("created_at", json!(now)),
            ("updated_at", json!(now)),
            // The heartbeat trigger stamps a new row with the database's clock.
            ("heartbeat_at", json!(now)),
            ("ip_addr", Value::Null),
            ("tls_fingerprint", Value::Null),
            ("fleet", Value::Null),
        ] {
            if object.get(column).is_none() {
                object[column] = default;
            }
        }
        let row: Instance = serde_json::from_value(object)
            .map_err(|error| Refusal::invalid(format!("objects: {error}")))?;
        if self.instances.contains_key(&row.id) {
            return Err(Refusal::unique(format!(
                "duplicate key value violates unique constraint \"instances_pkey\" ({})",
                row.id
            )));
        }
        self.instances.insert(row.id.clone(), row);
        Ok(())
    }

    /// Writes an updated mandelbox row through the assignment trigger's rules.
    fn update_mandelbox(&mut self, row: Mandelbox) -> Result<Mandelbox, Refusal> {
        check_user_matches_status(&row)?;
        let old = self.mandelboxes.get(&row.id).cloned();
        let row = self.apply_assignment(old.as_ref(), row)?;
        self.mandelboxes.insert(row.id, row.clone());
        Ok(row)
    }

    /// `whist.mandelboxes_enforce_assignment`: the stamp on a status change, the per-user limit
    /// when a box becomes live for a user, and the capacity taken or given back when a box gains
    /// or loses its user.
    fn apply_assignment(
        &mut self,
        old: Option<&Mandelbox>,
        mut row: Mandelbox,
    ) -> Result<Mandelbox, Refusal> {
        if let Some(old) = old {
            if old.instance_id != row.instance_id {
                return Err(Refusal::check(format!(
                    "mandelbox_moved: mandelbox {} cannot move from instance {} to {}",
                    row.id, old.instance_id, row.instance_id
                )));
            }
            if old.status != row.status {
                row.updated_at = self.now();
            }
        }
        let was_assigned = old.is_some_and(|old| old.user_id.is_some());
        let was_live_for_user = old
            .is_some_and(|old| old.user_id == row.user_id && old.status != MandelboxStatus::Dying);
        if let Some(user) = row.user_id.as_deref()
            && row.status != MandelboxStatus::Dying
            && !was_live_for_user
        {
            let limit = i64::from(FleetSettings::DEFAULT.mandelbox_limit_per_user);
            let live = self
                .mandelboxes
                .values()
                .filter(|other| {
                    other.user_id.as_deref() == Some(user)
                        && other.status != MandelboxStatus::Dying
                        && other.id != row.id
                })
                .count() as i64;
            if live >= limit {
                return Err(Refusal::check(format!(
                    "mandelbox_limit_reached: user {user} already has {live} live mandelboxes (limit {limit})"
                )));
            }
        }
        let is_assigned = row.user_id.is_some();
        if is_assigned && !was_assigned {
            let max_age = chrono::Duration::seconds(ASSIGN_HEARTBEAT_MAX_AGE_SECONDS);
            let now = self.now();
            let stale_before = now - max_age;
            let instance = self.instances.get_mut(&row.instance_id);
            match instance {
                Some(instance)
                    if instance.status == InstanceStatus::Active
                        && instance.remaining_capacity > 0
                        && instance.heartbeat_at >= stale_before =>
                {
                    instance.remaining_capacity -= 1;
                    instance.updated_at = now;
                }
                Some(instance) if instance.status != InstanceStatus::Active => {
                    return Err(Refusal::check(format!(
                        "instance_not_accepting: instance {} is {}",
                        instance.id, instance.status
                    )));
                }
                None => {
                    return Err(Refusal::check(format!(
                        "instance_not_accepting: instance {} is missing",
                        row.instance_id
                    )));
                }
                Some(instance) if instance.heartbeat_at < stale_before => {
                    return Err(Refusal::check(format!(
                        "instance_not_accepting: instance {} has sent no heartbeat since {}",
                        instance.id, instance.heartbeat_at
                    )));
                }
                Some(instance) => {
                    return Err(Refusal::check(format!(
                        "instance_full: instance {} has no remaining capacity",
                        instance.id
                    )));
                }
            }
        } else if was_assigned && !is_assigned {
            self.give_capacity_back(&row.instance_id);
        }
        Ok(row)
    }

    fn give_capacity_back(&mut self, instance_id: &str) {
        self.update_instance(instance_id, |instance| instance.remaining_capacity += 1);
    }

    // ---- direct access (the fake's own API) ----

    pub(crate) fn put_instance(&mut self, instance: Instance) {
        self.instances.insert(instance.id.clone(), instance);
    }

    pub(crate) fn put_mandelbox(&mut self, mandelbox: Mandelbox) {
        self.mandelboxes.insert(mandelbox.id, mandelbox);
    }

    /// Deletes a box; an assigned one gives its capacity back (the delete trigger).
    pub(crate) fn delete_mandelbox(&mut self, id: MandelboxId) -> Option<Mandelbox> {
        let row = self.mandelboxes.remove(&id)?;
        if row.user_id.is_some() {
            self.give_capacity_back(&row.instance_id);
        }
        Some(row)
    }

    /// Deletes an instance with its boxes.
    pub(crate) fn delete_instance(&mut self, id: &str) -> Option<Instance> {
        self.mandelboxes.retain(|_, row| row.instance_id != id);
        self.instances.remove(id)
    }

    /// Changes an instance in place; `false` when there is no such row.
    pub(crate) fn update_instance(&mut self, id: &str, change: impl FnOnce(&mut Instance)) -> bool {
        let now = self.now();
        let Some(row) = self.instances.get_mut(id) else {
            return false;
        };
        change(row);
        row.updated_at = now;
        true
    }

    fn update_instance_where(
        &mut self,
        id: &str,
        condition: impl FnOnce(&Instance) -> bool,
        change: impl FnOnce(&mut Instance),
    ) -> Vec<Instance> {
        if !self.instances.get(id).is_some_and(condition) {
            return Vec::new();
        }
        self.update_instance(id, change);
        self.instances.get(id).cloned().into_iter().collect()
    }

    pub(crate) fn grant_lease(&mut self, name: &str, holder: &str) -> Fence {
        let now = self.now();
        let lease = self.leases.entry(name.to_owned()).or_insert_with(|| Lease {
            name: name.to_owned(),
            holder: None,
            generation: 0,
            expires_at: now,
            renewed_at: now,
        });
        lease.generation += 1;
        lease.holder = Some(holder.to_owned());
        lease.expires_at = now + chrono::Duration::hours(1);
        lease.renewed_at = now;
        Fence {
            lease: name.to_owned(),
            holder: holder.to_owned(),
            generation: lease.generation,
        }
    }

    pub(crate) fn instance(&self, id: &str) -> Option<Instance> {
        self.instances.get(id).cloned()
    }

    pub(crate) fn instances(&self) -> Vec<Instance> {
        self.instances.values().cloned().collect()
    }

    pub(crate) fn mandelbox(&self, id: MandelboxId) -> Option<Mandelbox> {
        self.mandelboxes.get(&id).cloned()
    }

    /// Every box, oldest first (ties by id), as the `order_by: {created_at: asc}` queries.
    pub(crate) fn mandelboxes(&self) -> Vec<Mandelbox> {
        let mut all: Vec<Mandelbox> = self.mandelboxes.values().cloned().collect();
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        all
    }

    fn boxes_on(&self, instance_id: &str) -> Vec<Mandelbox> {
        self.mandelboxes()
            .into_iter()
            .filter(|row| row.instance_id == instance_id)
            .collect()
    }
}
