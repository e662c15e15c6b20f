-- Keys the CE poller has published per connection and entity: the local side of the key diff that infers
-- deletes missed while a delta token was expired, and the parent (order / RMA) of lines whose change-tracking
-- tombstones carry only their own id.
CREATE TABLE ce_known_keys (
    tenant_id     text   NOT NULL,
    connection_id text   NOT NULL,
    entity        text   NOT NULL,
    source_id     text   NOT NULL,
    parent_id     text,
    version       text   NOT NULL DEFAULT '0',
    generation    int    NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, connection_id, entity, source_id)
);
CREATE INDEX ce_known_keys_gen ON ce_known_keys (tenant_id, connection_id, entity, generation);
-- For salesorder rows parent_id holds the order number: RMAs name their order by number.
CREATE INDEX ce_known_keys_parent ON ce_known_keys (tenant_id, connection_id, entity, parent_id);
