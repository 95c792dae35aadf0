DROP TABLE IF EXISTS config.desktop_app_version;
DROP TABLE IF EXISTS config.settings;
DROP TABLE IF EXISTS config.regions;
DROP SCHEMA IF EXISTS config;
