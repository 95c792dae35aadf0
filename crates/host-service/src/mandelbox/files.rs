//! The resource-mapping files: written by the host, read by the programs in the box.
//!
//! Every file is written to a temporary name and renamed, so a box never reads a partial value.
//! Nothing is fsynced: the box reads the files through the same page cache, and a crash of the
//! host ends the box with them. `.paramsReady` is written last and before the container starts: the box's start-up
//! script blocks on it and then reads the others.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use base64::Engine;

use crate::resources::HostPorts;

pub const HOST_PORT_FOR_32262: &str = "hostPort_for_my_32262_tcp";
pub const TTY: &str = "tty";
pub const GPU_INDEX: &str = "gpu_index";
pub const TIMEOUT: &str = "timeout";
pub const PARAMS_READY: &str = ".paramsReady";
pub const SESSION_ID: &str = "session_id";
pub const CONFIG_JSON: &str = "config.json";
/// Written by the box once the browser's X client is up: the session is ready.
pub const READY: &str = "done_sleeping_until_X_clients";

/// What the box needs before it starts.
#[derive(Debug, Clone, Copy)]
pub struct StartParams {
    pub ports: HostPorts,
    pub tty: u8,
    pub gpu_index: u32,
    pub protocol_timeout: i64,
}

/// Creates the resource directory and writes the start parameters, `.paramsReady` last.
pub fn write_start_params(dir: &Path, params: &StartParams) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // The box may run as an unprivileged user and must be able to write its readiness file.
    set_mode(dir, 0o777)?;
    write_file(
        dir,
        HOST_PORT_FOR_32262,
        params.ports.port_32262.to_string().as_bytes(),
    )?;
    write_file(dir, TTY, params.tty.to_string().as_bytes())?;
    write_file(dir, GPU_INDEX, params.gpu_index.to_string().as_bytes())?;
    write_file(dir, TIMEOUT, params.protocol_timeout.to_string().as_bytes())?;
    write_file(dir, PARAMS_READY, PARAMS_READY.as_bytes())
}

pub fn write_session_id(dir: &Path, session_id: &str) -> std::io::Result<()> {
    write_file(dir, SESSION_ID, session_id.as_bytes())
}

pub fn write_client_config(dir: &Path, config: &[u8]) -> std::io::Result<()> {
    write_file(dir, CONFIG_JSON, config)
}

/// `json_data` is neither JSON nor base64(gzip(JSON)).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("json_data is neither a JSON object nor base64-encoded gzip of one")]
pub struct UndecodableClientConfig;

/// Clients send their settings either as a JSON object or as base64(gzip(JSON object)). An
/// empty string means "no settings".
pub fn decode_client_config(json_data: &str) -> Result<Vec<u8>, UndecodableClientConfig> {
    let trimmed = json_data.trim();
    if trimmed.is_empty() {
        return Ok(b"{}".to_vec());
    }
    if is_json_object(trimmed.as_bytes()) {
        return Ok(trimmed.as_bytes().to_vec());
    }
    let compressed = base64::engine::general_purpose::STANDARD
        .decode(trimmed)
        .map_err(|_| UndecodableClientConfig)?;
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(compressed.as_slice())
        // A bound on the inflated size keeps a tiny request from filling the disk.
        .take(64 * 1024 * 1024)
        .read_to_end(&mut inflated)
        .map_err(|_| UndecodableClientConfig)?;
    if is_json_object(&inflated) {
        Ok(inflated)
    } else {
        Err(UndecodableClientConfig)
    }
}

fn is_json_object(bytes: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<serde_json::Value>(bytes),
        Ok(serde_json::Value::Object(_))
    )
}

/// Waits until the box writes its readiness file. `false` when `timeout` passes first.
///
/// The first look is at once, then after 1 ms, each pause twice the last up to
/// [`LONGEST_READY_PAUSE`]: a box that is ready within milliseconds of its configuration (the
/// usual case) is seen within about as long, and one that takes seconds costs a `stat` every
/// 16 ms rather than every few. The look is a plain `stat` on the calling worker (microseconds
/// on a local directory), so it needs no blocking pool and follows tokio's clock in tests.
pub async fn wait_for_ready(dir: &Path, timeout: Duration) -> bool {
    use backon::{ExponentialBuilder, Retryable as _};
    let path = dir.join(READY);
    let look = || async {
        if path.try_exists().unwrap_or(false) {
            Ok(())
        } else {
            Err(NotYet)
        }
    };
    let pauses = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(1))
        .with_max_delay(LONGEST_READY_PAUSE)
        .without_max_times();
    tokio::time::timeout(timeout, look.retry(pauses).sleep(tokio::time::sleep))
        .await
        .is_ok()
}

/// The longest pause between two looks for the readiness file.
pub const LONGEST_READY_PAUSE: Duration = Duration::from_millis(16);

/// The readiness file is not there yet.
#[derive(Debug)]
struct NotYet;

fn write_file(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, contents)?;
    set_mode(&temporary, 0o644)?;
    std::fs::rename(&temporary, dir.join(name))
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "whist-files-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn gzip_base64(text: &str) -> String {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(text.as_bytes()).expect("compress");
        base64::engine::general_purpose::STANDARD.encode(encoder.finish().expect("finish"))
    }

    #[test]
    fn start_params_are_written_with_params_ready_last() {
        let dir = temp_dir("params").join("mandelboxResourceMappings");
        let params = StartParams {
            ports: HostPorts {
                port_32261: 40001,
                port_32262: 40002,
                port_32263: 40003,
                port_32273: 40004,
            },
            tty: 12,
            gpu_index: 1,
            protocol_timeout: -1,
        };
        write_start_params(&dir, &params).expect("written");
        let read = |name| std::fs::read_to_string(dir.join(name)).expect(name);
        assert_eq!(read(HOST_PORT_FOR_32262), "40002");
        assert_eq!(read(TTY), "12");
        assert_eq!(read(GPU_INDEX), "1");
        assert_eq!(read(TIMEOUT), "-1");
        assert_eq!(read(PARAMS_READY), ".paramsReady");
        let ready_time = std::fs::metadata(dir.join(PARAMS_READY))
            .and_then(|m| m.modified())
            .expect("mtime");
        for name in [HOST_PORT_FOR_32262, TTY, GPU_INDEX, TIMEOUT] {
            let written = std::fs::metadata(dir.join(name))
                .and_then(|m| m.modified())
                .expect("mtime");
            assert!(written <= ready_time, "{name} written after .paramsReady");
        }
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn client_config_accepts_plain_json_and_gzip_base64() {
        let json = r#"{"dark_mode":true,"desired_timezone":"Europe/Paris"}"#;
        assert_eq!(decode_client_config(json).expect("plain"), json.as_bytes());
        assert_eq!(
            decode_client_config(&gzip_base64(json)).expect("gzip"),
            json.as_bytes()
        );
        assert_eq!(decode_client_config("").expect("empty"), b"{}");
    }

    #[test]
    fn client_config_refuses_everything_else() {
        for bad in ["not json", "[1,2]", "aGVsbG8=", "\"string\""] {
            assert_eq!(
                decode_client_config(bad),
                Err(UndecodableClientConfig),
                "{bad}"
            );
        }
        assert_eq!(
            decode_client_config(&gzip_base64("plain text")),
            Err(UndecodableClientConfig)
        );
    }

    #[tokio::test]
    async fn readiness_is_seen_or_times_out() {
        let dir = temp_dir("ready");
        assert!(!wait_for_ready(&dir, Duration::from_millis(50)).await);
        let writer = {
            let dir = dir.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                std::fs::write(dir.join(READY), "done").expect("write");
            })
        };
        assert!(wait_for_ready(&dir, Duration::from_secs(5)).await);
        writer.await.expect("writer");
    }

    /// On tokio's clock: a file that comes late is seen within the longest pause of it.
    #[tokio::test(start_paused = true)]
    async fn a_late_box_is_seen_within_the_longest_pause() {
        let dir = temp_dir("late");
        let started = tokio::time::Instant::now();
        let writer = {
            let dir = dir.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                std::fs::write(dir.join(READY), "done").expect("write");
            })
        };
        assert!(wait_for_ready(&dir, Duration::from_secs(20)).await);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(3), "{waited:?}");
        assert!(
            waited <= Duration::from_secs(3) + LONGEST_READY_PAUSE,
            "{waited:?}"
        );
        writer.await.expect("writer");
        assert!(!wait_for_ready(&temp_dir("never"), Duration::from_secs(20)).await);
        assert!(started.elapsed() >= Duration::from_secs(23));
    }
}
