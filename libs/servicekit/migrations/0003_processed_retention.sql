-- Retention of the dedupe rows: a BRIN index on processed_at (rows arrive in time order, so it stays a few
-- pages and costs next to nothing per insert) lets the pruning task find expired rows without a scan.
CREATE INDEX processed_at_brin ON processed USING brin (processed_at);
