DROP TABLE IF EXISTS config.leases;
DROP TABLE IF EXISTS config.image_upgrades;
DROP FUNCTION IF EXISTS config.image_upgrades_apply_swap();
