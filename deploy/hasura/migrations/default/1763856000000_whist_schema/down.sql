DROP TABLE IF EXISTS whist.images;
DROP TABLE IF EXISTS whist.mandelboxes;
DROP TABLE IF EXISTS whist.instances;
DROP FUNCTION IF EXISTS whist.set_current_timestamp_updated_at();
DROP SCHEMA IF EXISTS whist;
