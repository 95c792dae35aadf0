-- The tables every mandelbox image, client and dashboard depends on, column for column as the
-- original services used them. Later migrations add guarantees; they never rename or drop.

CREATE SCHEMA IF NOT EXISTS whist;

CREATE FUNCTION whist.set_current_timestamp_updated_at()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TABLE whist.instances (
    id                 varchar     NOT NULL PRIMARY KEY,
    provider           varchar     NOT NULL,
    region             varchar     NOT NULL,
    image_id           varchar     NOT NULL,
    client_sha         varchar     NOT NULL,
    ip_addr            inet,
    instance_type      varchar     NOT NULL,
    remaining_capacity integer     NOT NULL,
    status             varchar     NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER set_whist_instances_updated_at
    BEFORE UPDATE ON whist.instances
    FOR EACH ROW EXECUTE FUNCTION whist.set_current_timestamp_updated_at();

CREATE TABLE whist.mandelboxes (
    id          varchar     NOT NULL PRIMARY KEY,
    app         varchar     NOT NULL,
    instance_id varchar     NOT NULL
        CONSTRAINT mandelboxes_instance_id_fkey REFERENCES whist.instances (id)
        ON UPDATE RESTRICT ON DELETE RESTRICT,
    user_id     varchar,
    session_id  varchar,
    status      varchar     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE whist.images (
    provider   varchar     NOT NULL,
    region     varchar     NOT NULL,
    image_id   varchar     NOT NULL,
    client_sha varchar     NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, region)
);

CREATE TRIGGER set_whist_images_updated_at
    BEFORE UPDATE ON whist.images
    FOR EACH ROW EXECUTE FUNCTION whist.set_current_timestamp_updated_at();
