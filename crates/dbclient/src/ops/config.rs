//! Operations on the fleet configuration (`config` schema).
//!
//! `config.desktop_app_version` is exposed as `desktop_app_version` (a custom name in the Hasura
//! metadata) because the client's release pipeline already calls
//! `update_desktop_app_version_by_pk`.

use serde_json::json;
use whist_types::{DesktopAppVersion, Environment, FleetSettings, RegionConfig, ScheduledBuffer};

use crate::Operation;
use crate::operation::{affected_rows, field};

/// The columns of `config.regions` the services read.
macro_rules! region_fields {
    () => {
        "region enabled desired_free_mandelboxes instance_types schedule_time_zone"
    };
}

/// The columns of `config.settings` the services read.
macro_rules! settings_fields {
    () => {
        "mandelbox_limit_per_user scale_up_cooldown_seconds scale_down_cooldown_seconds scale_down_delay_seconds heartbeat_timeout_seconds instance_ready_timeout_seconds schedule_lead_seconds"
    };
}

/// The columns of `config.desktop_app_version`.
macro_rules! desktop_app_version_fields {
    () => {
        "id major minor micro dev_rc staging_rc dev_commit_hash staging_commit_hash prod_commit_hash"
    };
}

/// The columns of `config.region_schedules` the services read.
macro_rules! schedule_fields {
    () => {
        "region weekday hour desired_free_mandelboxes"
    };
}

pub(crate) use {desktop_app_version_fields, region_fields, schedule_fields, settings_fields};

const REGION_CONFIGS: &str = concat!(
    "query RegionConfigs { config_regions(order_by: {region: asc}) { ",
    region_fields!(),
    " } }"
);

/// Every configured region, enabled or not.
pub fn region_configs() -> Operation<Vec<RegionConfig>> {
    Operation::new(
        "RegionConfigs",
        REGION_CONFIGS,
        json!({}),
        field("config_regions"),
    )
}

const SET_REGION_CONFIG: &str = concat!(
    "mutation SetRegionConfig($region: String!, $enabled: Boolean!, $desired_free_mandelboxes: Int!, $instance_types: jsonb!, $schedule_time_zone: String!) { ",
    "delete_config_regions(where: {region: {_eq: $region}}) { affected_rows } ",
    "insert_config_regions(objects: [{region: $region, enabled: $enabled, desired_free_mandelboxes: $desired_free_mandelboxes, instance_types: $instance_types, schedule_time_zone: $schedule_time_zone}]) { affected_rows } }"
);

/// Creates or replaces one region's configuration in one transaction.
pub fn set_region_config(config: &RegionConfig) -> Operation<()> {
    let decode = affected_rows("insert_config_regions");
    Operation::new(
        "SetRegionConfig",
        SET_REGION_CONFIG,
        json!({
            "region": config.region,
            "enabled": config.enabled,
            "desired_free_mandelboxes": config.desired_free_mandelboxes,
            "instance_types": config.instance_types,
            "schedule_time_zone": config.schedule_time_zone,
        }),
        move |data| match decode(data)? {
            1 => Ok(()),
            n => Err(format!("expected one region row written, got {n}")),
        },
    )
}

const SET_REGION_SCHEDULE: &str = concat!(
    "mutation SetRegionSchedule($region: String!, $cells: [config_region_schedules_insert_input!]!) { ",
    "delete_config_region_schedules(where: {region: {_eq: $region}}) { affected_rows } ",
    "insert_config_region_schedules(objects: $cells) { affected_rows } }"
);

const CLEAR_REGION_SCHEDULE: &str = "mutation ClearRegionSchedule($region: String!) { delete_config_region_schedules(where: {region: {_eq: $region}}) { affected_rows } }";

/// Replaces `region`'s whole schedule with `cells` in one transaction (no cells clears it: every
/// hour keeps the region's default). Every cell must name `region`. Returns the hours written.
pub fn set_region_schedule(region: &str, cells: &[ScheduledBuffer]) -> Operation<u64> {
    if cells.is_empty() {
        let decode = affected_rows("delete_config_region_schedules");
        return Operation::new(
            "ClearRegionSchedule",
            CLEAR_REGION_SCHEDULE,
            json!({ "region": region }),
            move |data| decode(data).map(|_| 0),
        );
    }
    Operation::new(
        "SetRegionSchedule",
        SET_REGION_SCHEDULE,
        json!({ "region": region, "cells": cells }),
        affected_rows("insert_config_region_schedules"),
    )
}

const DELETE_REGION_CONFIG: &str = "mutation DeleteRegionConfig($region: String!) { delete_config_regions(where: {region: {_eq: $region}}) { affected_rows } }";

/// Forgets a region's configuration. Returns whether it existed.
pub fn delete_region_config(region: &str) -> Operation<bool> {
    let decode = affected_rows("delete_config_regions");
    Operation::new(
        "DeleteRegionConfig",
        DELETE_REGION_CONFIG,
        json!({ "region": region }),
        move |data| decode(data).map(|rows| rows > 0),
    )
}

const FLEET_SETTINGS: &str = concat!(
    "query FleetSettings { config_settings_by_pk(id: 1) { ",
    settings_fields!(),
    " } }"
);

/// The fleet-wide settings row.
pub fn fleet_settings() -> Operation<Option<FleetSettings>> {
    Operation::new(
        "FleetSettings",
        FLEET_SETTINGS,
        json!({}),
        field("config_settings_by_pk"),
    )
}

const SET_FLEET_SETTINGS: &str = concat!(
    "mutation SetFleetSettings($mandelbox_limit_per_user: Int!, $scale_up_cooldown_seconds: Int!, ",
    "$scale_down_cooldown_seconds: Int!, $scale_down_delay_seconds: Int!, $heartbeat_timeout_seconds: Int!, ",
    "$instance_ready_timeout_seconds: Int!, $schedule_lead_seconds: Int!) { update_config_settings(where: {id: {_eq: 1}}, _set: {",
    "mandelbox_limit_per_user: $mandelbox_limit_per_user, scale_up_cooldown_seconds: $scale_up_cooldown_seconds, ",
    "scale_down_cooldown_seconds: $scale_down_cooldown_seconds, scale_down_delay_seconds: $scale_down_delay_seconds, ",
    "heartbeat_timeout_seconds: $heartbeat_timeout_seconds, instance_ready_timeout_seconds: $instance_ready_timeout_seconds, ",
    "schedule_lead_seconds: $schedule_lead_seconds",
    "}) { affected_rows } }"
);

/// Replaces the fleet-wide settings.
pub fn set_fleet_settings(settings: &FleetSettings) -> Operation<()> {
    let decode = affected_rows("update_config_settings");
    Operation::new(
        "SetFleetSettings",
        SET_FLEET_SETTINGS,
        serde_json::to_value(settings).expect("settings are plain integers"),
        move |data| match decode(data)? {
            1 => Ok(()),
            n => Err(format!("expected the settings row updated, got {n} rows")),
        },
    )
}

const DESKTOP_APP_VERSION: &str = concat!(
    "query DesktopAppVersion { desktop_app_version_by_pk(id: 1) { ",
    desktop_app_version_fields!(),
    " } }"
);

/// The published desktop client.
pub fn desktop_app_version() -> Operation<Option<DesktopAppVersion>> {
    Operation::new(
        "DesktopAppVersion",
        DESKTOP_APP_VERSION,
        json!({}),
        field("desktop_app_version_by_pk"),
    )
}

const SET_DEV_COMMIT: &str = "mutation SetDesktopAppCommit($hash: String!) { update_desktop_app_version_by_pk(pk_columns: {id: 1}, _set: {dev_commit_hash: $hash}) { id } }";
const SET_STAGING_COMMIT: &str = "mutation SetDesktopAppCommit($hash: String!) { update_desktop_app_version_by_pk(pk_columns: {id: 1}, _set: {staging_commit_hash: $hash}) { id } }";
const SET_PROD_COMMIT: &str = "mutation SetDesktopAppCommit($hash: String!) { update_desktop_app_version_by_pk(pk_columns: {id: 1}, _set: {prod_commit_hash: $hash}) { id } }";

/// Publishes a client commit for an environment, as the client's release pipeline does.
pub fn set_desktop_app_commit(environment: Environment, hash: &str) -> Operation<()> {
    let document = match environment {
        Environment::Local | Environment::Dev => SET_DEV_COMMIT,
        Environment::Staging => SET_STAGING_COMMIT,
        Environment::Prod => SET_PROD_COMMIT,
    };
    Operation::new(
        "SetDesktopAppCommit",
        document,
        json!({ "hash": hash }),
        |data| match data.get("update_desktop_app_version_by_pk") {
            Some(row) if row.is_object() => Ok(()),
            _ => Err("the desktop_app_version row (id 1) is missing".to_owned()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::assert_well_formed;

    fn settings() -> FleetSettings {
        FleetSettings::DEFAULT
    }

    #[test]
    fn every_document_is_well_formed() {
        assert_well_formed(&region_configs());
        assert_well_formed(&set_region_config(&RegionConfig {
            region: "us-east-1".into(),
            enabled: true,
            desired_free_mandelboxes: 2,
            instance_types: vec!["g4dn.2xlarge".into()],
            schedule_time_zone: "UTC".into(),
        }));
        assert_well_formed(&delete_region_config("us-east-1"));
        let cell = ScheduledBuffer {
            region: "us-east-1".into(),
            weekday: 1,
            hour: 8,
            desired_free_mandelboxes: 6,
        };
        assert_well_formed(&set_region_schedule("us-east-1", &[cell]));
        assert_well_formed(&set_region_schedule("us-east-1", &[]));
        assert_well_formed(&fleet_settings());
        assert_well_formed(&set_fleet_settings(&settings()));
        assert_well_formed(&desktop_app_version());
        for environment in [Environment::Dev, Environment::Staging, Environment::Prod] {
            assert_well_formed(&set_desktop_app_commit(environment, "abc"));
        }
    }

    #[test]
    fn each_environment_publishes_its_own_column() {
        assert!(
            set_desktop_app_commit(Environment::Prod, "x")
                .document()
                .contains("prod_commit_hash")
        );
        assert!(
            set_desktop_app_commit(Environment::Local, "x")
                .document()
                .contains("dev_commit_hash")
        );
    }
}
