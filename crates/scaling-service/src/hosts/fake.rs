//! An in-memory cloud behind [`HostHandler`], so the executor, the controller and anything that
//! replays a fleet can run without an EC2 API.
//!
//! It keeps the rules of EC2 that the executor depends on, and [`super::conformance`] holds it to
//! the same cases as the real handler: a launch retried with its client token returns the same
//! machines; tags are there from the launch; each region is its own cloud; terminated machines
//! stay listed, as terminated; an id the cloud never knew is described as unknown, and
//! terminating it (or nothing) succeeds; a wait for a state that cannot come fails naming the
//! machine, one that does not come in time times out.
//!
//! Time is tokio's: a machine runs `boot_time` after its launch and is terminated
//! `shutdown_time` after its termination, so tests on paused time decide when that is. Rare
//! answers are scripted: [`FakeHosts::fail_next`] makes the next call of a kind fail, and
//! [`FakeHosts::hide_from_listings`] makes machines missing from tag listings (the listing a
//! cloud answers with during an outage) while they still exist when asked by id.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio::time::Instant;

use super::{CloudHost, CloudState, Described, HostError, HostHandler, LaunchRequest};

/// How often a wait looks at the machines again (tokio time).
const WAIT_POLL: Duration = Duration::from_millis(50);

/// The calls of [`HostHandler`], to script failures of and to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    Launch,
    Terminate,
    WaitRunning,
    WaitTerminated,
    List,
    Describe,
}

/// The in-memory cloud. Cheap to make; one per test.
#[derive(Debug, Default)]
pub struct FakeHosts {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    boot_time: Duration,
    shutdown_time: Duration,
    /// Every machine ever launched, by id.
    machines: BTreeMap<String, Machine>,
    /// (region, client token) → the machines that launch made.
    launches: HashMap<(String, String), Vec<String>>,
    failures: HashMap<Call, VecDeque<HostError>>,
    hidden: HashSet<String>,
    calls: HashMap<Call, usize>,
}

#[derive(Debug)]
struct Machine {
    host: CloudHost,
    launched: Instant,
    terminated: Option<Instant>,
}

impl Machine {
    /// The state now, as time has moved it on.
    fn observe(&mut self, now: Instant, boot_time: Duration, shutdown_time: Duration) {
        self.host.state = match self.terminated {
            Some(at) if now >= at + shutdown_time => CloudState::Terminated,
            Some(_) => CloudState::ShuttingDown,
            None if now >= self.launched + boot_time => CloudState::Running,
            None => CloudState::Pending,
        };
    }
}

impl FakeHosts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Machines are `Pending` for this long after their launch, then `Running` (default: none).
    pub fn with_boot_time(self, boot_time: Duration) -> Self {
        self.lock().boot_time = boot_time;
        self
    }

    /// Machines are `ShuttingDown` for this long after their termination (default: none).
    pub fn with_shutdown_time(self, shutdown_time: Duration) -> Self {
        self.lock().shutdown_time = shutdown_time;
        self
    }

    /// The next call of this kind fails with `error` (queued: several make several calls fail).
    pub fn fail_next(&self, call: Call, error: HostError) {
        self.lock()
            .failures
            .entry(call)
            .or_default()
            .push_back(error);
    }

    /// Tag listings leave these machines out from now on; asked by id, they are still there.
    pub fn hide_from_listings<I: IntoIterator<Item = String>>(&self, ids: I) {
        self.lock().hidden.extend(ids);
    }

    /// Listings show every machine again.
    pub fn show_in_listings(&self) {
        self.lock().hidden.clear();
    }

    /// How many times `call` was made (failed ones included).
    pub fn calls(&self, call: Call) -> usize {
        self.lock().calls.get(&call).copied().unwrap_or(0)
    }

    /// Every machine of `region` as it is now, terminated ones included.
    pub fn machines(&self, region: &str) -> Vec<CloudHost> {
        let mut state = self.lock();
        state.observe_all();
        state
            .machines
            .values()
            .filter(|machine| machine.host.region == region)
            .map(|machine| machine.host.clone())
            .collect()
    }

    /// Terminates a machine behind the fleet's back (a person, a spot reclaim).
    pub fn terminate_outside(&self, id: &str) {
        let mut state = self.lock();
        if let Some(machine) = state.machines.get_mut(id) {
            machine.terminated.get_or_insert_with(Instant::now);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the call and takes its scripted failure, if one is queued.
    fn begin(&self, call: Call) -> Result<MutexGuard<'_, State>, HostError> {
        let mut state = self.lock();
        *state.calls.entry(call).or_default() += 1;
        if let Some(error) = state.failures.get_mut(&call).and_then(VecDeque::pop_front) {
            return Err(error);
        }
        state.observe_all();
        Ok(state)
    }

    async fn wait_for(
        &self,
        call: Call,
        region: &str,
        ids: &[String],
        timeout: Duration,
        wanted: CloudState,
    ) -> Result<(), HostError> {
        let deadline = Instant::now() + timeout;
        let what = match wanted {
            CloudState::Running => "hosts to run",
            _ => "hosts to terminate",
        };
        // Counted once, and a scripted failure fails the wait at once, as a refused call would.
        drop(self.begin(call)?);
        loop {
            // The lock is released before the pause below.
            let waiting = {
                let mut state = self.lock();
                state.observe_all();
                let mut waiting = false;
                for id in ids {
                    let machine = state
                        .machines
                        .get(id)
                        .filter(|machine| machine.host.region == region);
                    match (wanted, machine.map(|machine| machine.host.state)) {
                        (_, Some(state)) if state == wanted => {}
                        // Unknown to the cloud: as good as terminated; never going to run.
                        (CloudState::Running, None) => {
                            return Err(HostError::Failed(format!(
                                "instance {id} is unknown instead of running"
                            )));
                        }
                        (_, None) => {}
                        (CloudState::Running, Some(CloudState::Pending)) => waiting = true,
                        (CloudState::Running, Some(other)) => {
                            return Err(HostError::Failed(format!(
                                "instance {id} is {other:?} instead of running"
                            )));
                        }
                        (_, Some(_)) => waiting = true,
                    }
                }
                waiting
            };
            if !waiting {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HostError::Timeout(timeout, what));
            }
            tokio::time::sleep_until(deadline.min(Instant::now() + WAIT_POLL)).await;
        }
    }
}

impl State {
    fn observe_all(&mut self) {
        let now = Instant::now();
        let (boot_time, shutdown_time) = (self.boot_time, self.shutdown_time);
        for machine in self.machines.values_mut() {
            machine.observe(now, boot_time, shutdown_time);
        }
    }
}

impl HostHandler for FakeHosts {
    fn launch<'a>(
        &'a self,
        request: &'a LaunchRequest,
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        async move {
            let mut state = self.begin(Call::Launch)?;
            let key = (request.region.clone(), request.client_token.clone());
            if let Some(ids) = state.launches.get(&key) {
                let ids = ids.clone();
                return Ok(ids
                    .iter()
                    .map(|id| state.machines[id].host.clone())
                    .collect());
            }
            let mut launched = Vec::new();
            for _ in 0..request.count {
                state.next_id += 1;
                let host = CloudHost {
                    // EC2's shape: i- and 17 hex digits.
                    id: format!("i-{:017x}", state.next_id),
                    region: request.region.clone(),
                    image_id: request.image_id.clone(),
                    instance_type: request.instance_type.clone(),
                    state: CloudState::Pending,
                    tags: request.tags.clone(),
                    launched_at: Some(Utc::now()),
                };
                state.machines.insert(
                    host.id.clone(),
                    Machine {
                        host: host.clone(),
                        launched: Instant::now(),
                        terminated: None,
                    },
                );
                launched.push(host);
            }
            state
                .launches
                .insert(key, launched.iter().map(|host| host.id.clone()).collect());
            Ok(launched)
        }
        .boxed()
    }

    fn terminate<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<(), HostError>> {
        async move {
            let mut state = self.begin(Call::Terminate)?;
            let now = Instant::now();
            for id in ids {
                if let Some(machine) = state.machines.get_mut(id)
                    && machine.host.region == region
                {
                    machine.terminated.get_or_insert(now);
                }
            }
            state.observe_all();
            Ok(())
        }
        .boxed()
    }

    fn wait_running<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.wait_for(Call::WaitRunning, region, ids, timeout, CloudState::Running)
            .boxed()
    }

    fn wait_terminated<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.wait_for(
            Call::WaitTerminated,
            region,
            ids,
            timeout,
            CloudState::Terminated,
        )
        .boxed()
    }

    fn list<'a>(
        &'a self,
        region: &'a str,
        tag: (&'a str, &'a str),
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        async move {
            let state = self.begin(Call::List)?;
            Ok(state
                .machines
                .values()
                .filter(|machine| machine.host.region == region)
                .filter(|machine| !state.hidden.contains(&machine.host.id))
                .filter(|machine| machine.host.tags.get(tag.0).map(String::as_str) == Some(tag.1))
                .map(|machine| machine.host.clone())
                .collect())
        }
        .boxed()
    }

    fn describe<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Described, HostError>> {
        async move {
            let state = self.begin(Call::Describe)?;
            Ok(ids
                .iter()
                .map(|id| {
                    let host = state
                        .machines
                        .get(id)
                        .filter(|machine| machine.host.region == region)
                        .map(|machine| machine.host.clone());
                    (id.clone(), host)
                })
                .collect())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance::{self, Subject};
    use super::*;

    fn subject(hosts: &FakeHosts) -> Subject<'_> {
        Subject {
            hosts,
            region: "us-east-1",
            other_region: "eu-west-1",
            image_id: "ami-0fake",
        }
    }

    /// Every case the EC2 handler is held to against moto, here on paused time.
    #[tokio::test(start_paused = true)]
    async fn behaves_like_the_ec2_handler() {
        // Booting takes a while, so the waits in the cases really wait.
        let hosts = FakeHosts::new().with_boot_time(Duration::from_secs(2));
        conformance::all(&subject(&hosts)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn machines_boot_and_shut_down_in_tokio_time() {
        let hosts = FakeHosts::new()
            .with_boot_time(Duration::from_secs(40))
            .with_shutdown_time(Duration::from_secs(10));
        let request = subject(&hosts).request("boot", 1);
        let id = hosts.launch(&request).await.expect("launch")[0].id.clone();
        assert_eq!(hosts.machines("us-east-1")[0].state, CloudState::Pending);
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(hosts.machines("us-east-1")[0].state, CloudState::Running);
        hosts
            .terminate("us-east-1", std::slice::from_ref(&id))
            .await
            .expect("terminate");
        assert_eq!(
            hosts.machines("us-east-1")[0].state,
            CloudState::ShuttingDown
        );
        hosts
            .wait_terminated("us-east-1", &[id], Duration::from_secs(60))
            .await
            .expect("terminated");
        assert_eq!(hosts.machines("us-east-1")[0].state, CloudState::Terminated);
    }

    #[tokio::test(start_paused = true)]
    async fn scripted_failures_and_hidden_machines() {
        let hosts = FakeHosts::new();
        let request = subject(&hosts).request("faults", 2);
        hosts.fail_next(Call::Launch, HostError::Throttled("slow down".into()));
        let error = hosts.launch(&request).await.expect_err("scripted");
        assert!(error.is_retryable(), "{error}");
        let launched = hosts.launch(&request).await.expect("the next one works");
        assert_eq!(hosts.calls(Call::Launch), 2);

        let ids: Vec<String> = launched.iter().map(|host| host.id.clone()).collect();
        hosts.hide_from_listings(ids.clone());
        let tag = (conformance::TAG, request.tags[conformance::TAG].as_str());
        let listed = hosts.list("us-east-1", tag).await.expect("list");
        assert!(listed.is_empty(), "{listed:?}");
        let described = hosts.describe("us-east-1", &ids).await.expect("describe");
        assert!(described.values().all(Option::is_some), "{described:?}");
        hosts.show_in_listings();
        let listed = hosts.list("us-east-1", tag).await.expect("list");
        assert_eq!(listed.len(), 2);

        // A machine terminated behind the fleet's back is reported so.
        hosts.terminate_outside(&ids[0]);
        let described = hosts.describe("us-east-1", &ids).await.expect("describe");
        assert_eq!(
            described[&ids[0]].as_ref().map(|host| host.state),
            Some(CloudState::Terminated)
        );
    }
}
