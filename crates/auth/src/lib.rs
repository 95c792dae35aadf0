//! JWT verification against a JWKS, for both services.
//!
//! Clients of `json_transport` present an Auth0 access token: an RS256-signed JWT whose `kid`
//! names one of the tenant's signing keys, published as a JWKS at
//! `<issuer>.well-known/jwks.json`. [`JwtVerifier`] keeps those keys in memory and checks a
//! token's signature, `exp`, `nbf`, `iss`, `aud` and `sub` against them; how and when it
//! refetches them is described on the `verifier` module.
//!
//! The verifier is self-contained (configuration in, [`Claims`] or [`AuthError`] out) so the
//! scaling service can use the same code for the same tokens.
//!
//! Modules, one concern each: `config` (what the verifier is told), `error` (why a request is
//! refused), `header` (the `Authorization` header), `verifier` (the key cache and its
//! refreshes), `jwks` (fetching and reading the key set) and `token` (reading a token's header
//! and claims). They are private; everything public is re-exported here.

mod config;
mod error;
mod header;
mod jwks;
mod token;
mod verifier;

pub use config::{
    DEFAULT_LEEWAY, DEFAULT_MIN_REFRESH_INTERVAL, DEFAULT_REFRESH_INTERVAL, JwtConfig,
};
pub use error::AuthError;
pub use header::bearer_token;
pub use token::Claims;
pub use verifier::JwtVerifier;
