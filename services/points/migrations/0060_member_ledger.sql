-- Each member's position in the ledger, for points.member-ledger.v1 (docs/events.md, "Member ledger"):
-- `sequence` counts the member's entries (1, 2, 3 ... without gaps) and `balance` sums their points. Advanced
-- in the transaction that appends the entries, so every published entry carries its member_sequence and
-- balance_after, and a consumer can keep a member's balance from the topic alone.
CREATE TABLE member_balances (
    tenant_id  text        NOT NULL,
    member_id  text        NOT NULL,
    sequence   bigint      NOT NULL CHECK (sequence >= 0),
    balance    bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, member_id)
);

-- Entries appended before this migration count: sequences continue after them.
INSERT INTO member_balances (tenant_id, member_id, sequence, balance)
SELECT tenant_id, member_id, count(*), sum(points) FROM ledger GROUP BY tenant_id, member_id;
