-- The dedupe keys are opaque identifiers, never sorted for people: byte order ("C") makes every B-tree
-- comparison a memcmp instead of a locale-aware strcoll. Each message inserts one processed row, so this
-- is on the hot path of every consumer. Changing a column's collation rebuilds the index, not the table.
ALTER TABLE processed
    ALTER COLUMN consumer TYPE text COLLATE "C",
    ALTER COLUMN tenant_id TYPE text COLLATE "C",
    ALTER COLUMN event_id TYPE text COLLATE "C";
