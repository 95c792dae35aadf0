-- State the scaling-service must not lose across restarts: image upgrades in progress (the
-- "shield" around a new image's buffer) and the leader lease that lets several replicas run
-- while exactly one of them scales.

-- An image upgrade of one region. Deploy tooling inserts it PENDING; the scaling-service launches
-- the new image's buffer (SHIELDED), then swaps the region to it once the client for this commit
-- is published (SWAPPED), or rolls it back if the new hosts never become ACTIVE (ROLLED_BACK).
CREATE TABLE config.image_upgrades (
    provider    varchar     NOT NULL DEFAULT 'AWS',
    region      varchar     NOT NULL,
    image_id    varchar     NOT NULL,
    client_sha  varchar     NOT NULL,
    state       varchar     NOT NULL DEFAULT 'PENDING'
        CONSTRAINT image_upgrades_state_valid
        CHECK (state IN ('PENDING', 'SHIELDED', 'SWAPPED', 'ROLLED_BACK')),
    -- If the new hosts are not ACTIVE by then, the upgrade is rolled back.
    deadline_at timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, region, image_id)
);

-- At most one upgrade in progress per region.
CREATE UNIQUE INDEX image_upgrades_one_in_progress
    ON config.image_upgrades (provider, region)
    WHERE state IN ('PENDING', 'SHIELDED');

CREATE TRIGGER set_config_image_upgrades_updated_at
    BEFORE UPDATE ON config.image_upgrades
    FOR EACH ROW EXECUTE FUNCTION whist.set_current_timestamp_updated_at();

-- Swapping is one write: an upgrade turning SWAPPED makes its image the region's current one in
-- the same transaction, so the two can never disagree whoever writes.
CREATE FUNCTION config.image_upgrades_apply_swap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'SWAPPED' AND OLD.state IS DISTINCT FROM 'SWAPPED' THEN
        DELETE FROM whist.images WHERE provider = NEW.provider AND region = NEW.region;
        INSERT INTO whist.images (provider, region, image_id, client_sha)
            VALUES (NEW.provider, NEW.region, NEW.image_id, NEW.client_sha);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER image_upgrades_apply_swap
    AFTER UPDATE OF state ON config.image_upgrades
    FOR EACH ROW EXECUTE FUNCTION config.image_upgrades_apply_swap();

-- Named leases. A replica holds one while `expires_at` is in the future and renews it well
-- before; another replica takes it over only once it has expired.
CREATE TABLE config.leases (
    name       varchar     NOT NULL PRIMARY KEY,
    holder     varchar,
    expires_at timestamptz NOT NULL DEFAULT 'epoch'
);

INSERT INTO config.leases (name) VALUES ('scaling');
