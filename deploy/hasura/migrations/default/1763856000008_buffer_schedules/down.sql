DROP TABLE IF EXISTS config.region_schedules;
DROP TRIGGER IF EXISTS regions_check_time_zone ON config.regions;
DROP FUNCTION IF EXISTS config.regions_check_time_zone();
ALTER TABLE config.regions DROP COLUMN IF EXISTS schedule_time_zone;
ALTER TABLE config.settings DROP COLUMN IF EXISTS schedule_lead_seconds;
