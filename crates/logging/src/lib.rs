//! Logging setup shared by both services and the tests.
//!
//! The filter comes from `RUST_LOG` (default `info`); the format from `LOG_FORMAT` (`text`, the
//! default, for people; `json` for log shippers). Both are read once at start-up.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable, one line per event, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line with the span fields flattened in, for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "text" | "pretty" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

/// Why logging could not be set up.
#[derive(Debug)]
pub enum InitError {
    /// `RUST_LOG` is not a valid filter.
    Filter(String),
    /// `LOG_FORMAT` is not a known format.
    Format(String),
    /// A global subscriber was already installed.
    AlreadyInitialised,
}

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Filter(message) => write!(f, "invalid RUST_LOG: {message}"),
            Self::Format(message) => write!(f, "invalid LOG_FORMAT: {message}"),
            Self::AlreadyInitialised => f.write_str("logging was already initialised"),
        }
    }
}

impl std::error::Error for InitError {}

/// Installs the global subscriber from `RUST_LOG` and `LOG_FORMAT`.
pub fn init_from_env() -> Result<(), InitError> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let format = std::env::var("LOG_FORMAT").unwrap_or_default();
    let format = format.parse().map_err(InitError::Format)?;
    init(&filter, format)
}

/// Installs the global subscriber with an explicit filter and format.
pub fn init(filter: &str, format: LogFormat) -> Result<(), InitError> {
    let filter = EnvFilter::builder()
        .parse(filter)
        .map_err(|error| InitError::Filter(error.to_string()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|_| InitError::AlreadyInitialised)
}

/// Logging for tests: output captured per test by the harness, `RUST_LOG` honoured (default
/// `warn` so that passing tests stay quiet). Safe to call from every test.
pub fn init_for_tests() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _already_installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_span_events(FmtSpan::NONE)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_unknown_ones_are_named() {
        assert_eq!("JSON".parse(), Ok(LogFormat::Json));
        assert_eq!("".parse(), Ok(LogFormat::Text));
        let error = "xml".parse::<LogFormat>().expect_err("xml is not a format");
        assert!(error.contains("xml"), "{error}");
    }

    #[test]
    fn a_bad_filter_is_reported_not_ignored() {
        let error = init("=[", LogFormat::Text).expect_err("invalid filter");
        assert!(matches!(error, InitError::Filter(_)), "{error}");
    }
}
