-- Member resolver: members (from the loyalty core), source customer links, parked orders/returns.
-- Every primary key starts with tenant_id and every query filters by it (DESIGN.md, Tenancy).
-- version_key columns hold servicekit-independent sortable versions (see resolver.versions): compared
-- with COLLATE "C" so the order is byte order on every server.

CREATE TABLE members (
    tenant_id         text        NOT NULL,
    member_id         text        NOT NULL,
    external_id       text,
    email_normalized  text,
    consent_marketing boolean     NOT NULL DEFAULT false,
    consent_profiling boolean     NOT NULL DEFAULT false,
    status            text        NOT NULL DEFAULT 'active',
    version_key       text        COLLATE "C" NOT NULL DEFAULT '',
    -- false after any write; the resolver re-links customers against the member and sets it true
    relinked          boolean     NOT NULL DEFAULT false,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, member_id)
);
CREATE INDEX members_external ON members (tenant_id, external_id) WHERE external_id IS NOT NULL;
CREATE INDEX members_email ON members (tenant_id, email_normalized) WHERE email_normalized IS NOT NULL;
CREATE INDEX members_relink ON members (updated_at) WHERE NOT relinked;

-- One row per source customer: its identifying facts and the member it resolves to (if any).
CREATE TABLE customer_links (
    tenant_id          text        NOT NULL,
    connection_id      text        NOT NULL,
    source             text        NOT NULL,
    customer_source_id text        NOT NULL,
    entity             text        NOT NULL,
    parent_source_id   text,
    external_id        text,
    email_normalized   text,
    member_id          text,
    match              text        NOT NULL
                       CHECK (match IN ('external_id', 'email', 'unmatched', 'ambiguous', 'deleted')),
    note               text        NOT NULL DEFAULT '',
    version_key        text        COLLATE "C" NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, connection_id, source, customer_source_id)
);
CREATE INDEX customer_links_external ON customer_links (tenant_id, external_id) WHERE external_id IS NOT NULL;
CREATE INDEX customer_links_email ON customer_links (tenant_id, email_normalized) WHERE email_normalized IS NOT NULL;

-- Orders already resolved, so a return can take its member from the order it anchors to.
CREATE TABLE order_members (
    tenant_id       text        NOT NULL,
    order_source_id text        NOT NULL,
    order_number    text,
    member_id       text        NOT NULL,
    resolved_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, order_source_id)
);
CREATE INDEX order_members_number ON order_members (tenant_id, order_number) WHERE order_number IS NOT NULL;

-- Order-scoped events waiting for a member, in arrival order (seq). kind: order/return heads wait for a
-- customer link (or an email match, or for returns the anchored order); parts (lines, deletes) queue
-- behind a parked head of the same order so the order's events stay in sequence.
CREATE TABLE parked (
    tenant_id              text        NOT NULL,
    seq                    bigserial,
    order_source_id        text        NOT NULL,
    kind                   text        NOT NULL CHECK (kind IN ('order', 'return', 'part')),
    connection_id          text        NOT NULL,
    source                 text        NOT NULL,
    customer_source_id     text,
    email_normalized       text,
    anchor_order_source_id text,
    anchor_order_number    text,
    event_id               text        NOT NULL,
    event_type             text        NOT NULL,
    payload                bytea       NOT NULL,
    reason                 text        NOT NULL DEFAULT '',
    parked_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, seq)
);
CREATE UNIQUE INDEX parked_event ON parked (tenant_id, event_id);
CREATE INDEX parked_order ON parked (tenant_id, order_source_id, seq);
CREATE INDEX parked_customer ON parked (tenant_id, connection_id, source, customer_source_id)
    WHERE customer_source_id IS NOT NULL;
CREATE INDEX parked_email ON parked (tenant_id, email_normalized) WHERE email_normalized IS NOT NULL;
CREATE INDEX parked_anchor_id ON parked (tenant_id, anchor_order_source_id) WHERE anchor_order_source_id IS NOT NULL;
CREATE INDEX parked_anchor_number ON parked (tenant_id, anchor_order_number) WHERE anchor_order_number IS NOT NULL;
