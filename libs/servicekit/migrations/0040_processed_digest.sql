-- A digest of each handled event's content (issue 15): the same event id with different content is a
-- rewrite to handle, not a duplicate to drop. NULL on rows from before: those count as the same content.
ALTER TABLE processed ADD COLUMN digest text;
