ALTER TABLE whist.instances DROP COLUMN IF EXISTS tls_fingerprint;
