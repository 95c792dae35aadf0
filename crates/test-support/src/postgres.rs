//! A throwaway Postgres cluster on a loopback port.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::process::{as_user, free_port, give_to, postgres_user, stop_child, wait_until};

/// Where Debian's `postgresql-15` puts the server binaries.
const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// A running cluster. Dropping it stops the server (fast shutdown); the data directory is left
/// to the owner of `dir`.
#[derive(Debug)]
pub struct Postgres {
    child: Child,
    port: u16,
    bin_dir: PathBuf,
}

impl Postgres {
    /// Creates a cluster under `dir` (trust auth, no fsync) and starts it on a free port.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let bin_dir = std::env::var_os("WHIST_PG_BIN")
            .map_or_else(|| PathBuf::from(DEFAULT_BIN_DIR), PathBuf::from);
        if !bin_dir.join("postgres").exists() {
            bail!(
                "Postgres 15 server binaries not found in {} (apt-get install postgresql-15, or set WHIST_PG_BIN)",
                bin_dir.display()
            );
        }
        let user = postgres_user()?;
        give_to(dir, user.as_ref())?;
        let data = dir.join("data");
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut initdb, user.as_ref());
        let output = initdb.output().context("run initdb")?;
        if !output.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }

        let port = free_port()?;
        let log =
            std::fs::File::create(dir.join("postgres.log")).context("create the Postgres log")?;
        give_to(&dir.join("postgres.log"), user.as_ref())?;
        let mut server = Command::new(bin_dir.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a Ctrl-C in the terminal goes to the program that owns the
            // stack, which stops the database last, after everything that still writes to it.
            .process_group(0);
        as_user(&mut server, user.as_ref());
        let child = server.spawn().context("start postgres")?;
        let mut postgres = Self {
            child,
            port,
            bin_dir,
        };
        let ready_check = postgres.pg_isready();
        wait_until(
            "postgres",
            &mut postgres.child,
            Duration::from_secs(30),
            || {
                Command::new(&ready_check.0)
                    .args(&ready_check.1)
                    .status()
                    .is_ok_and(|status| status.success())
            },
        )
        .with_context(|| format!("see {}", dir.join("postgres.log").display()))?;
        Ok(postgres)
    }

    fn pg_isready(&self) -> (PathBuf, Vec<String>) {
        (
            self.bin_dir.join("pg_isready"),
            vec![
                "-q".into(),
                "-h".into(),
                "127.0.0.1".into(),
                "-p".into(),
                self.port.to_string(),
            ],
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection URL of `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The process id of the postmaster.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs SQL from a file in one transaction, stopping at the first error.
    pub fn run_file(&self, file: &Path) -> anyhow::Result<()> {
        self.psql(&["-1", "-f", &file.to_string_lossy()])
            .with_context(|| format!("apply {}", file.display()))
    }

    /// Runs one SQL text in one transaction.
    pub fn run_sql(&self, sql: &str) -> anyhow::Result<()> {
        self.psql(&["-1", "-c", sql])
    }

    /// Runs a query and returns its unaligned, tuples-only output.
    pub fn query(&self, sql: &str) -> anyhow::Result<String> {
        let output = self
            .psql_command(&["-At", "-c", sql])
            .output()
            .context("run psql")?;
        if !output.status.success() {
            bail!("{}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    fn psql(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = self.psql_command(args).output().context("run psql")?;
        if !output.status.success() {
            bail!("{}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    fn psql_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(self.bin_dir.join("psql"));
        command
            .args([
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-p", &self.port.to_string()])
            .args(args)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null());
        command
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is Postgres's fast shutdown: disconnect clients, stop cleanly.
        stop_child(&mut self.child, Signal::SIGINT, Duration::from_secs(10));
    }
}
