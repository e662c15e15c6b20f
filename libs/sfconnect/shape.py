"""The org's shape, learned at verify and saved with the connection: which objects and fields exist.

Salesforce orgs differ: ``CurrencyIsoCode`` exists only with multicurrency, the ``Person*`` fields only with
person accounts, OrderSummary / OrderItemSummary / CreditMemo only with Order Management, and the tenant's
own customer id is an org-specific field (docs/vendor-facts.md, ``## Salesforce``). A fixed SOQL field list
makes such an org answer ``INVALID_FIELD``; every SOQL is built from this shape instead
(:func:`sfconnect.records.select_soql`).

Learned from Describe Global (``GET /services/data/vXX.X/sobjects``) and one sObject Describe per object the
connector reads (including the parents of ``Parent.Field`` paths). Saved in ``cursors`` under the entity
:data:`SHAPE_ENTITY` of the connection (verify writes it, the poller and listener read it, and a query
answered ``INVALID_FIELD`` learns and saves it again).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from servicekit.connections import CursorStore
from sfconnect.config import FIELDS

__all__ = ["OM_OBJECTS", "PARENT_OBJECT", "SHAPE_ENTITY", "OrgShape", "learn_shape", "load_shape",
           "objects_to_describe", "save_shape"]

SHAPE_ENTITY = "org:shape"

OM_OBJECTS = frozenset({"OrderSummary", "OrderItemSummary", "CreditMemo"})
"""Objects that exist only in Order Management orgs."""

PARENT_OBJECT: dict[str, str] = {
    "Account": "Account", "BillToContact": "Contact", "ReturnOrder": "ReturnOrder", "OrderItem": "OrderItem",
    "Pricebook2": "Pricebook2", "Product2": "Product2", "OrderSummary": "OrderSummary", "OriginalOrder": "Order",
}
"""Relationship name -> object, for the parent paths in :data:`sfconnect.config.FIELDS`."""


class _Getter(Protocol):
    async def get_json(self, path: str, **kw: Any) -> Any: ...

    @property
    def data_path(self) -> str: ...


@dataclass(frozen=True)
class OrgShape:
    objects: frozenset[str]
    """Every object Describe Global lists."""
    fields: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Field names per described object."""

    @property
    def multi_currency(self) -> bool:
        return "CurrencyIsoCode" in self.fields.get("Order", frozenset())

    @property
    def person_accounts(self) -> bool:
        return "IsPersonAccount" in self.fields.get("Account", frozenset())

    @property
    def order_management(self) -> bool:
        return OM_OBJECTS <= self.objects

    def has_object(self, obj: str) -> bool:
        return obj in self.objects

    def has_field(self, obj: str, path: str) -> bool:
        """Whether ``path`` (``Field`` or ``Relationship.Field``) exists on ``obj``; an object that was not
        described is assumed to have it (the query then says otherwise, and the shape is learned again)."""
        if "." in path:
            rel, _, name = path.partition(".")
            parent = PARENT_OBJECT.get(rel)
            if parent is None or parent not in self.fields:
                return True
            return name in self.fields[parent]
        known = self.fields.get(obj)
        return True if known is None else path in known

    def summary(self) -> dict[str, Any]:
        return {"multi_currency": self.multi_currency, "person_accounts": self.person_accounts,
                "order_management": self.order_management}

    def to_json(self) -> dict[str, Any]:
        return {"objects": sorted(self.objects), "fields": {k: sorted(v) for k, v in self.fields.items()},
                **self.summary()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OrgShape:
        return cls(frozenset(data.get("objects") or ()),
                   {k: frozenset(v) for k, v in dict(data.get("fields") or {}).items()})


def objects_to_describe(objects: Iterable[str]) -> list[str]:
    """The synced objects and the parents their field lists name."""
    out: dict[str, None] = {}
    for obj in objects:
        out[obj] = None
        for path in FIELDS.get(obj, ()):
            if "." in path:
                parent = PARENT_OBJECT.get(path.split(".", 1)[0])
                if parent:
                    out[parent] = None
    return list(out)


async def learn_shape(client: _Getter, objects: Iterable[str]) -> OrgShape:
    """Describe Global, then one sObject Describe per object (module docstring). Objects the org does not
    have are left out of ``fields``."""
    glob = await client.get_json(f"{client.data_path}/sobjects/")
    names = frozenset(str(o["name"]) for o in glob.get("sobjects") or [])
    fields: dict[str, frozenset[str]] = {}
    for obj in objects_to_describe(objects):
        if obj not in names:
            continue
        desc = await client.get_json(f"{client.data_path}/sobjects/{obj}/describe")
        fields[obj] = frozenset(str(f["name"]) for f in desc.get("fields") or [])
    return OrgShape(names, fields)


async def load_shape(cursors: CursorStore, tenant_id: str, connection_id: str) -> OrgShape | None:
    data = await cursors.load(tenant_id, connection_id, SHAPE_ENTITY)
    return OrgShape.from_json(data) if data else None


async def save_shape(cursors: CursorStore, tenant_id: str, connection_id: str, shape: OrgShape) -> None:
    await cursors.save(tenant_id, connection_id, SHAPE_ENTITY, shape.to_json())
