//! A self-signed TLS certificate made in process.
