-- Hosts make their TLS certificate themselves at every start, so no authority can vouch for it.
-- Instead a host publishes the SHA-256 of its certificate (DER, lower-case hex) on its row when it
-- registers or resumes, and whoever talks to its json_transport (the scaling-service's proxy)
-- accepts exactly that certificate. A row without one gets no proxied request.
ALTER TABLE whist.instances
    ADD COLUMN tls_fingerprint varchar
        CONSTRAINT instances_tls_fingerprint_is_sha256
        CHECK (tls_fingerprint ~ '^[0-9a-f]{64}$');
