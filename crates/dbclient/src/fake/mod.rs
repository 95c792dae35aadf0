//! An in-memory database behind [`HasuraClient`], so the agent and the executor can be tested
//! on paused tokio time without an engine.
//!
//! [`FakeDatabase::client`] hands out a client whose operations never leave the process: each
//! one is answered by name from in-memory tables, with the rules the database's triggers enforce
//! (capacity moves when a box gains or loses its user, the per-user limit, rows stamped on state
//! changes, fenced writes refused once the lease moved on), and the answer goes through the same
//! decoding as an engine's, errors included. Live queries publish a full result set after every
//! write, as the engine does.
//!
//! What a test can do besides: make the next call of an operation fail ([`FakeDatabase::fail_next`]),
//! hold it until the test lets it go ([`FakeDatabase::hold_next`], for races decided on purpose),
//! cut the live queries off, act as the scaling-service (claim a box) and read every table.
//!
//! It serves the operations the agent, the executor and the leader send; any other answers a
//! validation error naming it, and a live query it does not serve never connects (its state says
//! why), so a test that strays fails loudly. Its clock is the machine's, moved on with
//! [`FakeDatabase::advance_clock`] (tokio's paused time does not move it). Unlike Hasura, which
//! polls, it publishes every write at once, and a cut is noticed at once rather than after the
//! keep-alive. It is held to the engine on
//! shared cases ([`conformance`], which `tests/stack_fake_conformance.rs` runs on the engine).

pub mod conformance;
mod tables;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use whist_types::{Instance, Mandelbox, MandelboxId};

use self::tables::{Refusal, Tables};
use crate::{Fence, HasuraClient, HasuraConfig};

/// How a scripted call fails.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The engine is unreachable (HTTP 503): a transient error, which callers retry.
    Unavailable,
    /// The engine answers with a GraphQL error of this `extensions.code` and message.
    Error { code: String, message: String },
    /// The call is applied, but its answer never arrives (HTTP 503 after the commit): what a
    /// retry must survive.
    AnswerLost,
}

/// An in-memory database. Cheap to share: every client it hands out reaches the same tables.
#[derive(Debug)]
pub struct FakeDatabase {
    state: Mutex<State>,
    /// Bumped after every write; live queries republish on each bump.
    version: watch::Sender<u64>,
    /// Whether live queries deliver (`false` while cut off).
    live: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct State {
    tables: Tables,
    faults: VecDeque<(String, Fault)>,
    holds: Vec<(String, Arc<Hold>)>,
    /// Every operation served, by name, in order.
    calls: Vec<String>,
}

/// A call held back by [`FakeDatabase::hold_next`].
#[derive(Debug)]
pub struct Hold {
    /// The held call's variables, set when it arrives.
    arrived: watch::Sender<Option<Value>>,
    released: CancellationToken,
}

impl Default for Hold {
    fn default() -> Self {
        Self {
            arrived: watch::channel(None).0,
            released: CancellationToken::new(),
        }
    }
}

impl Hold {
    /// Waits until the held call reached the database (it has not been applied yet).
    pub async fn arrived(&self) {
        let mut arrived = self.arrived.subscribe();
        // The sender lives as long as `self`, so the wait ends only by the call's arrival.
        let _ = arrived.wait_for(Option::is_some).await;
    }

    /// The variables of the held call, once it arrived.
    pub fn variables(&self) -> Option<Value> {
        self.arrived.borrow().clone()
    }

    /// Lets the held call go on; it is applied to the tables as they are then.
    pub fn release(&self) {
        self.released.cancel();
    }

    async fn wait_released(&self, variables: &Value) {
        self.arrived.send_replace(Some(variables.clone()));
        self.released.cancelled().await;
    }
}

impl Default for FakeDatabase {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            version: watch::channel(0).0,
            live: watch::channel(true).0,
        }
    }
}

impl FakeDatabase {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A client whose operations and live queries this database answers.
    pub fn client(self: &Arc<Self>) -> HasuraClient {
        // Never contacted: every call is answered in process.
        let url = "http://127.0.0.1:9/v1/graphql"
            .parse()
            .expect("a constant URL parses");
        HasuraClient::new(HasuraConfig::new(url, None)).with_fake(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("the fake's lock is never poisoned")
    }

    /// Applies a change made from outside the clients (the test acting as another service).
    fn write<T>(&self, change: impl FnOnce(&mut Tables) -> T) -> T {
        let result = change(&mut self.lock().tables);
        self.version.send_modify(|version| *version += 1);
        result
    }

    /// Answers one operation: its HTTP status and body, as an engine would send them.
    pub(crate) async fn answer(&self, name: &'static str, variables: &Value) -> (u16, Vec<u8>) {
        let (hold, answer_lost) = {
            let mut state = self.lock();
            state.calls.push(name.to_owned());
            let fault = state
                .faults
                .iter()
                .position(|(op, _)| op == name)
                .and_then(|at| state.faults.remove(at));
            let answer_lost = matches!(fault, Some((_, Fault::AnswerLost)));
            match fault {
                Some((_, Fault::AnswerLost)) | None => {}
                Some((_, Fault::Unavailable)) => {
                    return (503, b"service unavailable".to_vec());
                }
                Some((_, Fault::Error { code, message })) => {
                    return (200, errors(&code, &message));
                }
            }
            let hold = state
                .holds
                .iter()
                .position(|(op, _)| op == name)
                .map(|at| state.holds.remove(at).1);
            (hold, answer_lost)
        };
        if let Some(hold) = hold {
            hold.wait_released(variables).await;
        }
        let answer = self.transaction(name, variables);
        if answer_lost {
            return (503, b"service unavailable".to_vec());
        }
        match answer {
            Ok(data) => (
                200,
                serde_json::to_vec(&json!({ "data": data })).expect("JSON values serialise"),
            ),
            Err(Refusal { code, message }) => (200, errors(code, &message)),
        }
    }

    /// Runs one operation on the tables as one transaction (a refusal leaves them as they were);
    /// live queries republish when it changed anything.
    fn transaction(&self, name: &str, variables: &Value) -> Result<Value, Refusal> {
        let (answer, wrote) = {
            let mut state = self.lock();
            let before = state.tables.clone();
            match state.tables.answer(name, variables) {
                Ok(data) => {
                    let wrote = state.tables != before;
                    (Ok(data), wrote)
                }
                Err(refusal) => {
                    state.tables = before;
                    (Err(refusal), false)
                }
            }
        };
        if wrote {
            self.version.send_modify(|version| *version += 1);
        }
        answer
    }

    /// Live-query result sets: the rows of `root` for `name` now, or an error naming a query this
    /// fake does not serve.
    pub(crate) fn live_rows(&self, name: &str, variables: &Value) -> Result<Value, String> {
        self.lock().tables.live(name, variables)
    }

    pub(crate) fn versions(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub(crate) fn live_watch(&self) -> watch::Receiver<bool> {
        self.live.subscribe()
    }

    // ---- scripting ----

    /// Makes the next call of operation `name` fail with `fault` (queued per operation).
    pub fn fail_next(&self, name: &str, fault: Fault) {
        self.lock().faults.push_back((name.to_owned(), fault));
    }

    /// Holds the next call of operation `name` before it is applied, until the returned hold is
    /// released: the test decides what happens in between.
    pub fn hold_next(&self, name: &str) -> Arc<Hold> {
        let hold = Arc::new(Hold::default());
        self.lock().holds.push((name.to_owned(), hold.clone()));
        hold
    }

    /// Cuts every live query off (their connections fail) until [`Self::restore_live`].
    pub fn cut_live(&self) {
        self.live.send_replace(false);
    }

    /// Lets live queries connect again; each delivers the current result set as a new
    /// connection.
    pub fn restore_live(&self) {
        self.live.send_replace(true);
    }

    /// How many times operation `name` was called.
    pub fn count(&self, name: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|call| *call == name)
            .count()
    }

    // ---- the tables, as other services would change them ----

    /// Puts (or replaces) an instance row as it is given.
    pub fn put_instance(&self, instance: Instance) {
        self.write(|tables| tables.put_instance(instance));
    }

    /// Puts (or replaces) a mandelbox row as it is given (no trigger runs).
    pub fn put_mandelbox(&self, mandelbox: Mandelbox) {
        self.write(|tables| tables.put_mandelbox(mandelbox));
    }

    /// The scaling-service's claim of a WAITING box for `user`, with the database's rules: the
    /// instance's capacity is taken and the user's limit enforced. `Err` carries the refusal's
    /// message.
    pub fn claim(
        &self,
        id: MandelboxId,
        user: &str,
        session_id: &str,
    ) -> Result<Mandelbox, String> {
        let variables = json!({ "id": id, "user_id": user, "session_id": session_id });
        let data = self
            .transaction("ClaimMandelbox", &variables)
            .map_err(|refusal| refusal.message)?;
        let returning = data["update_whist_mandelboxes"]["returning"][0].clone();
        if returning.is_null() {
            return Err(format!("mandelbox {id} is not WAITING"));
        }
        Ok(serde_json::from_value(returning).expect("the fake's rows decode"))
    }

    /// Deletes a mandelbox row as an operator would, with the capacity it held given back.
    pub fn delete_mandelbox(&self, id: MandelboxId) -> Option<Mandelbox> {
        self.write(|tables| tables.delete_mandelbox(id))
    }

    /// Deletes an instance row and its mandelboxes (e.g. the scaler reaped it).
    pub fn delete_instance(&self, id: &str) -> Option<Instance> {
        self.write(|tables| tables.delete_instance(id))
    }

    /// Changes an instance row in place (e.g. the scaler marks it DRAINING).
    pub fn update_instance(&self, id: &str, change: impl FnOnce(&mut Instance)) {
        self.write(|tables| tables.update_instance(id, change));
    }

    pub fn instance(&self, id: &str) -> Option<Instance> {
        self.lock().tables.instance(id)
    }

    pub fn instances(&self) -> Vec<Instance> {
        self.lock().tables.instances()
    }

    pub fn mandelbox(&self, id: MandelboxId) -> Option<Mandelbox> {
        self.lock().tables.mandelbox(id)
    }

    /// Every mandelbox row, oldest first.
    pub fn mandelboxes(&self) -> Vec<Mandelbox> {
        self.lock().tables.mandelboxes()
    }

    /// Moves the database's clock on (it is the machine's, not tokio's): leases expire and
    /// heartbeats age by it.
    pub fn advance_clock(&self, by: chrono::Duration) {
        self.write(|tables| tables.advance_clock(by));
    }

    /// Makes `holder` the holder of lease `name` in a new generation for an hour, and returns
    /// its fence.
    pub fn grant_lease(&self, name: &str, holder: &str) -> Fence {
        self.write(|tables| tables.grant_lease(name, holder))
    }
}

/// A GraphQL error envelope as Hasura writes it.
fn errors(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "errors": [{ "message": message, "extensions": { "path": "$", "code": code } }]
    }))
    .expect("JSON values serialise")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use whist_types::{InstanceStatus, MandelboxStatus, NewInstance, NewMandelbox};

    use super::*;
    use crate::{DbError, ops};

    #[tokio::test]
    async fn the_fake_passes_every_case_the_engine_passes() {
        conformance::all(&FakeDatabase::new().client()).await;
    }

    fn host(id: &str) -> NewInstance {
        NewInstance {
            id: id.to_owned(),
            provider: "AWS".to_owned(),
            region: "us-east-1".to_owned(),
            image_id: "ami".to_owned(),
            client_sha: "sha".to_owned(),
            instance_type: "g4dn.xlarge".to_owned(),
            remaining_capacity: 1,
            status: InstanceStatus::Active,
            fleet: None,
        }
    }

    /// Instance `i-1` with one WAITING box, whose id is returned.
    async fn host_with_zygote(db: &HasuraClient) -> MandelboxId {
        db.execute(&ops::insert_instances(&[host("i-1")]))
            .await
            .expect("insert");
        let id = MandelboxId::new_random();
        db.execute(&ops::insert_mandelboxes(&[NewMandelbox::waiting(
            id, "CHROME", "i-1",
        )]))
        .await
        .expect("insert");
        id
    }

    #[tokio::test]
    async fn scripted_faults_fail_the_next_call_of_their_operation_only() {
        let fake = FakeDatabase::new();
        let db = fake.client();
        fake.fail_next("InstanceById", Fault::Unavailable);
        fake.fail_next(
            "InstanceById",
            Fault::Error {
                code: "validation-failed".to_owned(),
                message: "no".to_owned(),
            },
        );
        let first = db.execute(&ops::instance_by_id("i-1")).await;
        assert!(
            first.as_ref().is_err_and(DbError::is_transient),
            "{first:?}"
        );
        assert!(
            db.execute(&ops::instances()).await.is_ok(),
            "other operations answer"
        );
        let second = db.execute(&ops::instance_by_id("i-1")).await;
        assert!(
            matches!(second, Err(DbError::Validation { .. })),
            "{second:?}"
        );
        assert_eq!(
            db.execute(&ops::instance_by_id("i-1"))
                .await
                .expect("answers"),
            None
        );
        assert_eq!(fake.count("InstanceById"), 3);
    }

    #[tokio::test]
    async fn an_operation_it_does_not_serve_is_refused_by_name() {
        let db = FakeDatabase::new().client();
        let error = db.execute(&ops::images()).await.expect_err("not served");
        assert!(error.to_string().contains("Images"), "{error}");
    }

    #[tokio::test]
    async fn a_held_call_is_applied_to_the_tables_as_they_are_when_released() {
        let fake = FakeDatabase::new();
        let db = fake.client();
        let id = host_with_zygote(&db).await;
        let hold = fake.hold_next("DeleteMandelboxIn");
        let retire = tokio::spawn({
            let db = db.clone();
            async move {
                db.execute(&ops::delete_mandelbox_in(id, &[MandelboxStatus::Waiting]))
                    .await
            }
        });
        hold.arrived().await;
        assert_eq!(hold.variables().expect("arrived")["id"], json!(id));
        fake.claim(id, "alice", "1").expect("the claim lands first");
        hold.release();
        let deleted = retire.await.expect("task").expect("answer");
        assert_eq!(deleted, None, "the claim won");
        assert_eq!(fake.instance("i-1").expect("row").remaining_capacity, 0);
    }

    #[tokio::test]
    async fn the_database_clock_moves_leases_and_heartbeats_on() {
        let fake = FakeDatabase::new();
        let db = fake.client();
        let fence = fake.grant_lease("scaling", "replica-a");
        db.execute(&ops::lease_check(&fence)).await.expect("holds");
        let id = host_with_zygote(&db).await;
        fake.advance_clock(chrono::Duration::hours(2));
        let lapsed = db.execute(&ops::lease_check(&fence)).await;
        assert!(matches!(lapsed, Err(DbError::Fenced { .. })), "{lapsed:?}");
        let stale = fake.claim(id, "alice", "1").expect_err("a silent host");
        assert!(stale.contains("no heartbeat"), "{stale}");
        assert!(db.execute(&ops::heartbeat("i-1")).await.expect("heartbeat"));
        fake.claim(id, "alice", "1")
            .expect("a host that beats again takes sessions");
    }

    #[tokio::test]
    async fn live_queries_follow_writes_and_reconnect_after_a_cut() {
        let fake = FakeDatabase::new();
        let db = fake.client();
        db.execute(&ops::insert_instances(&[host("i-1")]))
            .await
            .expect("insert");
        let mut boxes = db.subscribe(crate::live::queries::mandelboxes_on_instance("i-1"));
        let first = boxes.next().await.expect("first result set");
        assert!(first.rows.is_empty());
        let id = MandelboxId::new_random();
        db.execute(&ops::insert_mandelboxes(&[NewMandelbox::waiting(
            id, "CHROME", "i-1",
        )]))
        .await
        .expect("insert");
        let next = boxes.next().await.expect("after the insert");
        assert_eq!(next.added.len(), 1);

        fake.cut_live();
        fake.delete_mandelbox(id);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(matches!(
            boxes.state(),
            crate::ConnectionState::Waiting { .. }
        ));
        fake.restore_live();
        let after = boxes.next().await.expect("after the cut");
        assert!(after.rows.is_empty());
        assert_eq!(boxes.state(), crate::ConnectionState::Live);
    }
}
