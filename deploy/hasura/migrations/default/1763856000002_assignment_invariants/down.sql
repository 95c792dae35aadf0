DROP TRIGGER IF EXISTS mandelboxes_release_capacity ON whist.mandelboxes;
DROP FUNCTION IF EXISTS whist.mandelboxes_release_capacity();
DROP TRIGGER IF EXISTS mandelboxes_enforce_assignment ON whist.mandelboxes;
DROP FUNCTION IF EXISTS whist.mandelboxes_enforce_assignment();
DROP INDEX IF EXISTS whist.instances_region_status_idx;
DROP INDEX IF EXISTS whist.mandelboxes_instance_id_idx;
DROP INDEX IF EXISTS whist.mandelboxes_user_id_idx;
ALTER TABLE whist.mandelboxes
    DROP CONSTRAINT IF EXISTS mandelboxes_id_is_uuid,
    DROP CONSTRAINT IF EXISTS mandelboxes_user_matches_status,
    DROP CONSTRAINT IF EXISTS mandelboxes_status_valid;
ALTER TABLE whist.instances
    DROP CONSTRAINT IF EXISTS instances_status_valid,
    DROP CONSTRAINT IF EXISTS instances_remaining_capacity_nonnegative;
