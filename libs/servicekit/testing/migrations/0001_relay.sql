-- Tables of the two-hop relay pipe used by the platform's exactly-once tests and bench/pipe.py.
-- relay_effects has NO unique key on purpose: a duplicated effect would show up as a second row.
CREATE TABLE relay_effects (
    hop        text        NOT NULL,
    tenant_id  text        NOT NULL,
    source_id  text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX relay_effects_hop ON relay_effects (hop, tenant_id, source_id);
-- A poison message becomes good once its source_id is listed here ("the fix").
CREATE TABLE relay_fixes (
    tenant_id text NOT NULL,
    source_id text NOT NULL,
    PRIMARY KEY (tenant_id, source_id)
);
