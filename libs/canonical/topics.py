"""Topic names in one place; ``schemas/topics.yaml`` is generated from :data:`TOPICS` (a test checks)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CANONICAL_CUSTOMER",
    "CANONICAL_ORDER",
    "CANONICAL_PRODUCT",
    "CANONICAL_RETURN",
    "MEMBERS",
    "POINTS_LEDGER",
    "POINTS_MEMBER_LEDGER",
    "RESOLVED_ORDER",
    "RESOLVED_RETURN",
    "TOPICS",
    "TopicSpec",
    "dlq",
    "raw",
]


@dataclass(frozen=True)
class TopicSpec:
    name: str
    event_types: tuple[str, ...]
    key: str
    partitions: int
    retention_ms: int
    dlq: str | None = None
    """Dead-letter topic of the consumer that reads this topic in the pipe, if any."""
    replication_factor: int = 3
    """Copies of each partition on a real cluster (FLASH_KAFKA_REPLICATION_FACTOR overrides; the embedded
    single-node broker gets 1)."""
    min_insync_replicas: int = 2
    """Replicas that must have a write before an acks=all produce succeeds (FLASH_KAFKA_MIN_INSYNC_REPLICAS
    overrides); with replication 3 one broker may be down without stopping writes."""
    producer: str = "flash"
    """Who writes the topic: ``flash`` (a service of this platform) or an outside system (``loyalty-core``)."""


_DAY = 24 * 3600 * 1000


def dlq(consumer: str) -> str:
    """Dead-letter topic of one consumer (``dlq.<consumer>``)."""
    return f"dlq.{consumer}.v1"


def raw(source: str, entity: str) -> str:
    """Raw topic of one vendor entity (``raw.<source>.<entity>.v1``)."""
    return f"raw.{source}.{entity}.v1"


CANONICAL_CUSTOMER = "canonical.customer.v1"
CANONICAL_PRODUCT = "canonical.product.v1"
CANONICAL_ORDER = "canonical.order.v1"
CANONICAL_RETURN = "canonical.return.v1"
MEMBERS = "loyalty.member.v1"
RESOLVED_ORDER = "resolved.order.v1"
RESOLVED_RETURN = "resolved.return.v1"
POINTS_LEDGER = "points.ledger.v1"
POINTS_MEMBER_LEDGER = "points.member-ledger.v1"
"""The ledger again, keyed by member: one member's entries in one partition, in member_sequence order."""

RAW_ENTITIES: dict[str, tuple[str, ...]] = {
    "dynamics-ce": (
        "salesorder", "salesorderdetail", "account", "contact", "product", "msdyn_rma", "msdyn_rmaproduct",
    ),
    "dynamics-fo": (
        "SalesOrderHeadersV2", "SalesOrderLines", "CustomersV3", "ReleasedProductsV2", "ReturnOrderHeaders",
    ),
    "salesforce": (
        "Order", "OrderItem", "Account", "Contact", "Product2", "PricebookEntry", "ReturnOrder",
        "ReturnOrderLineItem", "CreditMemo", "OrderSummary", "OrderItemSummary",
    ),
}

ORDER_SCOPED_ENTITIES = frozenset({
    "salesorder", "salesorderdetail", "msdyn_rma", "msdyn_rmaproduct", "SalesOrderHeadersV2", "SalesOrderLines",
    "ReturnOrderHeaders",
    "Order", "OrderItem", "ReturnOrder", "ReturnOrderLineItem", "CreditMemo", "OrderSummary", "OrderItemSummary",
})
"""Vendor entities whose raw records are keyed by their order, so an order and its parts stay ordered."""

_ORDER_KEY = "tenant_id:order_source_id"
_ENTITY_KEY = "tenant_id:source_id"

TOPICS: tuple[TopicSpec, ...] = (
    *(
        TopicSpec(raw(src, ent), ("raw.record",), _ORDER_KEY if ent in ORDER_SCOPED_ENTITIES else _ENTITY_KEY,
                  4, 7 * _DAY, dlq("normalizer"))
        for src, ents in RAW_ENTITIES.items()
        for ent in ents
    ),
    TopicSpec(CANONICAL_CUSTOMER, ("customer.upserted", "customer.deleted"), _ENTITY_KEY, 4, 30 * _DAY,
              dlq("resolver")),
    TopicSpec(CANONICAL_PRODUCT, ("product.upserted", "product.deleted"), _ENTITY_KEY, 4, 30 * _DAY,
              dlq("points")),
    TopicSpec(CANONICAL_ORDER,
              ("order.upserted", "order.deleted", "order.line_upserted", "order.line_deleted"),
              _ORDER_KEY, 4, 30 * _DAY, dlq("resolver")),
    TopicSpec(CANONICAL_RETURN, ("return.upserted", "return.deleted"), _ORDER_KEY, 4, 30 * _DAY,
              dlq("resolver")),
    TopicSpec(MEMBERS, ("member.upserted",), "tenant_id:member_id", 4, 30 * _DAY, dlq("resolver"),
              producer="loyalty-core"),
    TopicSpec(RESOLVED_ORDER, ("order.resolved", "order.line_upserted", "order.line_deleted", "order.deleted"),
              _ORDER_KEY, 4, 30 * _DAY, dlq("points")),
    TopicSpec(RESOLVED_RETURN, ("return.resolved", "return.deleted"), _ORDER_KEY, 4, 30 * _DAY, dlq("points")),
    TopicSpec(POINTS_LEDGER, ("points.ledger_entry",), _ORDER_KEY, 4, 365 * _DAY),
    TopicSpec(POINTS_MEMBER_LEDGER, ("points.ledger_entry",), "tenant_id:member_id", 4, 365 * _DAY),
    *(
        TopicSpec(dlq(c), ("<any, unchanged>",), "unchanged", 1, 30 * _DAY)
        for c in ("normalizer", "resolver", "points", "ce-poller", "fo-poller", "sf-poller", "cdc-listener")
    ),
)
