-- What keeps the fleet controller from destroying what it cannot prove is gone, and from acting
-- twice: rows that know their fleet, a heartbeat of its own, and a lease with a generation that
-- fences an old leader's writes.

-- The fleet that launched a host: the value of its `whist:fleet` cloud tag (`whist-<environment>`).
-- A controller reconciles, drains and terminates only its own fleet's rows. Rows from before this
-- column have none and are never deleted by reconciliation; an operator claims them with
--   UPDATE whist.instances SET fleet = 'whist-prod' WHERE fleet IS NULL AND region = '...';
ALTER TABLE whist.instances ADD COLUMN fleet varchar;

-- The host's heartbeat, stamped by the database clock. Nothing but a heartbeat moves it: claims
-- and state changes touch `updated_at`, so a dead host that keeps being claimed still looks dead.
ALTER TABLE whist.instances ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now();

-- Whatever time a writer sends, the database's clock is what lands: hosts' clocks never decide
-- whether a host is alive.
CREATE FUNCTION whist.instances_stamp_heartbeat()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.heartbeat_at IS DISTINCT FROM OLD.heartbeat_at THEN
        NEW.heartbeat_at := now();
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER instances_stamp_heartbeat
    BEFORE INSERT OR UPDATE ON whist.instances
    FOR EACH ROW EXECUTE FUNCTION whist.instances_stamp_heartbeat();

-- A host whose heartbeat is older than this gets no new session, whatever its boxes say.
ALTER TABLE config.settings
    ADD COLUMN assign_heartbeat_max_age_seconds integer NOT NULL DEFAULT 90
        CONSTRAINT settings_assign_heartbeat_max_age_positive
        CHECK (assign_heartbeat_max_age_seconds > 0);

-- The claim refuses a host whose heartbeat is too old (`instance_not_accepting`), so the assign
-- path moves on to the next host.
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
        SELECT coalesce(max(assign_heartbeat_max_age_seconds), 90) INTO heartbeat_max_age
            FROM config.settings;
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

-- Leases on the database clock. A replica asks for the lease by writing its name (and the
-- length it wants); this trigger decides: the holder renews, anyone takes an expired lease, nobody
-- takes a live one (the row is left alone and the update affects nothing). Every change of hands
-- bumps `generation`, the fencing value the holder's writes carry. `renewed_at` tells the holder
-- the database's time, so it can count its lease without trusting its own clock.
ALTER TABLE config.leases
    ADD COLUMN generation    bigint      NOT NULL DEFAULT 0,
    ADD COLUMN lease_seconds integer     NOT NULL DEFAULT 15
        CONSTRAINT leases_lease_seconds_valid CHECK (lease_seconds BETWEEN 1 AND 3600),
    ADD COLUMN renewed_at    timestamptz NOT NULL DEFAULT 'epoch';

CREATE FUNCTION config.leases_decide()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- Released: free at once, same generation (the next holder bumps it).
    IF NEW.holder IS NULL THEN
        NEW.expires_at := 'epoch';
        NEW.renewed_at := now();
        RETURN NEW;
    END IF;
    IF OLD.holder IS DISTINCT FROM NEW.holder AND OLD.expires_at > now() THEN
        RETURN NULL;
    END IF;
    IF OLD.holder IS DISTINCT FROM NEW.holder OR OLD.expires_at <= now() THEN
        NEW.generation := OLD.generation + 1;
    END IF;
    NEW.expires_at := now() + make_interval(secs => NEW.lease_seconds);
    NEW.renewed_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER leases_decide
    BEFORE UPDATE ON config.leases
    FOR EACH ROW EXECUTE FUNCTION config.leases_decide();

-- The fence. A leader's mutation starts by inserting (name, holder, generation) here; the
-- trigger lets the rest of the mutation run only while that generation holds the lease, and
-- keeps no row. The share lock makes a takeover wait for the fenced write to commit, so an old
-- leader's write lands before the new leader's term or not at all. Refusals carry the tag
-- `lease_lost` (SQLSTATE 23514, like the assignment trigger's).
CREATE TABLE config.lease_fences (
    name       varchar NOT NULL,
    holder     varchar NOT NULL,
    generation bigint  NOT NULL,
    PRIMARY KEY (name, holder, generation)
);

CREATE FUNCTION config.lease_fences_check()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM 1 FROM config.leases
        WHERE name = NEW.name AND holder = NEW.holder AND generation = NEW.generation
            AND expires_at > now()
        FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lease_lost: % does not hold lease % in generation %',
            NEW.holder, NEW.name, NEW.generation
            USING ERRCODE = '23514';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER lease_fences_check
    BEFORE INSERT ON config.lease_fences
    FOR EACH ROW EXECUTE FUNCTION config.lease_fences_check();
