-- The newest version of every Salesforce record this connection published, and its payload (the last known
-- state a CDC UPDATE is applied to). Read before publishing: a re-read (overlap window, restart, reconcile,
-- CDC fetch-back) never re-publishes a version that was already published, by any process.
CREATE TABLE IF NOT EXISTS sf_published (
    tenant_id     text        NOT NULL,
    connection_id text        NOT NULL,
    object        text        NOT NULL,
    record_id     text        NOT NULL,
    version       text        NOT NULL,
    payload       text,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, connection_id, object, record_id)
);
