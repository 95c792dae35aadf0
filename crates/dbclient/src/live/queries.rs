//! The live queries the services subscribe to. Each delivers a full result set every time it
//! changes; [`crate::Subscription`] turns those into diffs.

use std::marker::PhantomData;

use serde_json::{Value, json};
use whist_types::{
    DesktopAppVersion, FleetSettings, Image, Instance, Mandelbox, RegionConfig, ScheduledBuffer,
};

use crate::ops::config::{
    desktop_app_version_fields, region_fields, schedule_fields, settings_fields,
};
use crate::ops::{image_fields, instance_fields, mandelbox_fields};

/// A subscription document, its variables and the root field holding the rows.
#[derive(Debug, Clone)]
pub struct LiveQuery<T> {
    pub(crate) name: &'static str,
    pub(crate) document: &'static str,
    pub(crate) variables: Value,
    pub(crate) root: &'static str,
    row: PhantomData<fn() -> T>,
}

impl<T> LiveQuery<T> {
    fn new(
        name: &'static str,
        document: &'static str,
        variables: Value,
        root: &'static str,
    ) -> Self {
        Self {
            name,
            document,
            variables,
            root,
            row: PhantomData,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn document(&self) -> &'static str {
        self.document
    }

    pub fn variables(&self) -> &Value {
        &self.variables
    }

    pub(crate) fn request_body(&self) -> Value {
        json!({ "query": self.document, "variables": self.variables, "operationName": self.name })
    }
}

const INSTANCES: &str = concat!(
    "subscription LiveInstances { whist_instances(order_by: {id: asc}) { ",
    instance_fields!(),
    " } }"
);

/// Every instance of the fleet (the scaling-service's view).
pub fn instances() -> LiveQuery<Instance> {
    LiveQuery::new("LiveInstances", INSTANCES, json!({}), "whist_instances")
}

const INSTANCE: &str = concat!(
    "subscription LiveInstance($id: String!) { whist_instances(where: {id: {_eq: $id}}) { ",
    instance_fields!(),
    " } }"
);

/// One instance's row (a host watching for DRAINING); empty once the row is deleted.
pub fn instance(id: &str) -> LiveQuery<Instance> {
    LiveQuery::new(
        "LiveInstance",
        INSTANCE,
        json!({ "id": id }),
        "whist_instances",
    )
}

const MANDELBOXES: &str = concat!(
    "subscription LiveMandelboxes { whist_mandelboxes(order_by: {id: asc}) { ",
    mandelbox_fields!(),
    " } }"
);

/// Every mandelbox of the fleet.
pub fn mandelboxes() -> LiveQuery<Mandelbox> {
    LiveQuery::new(
        "LiveMandelboxes",
        MANDELBOXES,
        json!({}),
        "whist_mandelboxes",
    )
}

const MANDELBOXES_ON_INSTANCE: &str = concat!(
    "subscription LiveMandelboxesOnInstance($instance_id: String!) { whist_mandelboxes(where: {instance_id: {_eq: $instance_id}}, order_by: {id: asc}) { ",
    mandelbox_fields!(),
    " } }"
);

/// Every mandelbox of one instance (a host watching for ALLOCATED boxes).
pub fn mandelboxes_on_instance(instance_id: &str) -> LiveQuery<Mandelbox> {
    LiveQuery::new(
        "LiveMandelboxesOnInstance",
        MANDELBOXES_ON_INSTANCE,
        json!({ "instance_id": instance_id }),
        "whist_mandelboxes",
    )
}

const IMAGES: &str = concat!(
    "subscription LiveImages { whist_images(order_by: [{provider: asc}, {region: asc}]) { ",
    image_fields!(),
    " } }"
);

/// The active image of every region.
pub fn images() -> LiveQuery<Image> {
    LiveQuery::new("LiveImages", IMAGES, json!({}), "whist_images")
}

const REGION_CONFIGS: &str = concat!(
    "subscription LiveRegionConfigs { config_regions(order_by: {region: asc}) { ",
    region_fields!(),
    " } }"
);

/// Every region's configuration.
pub fn region_configs() -> LiveQuery<RegionConfig> {
    LiveQuery::new(
        "LiveRegionConfigs",
        REGION_CONFIGS,
        json!({}),
        "config_regions",
    )
}

const REGION_SCHEDULES: &str = concat!(
    "subscription LiveRegionSchedules { config_region_schedules(order_by: [{region: asc}, {weekday: asc}, {hour: asc}]) { ",
    schedule_fields!(),
    " } }"
);

/// Every region's buffer schedule, hour by hour.
pub fn region_schedules() -> LiveQuery<ScheduledBuffer> {
    LiveQuery::new(
        "LiveRegionSchedules",
        REGION_SCHEDULES,
        json!({}),
        "config_region_schedules",
    )
}

const FLEET_SETTINGS: &str = concat!(
    "subscription LiveFleetSettings { config_settings(where: {id: {_eq: 1}}) { ",
    settings_fields!(),
    " } }"
);

/// The fleet-wide settings (one row).
pub fn fleet_settings() -> LiveQuery<FleetSettings> {
    LiveQuery::new(
        "LiveFleetSettings",
        FLEET_SETTINGS,
        json!({}),
        "config_settings",
    )
}

const DESKTOP_APP_VERSION: &str = concat!(
    "subscription LiveDesktopAppVersion { desktop_app_version(where: {id: {_eq: 1}}) { ",
    desktop_app_version_fields!(),
    " } }"
);

/// The published desktop client (one row).
pub fn desktop_app_version() -> LiveQuery<DesktopAppVersion> {
    LiveQuery::new(
        "LiveDesktopAppVersion",
        DESKTOP_APP_VERSION,
        json!({}),
        "desktop_app_version",
    )
}

const UPGRADES_IN_PROGRESS: &str = concat!(
    "subscription LiveUpgradesInProgress { config_image_upgrades(where: {state: {_in: [\"PENDING\", \"SHIELDED\"]}}, order_by: {region: asc}) { ",
    crate::ops::scaling::upgrade_fields!(),
    " } }"
);

/// Image upgrades still in progress (the scaling-service's shields).
pub fn upgrades_in_progress() -> LiveQuery<whist_types::ImageUpgrade> {
    LiveQuery::new(
        "LiveUpgradesInProgress",
        UPGRADES_IN_PROGRESS,
        json!({}),
        "config_image_upgrades",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_subscription<T>(query: &LiveQuery<T>) {
        let document = query.document();
        let header = format!("subscription {}", query.name());
        assert!(
            document.starts_with(&format!("{header} "))
                || document.starts_with(&format!("{header}(")),
            "{document}"
        );
        assert!(
            document.contains(&format!("{}(", query.root))
                || document.contains(&format!("{} {{", query.root))
        );
        assert_eq!(document.matches('{').count(), document.matches('}').count());
        assert!(!document.contains("_and: {"));
    }

    #[test]
    fn every_live_query_is_a_named_subscription_on_its_root() {
        assert_subscription(&instances());
        assert_subscription(&instance("i-1"));
        assert_subscription(&mandelboxes());
        assert_subscription(&mandelboxes_on_instance("i-1"));
        assert_subscription(&images());
        assert_subscription(&region_configs());
        assert_subscription(&fleet_settings());
        assert_subscription(&desktop_app_version());
    }

    #[test]
    fn the_host_sees_all_its_boxes_not_a_single_status() {
        let query = mandelboxes_on_instance("i-1");
        assert!(
            !query.document().contains("status: {"),
            "diffing needs every row of the instance"
        );
        assert_eq!(query.variables(), &json!({"instance_id": "i-1"}));
    }
}
