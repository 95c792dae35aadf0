-- The assignment invariants, enforced by the database so that they hold whoever writes:
--
--   * an instance's remaining_capacity is its capacity minus the mandelboxes assigned to a user
--     on it, and never goes below zero;
--   * a mandelbox is assigned only on an ACTIVE instance with capacity left;
--   * a user never holds more live (not DYING) mandelboxes than config.settings allows, even when
--     many claims for that user race.
--
-- "Assigned" means user_id is set. A claim is the conditional update
-- `SET status = 'ALLOCATED', user_id = ... WHERE id = ... AND status = 'WAITING'`: the row lock
-- makes the loser of a race match no row, and the trigger below does the accounting inside the
-- same transaction, so a failed check rolls the claim back whole.
--
-- Errors raised here use SQLSTATE 23514 (check_violation), which the GraphQL engine reports as a
-- `constraint-violation`, and start with a stable tag the client matches on:
--   mandelbox_limit_reached, instance_not_accepting, instance_full, mandelbox_moved.

ALTER TABLE whist.instances
    ADD CONSTRAINT instances_remaining_capacity_nonnegative CHECK (remaining_capacity >= 0),
    ADD CONSTRAINT instances_status_valid
        CHECK (status IN ('PRE_CONNECTION', 'ACTIVE', 'DRAINING'));

ALTER TABLE whist.mandelboxes
    ADD CONSTRAINT mandelboxes_status_valid
        CHECK (status IN ('WAITING', 'ALLOCATED', 'CONNECTING', 'RUNNING', 'DYING')),
    -- A waiting box belongs to nobody; a box in a session always belongs to someone.
    ADD CONSTRAINT mandelboxes_user_matches_status
        CHECK (CASE status
                   WHEN 'WAITING' THEN user_id IS NULL
                   WHEN 'DYING' THEN true
                   ELSE user_id IS NOT NULL
               END);

-- The per-user limit counts a user's boxes; the host and the scaler list boxes by instance.
CREATE INDEX mandelboxes_user_id_idx ON whist.mandelboxes (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX mandelboxes_instance_id_idx ON whist.mandelboxes (instance_id);
CREATE INDEX instances_region_status_idx ON whist.instances (region, status);

CREATE FUNCTION whist.mandelboxes_enforce_assignment()
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

CREATE TRIGGER mandelboxes_enforce_assignment
    BEFORE INSERT OR UPDATE ON whist.mandelboxes
    FOR EACH ROW EXECUTE FUNCTION whist.mandelboxes_enforce_assignment();

-- Removing an assigned box gives its capacity back in the same transaction as the delete.
CREATE FUNCTION whist.mandelboxes_release_capacity()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF OLD.user_id IS NOT NULL THEN
        UPDATE whist.instances
            SET remaining_capacity = remaining_capacity + 1
            WHERE id = OLD.instance_id;
    END IF;
    RETURN OLD;
END;
$$;

CREATE TRIGGER mandelboxes_release_capacity
    AFTER DELETE ON whist.mandelboxes
    FOR EACH ROW EXECUTE FUNCTION whist.mandelboxes_release_capacity();

-- Mandelbox ids are UUIDs: containers, clients and logs parse them as such.
ALTER TABLE whist.mandelboxes
    ADD CONSTRAINT mandelboxes_id_is_uuid
        CHECK (id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$');
