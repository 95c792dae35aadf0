-- The instance row of the compose file's one host, as the scaling-service writes it when it
-- launches a machine (PRE_CONNECTION); the host registers against it and turns it ACTIVE.
INSERT INTO whist.instances (id, provider, region, image_id, client_sha, instance_type, remaining_capacity, status, fleet)
VALUES ('compose-host-1', 'AWS', 'us-east-1', 'local-host-image', 'local_dev', 'g4dn.2xlarge', 2, 'PRE_CONNECTION', 'whist-local')
ON CONFLICT (id) DO NOTHING;
