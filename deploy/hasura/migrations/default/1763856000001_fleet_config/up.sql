-- What the scaling-service reads to decide, kept in its own schema so that operators can change it
-- live (the service subscribes to these tables) without touching fleet state.

CREATE SCHEMA IF NOT EXISTS config;

-- One row per region the fleet knows. Only enabled regions are scaled and assignable.
CREATE TABLE config.regions (
    region                   varchar     NOT NULL PRIMARY KEY,
    enabled                  boolean     NOT NULL DEFAULT true,
    -- How many free (WAITING, on the current image) mandelboxes to keep ready.
    desired_free_mandelboxes integer     NOT NULL DEFAULT 2
        CONSTRAINT regions_desired_free_mandelboxes_nonnegative CHECK (desired_free_mandelboxes >= 0),
    -- Instance types to launch, in order of preference (a JSON array of strings).
    instance_types           jsonb       NOT NULL DEFAULT '["g4dn.2xlarge"]'
        CONSTRAINT regions_instance_types_nonempty_array
        CHECK (jsonb_typeof(instance_types) = 'array' AND jsonb_array_length(instance_types) > 0),
    updated_at               timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER set_config_regions_updated_at
    BEFORE UPDATE ON config.regions
    FOR EACH ROW EXECUTE FUNCTION whist.set_current_timestamp_updated_at();

-- Fleet-wide settings: exactly one row, id 1.
CREATE TABLE config.settings (
    id                          integer     NOT NULL PRIMARY KEY DEFAULT 1
        CONSTRAINT settings_single_row CHECK (id = 1),
    -- Live (not DYING) mandelboxes one user may hold; enforced by the database on every claim.
    mandelbox_limit_per_user    integer     NOT NULL DEFAULT 3
        CONSTRAINT settings_mandelbox_limit_positive CHECK (mandelbox_limit_per_user >= 1),
    -- Minimum time between two launches in one region.
    scale_up_cooldown_seconds   integer     NOT NULL DEFAULT 60
        CONSTRAINT settings_scale_up_cooldown_nonnegative CHECK (scale_up_cooldown_seconds >= 0),
    -- Minimum time between two scale-downs in one region.
    scale_down_cooldown_seconds integer     NOT NULL DEFAULT 300
        CONSTRAINT settings_scale_down_cooldown_nonnegative CHECK (scale_down_cooldown_seconds >= 0),
    -- How long a region must stay above target before idle hosts are drained.
    scale_down_delay_seconds    integer     NOT NULL DEFAULT 600
        CONSTRAINT settings_scale_down_delay_nonnegative CHECK (scale_down_delay_seconds >= 0),
    -- A host whose heartbeat is older than this is presumed dead and reaped.
    heartbeat_timeout_seconds   integer     NOT NULL DEFAULT 180
        CONSTRAINT settings_heartbeat_timeout_positive CHECK (heartbeat_timeout_seconds > 0),
    -- How long a launched host may take to become ACTIVE (an image upgrade rolls back after it).
    instance_ready_timeout_seconds integer  NOT NULL DEFAULT 900
        CONSTRAINT settings_instance_ready_timeout_positive CHECK (instance_ready_timeout_seconds > 0),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER set_config_settings_updated_at
    BEFORE UPDATE ON config.settings
    FOR EACH ROW EXECUTE FUNCTION whist.set_current_timestamp_updated_at();

INSERT INTO config.settings (id) VALUES (1);

-- The published desktop client, bumped by the client's release pipeline through the Hasura
-- mutation `update_desktop_app_version_by_pk`. The commit hash of the running environment decides
-- when an image upgrade swaps over.
CREATE TABLE config.desktop_app_version (
    id                  integer NOT NULL PRIMARY KEY
        CONSTRAINT desktop_app_version_single_row CHECK (id = 1),
    major               integer NOT NULL DEFAULT 0,
    minor               integer NOT NULL DEFAULT 0,
    micro               integer NOT NULL DEFAULT 0,
    dev_rc              integer NOT NULL DEFAULT 0,
    staging_rc          integer NOT NULL DEFAULT 0,
    dev_commit_hash     varchar NOT NULL DEFAULT '',
    staging_commit_hash varchar NOT NULL DEFAULT '',
    prod_commit_hash    varchar NOT NULL DEFAULT ''
);

INSERT INTO config.desktop_app_version (id) VALUES (1);
