-- The assign, decided inside the database in one round trip, and the demand ledger that records
-- every attempt.
--
-- Inserting a row into whist.assign_ledger *is* the assign: the trigger below reads the request
-- columns (user, session, regions in the client's order, client commit), chooses the box, claims
-- it, and fills in the decision columns before the row is stored; the engine's insert returns
-- them (`returning`). Refusals are decisions too: the row is kept with its refusal code, so the
-- ledger is the whole history of demand, met and unmet, that capacity planning replays.
--
-- The decision follows the same rules the service applied before, now in one place:
--   * only enabled regions count, in the client's order, each once; none → REGION_NOT_ENABLED;
--   * a region whose image row names another build than the client's (one commit rule: equal, or
--     one a prefix of the other) is skipped; only such regions → COMMIT_HASH_MISMATCH; the
--     local environment sends any_client_commit and takes any client build as the region's;
--   * a region whose ACTIVE hosts on its image all run builds the image row does not name is a
--     configuration error (SERVICE_UNAVAILABLE when nothing else is found);
--   * a box is a WAITING mandelbox on an ACTIVE host of the region's image that runs the build,
--     has capacity, an address and a fresh heartbeat; the fullest host first;
--   * a user at the limit gets USER_ALREADY_ACTIVE. One user's attempts are serialised (the same
--     advisory lock as the claim trigger's), so that refusal is decided on committed claims
--     only and is never mistaken for NO_INSTANCE_AVAILABLE while the user's own other attempts
--     are in flight;
--   * boxes another attempt is claiming are skipped (SKIP LOCKED), never waited for.
-- The claim itself is the same conditional update as before, so the claim trigger's invariants
-- (capacity, the per-user limit, heartbeats) hold exactly as they did.

CREATE TABLE whist.assign_ledger (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    -- The request.
    user_id        varchar     NOT NULL,
    session_id     varchar     NOT NULL,
    -- The regions the client asked for, in its order (a JSON array of strings).
    regions        jsonb       NOT NULL
        CONSTRAINT assign_ledger_regions_is_array CHECK (jsonb_typeof(regions) = 'array'),
    client_commit  varchar     NOT NULL,
    any_client_commit boolean  NOT NULL DEFAULT false,
    -- The decision (whatever a writer sends here is replaced).
    outcome        varchar,
    region         varchar,
    instance_id    varchar,
    mandelbox_id   varchar,
    ip_addr        inet,
    -- For the operator: why a region could not serve (a configuration error), when one could not.
    detail         varchar,
    -- Time the decision took inside the database.
    decision_ms    real
);

CREATE INDEX assign_ledger_requested_at_idx ON whist.assign_ledger (requested_at);

-- How long the ledger keeps an attempt. Each new attempt removes at most two older than this, so
-- the ledger stays bounded with no job of its own, and nothing younger is ever removed.
ALTER TABLE config.settings
    ADD COLUMN assign_ledger_retention_hours integer NOT NULL DEFAULT 720
        CONSTRAINT settings_assign_ledger_retention_positive
        CHECK (assign_ledger_retention_hours > 0);

-- The one commit rule (`whist_types::same_commit`): both non-empty, one a prefix of the other.
CREATE FUNCTION whist.same_commit(a text, b text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT a <> '' AND b <> '' AND (starts_with(a, b) OR starts_with(b, a))
$$;

CREATE FUNCTION whist.assign_ledger_decide()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    started         timestamptz := clock_timestamp();
    settings        record;
    user_live       integer;
    asked           text;
    seen            text[] := '{}';
    enabled_seen    boolean := false;
    matching_seen   boolean := false;
    mismatching_seen boolean := false;
    misconfigured_seen boolean := false;
    image           record;
    client          text;
    host            record;
    box             record;
BEGIN
    NEW.requested_at := now();
    NEW.outcome := NULL;
    NEW.region := NULL;
    NEW.instance_id := NULL;
    NEW.mandelbox_id := NULL;
    NEW.ip_addr := NULL;
    NEW.detail := NULL;

    SELECT coalesce(max(mandelbox_limit_per_user), 3) AS user_limit,
           coalesce(max(assign_heartbeat_max_age_seconds), 90) AS heartbeat_max_age,
           coalesce(max(assign_ledger_retention_hours), 720) AS retention_hours
        INTO settings FROM config.settings;

    -- One user's attempts one at a time, after every earlier one of theirs has committed.
    PERFORM pg_advisory_xact_lock(hashtextextended('whist.mandelboxes.user:' || NEW.user_id, 0));
    SELECT count(*) INTO user_live
        FROM whist.mandelboxes WHERE user_id = NEW.user_id AND status <> 'DYING';

    <<regions>>
    FOR asked IN SELECT value FROM jsonb_array_elements_text(NEW.regions) WITH ORDINALITY
                     AS requested(value, position) ORDER BY position
    LOOP
        CONTINUE WHEN asked = ANY (seen);
        seen := seen || asked;
        CONTINUE WHEN NOT EXISTS (
            SELECT 1 FROM config.regions WHERE region = asked AND enabled);
        enabled_seen := true;
        SELECT * INTO image FROM whist.images WHERE provider = 'AWS' AND region = asked;
        CONTINUE WHEN NOT FOUND;
        client := CASE WHEN NEW.any_client_commit THEN image.client_sha ELSE NEW.client_commit END;
        IF NOT whist.same_commit(image.client_sha, client) THEN
            mismatching_seen := true;
            CONTINUE;
        END IF;
        IF EXISTS (SELECT 1 FROM whist.instances
                       WHERE region = asked AND status = 'ACTIVE' AND image_id = image.image_id)
           AND NOT EXISTS (SELECT 1 FROM whist.instances
                       WHERE region = asked AND status = 'ACTIVE' AND image_id = image.image_id
                           AND whist.same_commit(client_sha, image.client_sha)
                           AND whist.same_commit(client_sha, client)) THEN
            misconfigured_seen := true;
            NEW.detail := format('region %s: its image row (%s) names commit %s, which none of its ACTIVE hosts on that image runs',
                asked, image.image_id, image.client_sha);
            CONTINUE;
        END IF;
        matching_seen := true;

        -- The fullest host first; on it, a box no other attempt is claiming.
        FOR host IN
            SELECT i.id, i.ip_addr FROM whist.instances i
                WHERE i.region = asked AND i.status = 'ACTIVE' AND i.image_id = image.image_id
                    AND i.remaining_capacity > 0 AND i.ip_addr IS NOT NULL
                    AND i.heartbeat_at >= now() - make_interval(secs => settings.heartbeat_max_age)
                    AND whist.same_commit(i.client_sha, image.client_sha)
                    AND whist.same_commit(i.client_sha, client)
                ORDER BY i.remaining_capacity, i.id
        LOOP
            SELECT m.id INTO box FROM whist.mandelboxes m
                WHERE m.instance_id = host.id AND m.status = 'WAITING'
                ORDER BY m.id
                LIMIT 1
                FOR UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            IF user_live >= settings.user_limit THEN
                NEW.outcome := 'USER_ALREADY_ACTIVE';
                EXIT regions;
            END IF;
            BEGIN
                UPDATE whist.mandelboxes
                    SET status = 'ALLOCATED', user_id = NEW.user_id, session_id = NEW.session_id
                    WHERE id = box.id AND status = 'WAITING';
                IF FOUND THEN
                    NEW.outcome := 'ASSIGNED';
                    NEW.region := asked;
                    NEW.instance_id := host.id;
                    NEW.mandelbox_id := box.id;
                    NEW.ip_addr := host.ip_addr;
                    EXIT regions;
                END IF;
            EXCEPTION WHEN check_violation THEN
                -- The host filled up, stopped accepting or fell silent since it was chosen (the
                -- claim trigger's refusals): the next host.
                NULL;
            END;
        END LOOP;
    END LOOP;

    IF NEW.outcome IS NULL THEN
        NEW.outcome := CASE
            WHEN NOT enabled_seen THEN 'REGION_NOT_ENABLED'
            WHEN matching_seen THEN 'NO_INSTANCE_AVAILABLE'
            WHEN misconfigured_seen THEN 'SERVICE_UNAVAILABLE'
            WHEN mismatching_seen THEN 'COMMIT_HASH_MISMATCH'
            ELSE 'NO_INSTANCE_AVAILABLE'
        END;
    END IF;

    -- Retention: at most two expired attempts go with each new one (never a younger one, and
    -- never one another attempt is removing).
    DELETE FROM whist.assign_ledger WHERE id IN (
        SELECT id FROM whist.assign_ledger
            WHERE requested_at < now() - make_interval(hours => settings.retention_hours)
            ORDER BY requested_at
            LIMIT 2
            FOR UPDATE SKIP LOCKED);

    NEW.decision_ms := extract(epoch FROM clock_timestamp() - started) * 1000;
    RETURN NEW;
END;
$$;

CREATE TRIGGER assign_ledger_decide
    BEFORE INSERT ON whist.assign_ledger
    FOR EACH ROW EXECUTE FUNCTION whist.assign_ledger_decide();

-- The decision reads boxes by instance and status.
CREATE INDEX mandelboxes_instance_status_idx ON whist.mandelboxes (instance_id, status);
