-- A small fleet for local development: one enabled region with two free mandelboxes wanted.
INSERT INTO config.regions (region, enabled, desired_free_mandelboxes, instance_types)
VALUES ('us-east-1', true, 2, '["g4dn.2xlarge"]')
ON CONFLICT (region) DO NOTHING;

UPDATE config.desktop_app_version
SET major = 3, minor = 0, micro = 0,
    dev_commit_hash = 'local_dev', staging_commit_hash = 'local_dev', prod_commit_hash = 'local_dev'
WHERE id = 1;

-- The machine image of the region's hosts. The local fleet launches host-service processes
-- built from this checkout, whose commit is `local_dev`.
INSERT INTO whist.images (provider, region, image_id, client_sha)
VALUES ('AWS', 'us-east-1', 'local-host-image', 'local_dev')
ON CONFLICT (provider, region) DO NOTHING;

-- A developer watches this fleet react: scale up at once, scale down after a minute.
UPDATE config.settings
SET scale_up_cooldown_seconds = 5, scale_down_cooldown_seconds = 60, scale_down_delay_seconds = 60
WHERE id = 1;
