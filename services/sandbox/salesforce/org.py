"""One simulated org: records with sorted indexes, SOQL execution, writes that emit CDC, the event log.

Storage: ``tables[obj][id] -> record`` (sparse dicts; datetimes as epoch ms, dates as ``YYYY-MM-DD``).
Each object keeps ``smod[obj]``, a sorted list of ``(SystemModstamp, Id)``, so an ordered range query
(``WHERE SystemModstamp > X ORDER BY SystemModstamp, Id``) is a bisect plus a slice, and lookups on
reference fields (``OrderItem.OrderId``) use a lazily built child index.

Writes happen inside a :meth:`Org.transaction`: every row written shares the transaction's timestamp
(so ``SystemModstamp`` collides across rows, as it does in Salesforce) and its CDC events share one
``transactionKey`` with increasing ``sequenceNumber``. Transactions do not roll back on error.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import random
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandbox.salesforce.clock import SimClock, cdc_datetime, rest_datetime
from sandbox.salesforce.errors import SalesforceError
from sandbox.salesforce.ids import EMPTY_ID, IdFactory, base62, to_18
from sandbox.salesforce.schema import PREFIX_TO_OBJECT, SCHEMA, FieldDef
from sandbox.salesforce.soql import (
    Cmp,
    FieldPath,
    In,
    Query,
    compile_predicate,
    datetime_bounds,
    parse_datetime,
)

if TYPE_CHECKING:
    from sandbox.salesforce.bulk import BulkJob

__all__ = ["ORDER_STATUSES", "CdcEvent", "Org", "Transaction"]

#: Order Status picklist of the simulated org -> StatusCode category. "Fulfilled" and "Cancelled" are
#: org-defined values (Salesforce only ships Draft and Activated).
ORDER_STATUSES: dict[str, str] = {
    "Draft": "Draft",
    "Activated": "Activated",
    "Fulfilled": "Activated",
    "Cancelled": "Activated",
}
_NO_CDC_FIELDS = {"Id", "IsDeleted", "SystemModstamp"}
_DAY_MS = 86_400_000


@dataclass
class Change:
    entity: str
    change_type: str
    record_ids: list[str]
    fields: dict[str, Any]
    changed: list[str]


@dataclass
class Transaction:
    ts: int
    origin: str
    changes: list[Change] = field(default_factory=list)
    long_running: bool = False
    """Started ``ts`` in the past: its rows carry that SystemModstamp but become visible (and its change
    events are committed) only now, behind any SystemModstamp cursor that moved on meanwhile."""


@dataclass(frozen=True)
class CdcEvent:
    replay_id: int
    entity: str
    commit_ms: int
    payload: dict[str, Any]
    schema: str

    @property
    def channel(self) -> str:
        return f"/data/{self.entity}ChangeEvent"

    @property
    def header(self) -> dict[str, Any]:
        header: dict[str, Any] = self.payload["ChangeEventHeader"]
        return header


PERSON_FIELDS = frozenset({"IsPersonAccount", "PersonEmail", "PersonContactId", "PersonHasOptedOutOfEmail"})
OM_OBJECTS = frozenset({"OrderSummary", "OrderItemSummary", "OrderItemSummaryChange", "CreditMemo", "CreditMemoLine"})


@dataclass
class Cursor:
    """A REST query cursor: the matching ids are fixed when the query first runs."""

    object: str
    query: Query
    ids: list[str]
    batch_size: int
    created_ms: int


def _coerce(fdef: FieldDef, value: Any) -> Any:
    if value is None:
        return None
    t = fdef.type
    if t == "datetime":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            return parse_datetime(value.replace("+0000", "+00:00"))
        raise SalesforceError(400, "JSON_PARSER_ERROR", f"Cannot deserialize {value!r} as dateTime")
    if t in ("double", "currency"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SalesforceError(400, "JSON_PARSER_ERROR", f"Cannot deserialize {value!r} as double")
        return round(float(value), 2) if t == "currency" else float(value)
    if t == "boolean":
        if not isinstance(value, bool):
            raise SalesforceError(400, "JSON_PARSER_ERROR", f"Cannot deserialize {value!r} as boolean")
        return value
    if not isinstance(value, str):
        raise SalesforceError(400, "JSON_PARSER_ERROR", f"Cannot deserialize {value!r} as string")
    if t in ("id", "reference") and len(value) == 15:
        return to_18(value)
    return value


def format_rest(fdef: FieldDef, value: Any) -> Any:
    if value is not None and fdef.type == "datetime":
        return rest_datetime(value)
    return value


def format_cdc(fdef: FieldDef, value: Any) -> Any:
    if value is not None and fdef.type == "datetime":
        return cdc_datetime(value)
    return value


class Org:
    """A simulated Salesforce org (see module docstring)."""

    def __init__(
        self,
        clock: SimClock,
        name: str,
        *,
        client_id: str,
        client_secret: str,
        mode: str = "order",
        seed: int = 0,
        multi_currency: bool = True,
        person_accounts: bool = True,
    ) -> None:
        if mode not in ("order", "order_management"):
            raise ValueError("mode must be 'order' or 'order_management'")
        digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
        pod = base62(digest[0] * 256 + digest[1], 2)
        self.clock = clock
        self.name = name
        self.client_id = client_id
        self.client_secret = client_secret
        self.mode = mode
        self.refresh_token = f"{name}-refresh-token"
        self.multi_currency = multi_currency
        self.person_accounts = person_accounts
        self.rng = random.Random(int.from_bytes(digest[:8], "big"))
        self.ids = IdFactory(pod=pod, base=int.from_bytes(digest[2:5], "big") % 50_000)
        self.org_id = to_18(f"00D{pod}0000{base62(int.from_bytes(digest[5:8], 'big'), 6)}")
        self.tables: dict[str, dict[str, dict[str, Any]]] = {o: {} for o in SCHEMA}
        self.smod: dict[str, list[tuple[int, str]]] = {o: [] for o in SCHEMA}
        self._ref_index: dict[tuple[str, str], dict[str, set[str]]] = {}
        self.status_categories = dict(ORDER_STATUSES)
        self.cdc_entities: set[str] | None = None  # None: every object publishes change events
        self.api_version_default = "66.0"
        # CDC log: parallel lists so replay and retention lookups are bisects
        self.events: list[CdcEvent] = []
        self.event_replay_ids: list[int] = []
        self.event_commit_ms: list[int] = []
        self.retention_ms = 72 * 3_600_000
        self._next_replay = 8_000_000 + self.rng.randrange(100_000)
        self._next_commit = 1_100_583_000_000 + self.rng.randrange(1_000_000)
        self._wakeup = asyncio.Event()
        self._tx: Transaction | None = None
        self.publish_enabled = True  # False while seeding: history predates every subscriber
        self.default_origin = "com/salesforce/api/rest/66.0"
        # limits
        self.api_max = 100_000
        self.api_calls: deque[int] = deque()
        self.bulk_jobs_max = 10_000
        self.bulk_job_times: deque[int] = deque()
        self.cursors: dict[str, Cursor] = {}
        self.bulk_jobs: dict[str, BulkJob] = {}
        self.stats: dict[str, int] = {}
        self.api_versions: dict[str, int] = {}
        self.user_id = self.ids.next("005")
        user_ts = clock.now_ms() - 400 * _DAY_MS
        self.insert_raw(
            "User",
            {
                "Id": self.user_id,
                "Name": "Integration User",
                "Username": f"integration@{name}.example",
                "Email": f"integration@{name}.example",
                "IsActive": True,
                "CreatedDate": user_ts,
                "LastModifiedDate": user_ts,
                "SystemModstamp": user_ts,
            },
        )

    # ------------------------------------------------------------------ features
    def hidden_fields(self) -> frozenset[str]:
        """Fields this org does not have (docs/vendor-facts.md, Salesforce: CurrencyIsoCode only with
        multicurrency, the Person* fields only with person accounts)."""
        out: set[str] = set()
        if not self.multi_currency:
            out.add("CurrencyIsoCode")
        if not self.person_accounts:
            out.update(PERSON_FIELDS)
        return frozenset(out)

    def has_object(self, obj: str) -> bool:
        """Order Management objects exist only in Order Management orgs."""
        return obj not in OM_OBJECTS or self.mode == "order_management"

    # ------------------------------------------------------------------ reads
    def lookup(self, record_id: str | None) -> dict[str, Any] | None:
        if not record_id or len(record_id) not in (15, 18):
            return None
        obj = PREFIX_TO_OBJECT.get(record_id[:3])
        if obj is None:
            return None
        rid = record_id if len(record_id) == 18 else to_18(record_id)
        return self.tables[obj].get(rid)

    def object_of(self, record_id: str) -> str | None:
        return PREFIX_TO_OBJECT.get(record_id[:3])

    def get(self, obj: str, record_id: str) -> dict[str, Any] | None:
        rec = self.tables[obj].get(record_id if len(record_id) != 15 else to_18(record_id))
        return rec

    def records(self, obj: str, *, include_deleted: bool = False) -> Iterator[dict[str, Any]]:
        for rec in self.tables[obj].values():
            if include_deleted or not rec.get("IsDeleted"):
                yield rec

    def get_path(self, rec: dict[str, Any], path: FieldPath) -> Any:
        cur: dict[str, Any] | None = rec
        for hop in path.parts[:-1]:
            assert cur is not None
            cur = self.lookup(cur.get(hop + "Id"))
            if cur is None:
                return None
        assert cur is not None
        return cur.get(path.parts[-1])

    def children(self, obj: str, ref_field: str, parent_id: str) -> set[str]:
        key = (obj, ref_field)
        index = self._ref_index.get(key)
        if index is None:
            index = {}
            for rid, rec in self.tables[obj].items():
                ref = rec.get(ref_field)
                if ref:
                    index.setdefault(ref, set()).add(rid)
            self._ref_index[key] = index
        return index.get(parent_id, set())

    def render(self, obj: str, rec: dict[str, Any], fields: Iterable[FieldPath], version: str) -> dict[str, Any]:
        """A record as REST returns it: ``attributes`` first, parents as nested objects."""
        out: dict[str, Any] = {
            "attributes": {"type": obj, "url": f"/services/data/v{version}/sobjects/{obj}/{rec['Id']}"}
        }
        for fp in fields:
            container = out
            cur: dict[str, Any] | None = rec
            for hop in fp.parts[:-1]:
                assert cur is not None
                parent = self.lookup(cur.get(hop + "Id"))
                if hop not in container:
                    if parent is None:
                        container[hop] = None
                    else:
                        ptype = self.object_of(parent["Id"]) or ""
                        container[hop] = {
                            "attributes": {
                                "type": ptype,
                                "url": f"/services/data/v{version}/sobjects/{ptype}/{parent['Id']}",
                            }
                        }
                if container[hop] is None or parent is None:
                    cur = None
                    break
                container = container[hop]
                cur = parent
            if cur is not None:
                container[fp.parts[-1]] = format_rest(fp.field, cur.get(fp.parts[-1]))
        return out

    def execute(self, query: Query, *, include_deleted: bool) -> list[str]:
        """Evaluate a query once; returns the ordered ids (LIMIT/OFFSET applied)."""
        obj = query.sobject.name
        table = self.tables[obj]
        pred = compile_predicate(query.where, self.get_path) if query.where is not None else None
        ordered = False
        candidates: Iterable[str]
        id_set = self._id_candidates(query)
        if id_set is not None:
            candidates = sorted(id_set)
        else:
            lo, hi = datetime_bounds(query.where, "SystemModstamp")
            keys = [(k.path.parts, k.ascending) for k in query.order]
            index_order = keys in (
                [],
                [(("SystemModstamp",), True)],
                [(("SystemModstamp",), True), (("Id",), True)],
            )
            if lo is not None or hi is not None or (keys and index_order):
                index = self.smod[obj]
                start = 0 if lo is None else bisect.bisect_left(index, (lo, ""))
                end = len(index) if hi is None else bisect.bisect_right(index, (hi, "\uffff"))
                candidates = (rid for _, rid in index[start:end])
                ordered = index_order
            else:
                candidates = list(table)
        out: list[str] = []
        need = None
        if ordered and query.limit is not None:
            need = query.limit + (query.offset or 0)
        for rid in candidates:
            rec = table.get(rid)
            if rec is None or (rec.get("IsDeleted") and not include_deleted):
                continue
            if pred is not None and not pred(rec):
                continue
            out.append(rid)
            if need is not None and len(out) >= need:
                break
        if query.order and not ordered:
            for key in reversed(query.order):
                path = key.path

                def sort_key(rid: str, path: FieldPath = path, nulls_first: bool = key.nulls_first) -> Any:
                    v = self.get_path(table[rid], path)
                    if v is None:
                        return (0 if nulls_first else 2, 0)
                    return (
                        1,
                        v.lower() if isinstance(v, str) and path.field.type not in ("id", "reference") else v,
                    )

                if key.ascending:
                    out.sort(key=sort_key)
                else:
                    out.sort(key=sort_key, reverse=True)
        if query.offset:
            out = out[query.offset :]
        if query.limit is not None:
            out = out[: query.limit]
        return out

    def _id_candidates(self, query: Query) -> set[str] | None:
        """Ids from ``Id = / IN`` or ``Ref = / IN`` conjuncts at the top level, if any."""
        where = query.where
        conjuncts = list(where.items) if where is not None and type(where).__name__ == "And" else [where]  # type: ignore[union-attr]
        obj = query.sobject.name
        for c in conjuncts:
            if isinstance(c, Cmp) and c.op == "=" and isinstance(c.value, str):
                values: tuple[Any, ...] = (c.value,)
                path = c.path
            elif isinstance(c, In) and not c.negate:
                values, path = c.values, c.path
            else:
                continue
            if len(path.parts) != 1 or path.field.type not in ("id", "reference"):
                continue
            ids = {to_18(v[:15]) for v in values if isinstance(v, str) and len(v) in (15, 18)}
            if path.parts[0] == "Id":
                return {i for i in ids if i in self.tables[obj]}
            out: set[str] = set()
            for i in ids:
                out |= self.children(obj, path.parts[0], i)
            return out
        return None

    # ------------------------------------------------------------------ writes
    def insert_raw(self, obj: str, rec: dict[str, Any]) -> dict[str, Any]:
        """Store a complete record without CDC (seeding). Call :meth:`rebuild_indexes` afterwards."""
        rec.setdefault("IsDeleted", False)
        rec.setdefault("CreatedById", getattr(self, "user_id", None))
        rec.setdefault("LastModifiedById", rec["CreatedById"])
        self.tables[obj][rec["Id"]] = rec
        return rec

    def rebuild_indexes(self) -> None:
        for obj, table in self.tables.items():
            self.smod[obj] = sorted((r["SystemModstamp"], rid) for rid, r in table.items())
        self._ref_index.clear()

    def _index_move(self, obj: str, rid: str, old: int | None, new: int) -> None:
        index = self.smod[obj]
        if old is not None:
            i = bisect.bisect_left(index, (old, rid))
            if i < len(index) and index[i] == (old, rid):
                del index[i]
        bisect.insort(index, (new, rid))

    @contextmanager
    def transaction(self, origin: str | None = None, *, started_s_ago: float = 0.0) -> Iterator[Transaction]:
        """Group writes: one timestamp, one transactionKey, CDC published when the block exits.

        ``started_s_ago`` simulates a long transaction: the rows are stamped with its start time, that
        long ago, while they (and the change events) appear only when the block exits."""
        if self._tx is not None:
            yield self._tx
            return
        now = self.clock.now_ms()
        tx = Transaction(ts=now - int(started_s_ago * 1000), origin=origin or self.default_origin,
                         long_running=started_s_ago > 0)
        self._tx = tx
        try:
            yield tx
        finally:
            self._tx = None
        self._publish(tx)

    def create(self, obj: str, values: dict[str, Any], *, origin: str | None = None) -> str:
        od = SCHEMA[obj]
        with self.transaction(origin) as tx:
            rid = self.ids.next(od.prefix)
            rec: dict[str, Any] = {
                "Id": rid,
                "IsDeleted": False,
                "CreatedDate": tx.ts,
                "CreatedById": self.user_id,
                "LastModifiedDate": tx.ts,
                "LastModifiedById": self.user_id,
                "SystemModstamp": tx.ts,
            }
            for name, value in self._coerce_all(obj, values).items():
                rec[name] = value
            self._derive(obj, rec, set(values))
            self.tables[obj][rid] = rec
            self._index_move(obj, rid, None, tx.ts)
            self._index_refs(obj, rid, {}, rec)
            if self.publish_enabled:
                cdc = {k: v for k, v in rec.items() if v is not None and k not in _NO_CDC_FIELDS}
                tx.changes.append(Change(obj, "CREATE", [rid], cdc, []))
            self._after_write(obj, rec)
        return rid

    def update(self, obj: str, record_id: str, values: dict[str, Any], *, origin: str | None = None) -> list[str]:
        """Apply field changes; returns the changed field names (empty: nothing changed, nothing emitted)."""
        rec = self._live(obj, record_id)
        with self.transaction(origin) as tx:
            coerced = self._coerce_all(obj, values)
            before = dict(rec)
            for name, value in coerced.items():
                if name in ("Id", "CreatedDate", "SystemModstamp", "IsDeleted"):
                    raise SalesforceError(
                        400,
                        "INVALID_FIELD_FOR_INSERT_UPDATE",
                        f"Unable to create/update fields: {name}.",
                        [name],
                    )
                rec[name] = value
            self._derive(obj, rec, set(coerced))
            changed = [k for k in rec if k not in _NO_CDC_FIELDS and rec.get(k) != before.get(k)]
            if not changed:
                return []
            old_smod = rec["SystemModstamp"]
            rec["LastModifiedDate"] = rec["SystemModstamp"] = tx.ts
            self._index_move(obj, rec["Id"], old_smod, tx.ts)
            self._index_refs(obj, rec["Id"], before, rec)
            names = ["LastModifiedDate", *[c for c in changed if c != "LastModifiedDate"]]
            tx.changes.append(Change(obj, "UPDATE", [rec["Id"]], {n: rec.get(n) for n in names}, names))
            self._after_write(obj, rec)
            return names

    def touch(self, obj: str, record_id: str) -> None:
        """A system-only update: moves SystemModstamp, not LastModifiedDate, and publishes no event."""
        rec = self._live(obj, record_id)
        ts = self.clock.now_ms()
        old = rec["SystemModstamp"]
        rec["SystemModstamp"] = ts
        self._index_move(obj, rec["Id"], old, ts)

    def delete(self, obj: str, record_id: str, *, origin: str | None = None) -> None:
        rec = self._live(obj, record_id)
        with self.transaction(origin) as tx:
            self._set_deleted(obj, rec, True, tx)
            for child_obj, od in SCHEMA.items():
                if od.parent_field and obj in od.fields[od.parent_field].ref_to:
                    for cid in sorted(self.children(child_obj, od.parent_field, rec["Id"])):
                        child = self.tables[child_obj][cid]
                        if not child.get("IsDeleted"):
                            self._set_deleted(child_obj, child, True, tx)
            self._after_write(obj, rec)

    def undelete(self, obj: str, record_id: str, *, origin: str | None = None) -> None:
        rec = self.get(obj, record_id)
        if rec is None or not rec.get("IsDeleted"):
            raise SalesforceError(400, "UNDELETE_FAILED", "Entity is not in the recycle bin")
        deleted_at = rec["SystemModstamp"]
        with self.transaction(origin) as tx:
            self._set_deleted(obj, rec, False, tx)
            for child_obj, od in SCHEMA.items():
                if od.parent_field and obj in od.fields[od.parent_field].ref_to:
                    for cid in sorted(self.children(child_obj, od.parent_field, rec["Id"])):
                        child = self.tables[child_obj][cid]
                        if child.get("IsDeleted") and child["SystemModstamp"] == deleted_at:
                            self._set_deleted(child_obj, child, False, tx)
            self._after_write(obj, rec)

    def _set_deleted(self, obj: str, rec: dict[str, Any], deleted: bool, tx: Transaction) -> None:
        old = rec["SystemModstamp"]
        rec["IsDeleted"] = deleted
        rec["SystemModstamp"] = rec["LastModifiedDate"] = tx.ts
        self._index_move(obj, rec["Id"], old, tx.ts)
        if deleted:
            tx.changes.append(Change(obj, "DELETE", [rec["Id"]], {}, []))
        else:
            cdc = {k: v for k, v in rec.items() if v is not None and k not in _NO_CDC_FIELDS}
            tx.changes.append(Change(obj, "UNDELETE", [rec["Id"]], cdc, []))

    def _live(self, obj: str, record_id: str) -> dict[str, Any]:
        rec = self.get(obj, record_id)
        if rec is None:
            raise SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")
        if rec.get("IsDeleted"):
            raise SalesforceError(404, "ENTITY_IS_DELETED", "entity is deleted")
        return rec

    def _coerce_all(self, obj: str, values: dict[str, Any]) -> dict[str, Any]:
        od = SCHEMA[obj]
        out: dict[str, Any] = {}
        for name, value in values.items():
            fdef = od.field_ci(name)
            if fdef is None:
                raise SalesforceError(400, "INVALID_FIELD", f"No such column '{name}' on sobject of type {obj}", [name])
            out[fdef.name] = _coerce(fdef, value)
        return out

    def _index_refs(self, obj: str, rid: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        for (iobj, fname), index in self._ref_index.items():
            if iobj != obj or before.get(fname) == after.get(fname):
                continue
            if before.get(fname):
                index.get(before[fname], set()).discard(rid)
            if after.get(fname):
                index.setdefault(after[fname], set()).add(rid)

    def _derive(self, obj: str, rec: dict[str, Any], touched: set[str]) -> None:
        """Formula-like fields Salesforce maintains itself."""
        if obj == "Contact" or (obj == "Account" and rec.get("IsPersonAccount")):
            if rec.get("LastName") is not None:
                rec["Name"] = " ".join(p for p in (rec.get("FirstName"), rec.get("LastName")) if p)
        if obj == "OrderItem":
            q, p = rec.get("Quantity"), rec.get("UnitPrice")
            if q is not None and p is not None:
                rec["TotalPrice"] = round(q * p, 2)
        if obj == "Order":
            status = rec.get("Status")
            if status is not None:
                if status not in self.status_categories:
                    raise SalesforceError(
                        400,
                        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                        f"Status: bad value for restricted picklist field: {status}",
                        ["Status"],
                    )
                rec["StatusCode"] = self.status_categories[status]
                if rec["StatusCode"] == "Activated" and rec.get("ActivatedDate") is None:
                    rec["ActivatedDate"] = self._tx.ts if self._tx else self.clock.now_ms()
                    rec["ActivatedById"] = self.user_id
            rec.setdefault("TotalAmount", 0.0)

    def _after_write(self, obj: str, rec: dict[str, Any]) -> None:
        """Roll-ups: an order line change re-totals its order (an Order UPDATE in the same transaction)."""
        if obj == "OrderItem" and rec.get("OrderId"):
            self.retotal_order(rec["OrderId"])

    def retotal_order(self, order_id: str) -> None:
        order = self.tables["Order"].get(order_id)
        if order is None or order.get("IsDeleted"):
            return
        total = round(
            sum(
                self.tables["OrderItem"][i].get("TotalPrice") or 0.0
                for i in self.children("OrderItem", "OrderId", order_id)
                if not self.tables["OrderItem"][i].get("IsDeleted")
            ),
            2,
        )
        if order.get("TotalAmount") != total:
            self.update("Order", order_id, {"TotalAmount": total})

    # ------------------------------------------------------------------ CDC
    def schema_id(self, entity: str) -> str:
        return hashlib.sha256(f"{self.org_id}:{entity}".encode()).hexdigest()[:22]

    def _cdc_enabled(self, entity: str) -> bool:
        return self.cdc_entities is None or entity in self.cdc_entities

    def _publish(self, tx: Transaction) -> None:
        if not self.publish_enabled:
            return
        changes = [c for c in tx.changes if self._cdc_enabled(c.entity)]
        if not changes:
            return
        key = "%08x-%04x-%04x-%04x-%012x" % (  # noqa: UP031 - uuid-shaped transaction key
            self.rng.getrandbits(32),
            self.rng.getrandbits(16),
            self.rng.getrandbits(16),
            self.rng.getrandbits(16),
            self.rng.getrandbits(48),
        )
        self._next_commit += self.rng.randrange(1, 5000)
        commit_ms = self.clock.now_ms() if tx.long_running else tx.ts
        for seq, change in enumerate(changes, start=1):
            od = SCHEMA[change.entity]
            header = {
                "entityName": change.entity,
                "recordIds": change.record_ids,
                "changeType": change.change_type,
                "changeOrigin": tx.origin,
                "transactionKey": key,
                "sequenceNumber": seq,
                "commitTimestamp": commit_ms,
                "commitNumber": self._next_commit,
                "commitUser": self.user_id,
                "changedFields": change.changed,
            }
            hidden = self.hidden_fields()
            if change.change_type == "UPDATE":
                header["nulledFields"] = [n for n, v in change.fields.items() if v is None and n not in hidden]
            else:
                header["nulledFields"] = []
            header["diffFields"] = []
            payload: dict[str, Any] = {"ChangeEventHeader": header}
            for name, value in change.fields.items():
                if name not in hidden:
                    payload[name] = format_cdc(od.fields[name], value)
            self._append_event(change.entity, commit_ms, payload)
        self._notify()

    def _append_event(self, entity: str, commit_ms: int, payload: dict[str, Any]) -> CdcEvent:
        self._next_replay += self.rng.randrange(1, 9)
        event = CdcEvent(self._next_replay, entity, commit_ms, payload, self.schema_id(entity))
        self.events.append(event)
        self.event_replay_ids.append(event.replay_id)
        self.event_commit_ms.append(commit_ms)
        return event

    def _notify(self) -> None:
        wake, self._wakeup = self._wakeup, asyncio.Event()
        wake.set()

    @property
    def wakeup(self) -> asyncio.Event:
        return self._wakeup

    def emit_gap(self, entity: str, record_ids: list[str], change_type: str = "GAP_UPDATE") -> None:
        """Header-only gap event(s) for records of ``entity`` (re-read them through REST)."""
        if change_type not in ("GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE", "GAP_OVERFLOW"):
            raise ValueError(change_type)
        tx = Transaction(ts=self.clock.now_ms(), origin="")
        tx.changes.append(Change(entity, change_type, list(record_ids), {}, []))
        self._publish(tx)

    def emit_overflow(self, entity: str) -> None:
        """One GAP_OVERFLOW for ``entity``; recordIds holds the empty key ``000000000000000AAA``."""
        self.emit_gap(entity, [EMPTY_ID], "GAP_OVERFLOW")

    def oldest_retained_index(self) -> int:
        cutoff = self.clock.now_ms() - self.retention_ms
        return bisect.bisect_left(self.event_commit_ms, cutoff)

    def latest_replay_id(self) -> int:
        return self.event_replay_ids[-1] if self.event_replay_ids else self._next_replay

    # ------------------------------------------------------------------ limits
    def count_api_call(self) -> None:
        now = self.clock.now_ms()
        calls = self.api_calls
        while calls and calls[0] <= now - _DAY_MS:
            calls.popleft()
        if len(calls) >= self.api_max:
            raise SalesforceError(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        calls.append(now)

    def api_usage(self) -> tuple[int, int]:
        now = self.clock.now_ms()
        while self.api_calls and self.api_calls[0] <= now - _DAY_MS:
            self.api_calls.popleft()
        return len(self.api_calls), self.api_max

    def bump(self, stat: str, n: int = 1) -> None:
        self.stats[stat] = self.stats.get(stat, 0) + n
