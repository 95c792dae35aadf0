//! JWT verification against a JWKS.
