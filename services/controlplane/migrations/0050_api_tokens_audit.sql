-- Control plane: per-tenant API tokens (hashed, never stored in clear) and the audit of every change.

-- A token is shown once at creation: flash_<token_id>_<secret>. Only its SHA-256 is kept (the secret is
-- 256 random bits, so a fast hash is enough: nothing to brute-force). tenant_id NULL = operator (all tenants).
CREATE TABLE api_tokens (
    token_id     text        PRIMARY KEY,
    tenant_id    text,
    role         text        NOT NULL CHECK (role IN ('tenant', 'operator')),
    name         text        NOT NULL,
    token_hash   text        NOT NULL UNIQUE,
    created_by   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CHECK ((role = 'tenant') = (tenant_id IS NOT NULL))
);

-- Every change made through the API or the CLI: who (token or OS user), what, on which tenant, when.
CREATE TABLE audit_log (
    id        bigserial   PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text        NOT NULL,
    tenant_id text,
    action    text        NOT NULL,
    target    text,
    detail    jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_tenant ON audit_log (tenant_id, at);
