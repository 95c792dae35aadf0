//! The whole local stack, and the per-process shared instance tests use.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

use crate::engine::{Engine, EngineOptions, engine_binary};
use crate::metadata::{engine_names_json, notify_triggers_sql, tracked_tables};
use crate::postgres::Postgres;

/// The repository's root directory (where `deploy/` lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// How to start the stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub admin_secret: String,
    /// How often the engine re-reads every live query without a notification (whole seconds).
    pub subscription_refresh_seconds: u64,
    /// Install statement-level NOTIFY triggers so live queries are pushed at once.
    pub notify_triggers: bool,
    /// Apply `deploy/hasura/seeds` (a small local fleet configuration).
    pub seed: bool,
    /// The engine's loopback port; a free one when `None`.
    pub engine_port: Option<u16>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            admin_secret: "local-admin-secret".to_owned(),
            subscription_refresh_seconds: 1,
            notify_triggers: true,
            seed: false,
            engine_port: None,
        }
    }
}

/// Everything a client needs to use a running stack. Also passed between processes through
/// the `WHIST_STACK_*` environment variables.
#[derive(Debug, Clone)]
pub struct StackInfo {
    pub database_url: String,
    pub graphql_url: String,
    pub websocket_url: String,
    pub admin_secret: String,
    pub engine_binary: PathBuf,
    pub subscription_refresh_seconds: u64,
}

impl StackInfo {
    const VARIABLES: [&'static str; 6] = [
        "WHIST_STACK_DATABASE_URL",
        "WHIST_STACK_GRAPHQL_URL",
        "WHIST_STACK_WEBSOCKET_URL",
        "WHIST_STACK_ADMIN_SECRET",
        "WHIST_STACK_ENGINE_BIN",
        "WHIST_STACK_REFRESH_SECONDS",
    ];

    /// The environment that describes this stack to another process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let values = [
            self.database_url.clone(),
            self.graphql_url.clone(),
            self.websocket_url.clone(),
            self.admin_secret.clone(),
            self.engine_binary.display().to_string(),
            self.subscription_refresh_seconds.to_string(),
        ];
        Self::VARIABLES.into_iter().zip(values).collect()
    }

    /// The stack the environment describes, if it describes one.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        let Ok(graphql_url) = std::env::var("WHIST_STACK_GRAPHQL_URL") else {
            return Ok(None);
        };
        let get = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
        Ok(Some(Self {
            database_url: get("WHIST_STACK_DATABASE_URL")?,
            graphql_url,
            websocket_url: get("WHIST_STACK_WEBSOCKET_URL")?,
            admin_secret: get("WHIST_STACK_ADMIN_SECRET")?,
            engine_binary: get("WHIST_STACK_ENGINE_BIN")?.into(),
            subscription_refresh_seconds: get("WHIST_STACK_REFRESH_SECONDS")?
                .parse()
                .context("WHIST_STACK_REFRESH_SECONDS")?,
        }))
    }

    /// Starts a second engine over this stack's database (for tests that stop and restart an
    /// engine without disturbing everyone else). Its log goes to `log_file`.
    pub fn start_private_engine(&self, log_file: PathBuf) -> anyhow::Result<Engine> {
        let tables = tracked_tables(&repo_root().join("deploy/hasura/metadata"))?;
        Engine::start(EngineOptions {
            binary: self.engine_binary.clone(),
            database_url: self.database_url.clone(),
            admin_secret: self.admin_secret.clone(),
            names_json: engine_names_json(&tables),
            subscription_refresh_seconds: self.subscription_refresh_seconds,
            log_file,
            port: None,
        })
    }

    /// Runs SQL against the database and returns psql's unaligned, tuples-only output.
    pub fn sql(&self, sql: &str) -> anyhow::Result<String> {
        let psql = std::env::var_os("WHIST_PG_BIN")
            .map_or_else(
                || PathBuf::from("/usr/lib/postgresql/15/bin"),
                PathBuf::from,
            )
            .join("psql");
        let output = Command::new(psql)
            .args([
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                &self.database_url,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .context("run psql")?;
        if !output.status.success() {
            bail!("{}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

/// A running stack owned by this process. Dropping it stops everything and removes its files.
#[derive(Debug)]
pub struct Stack {
    info: StackInfo,
    engine: Engine,
    /// Taken in `drop` so the server stops before its directory is removed.
    postgres: Option<Postgres>,
    dir: PathBuf,
    watchdog: Option<Child>,
}

impl Stack {
    /// Starts Postgres, applies the migrations (and seeds, if asked), and starts the engine.
    pub fn start(options: &StackOptions) -> anyhow::Result<Self> {
        let root = repo_root();
        let engine_binary = engine_binary()?;
        let tables = tracked_tables(&root.join("deploy/hasura/metadata"))?;

        static STACKS_STARTED: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "whist-stack-{}-{}",
            std::process::id(),
            STACKS_STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let postgres = Postgres::start(&dir)?;

        for migration in sql_files(&root.join("deploy/hasura/migrations/default"), "up.sql")? {
            postgres.run_file(&migration)?;
        }
        if options.seed {
            for seed in sql_files(&root.join("deploy/hasura/seeds/default"), "")? {
                postgres.run_file(&seed)?;
            }
        }
        if options.notify_triggers {
            postgres.run_sql(&notify_triggers_sql(&tables))?;
        }

        let engine = Engine::start(EngineOptions {
            binary: engine_binary.clone(),
            database_url: postgres.url("postgres"),
            admin_secret: options.admin_secret.clone(),
            names_json: engine_names_json(&tables),
            subscription_refresh_seconds: options.subscription_refresh_seconds,
            log_file: dir.join("engine.log"),
            port: options.engine_port,
        })?;
        let info = StackInfo {
            database_url: postgres.url("postgres"),
            graphql_url: engine.graphql_url(),
            websocket_url: engine.websocket_url(),
            admin_secret: options.admin_secret.clone(),
            engine_binary,
            subscription_refresh_seconds: options.subscription_refresh_seconds,
        };
        let watchdog = spawn_watchdog(&engine, &postgres, &dir).ok();
        Ok(Self {
            info,
            engine,
            postgres: Some(postgres),
            dir,
            watchdog,
        })
    }

    pub fn info(&self) -> &StackInfo {
        &self.info
    }

    pub fn postgres(&self) -> &Postgres {
        self.postgres.as_ref().expect("only drop takes the server")
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The directory holding the cluster and the logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.engine.stop();
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        // The engine first (it holds connections), then the database, then its files.
        drop(self.postgres.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `up.sql` files of every migration, or every file of a seeds directory, in name order.
fn sql_files(dir: &Path, file_in_subdir: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    Ok(entries
        .into_iter()
        .map(|path| {
            if file_in_subdir.is_empty() {
                path
            } else {
                path.join(file_in_subdir)
            }
        })
        .filter(|path| {
            path.extension().is_some_and(|extension| extension == "sql") && path.is_file()
        })
        .collect())
}

/// A shell loop that outlives this process only to clean up after it: when this process is gone
/// (even killed), it stops the engine and Postgres and removes the stack's directory.
fn spawn_watchdog(engine: &Engine, postgres: &Postgres, dir: &Path) -> anyhow::Result<Child> {
    let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
kill -TERM "$2" 2>/dev/null; kill -INT "$3" 2>/dev/null
for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$3" 2>/dev/null || break; sleep 0.5; done
kill -KILL "$3" 2>/dev/null; rm -rf "$4""#;
    Command::new("sh")
        .args(["-c", script, "whist-stack-watchdog"])
        .arg(std::process::id().to_string())
        .arg(engine.pid().unwrap_or(0).to_string())
        .arg(postgres.pid().to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // A Ctrl-C meant for the owner must not take the watchdog down before it has cleaned up.
        .process_group(0)
        .spawn()
        .context("start the stack watchdog")
}

/// The stack this test process uses: the one the environment names, or one started now (once)
/// and cleaned up by its watchdog when the process exits.
pub fn shared() -> &'static StackInfo {
    static SHARED: OnceLock<StackInfo> = OnceLock::new();
    SHARED.get_or_init(|| {
        match StackInfo::from_env() {
            Ok(Some(info)) => return info,
            Ok(None) => {}
            Err(error) => panic!("the WHIST_STACK_* environment is incomplete: {error:#}"),
        }
        let stack = Stack::start(&StackOptions::default())
            .unwrap_or_else(|error| panic!("could not start the local stack: {error:#}"));
        let info = stack.info().clone();
        // Statics are never dropped; the watchdog stops everything when the process ends.
        std::mem::forget(stack);
        info
    })
}
