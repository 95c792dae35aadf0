-- One source for every fleet setting: the row of config.settings, whose column defaults are the
-- values a fresh database starts with (and whist_types::FleetSettings::DEFAULT mirrors, checked by
-- a stack test). The triggers used to fall back to literals of their own when the row was
-- missing; the row now cannot go missing, and a trigger that finds none refuses (STRICT) rather
-- than run without a per-user limit.

INSERT INTO config.settings (id) VALUES (1) ON CONFLICT (id) DO NOTHING;

CREATE FUNCTION config.settings_keep_row()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'settings_required: config.settings keeps its one row; update it instead'
        USING ERRCODE = '23514';
END;
$$;

CREATE TRIGGER settings_keep_row
    BEFORE DELETE ON config.settings
    FOR EACH ROW EXECUTE FUNCTION config.settings_keep_row();

CREATE TRIGGER settings_keep_row_on_truncate
    BEFORE TRUNCATE ON config.settings
    FOR EACH STATEMENT EXECUTE FUNCTION config.settings_keep_row();

CREATE OR REPLACE FUNCTION whist.mandelboxes_enforce_assignment()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    was_assigned boolean := TG_OP = 'UPDATE' AND OLD.user_id IS NOT NULL;
    is_assigned  boolean := NEW.user_id IS NOT NULL;
    was_live_for_user boolean := TG_OP = 'UPDATE'
        AND OLD.user_id IS NOT DISTINCT FROM NEW.user_id AND OLD.status <> 'DYING';
    user_limit integer;
    user_live integer;
    instance_state record;
    heartbeat_max_age integer;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.instance_id IS DISTINCT FROM OLD.instance_id THEN
        RAISE EXCEPTION 'mandelbox_moved: mandelbox % cannot move from instance % to %',
            NEW.id, OLD.instance_id, NEW.instance_id
            USING ERRCODE = '23514';
    END IF;

    -- State changes are stamped by the database clock, so timeouts measured from them do not
    -- depend on the clocks of the hosts that wrote them.
    IF TG_OP = 'UPDATE' AND NEW.status IS DISTINCT FROM OLD.status THEN
        NEW.updated_at := now();
    END IF;

    -- The per-user limit, whenever a box becomes live for a user. The advisory lock serialises
    -- the claims of one user; the count after it sees every claim committed before (READ
    -- COMMITTED takes a new snapshot per statement).
    IF is_assigned AND NEW.status <> 'DYING' AND NOT was_live_for_user THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('whist.mandelboxes.user:' || NEW.user_id, 0));
        SELECT mandelbox_limit_per_user INTO STRICT user_limit FROM config.settings WHERE id = 1;
        SELECT count(*) INTO user_live
            FROM whist.mandelboxes
            WHERE user_id = NEW.user_id AND status <> 'DYING' AND id <> NEW.id;
        IF user_live >= user_limit THEN
            RAISE EXCEPTION 'mandelbox_limit_reached: user % already has % live mandelboxes (limit %)',
                NEW.user_id, user_live, user_limit
                USING ERRCODE = '23514';
        END IF;
    END IF;

    -- Capacity moves only when a box gains or loses its user.
    IF is_assigned AND NOT was_assigned THEN
        SELECT assign_heartbeat_max_age_seconds INTO STRICT heartbeat_max_age
            FROM config.settings WHERE id = 1;
        UPDATE whist.instances
            SET remaining_capacity = remaining_capacity - 1
            WHERE id = NEW.instance_id AND status = 'ACTIVE' AND remaining_capacity > 0
                AND heartbeat_at >= now() - make_interval(secs => heartbeat_max_age);
        IF NOT FOUND THEN
            SELECT status, remaining_capacity, heartbeat_at INTO instance_state
                FROM whist.instances WHERE id = NEW.instance_id;
            IF instance_state IS NULL OR instance_state.status <> 'ACTIVE' THEN
                RAISE EXCEPTION 'instance_not_accepting: instance % is %',
                    NEW.instance_id, coalesce(instance_state.status, 'missing')
                    USING ERRCODE = '23514';
            END IF;
            IF instance_state.heartbeat_at < now() - make_interval(secs => heartbeat_max_age) THEN
                RAISE EXCEPTION 'instance_not_accepting: instance % has sent no heartbeat since %',
                    NEW.instance_id, instance_state.heartbeat_at
                    USING ERRCODE = '23514';
            END IF;
            RAISE EXCEPTION 'instance_full: instance % has no remaining capacity', NEW.instance_id
                USING ERRCODE = '23514';
        END IF;
    ELSIF was_assigned AND NOT is_assigned THEN
        UPDATE whist.instances
            SET remaining_capacity = remaining_capacity + 1
            WHERE id = NEW.instance_id;
    END IF;

    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION whist.assign_ledger_decide()
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
    locked          record;
    box             record;
    pass            integer;
    busy_seen       boolean;
BEGIN
    NEW.requested_at := now();
    NEW.outcome := NULL;
    NEW.region := NULL;
    NEW.instance_id := NULL;
    NEW.mandelbox_id := NULL;
    NEW.ip_addr := NULL;
    NEW.detail := NULL;

    SELECT mandelbox_limit_per_user AS user_limit,
           assign_heartbeat_max_age_seconds AS heartbeat_max_age,
           assign_ledger_retention_hours AS retention_hours
        INTO STRICT settings FROM config.settings WHERE id = 1;

    -- Retention, before any host is locked: at most two expired attempts go with each new one
    -- (never a younger one, and never one another attempt is removing).
    DELETE FROM whist.assign_ledger WHERE id IN (
        SELECT id FROM whist.assign_ledger
            WHERE requested_at < now() - make_interval(hours => settings.retention_hours)
            ORDER BY requested_at
            LIMIT 2
            FOR UPDATE SKIP LOCKED);

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

        -- The fullest host first; on it, a box no other attempt is claiming. The host's row is
        -- locked before its box is taken, and its state checked again under the lock, so the
        -- claim below cannot be refused by the claim trigger (no subtransaction needed). A host
        -- another attempt holds is passed over in a first pass (waiting for it would line every
        -- attempt up behind the fullest host); only if nothing else is free does a second pass
        -- wait for it.
        FOR pass IN 1..2 LOOP
            busy_seen := false;
            FOR host IN
                SELECT i.id FROM whist.instances i
                    WHERE i.region = asked AND i.status = 'ACTIVE' AND i.image_id = image.image_id
                        AND i.remaining_capacity > 0 AND i.ip_addr IS NOT NULL
                        AND i.heartbeat_at >= now() - make_interval(secs => settings.heartbeat_max_age)
                        AND whist.same_commit(i.client_sha, image.client_sha)
                        AND whist.same_commit(i.client_sha, client)
                    ORDER BY i.remaining_capacity, i.id
            LOOP
                IF pass = 1 THEN
                    SELECT i.id, i.ip_addr INTO locked FROM whist.instances i
                        WHERE i.id = host.id AND i.status = 'ACTIVE' AND i.remaining_capacity > 0
                            AND i.heartbeat_at >= now() - make_interval(secs => settings.heartbeat_max_age)
                        FOR UPDATE SKIP LOCKED;
                    IF NOT FOUND THEN
                        busy_seen := true;
                        CONTINUE;
                    END IF;
                ELSE
                    SELECT i.id, i.ip_addr INTO locked FROM whist.instances i
                        WHERE i.id = host.id AND i.status = 'ACTIVE' AND i.remaining_capacity > 0
                            AND i.heartbeat_at >= now() - make_interval(secs => settings.heartbeat_max_age)
                        FOR UPDATE;
                    CONTINUE WHEN NOT FOUND;
                END IF;
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
                -- The claim trigger checks again (capacity, the limit, the heartbeat) and cannot
                -- disagree: the host's row and the user's lock are held.
                UPDATE whist.mandelboxes
                    SET status = 'ALLOCATED', user_id = NEW.user_id, session_id = NEW.session_id
                    WHERE id = box.id AND status = 'WAITING';
                IF FOUND THEN
                    NEW.outcome := 'ASSIGNED';
                    NEW.region := asked;
                    NEW.instance_id := locked.id;
                    NEW.mandelbox_id := box.id;
                    NEW.ip_addr := locked.ip_addr;
                    EXIT regions;
                END IF;
            END LOOP;
            EXIT WHEN NOT busy_seen;
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

    NEW.decision_ms := extract(epoch FROM clock_timestamp() - started) * 1000;
    RETURN NEW;
END;
$$;
