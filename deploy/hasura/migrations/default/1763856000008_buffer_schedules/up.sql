-- Buffers by hour of the week. Each region's hours are in its schedule's time zone (an IANA name
-- Postgres knows, checked on every write); an hour without a row keeps the region's
-- desired_free_mandelboxes. The scaling-service subscribes to both, so a change applies at the
-- next decision, with the same cooldowns as any other change of target.

ALTER TABLE config.regions
    ADD COLUMN schedule_time_zone text NOT NULL DEFAULT 'UTC';

-- Hosts take minutes to boot: a scheduled rise is launched this long before its hour.
ALTER TABLE config.settings
    ADD COLUMN schedule_lead_seconds integer NOT NULL DEFAULT 300
        CONSTRAINT settings_schedule_lead_nonnegative CHECK (schedule_lead_seconds >= 0);

CREATE FUNCTION config.regions_check_time_zone()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = NEW.schedule_time_zone) THEN
        RAISE EXCEPTION 'unknown_time_zone: % is not a time zone name (e.g. UTC, Europe/Berlin)',
            NEW.schedule_time_zone
            USING ERRCODE = '23514';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER regions_check_time_zone
    BEFORE INSERT OR UPDATE OF schedule_time_zone ON config.regions
    FOR EACH ROW EXECUTE FUNCTION config.regions_check_time_zone();

-- No foreign key to config.regions: a region's configuration is rewritten as a whole (deleted and
-- inserted in one transaction), and its schedule must outlive that. Rows of a region without a
-- configuration are never read.
CREATE TABLE config.region_schedules (
    region                   varchar     NOT NULL,
    -- ISO weekday: 1 = Monday … 7 = Sunday.
    weekday                  smallint    NOT NULL
        CONSTRAINT region_schedules_weekday_valid CHECK (weekday BETWEEN 1 AND 7),
    hour                     smallint    NOT NULL
        CONSTRAINT region_schedules_hour_valid CHECK (hour BETWEEN 0 AND 23),
    desired_free_mandelboxes integer     NOT NULL
        CONSTRAINT region_schedules_desired_free_nonnegative CHECK (desired_free_mandelboxes >= 0),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (region, weekday, hour)
);

CREATE TRIGGER set_config_region_schedules_updated_at
    BEFORE UPDATE ON config.region_schedules
    FOR EACH ROW EXECUTE FUNCTION whist.set_current_timestamp_updated_at();
