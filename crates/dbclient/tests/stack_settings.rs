//! The fleet's settings have one source: the row of `config.settings`, whose column defaults are
//! what a fresh database starts with. The services' copy of those defaults
//! (`FleetSettings::DEFAULT`) must equal the columns', and the row cannot be removed (the triggers
//! read it and refuse to run without it, rather than fall back to values of their own).

mod common;

use std::collections::BTreeMap;

use whist_types::FleetSettings;

#[test]
fn the_services_defaults_are_the_columns_defaults() {
    let stack = whist_test_support::shared();
    let columns = stack
        .sql(
            "SELECT column_name || '=' || column_default FROM information_schema.columns \
             WHERE table_schema = 'config' AND table_name = 'settings' AND column_default IS NOT NULL",
        )
        .expect("read the column defaults");
    let defaults: BTreeMap<&str, &str> = columns
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let ours = serde_json::to_value(FleetSettings::DEFAULT).expect("serialises");
    for (column, value) in ours.as_object().expect("an object") {
        assert_eq!(
            defaults.get(column.as_str()).copied(),
            Some(value.to_string().as_str()),
            "config.settings.{column}"
        );
    }
}

#[test]
fn the_settings_row_cannot_be_deleted_or_truncated() {
    let stack = whist_test_support::shared();
    // In a transaction that is rolled back, so a missing guard fails this test and nothing else.
    for statement in ["DELETE FROM config.settings", "TRUNCATE config.settings"] {
        let result = stack.sql(&format!("BEGIN; {statement}; ROLLBACK;"));
        let error = result.expect_err(statement).to_string();
        assert!(error.contains("settings_required"), "{statement}: {error}");
    }
    let rows = stack
        .sql("SELECT count(*) FROM config.settings")
        .expect("count");
    assert_eq!(rows.trim(), "1");
}
