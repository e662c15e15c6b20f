-- The last version each connector published per record: a re-read (overlap window, resync, restart) skips
-- records whose version was already published, in any process, at any table size (connectorkit.cursors).
CREATE TABLE IF NOT EXISTS connector_published_versions (
    tenant_id     text        NOT NULL,
    connection_id text        NOT NULL,
    stream        text        NOT NULL,
    source_id     text        NOT NULL,
    version       text        NOT NULL,
    published_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, connection_id, stream, source_id)
);
