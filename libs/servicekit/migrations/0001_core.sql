-- Platform tables shared by every consumer: exactly-once tracking, outbox, dead letters, connections, cursors.

-- A row per (consumer, tenant, event) handled; written in the same transaction as the effect.
CREATE TABLE processed (
    consumer     text        NOT NULL,
    tenant_id    text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, tenant_id, event_id)
);

-- Messages a consumer emits, written with its effect, published after commit, deleted once acknowledged.
CREATE TABLE outbox (
    id         bigserial   PRIMARY KEY,
    consumer   text        NOT NULL,
    topic      text        NOT NULL,
    key        bytea,
    value      bytea       NOT NULL,
    headers    jsonb       NOT NULL DEFAULT '[]',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_consumer ON outbox (consumer, id);

-- Index of everything sent to a dlq.<consumer> topic, with the message itself, for list/show/replay.
CREATE TABLE dead_letters (
    id               bigserial   PRIMARY KEY,
    consumer         text        NOT NULL,
    tenant_id        text        NOT NULL DEFAULT '',
    event_id         text,
    entity           text,
    error_class      text        NOT NULL,
    error_message    text        NOT NULL,
    stage            text        NOT NULL,
    source_topic     text        NOT NULL,
    source_partition int,
    source_offset    bigint,
    attempts         int         NOT NULL,
    first_failed_at  timestamptz NOT NULL,
    last_failed_at   timestamptz NOT NULL,
    dlq_topic        text        NOT NULL,
    key              bytea,
    value            bytea       NOT NULL,
    headers          jsonb       NOT NULL DEFAULT '[]',
    replayed_at      timestamptz,
    replay_id        bigint
);
-- A source message is dead-lettered once per consumer, however often its batch is retried.
CREATE UNIQUE INDEX dead_letters_source ON dead_letters (consumer, source_topic, source_partition, source_offset)
    WHERE source_offset IS NOT NULL;
CREATE INDEX dead_letters_pending ON dead_letters (consumer, tenant_id, first_failed_at) WHERE replayed_at IS NULL;

-- Audit of every replay: who asked, with which filter, how many messages went back.
CREATE TABLE dlq_replays (
    id           bigserial   PRIMARY KEY,
    requested_by text        NOT NULL,
    filter       jsonb       NOT NULL,
    replayed     int         NOT NULL DEFAULT 0,
    dry_run      boolean     NOT NULL DEFAULT false,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

-- A connection to one vendor system of one tenant; credentials are Fernet-encrypted.
CREATE TABLE connections (
    tenant_id     text        NOT NULL,
    connection_id text        NOT NULL,
    source        text        NOT NULL CHECK (source IN ('dynamics-ce', 'dynamics-fo', 'salesforce')),
    endpoint      text        NOT NULL,
    credentials   bytea       NOT NULL,
    settings      jsonb       NOT NULL DEFAULT '{}',
    state         text        NOT NULL DEFAULT 'draft'
                  CHECK (state IN ('draft', 'verified', 'live', 'paused', 'failed')),
    last_error    text,
    verified_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, connection_id)
);
CREATE UNIQUE INDEX connections_id ON connections (connection_id);

-- Poller/listener checkpoints per connection and entity (delta links, watermarks, replay ids, page position).
CREATE TABLE cursors (
    tenant_id     text        NOT NULL,
    connection_id text        NOT NULL,
    entity        text        NOT NULL,
    cursor        jsonb       NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, connection_id, entity)
);
