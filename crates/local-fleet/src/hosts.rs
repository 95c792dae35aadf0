//! A cloud made of processes, for development: every "machine" is a host-service process on this
//! computer with an instance id, a loopback address, a data directory and a log of its own.
//!
//! It lives in `local-fleet` rather than in the scaling-service because only the local fleet runs
//! it: the scaling-service ships with EC2 alone and only provides the [`HostHandler`] trait this
//! implements, so a process supervisor (and its dependency on signals) stays out of production.
//!
//! Each host listens on its own address (127.0.1.1, 127.0.1.2, …) on the production ports, so the
//! assign and `json_transport` paths are the ones a real fleet takes. Hosts register through the
//! normal PRE_CONNECTION → ACTIVE path. Terminating a host sends SIGTERM (the host drains, as
//! an EC2 shutdown would make it) and SIGKILL after [`LocalHostsOptions::stop_timeout`]; once the
//! process has exited, [`LocalHostsOptions::on_exit`] removes whatever the "machine" left behind
//! (its containers), so an exit has the same effect as a machine vanishing.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;
use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::watch;

use scaling_service::hosts::{
    CloudHost, CloudState, Described, HostError, HostHandler, LaunchRequest,
};

/// Runs after a host process has exited, with its instance id: removes what it left behind.
pub type ExitHook = Arc<dyn Fn(String) -> BoxFuture<'static, ()> + Send + Sync>;

/// The port hosts serve `json_transport` on (the scaling-service's proxy only knows this one).
const TRANSPORT_PORT: u16 = scaling_service::http::HOST_TRANSPORT_PORT;
/// The port of each host's `/healthz`, `/readyz` and `/metrics`.
pub const OPS_PORT: u16 = 4679;

/// How local hosts are started.
#[derive(Clone)]
pub struct LocalHostsOptions {
    /// The host-service binary.
    pub host_binary: PathBuf,
    /// One directory per host is made in here (data, temporary files, `host-service.log`).
    pub dir: PathBuf,
    /// Arguments every host gets after its identity (Hasura, mandelbox image, timeouts, …).
    pub host_args: Vec<String>,
    /// Environment every host gets (secrets belong here rather than on the command line).
    pub host_env: Vec<(String, String)>,
    /// The first host's address; later hosts take the following ones.
    pub first_address: Ipv4Addr,
    /// How long a terminated host may drain before it is killed.
    pub stop_timeout: Duration,
    /// Cleans up after a host process has exited.
    pub on_exit: Option<ExitHook>,
}

impl std::fmt::Debug for LocalHostsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHostsOptions")
            .field("host_binary", &self.host_binary)
            .field("dir", &self.dir)
            .field("host_args", &self.host_args)
            .field("first_address", &self.first_address)
            .field("stop_timeout", &self.stop_timeout)
            .finish_non_exhaustive()
    }
}

/// One host of the local fleet, as [`LocalHosts::hosts`] reports it.
#[derive(Debug, Clone)]
pub struct LocalHost {
    pub cloud: CloudHost,
    pub address: Ipv4Addr,
    /// Its data directory and log.
    pub dir: PathBuf,
    pub pid: u32,
}

impl LocalHost {
    /// Where its `/healthz`, `/readyz` and `/metrics` are served.
    pub fn ops_url(&self) -> String {
        format!("http://{}:{OPS_PORT}", self.address)
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("host-service.log")
    }
}

/// Where a host process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Running,
    /// The process has exited (its pid may already belong to another process); its leftovers
    /// are being removed.
    Exited,
    /// Exited and cleaned up: the "machine" is terminated.
    Gone,
}

#[derive(Debug)]
struct Tracked {
    host: LocalHost,
    /// SIGTERM has been sent.
    stopping: bool,
    life: watch::Receiver<Life>,
}

impl Tracked {
    fn state(&self) -> CloudState {
        match *self.life.borrow() {
            Life::Gone => CloudState::Terminated,
            Life::Exited => CloudState::ShuttingDown,
            Life::Running if self.stopping => CloudState::ShuttingDown,
            Life::Running => CloudState::Running,
        }
    }

    fn snapshot(&self) -> CloudHost {
        CloudHost {
            state: self.state(),
            ..self.host.cloud.clone()
        }
    }
}

#[derive(Debug, Default)]
struct State {
    hosts: BTreeMap<String, Tracked>,
    /// Launch idempotency: the hosts each client token launched.
    launches: HashMap<String, Vec<String>>,
}

/// The [`HostHandler`] of the local fleet.
#[derive(Debug)]
pub struct LocalHosts {
    options: LocalHostsOptions,
    state: Mutex<State>,
}

impl LocalHosts {
    pub fn new(options: LocalHostsOptions) -> Self {
        Self {
            options,
            state: Mutex::new(State::default()),
        }
    }

    /// Every host whose process is still running, in launch order of their ids.
    pub fn hosts(&self) -> Vec<LocalHost> {
        self.lock()
            .hosts
            .values()
            .filter(|tracked| *tracked.life.borrow() != Life::Gone)
            .map(|tracked| tracked.host.clone())
            .collect()
    }

    /// The id of every host ever launched, gone or not.
    pub fn launched_ids(&self) -> Vec<String> {
        self.lock().hosts.keys().cloned().collect()
    }

    /// Terminates every host and waits until all are gone (drained or killed, leftovers
    /// removed). Used when the local fleet stops.
    pub async fn stop_all(&self) {
        let lives: Vec<(String, watch::Receiver<Life>)> = self
            .lock()
            .hosts
            .iter()
            .map(|(id, tracked)| (id.clone(), tracked.life.clone()))
            .collect();
        for (id, _) in &lives {
            self.stop(id);
        }
        futures::future::join_all(lives.into_iter().map(|(_, life)| wait_until_gone(life))).await;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn launch_now(&self, request: &LaunchRequest) -> Result<Vec<CloudHost>, HostError> {
        let mut state = self.lock();
        if let Some(ids) = state.launches.get(&request.client_token) {
            return Ok(ids
                .iter()
                .filter_map(|id| state.hosts.get(id).map(Tracked::snapshot))
                .collect());
        }
        let mut launched = Vec::new();
        for _ in 0..request.count {
            // Hosts are never forgotten, so their count numbers the next one's address.
            let number = u32::try_from(state.hosts.len()).unwrap_or(u32::MAX);
            let address = nth_address(self.options.first_address, number).ok_or_else(|| {
                HostError::Refused("the local fleet ran out of loopback addresses".into())
            })?;
            let id = format!("local-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            let tracked = self.spawn(request, &id, address)?;
            launched.push(tracked.snapshot());
            state.hosts.insert(id, tracked);
        }
        state.launches.insert(
            request.client_token.clone(),
            launched.iter().map(|host| host.id.clone()).collect(),
        );
        Ok(launched)
    }

    /// Starts one host process and the task that notices its end.
    fn spawn(
        &self,
        request: &LaunchRequest,
        id: &str,
        address: Ipv4Addr,
    ) -> Result<Tracked, HostError> {
        let dir = self.options.dir.join(id);
        std::fs::create_dir_all(&dir)
            .map_err(|error| HostError::Failed(format!("create {}: {error}", dir.display())))?;
        let log = std::fs::File::create(dir.join("host-service.log"))
            .map_err(|error| HostError::Failed(format!("create the host's log: {error}")))?;
        let log_err = log
            .try_clone()
            .map_err(|error| HostError::Failed(format!("open the host's log: {error}")))?;
        let mut command = tokio::process::Command::new(&self.options.host_binary);
        command
            .arg("--local")
            .args(["--instance-id", id])
            .args(["--instance-type", &request.instance_type])
            .args(["--image-id", &request.image_id])
            .args(["--region", &request.region])
            .args(["--public-ip", &address.to_string()])
            .args(["--listen", &format!("{address}:{TRANSPORT_PORT}")])
            .args(["--ops-listen", &format!("{address}:{OPS_PORT}")])
            .arg("--whist-dir")
            .arg(dir.join("whist"))
            .arg("--temp-dir")
            .arg(dir.join("temp"))
            .args(&self.options.host_args)
            .envs(self.options.host_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C in the developer's terminal reaches the fleet,
            // which stops hosts in order, not every host at once behind its back.
            .process_group(0);
        let mut child = command.spawn().map_err(|error| {
            HostError::Refused(format!(
                "start {}: {error}",
                self.options.host_binary.display()
            ))
        })?;
        let pid = child.id().unwrap_or_default();
        let (life_tx, life) = watch::channel(Life::Running);
        let on_exit = self.options.on_exit.clone();
        let host_id = id.to_owned();
        let data = [dir.join("whist"), dir.join("temp")];
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = life_tx.send(Life::Exited);
            tracing::info!(instance.id = %host_id, ?status, "local host exited");
            if let Some(on_exit) = on_exit {
                on_exit(host_id.clone()).await;
            }
            for dir in data {
                if let Err(error) = std::fs::remove_dir_all(&dir)
                    && error.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(instance.id = %host_id, dir = %dir.display(), %error, "remove a local host's files");
                }
            }
            let _ = life_tx.send(Life::Gone);
        });
        tracing::info!(instance.id = %id, %address, pid, "started a local host");
        Ok(Tracked {
            host: LocalHost {
                cloud: CloudHost {
                    id: id.to_owned(),
                    region: request.region.clone(),
                    image_id: request.image_id.clone(),
                    instance_type: request.instance_type.clone(),
                    state: CloudState::Running,
                    tags: request.tags.clone(),
                    launched_at: Some(Utc::now()),
                },
                address,
                dir,
                pid,
            },
            stopping: false,
            life,
        })
    }

    /// Sends SIGTERM now and SIGKILL after the stop timeout, unless the process has exited (a
    /// signal must never reach a process that reused its pid).
    fn stop(&self, id: &str) {
        let mut state = self.lock();
        let Some(tracked) = state.hosts.get_mut(id) else {
            return;
        };
        if tracked.stopping || *tracked.life.borrow() != Life::Running {
            return;
        }
        tracked.stopping = true;
        let pid = Pid::from_raw(tracked.host.pid as i32);
        let life = tracked.life.clone();
        let timeout = self.options.stop_timeout;
        let _ = kill(pid, Signal::SIGTERM);
        let id = id.to_owned();
        tokio::spawn(async move {
            if tokio::time::timeout(timeout, wait_until_exited(life.clone()))
                .await
                .is_err()
                && *life.borrow() == Life::Running
            {
                tracing::warn!(instance.id = %id, ?timeout, "local host did not stop; killing it");
                let _ = kill(pid, Signal::SIGKILL);
            }
        });
    }

    async fn wait_all(
        &self,
        ids: &[String],
        timeout: Duration,
        what: &'static str,
        done: impl Fn(Option<CloudState>) -> Result<bool, HostError>,
    ) -> Result<(), HostError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let states: Vec<Option<CloudState>> = {
                let state = self.lock();
                ids.iter()
                    .map(|id| state.hosts.get(id).map(Tracked::state))
                    .collect()
            };
            let mut all = true;
            for state in states {
                all &= done(state)?;
            }
            if all {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HostError::Timeout(timeout, what));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn wait_until_gone(mut life: watch::Receiver<Life>) {
    let _ = life.wait_for(|life| *life == Life::Gone).await;
}

async fn wait_until_exited(mut life: watch::Receiver<Life>) {
    let _ = life.wait_for(|life| *life != Life::Running).await;
}

/// The `n`th address after `first`, staying inside 127.0.0.0/8 and off its broadcast address.
fn nth_address(first: Ipv4Addr, n: u32) -> Option<Ipv4Addr> {
    let address = Ipv4Addr::from(u32::from(first).checked_add(n)?);
    (address.octets()[0] == 127 && address != Ipv4Addr::new(127, 255, 255, 255)).then_some(address)
}

impl HostHandler for LocalHosts {
    fn launch<'a>(
        &'a self,
        request: &'a LaunchRequest,
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        std::future::ready(self.launch_now(request)).boxed()
    }

    fn terminate<'a>(
        &'a self,
        _region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<(), HostError>> {
        for id in ids {
            self.stop(id);
        }
        std::future::ready(Ok(())).boxed()
    }

    fn wait_running<'a>(
        &'a self,
        _region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.wait_all(ids, timeout, "hosts to run", |state| match state {
            Some(CloudState::Running) => Ok(true),
            None => Err(HostError::Refused("unknown local host".into())),
            Some(other) => Err(HostError::Refused(format!(
                "local host is {other:?}, not running"
            ))),
        })
        .boxed()
    }

    fn wait_terminated<'a>(
        &'a self,
        _region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.wait_all(ids, timeout, "hosts to terminate", |state| {
            Ok(matches!(state, None | Some(CloudState::Terminated)))
        })
        .boxed()
    }

    fn list<'a>(
        &'a self,
        region: &'a str,
        tag: (&'a str, &'a str),
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        let hosts = self
            .lock()
            .hosts
            .values()
            .map(Tracked::snapshot)
            .filter(|host| {
                host.region == region && host.tags.get(tag.0).map(String::as_str) == Some(tag.1)
            })
            .collect();
        std::future::ready(Ok(hosts)).boxed()
    }

    fn describe<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Described, HostError>> {
        let state = self.lock();
        let described = ids
            .iter()
            .map(|id| {
                let host = state
                    .hosts
                    .get(id)
                    .map(Tracked::snapshot)
                    .filter(|host| host.region == region);
                (id.clone(), host)
            })
            .collect();
        std::future::ready(Ok(described)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_first_and_stay_on_loopback() {
        let first = Ipv4Addr::new(127, 0, 1, 1);
        assert_eq!(nth_address(first, 0), Some(first));
        assert_eq!(nth_address(first, 1), Some(Ipv4Addr::new(127, 0, 1, 2)));
        assert_eq!(nth_address(first, 255), Some(Ipv4Addr::new(127, 0, 2, 0)));
        assert_eq!(nth_address(Ipv4Addr::new(127, 255, 255, 254), 1), None);
        assert_eq!(nth_address(Ipv4Addr::new(127, 255, 255, 255), 1), None);
    }
}
