-- Work assignment for pollers and listeners (servicekit.leases): one copy at a time owns a connection,
-- through a lease with an expiry (database clock) and a fencing token that grows with every acquisition.
CREATE SEQUENCE IF NOT EXISTS connection_lease_token;

CREATE TABLE IF NOT EXISTS connection_leases (
    scope         text        NOT NULL,  -- the service (ce-poller, sf-poller, cdc-listener): each owns its own work
    tenant_id     text        NOT NULL,
    connection_id text        NOT NULL,
    holder        text        NOT NULL,  -- the copy (process) holding it
    token         bigint      NOT NULL,  -- fencing token, checked on every cursor write
    expires_at    timestamptz NOT NULL,
    acquired_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, tenant_id, connection_id)
);
CREATE INDEX IF NOT EXISTS connection_leases_holder ON connection_leases (scope, holder);

-- The copies alive per scope (heartbeats), so each can compute its even share of the connections.
CREATE TABLE IF NOT EXISTS lease_members (
    scope      text        NOT NULL,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (scope, holder)
);
