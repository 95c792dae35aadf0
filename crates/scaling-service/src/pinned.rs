//! HTTPS clients to hosts, each pinned to the certificate its instance row publishes
//! ([`whist_serve::pinned`]): the caller's token and the session's key never reach anything
//! else, whatever answers at the host's address.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Clients kept, one per fingerprint; more are dropped and made again (hosts come and go).
const MAX_CLIENTS: usize = 4096;

/// HTTPS clients to hosts, one per pinned certificate.
#[derive(Debug)]
pub struct PinnedClients {
    timeout: Duration,
    clients: Mutex<HashMap<String, reqwest::Client>>,
}

impl PinnedClients {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A client that talks only to a server presenting the certificate whose SHA-256 is
    /// `fingerprint` (lower-case hex); `None` for a fingerprint that is not one.
    pub fn pinned_to(&self, fingerprint: &str) -> Option<reqwest::Client> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(fingerprint) {
            return Some(client.clone());
        }
        let tls = whist_serve::pinned::client_config(fingerprint)?;
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            // A host answering with a redirect must not steer this service anywhere else.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("a client with a rustls configuration and timeouts always builds");
        clients.insert(fingerprint.to_owned(), client.clone());
        Some(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fingerprints_get_a_client() {
        let clients = PinnedClients::new(Duration::from_secs(1));
        assert!(clients.pinned_to("not a fingerprint").is_none());
        assert!(clients.pinned_to(&"ab".repeat(32)).is_some());
    }
}
