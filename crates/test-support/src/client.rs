//! A Hasura client for a stack, as every test and benchmark needs one.

use whist_dbclient::{HasuraClient, HasuraConfig};

use crate::StackInfo;

impl StackInfo {
    /// A client for this stack's engine, admin secret included.
    pub fn client(&self) -> HasuraClient {
        let mut config = HasuraConfig::new(
            self.graphql_url
                .parse()
                .expect("the stack's GraphQL URL is valid"),
            Some(self.admin_secret.clone()),
        );
        config.websocket_url = Some(
            self.websocket_url
                .parse()
                .expect("the stack's websocket URL is valid"),
        );
        HasuraClient::new(config)
    }
}
