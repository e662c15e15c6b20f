-- Business Events received per connection: a control number is accepted once (a second delivery is a replay
-- and is refused); handled_at is set once the announced record was fetched back and published, so events
-- accepted before a restart are still handled after it (fo_poller.events).
CREATE TABLE IF NOT EXISTS fo_business_events (
    tenant_id         text        NOT NULL,
    connection_id     text        NOT NULL,
    control_number    bigint      NOT NULL,
    business_event_id text        NOT NULL,
    legal_entity      text        NOT NULL,
    record_key        text        NOT NULL,
    event_time        timestamptz NOT NULL,
    received_at       timestamptz NOT NULL DEFAULT now(),
    handled_at        timestamptz,
    PRIMARY KEY (tenant_id, connection_id, control_number)
);
CREATE INDEX IF NOT EXISTS fo_business_events_pending
    ON fo_business_events (tenant_id, connection_id) WHERE handled_at IS NULL;
