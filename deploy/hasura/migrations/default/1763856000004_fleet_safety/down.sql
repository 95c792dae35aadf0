DROP TABLE IF EXISTS config.lease_fences;
DROP FUNCTION IF EXISTS config.lease_fences_check();
DROP TRIGGER IF EXISTS leases_decide ON config.leases;
DROP FUNCTION IF EXISTS config.leases_decide();
ALTER TABLE config.leases DROP COLUMN IF EXISTS generation, DROP COLUMN IF EXISTS lease_seconds,
    DROP COLUMN IF EXISTS renewed_at;
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
        SELECT coalesce(max(mandelbox_limit_per_user), 3) INTO user_limit FROM config.settings;
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
        UPDATE whist.instances
            SET remaining_capacity = remaining_capacity - 1
            WHERE id = NEW.instance_id AND status = 'ACTIVE' AND remaining_capacity > 0;
        IF NOT FOUND THEN
            SELECT status, remaining_capacity INTO instance_state
                FROM whist.instances WHERE id = NEW.instance_id;
            IF instance_state IS NULL OR instance_state.status <> 'ACTIVE' THEN
                RAISE EXCEPTION 'instance_not_accepting: instance % is %',
                    NEW.instance_id, coalesce(instance_state.status, 'missing')
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

ALTER TABLE config.settings DROP COLUMN IF EXISTS assign_heartbeat_max_age_seconds;
DROP TRIGGER IF EXISTS instances_stamp_heartbeat ON whist.instances;
DROP FUNCTION IF EXISTS whist.instances_stamp_heartbeat();
ALTER TABLE whist.instances DROP COLUMN IF EXISTS heartbeat_at, DROP COLUMN IF EXISTS fleet;
