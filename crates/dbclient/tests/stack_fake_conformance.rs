//! The cases the in-memory database is held to (`whist_dbclient::fake::conformance`), run on the
//! stack's engine: whatever the fake answers differently from the engine fails here or in the
//! fake's own run of the same cases.

mod common;

#[tokio::test]
async fn the_engine_passes_every_case_the_fake_is_held_to() {
    whist_dbclient::fake::conformance::all(&common::client()).await;
}
