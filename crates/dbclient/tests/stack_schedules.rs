//! Buffers by hour of the week in the database: a schedule is written and read whole, survives
//! a rewrite of its region's configuration, and the database refuses what cannot be applied (an
//! unknown time zone, an hour or weekday out of range, a negative target).

mod common;

use common::{client, unique};
use whist_dbclient::{DbError, ops};
use whist_types::{RegionConfig, ScheduledBuffer};

fn region_config(region: &str, zone: &str) -> RegionConfig {
    RegionConfig {
        region: region.to_owned(),
        enabled: true,
        desired_free_mandelboxes: 2,
        instance_types: vec!["g4dn.2xlarge".into()],
        schedule_time_zone: zone.to_owned(),
    }
}

fn cell(region: &str, weekday: i16, hour: i16, target: i32) -> ScheduledBuffer {
    ScheduledBuffer {
        region: region.to_owned(),
        weekday,
        hour,
        desired_free_mandelboxes: target,
    }
}

async fn schedule_of(db: &whist_dbclient::HasuraClient, region: &str) -> Vec<ScheduledBuffer> {
    let mut live = db.subscribe(whist_dbclient::live::queries::region_schedules());
    let snapshot = live.next().await.expect("a result set");
    snapshot
        .rows
        .iter()
        .filter(|row| row.region == region)
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_schedule_is_replaced_whole_and_outlives_a_rewrite_of_its_region() {
    let db = client();
    let region = unique("region");
    db.execute(&ops::set_region_config(&region_config(
        &region,
        "Europe/Berlin",
    )))
    .await
    .expect("region");
    let cells = [cell(&region, 1, 8, 10), cell(&region, 1, 9, 6)];
    assert_eq!(
        db.execute(&ops::set_region_schedule(&region, &cells))
            .await
            .expect("schedule"),
        2
    );
    assert_eq!(schedule_of(&db, &region).await, cells);

    // Changing the default target rewrites the region's row; its hours stay.
    let mut changed = region_config(&region, "Europe/Berlin");
    changed.desired_free_mandelboxes = 0;
    db.execute(&ops::set_region_config(&changed))
        .await
        .expect("rewrite");
    assert_eq!(schedule_of(&db, &region).await, cells);
    let read = db.execute(&ops::region_configs()).await.expect("read");
    assert_eq!(
        read.iter().find(|row| row.region == region),
        Some(&changed),
        "the zone is kept with the rest"
    );

    let replaced = [cell(&region, 7, 23, 1)];
    db.execute(&ops::set_region_schedule(&region, &replaced))
        .await
        .expect("replace");
    assert_eq!(schedule_of(&db, &region).await, replaced);
    db.execute(&ops::set_region_schedule(&region, &[]))
        .await
        .expect("clear");
    assert!(schedule_of(&db, &region).await.is_empty());
}

#[tokio::test]
async fn what_cannot_be_applied_is_refused() {
    let db = client();
    let region = unique("region");
    let unknown_zone = db
        .execute(&ops::set_region_config(&region_config(
            &region,
            "Mars/Olympus_Mons",
        )))
        .await;
    assert!(
        matches!(&unknown_zone, Err(DbError::ConstraintViolation { message, .. }) if message.contains("unknown_time_zone")),
        "{unknown_zone:?}"
    );
    db.execute(&ops::set_region_config(&region_config(&region, "UTC")))
        .await
        .expect("region");
    for (bad, why) in [
        (cell(&region, 0, 8, 1), "weekday 0"),
        (cell(&region, 8, 8, 1), "weekday 8"),
        (cell(&region, 1, 24, 1), "hour 24"),
        (cell(&region, 1, -1, 1), "hour -1"),
        (cell(&region, 1, 8, -1), "a negative target"),
    ] {
        let good = cell(&region, 2, 8, 3);
        let result = db
            .execute(&ops::set_region_schedule(&region, &[good, bad]))
            .await;
        assert!(
            matches!(result, Err(DbError::ConstraintViolation { .. })),
            "{why}: {result:?}"
        );
    }
    assert!(
        schedule_of(&db, &region).await.is_empty(),
        "a refused schedule writes none of its hours"
    );
}
