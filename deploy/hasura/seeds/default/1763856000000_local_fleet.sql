-- A small fleet for local development: one enabled region with two free mandelboxes wanted.
INSERT INTO config.regions (region, enabled, desired_free_mandelboxes, instance_types)
VALUES ('us-east-1', true, 2, '["g4dn.2xlarge"]')
ON CONFLICT (region) DO NOTHING;

UPDATE config.desktop_app_version
SET major = 3, minor = 0, micro = 0,
    dev_commit_hash = 'local_dev', staging_commit_hash = 'local_dev', prod_commit_hash = 'local_dev'
WHERE id = 1;
