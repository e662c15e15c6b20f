-- An order's lines live on its row (orders.lines: a JSON array of [line_id, product_source_id, amount,
-- version_key, deleted]) instead of a table of their own: the engine always loads and writes an order
-- together with its lines, so one row per order saves a statement, two rows and three index entries per
-- order on the hot path. The two lookups that start from a line or a product (a line tombstone that
-- names no order; a product whose category changed) use orders.line_keys, written with the lines:
-- 'l:<line_id>' for every line, 'p:<product_source_id>' for the products of live lines (GIN-indexed).
-- An order whose lines arrive before its header gets a row with known = false.

ALTER TABLE orders ADD COLUMN lines jsonb NOT NULL DEFAULT '[]',
                   ADD COLUMN line_keys text[] NOT NULL DEFAULT '{}';

INSERT INTO orders (tenant_id, order_source_id)
SELECT DISTINCT tenant_id, order_source_id FROM order_lines
ON CONFLICT (tenant_id, order_source_id) DO NOTHING;

UPDATE orders AS o SET lines = l.lines, line_keys = l.line_keys
FROM (
    SELECT tenant_id, order_source_id,
           jsonb_agg(jsonb_build_array(line_id, product_source_id, amount::text, version_key, deleted)
                     ORDER BY line_id) AS lines,
           array_agg('l:' || line_id ORDER BY line_id)
               || coalesce(array_agg(DISTINCT 'p:' || product_source_id)
                           FILTER (WHERE product_source_id IS NOT NULL AND NOT deleted), '{}') AS line_keys
    FROM order_lines GROUP BY tenant_id, order_source_id
) AS l
WHERE o.tenant_id = l.tenant_id AND o.order_source_id = l.order_source_id;

CREATE INDEX orders_line_keys ON orders USING gin (line_keys);

DROP TABLE order_lines;

-- The ledger's idempotency key leads with (tenant, order), so it also serves lookups by order and the
-- separate ledger_order index (one more index entry per ledger row) can go.
ALTER TABLE ledger ADD CONSTRAINT ledger_idempotency_key
    UNIQUE (tenant_id, order_source_id, source, kind, source_version);
ALTER TABLE ledger DROP CONSTRAINT ledger_tenant_id_source_order_source_id_kind_source_version_key;
DROP INDEX ledger_order;
