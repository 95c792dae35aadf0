//! Small helpers for the processes the stack runs.

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid, User};

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// The user Postgres runs as: itself when not root (Postgres refuses root), else `postgres`.
pub(crate) fn postgres_user() -> anyhow::Result<Option<User>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let user = User::from_name("postgres")
        .context("look up the postgres user")?
        .context(
            "running as root needs a `postgres` system user (apt-get install postgresql-15)",
        )?;
    Ok(Some(user))
}

/// Runs `command` as `user` when one is given.
pub(crate) fn as_user(command: &mut Command, user: Option<&User>) {
    use std::os::unix::process::CommandExt;
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
}

/// Hands a directory to `user`.
pub(crate) fn give_to(path: &Path, user: Option<&User>) -> anyhow::Result<()> {
    if let Some(user) = user {
        std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// Sends `signal` to a child and waits up to `grace` for it to exit, then kills it.
pub(crate) fn stop_child(child: &mut Child, signal: Signal, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
    let _ = kill(pid, signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `ready` every 25 ms until it returns true, the child exits, or `timeout` passes.
pub(crate) fn wait_until(
    what: &str,
    child: &mut Child,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited during start-up ({status})");
        }
        if Instant::now() >= deadline {
            bail!("{what} was not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
