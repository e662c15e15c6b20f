-- Points engine: programs, the product catalog it needs (categories), order/line/return state, and the
-- append-only ledger. Every primary key starts with tenant_id; every query filters by it.
-- version_key: sortable source versions (points.rules.version_key), compared with COLLATE "C".

CREATE TABLE programs (
    tenant_id  text        PRIMARY KEY,
    config     jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE products (
    tenant_id         text NOT NULL,
    product_source_id text NOT NULL,
    category          text,
    version_key       text COLLATE "C" NOT NULL,
    PRIMARY KEY (tenant_id, product_source_id)
);

CREATE TABLE orders (
    tenant_id       text        NOT NULL,
    order_source_id text        NOT NULL,
    connection_id   text        NOT NULL DEFAULT '',
    source          text        NOT NULL DEFAULT '',
    member_id       text        NOT NULL DEFAULT '',
    order_number    text,
    version         text        NOT NULL DEFAULT '',
    version_key     text        COLLATE "C" NOT NULL DEFAULT '',
    status          text        NOT NULL DEFAULT '',
    lifecycle       text        NOT NULL DEFAULT 'pending',
    currency        text        NOT NULL DEFAULT '',
    exchange_rate   numeric,
    total_amount    numeric     NOT NULL DEFAULT 0,
    tax_amount      numeric     NOT NULL DEFAULT 0,
    shipping_amount numeric     NOT NULL DEFAULT 0,
    deleted         boolean     NOT NULL DEFAULT false,
    known           boolean     NOT NULL DEFAULT false,
    awardable_since timestamptz,
    awarded         boolean     NOT NULL DEFAULT false,
    target_points   bigint      NOT NULL DEFAULT 0,
    pending_points  bigint      NOT NULL DEFAULT 0,
    earned          bigint      NOT NULL DEFAULT 0,
    clawed          bigint      NOT NULL DEFAULT 0,
    shortfall       bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, order_source_id),
    CHECK (earned + clawed >= 0)
);
CREATE INDEX orders_number ON orders (tenant_id, order_number) WHERE order_number IS NOT NULL;
CREATE INDEX orders_member ON orders (tenant_id, member_id);
CREATE INDEX orders_maturing ON orders (awardable_since) WHERE NOT awarded AND awardable_since IS NOT NULL;

CREATE TABLE order_lines (
    tenant_id         text    NOT NULL,
    order_source_id   text    NOT NULL,
    line_id           text    NOT NULL,
    product_source_id text,
    amount            numeric NOT NULL,
    version_key       text    COLLATE "C" NOT NULL,
    deleted           boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant_id, order_source_id, line_id)
);
CREATE INDEX order_lines_line ON order_lines (tenant_id, line_id);
CREATE INDEX order_lines_product ON order_lines (tenant_id, product_source_id) WHERE product_source_id IS NOT NULL;

-- Returns and credit notes, anchored to their original order by id or number. A return whose order is
-- not known yet simply waits here (parked) and is applied when the order arrives.
CREATE TABLE returns (
    tenant_id              text    NOT NULL,
    return_source_id       text    NOT NULL,
    anchor_order_source_id text,
    anchor_order_number    text,
    version_key            text    COLLATE "C" NOT NULL,
    lifecycle              text    NOT NULL,
    currency               text    NOT NULL,
    exchange_rate          numeric,
    amount                 numeric NOT NULL,
    deleted                boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant_id, return_source_id)
);
CREATE INDEX returns_anchor_id ON returns (tenant_id, anchor_order_source_id) WHERE anchor_order_source_id IS NOT NULL;
CREATE INDEX returns_anchor_number ON returns (tenant_id, anchor_order_number) WHERE anchor_order_number IS NOT NULL;

-- The append-only ledger. The idempotency key (tenant, source, order, kind, source version of the trigger)
-- is unique, so every write is idempotent; balances are sums over it.
CREATE TABLE ledger (
    id               bigserial,
    tenant_id        text        NOT NULL,
    member_id        text        NOT NULL,
    order_source_id  text        NOT NULL,
    source           text        NOT NULL,
    kind             text        NOT NULL CHECK (kind IN ('earn', 'void', 'adjust', 'clawback')),
    points           bigint      NOT NULL,
    reason           text        NOT NULL,
    source_version   text        NOT NULL,
    source_event_ids text[]      NOT NULL DEFAULT '{}',
    event_id         text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, source, order_source_id, kind, source_version)
);
CREATE INDEX ledger_member ON ledger (tenant_id, member_id, id);
CREATE INDEX ledger_order ON ledger (tenant_id, order_source_id);

CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the points ledger is append-only';
END $$;
CREATE TRIGGER ledger_no_update BEFORE UPDATE OR DELETE ON ledger FOR EACH ROW EXECUTE FUNCTION ledger_append_only();

-- Clawback the member's balance could not cover, when the program records shortfalls instead of going negative.
CREATE TABLE shortfalls (
    id              bigserial,
    tenant_id       text        NOT NULL,
    member_id       text        NOT NULL,
    order_source_id text        NOT NULL,
    points          bigint      NOT NULL,
    source_version  text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, order_source_id, source_version)
);
