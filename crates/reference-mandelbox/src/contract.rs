//! The in-container contract between host-service and a mandelbox: where the resource directory
//! is, the names of the files in it, the container ports and the exit codes. Everything a host
//! author needs to know about this program, apart from the port protocol, is in this file.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// The resource directory when `WHIST_RESOURCE_DIR` is unset: the host bind-mounts it here.
pub const DEFAULT_RESOURCE_DIR: &str = "/whist/resourceMappings";
/// Overrides [`DEFAULT_RESOURCE_DIR`] (local runs without a bind mount, tests).
pub const RESOURCE_DIR_ENV: &str = "WHIST_RESOURCE_DIR";
/// The session's encryption key, passed by the host in the environment (32 hex characters).
pub const AES_KEY_ENV: &str = "WHIST_AES_KEY";

/// Written by the host last, once every file read at start is complete.
pub const PARAMS_READY: &str = ".paramsReady";
/// The host port Docker mapped onto container port 32262/tcp (decimal u16).
pub const HOST_PORT_FILE: &str = "hostPort_for_my_32262_tcp";
/// The TTY number the host reserved for this box (decimal u8).
pub const TTY_FILE: &str = "tty";
/// The GPU the host assigned (decimal integer).
pub const GPU_INDEX_FILE: &str = "gpu_index";
/// Seconds a ready box waits for a client before ending; `-1` (any negative) means forever.
pub const TIMEOUT_FILE: &str = "timeout";
/// Written by the host when a user is assigned; its appearance is what turns a zygote into a session.
pub const CONFIG_JSON: &str = "config.json";
/// Optional, written by the host alongside `config.json`.
pub const SESSION_ID_FILE: &str = "session_id";
/// Written by this program (content `done`) once the session is ready for its client.
pub const READINESS_FILE: &str = "done_sleeping_until_X_clients";

/// The container ports; Docker publishes host ports onto them.
pub const TCP_PORTS: [u16; 3] = [32261, 32262, 32273];
pub const UDP_PORT: u16 = 32263;

/// Exit codes. 0 is a normal end (`END` from a client, or the timeout).
pub const EXIT_IO: i32 = 1;
pub const EXIT_BAD_PARAMS: i32 = 2;
pub const EXIT_BAD_CONFIG: i32 = 3;

/// A reason to end with a non-zero exit code, with the message printed to stderr.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn io(what: &str, err: &io::Error) -> Self {
        Self::new(EXIT_IO, format!("{what}: {err}"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (exit code {})", self.message, self.code)
    }
}

/// What the host wrote before `.paramsReady`, plus the key from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub host_port_32262: u16,
    pub tty: u8,
    pub gpu_index: i32,
    /// `None` means never time out.
    pub timeout: Option<Duration>,
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let timeout = match self.timeout {
            Some(t) => format!("{}s", t.as_secs()),
            None => "none".to_owned(),
        };
        // The key itself is a secret: only say that it was present and well formed.
        write!(
            f,
            "params: host_port_32262={} tty={} gpu_index={} timeout={timeout} aes_key=ok",
            self.host_port_32262, self.tty, self.gpu_index
        )
    }
}

/// Blocks until `path` exists, checking every `poll`. No timeout: a box may sit unused for hours.
pub fn wait_for_file(path: &Path, poll: Duration) {
    while !path.exists() {
        thread::sleep(poll);
    }
}

/// Reads the start parameters from `dir` (after `.paramsReady`) and checks the key.
pub fn read_params(dir: &Path, aes_key: Option<&str>) -> Result<Params, Failure> {
    let host_port_32262 = read_number(dir, HOST_PORT_FILE)?;
    let tty = read_number(dir, TTY_FILE)?;
    let gpu_index = read_number(dir, GPU_INDEX_FILE)?;
    let timeout_secs: i64 = read_number(dir, TIMEOUT_FILE)?;
    let params = Params {
        host_port_32262,
        tty,
        gpu_index,
        // Any negative value (the host writes -1) means no timeout.
        timeout: u64::try_from(timeout_secs).ok().map(Duration::from_secs),
    };
    check_aes_key(aes_key)?;
    Ok(params)
}

fn read_number<T: std::str::FromStr>(dir: &Path, name: &str) -> Result<T, Failure>
where
    T::Err: fmt::Display,
{
    let path = dir.join(name);
    let text = fs::read_to_string(&path).map_err(|e| {
        Failure::new(
            EXIT_BAD_PARAMS,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    text.trim().parse().map_err(|e| {
        Failure::new(
            EXIT_BAD_PARAMS,
            format!(
                "{} holds {:?}, not a valid number: {e}",
                path.display(),
                text.trim()
            ),
        )
    })
}

fn check_aes_key(key: Option<&str>) -> Result<(), Failure> {
    match key {
        Some(k) if k.len() == 32 && k.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(()),
        Some(_) => Err(Failure::new(
            EXIT_BAD_PARAMS,
            format!("{AES_KEY_ENV} must be 32 hexadecimal characters"),
        )),
        None => Err(Failure::new(
            EXIT_BAD_PARAMS,
            format!("{AES_KEY_ENV} is not set"),
        )),
    }
}

/// How long an invalid `config.json` is re-read before giving up: the host may have created the
/// file and not yet written it, and a box must not die on that window.
const CONFIG_SETTLE: Duration = Duration::from_millis(250);

/// Checks `config.json` looks like a JSON object (non-empty, starts with `{`). Deliberately not a
/// parser: the file belongs to the real image's browser, this program only needs to know one came.
pub fn check_config_json(dir: &Path, poll: Duration) -> Result<(), Failure> {
    let path = dir.join(CONFIG_JSON);
    let started = Instant::now();
    loop {
        let problem = match fs::read_to_string(&path) {
            Ok(text) if text.trim_start().starts_with('{') => return Ok(()),
            Ok(text) if text.trim().is_empty() => "is empty".to_owned(),
            Ok(_) => "does not start with '{'".to_owned(),
            Err(e) => format!("cannot be read: {e}"),
        };
        if started.elapsed() >= CONFIG_SETTLE {
            return Err(Failure::new(
                EXIT_BAD_CONFIG,
                format!("{} {problem}: not a JSON object", path.display()),
            ));
        }
        thread::sleep(poll);
    }
}

/// The key in `config.json` that keeps this box from ever signalling readiness, so tests can
/// exercise the host's readiness timeout. The real image has no such key.
pub const HOLD_READINESS_KEY: &str = "\"reference_hold_readiness\"";

/// Whether `config.json` carries [`HOLD_READINESS_KEY`] (a plain substring test: no JSON parser).
pub fn holds_readiness(dir: &Path) -> bool {
    fs::read_to_string(dir.join(CONFIG_JSON)).is_ok_and(|text| text.contains(HOLD_READINESS_KEY))
}

/// The session id, if the host wrote one (trimmed; empty counts as absent).
pub fn read_session_id(dir: &Path) -> Option<String> {
    let id = fs::read_to_string(dir.join(SESSION_ID_FILE)).ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Writes the readiness file through a temporary name and a rename, so the host, which polls for
/// it, never reads a half-written file.
pub fn write_readiness(dir: &Path) -> Result<PathBuf, Failure> {
    let tmp = dir.join(format!(".{READINESS_FILE}.tmp"));
    let path = dir.join(READINESS_FILE);
    fs::write(&tmp, "done").map_err(|e| Failure::io(&format!("writing {}", tmp.display()), &e))?;
    fs::rename(&tmp, &path)
        .map_err(|e| Failure::io(&format!("renaming to {}", path.display()), &e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{AES_KEY, TempDir, write_params};

    const POLL: Duration = Duration::from_millis(20);

    #[test]
    fn reads_every_parameter() {
        let dir = TempDir::new("params");
        write_params(dir.path(), "7", "30");
        let params = read_params(dir.path(), Some(AES_KEY)).expect("params");
        assert_eq!(
            params,
            Params {
                host_port_32262: 40123,
                tty: 7,
                gpu_index: 0,
                timeout: Some(Duration::from_secs(30)),
            }
        );
    }

    #[test]
    fn negative_timeout_means_none() {
        let dir = TempDir::new("infinite");
        write_params(dir.path(), "1", "-1");
        let params = read_params(dir.path(), Some(AES_KEY)).expect("params");
        assert_eq!(params.timeout, None);
    }

    #[test]
    fn bad_tty_is_exit_2_and_names_the_file() {
        let dir = TempDir::new("bad-tty");
        write_params(dir.path(), "300", "30");
        let failure = read_params(dir.path(), Some(AES_KEY)).expect_err("tty 300 is not a u8");
        assert_eq!(failure.code, EXIT_BAD_PARAMS);
        assert!(failure.message.contains(TTY_FILE), "{failure}");
    }

    #[test]
    fn missing_file_is_exit_2() {
        let dir = TempDir::new("missing");
        write_params(dir.path(), "1", "30");
        fs::remove_file(dir.path().join(GPU_INDEX_FILE)).expect("remove");
        let failure = read_params(dir.path(), Some(AES_KEY)).expect_err("gpu_index is missing");
        assert_eq!(failure.code, EXIT_BAD_PARAMS);
        assert!(failure.message.contains(GPU_INDEX_FILE), "{failure}");
    }

    #[test]
    fn aes_key_must_be_32_hex_characters() {
        let dir = TempDir::new("key");
        write_params(dir.path(), "1", "30");
        for key in [None, Some("abc"), Some("0123456789abcdef0123456789abcdeg")] {
            let failure = read_params(dir.path(), key).expect_err("bad key");
            assert_eq!(failure.code, EXIT_BAD_PARAMS);
        }
    }

    #[test]
    fn config_json_must_look_like_an_object() {
        let dir = TempDir::new("config");
        let path = dir.path().join(CONFIG_JSON);
        for bad in ["", "  \n", "[1]", "null"] {
            fs::write(&path, bad).expect("write");
            let failure = check_config_json(dir.path(), POLL).expect_err(bad);
            assert_eq!(failure.code, EXIT_BAD_CONFIG);
        }
        fs::write(&path, " \n{\"user\": 1}").expect("write");
        check_config_json(dir.path(), POLL).expect("an object");
    }

    #[test]
    fn readiness_file_is_complete_and_leaves_no_temporary() {
        let dir = TempDir::new("readiness");
        let path = write_readiness(dir.path()).expect("write");
        assert_eq!(fs::read_to_string(path).expect("read"), "done");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [READINESS_FILE]);
    }

    #[test]
    fn session_id_is_optional_and_trimmed() {
        let dir = TempDir::new("session-id");
        assert_eq!(read_session_id(dir.path()), None);
        fs::write(dir.path().join(SESSION_ID_FILE), "abc-123\n").expect("write");
        assert_eq!(read_session_id(dir.path()).as_deref(), Some("abc-123"));
    }
}
