DROP TABLE IF EXISTS whist.assign_ledger;
DROP FUNCTION IF EXISTS whist.assign_ledger_decide();
DROP FUNCTION IF EXISTS whist.same_commit(text, text);
DROP INDEX IF EXISTS whist.mandelboxes_instance_status_idx;
ALTER TABLE config.settings DROP COLUMN IF EXISTS assign_ledger_retention_hours;
DROP INDEX IF EXISTS whist.instances_assign_order_idx;
