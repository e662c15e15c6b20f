"""In-memory storage of one simulated Dataverse organisation.

Every table keeps

* ``rows``: primary key -> immutable row tuple (a write replaces the tuple, so a page being rendered never
  sees a half-applied update);
* ``keys``: the primary keys in ascending order (sorted lazily after bulk inserts), which is the order of
  plain and initial change-tracking paging: a paging cookie holds the last key, so a page is
  ``O(log n + page)`` and rows are never skipped when others are inserted or deleted mid-sync;
* an append-only change log of ``(version, key)`` plus tombstones ``key -> version``: a delta read from
  version ``V`` bisects the log, so it is ``O(changes since V)``.

Versions come from one monotonically increasing counter per organisation (Dataverse's row version is
org-wide as well); every create, update and delete takes the next value and stamps the row.
"""

from __future__ import annotations

import bisect
import datetime as dt
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from sandbox.dataverse.schema import ENTITIES, ENTITY_BY_LOGICAL, ORDER_STATUS_STATE, Column, Entity

__all__ = [
    "Clock",
    "DataverseError",
    "Org",
    "Row",
    "Table",
    "from_units",
    "iso",
    "to_epoch",
    "to_units",
]

Row = tuple[Any, ...]
_INDEXED = {
    "salesorderdetails": ("_salesorderid_value",),
    "salesorders": ("ordernumber",),
    "msdyn_rmaproducts": ("_msdyn_rma_value",),
    "msdyn_rmas": ("msdyn_referenceno",),
    "invoices": ("_salesorderid_value",),
}
_UNITS = Decimal(10000)
_Q4 = Decimal("0.0001")


class DataverseError(Exception):
    """An error the Web API reports as ``{"error": {"code": ..., "message": ...}}``."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class Clock:
    """Simulated wall clock: real time plus an offset tests can advance (data timestamps, delta tokens)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def to_units(value: Any) -> int:
    """Money in ten-thousandths (the precision Dataverse returns)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value * 10000
    d = value if isinstance(value, Decimal) else Decimal(str(value))
    return int((d * _UNITS).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def from_units(units: int) -> Decimal:
    return (Decimal(units) / _UNITS).quantize(_Q4)


def to_epoch(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("not a timestamp")
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return int(value.timestamp())
    if isinstance(value, str):
        return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    raise TypeError(f"not a timestamp: {value!r}")


def iso(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_guid() -> str:
    return str(uuid.uuid4())


class Table:
    def __init__(self, org: Org, entity: Entity) -> None:
        self.org = org
        self.entity = entity
        self.cols = entity.storage_columns()
        self.pos = {c: i for i, c in enumerate(self.cols)}
        self.by_name = entity.by_name
        self.rows: dict[str, Row] = {}
        self.keys: list[str] = []
        self._dirty = False
        self.log_versions: list[int] = []
        self.log_keys: list[str] = []
        self.tombstones: dict[str, int] = {}
        self.vpos = self.pos["versionnumber"]
        self.mpos = self.pos["modifiedon"]
        # Secondary indexes (column -> value -> keys) for parent/child joins done by the domain helpers.
        self.indexes: dict[str, dict[Any, set[str]]] = {c: {} for c in _INDEXED.get(entity.entity_set, ())}

    def lookup(self, column: str, value: Any) -> list[Row]:
        """Rows whose indexed ``column`` equals ``value`` (in primary-key order)."""
        keys = self.indexes[column].get(value, ())
        return [self.rows[k] for k in sorted(keys)]

    def _index(self, key: str, old: Row | None, new: Row | None) -> None:
        for column, index in self.indexes.items():
            p = self.pos[column]
            before = None if old is None else old[p]
            after = None if new is None else new[p]
            if old is not None and before != after and before is not None:
                bucket = index.get(before)
                if bucket is not None:
                    bucket.discard(key)
                    if not bucket:
                        del index[before]
            if new is not None and after is not None and (old is None or before != after):
                index.setdefault(after, set()).add(key)

    # -- reading -------------------------------------------------------------------------------------

    def live_keys(self) -> list[str]:
        """The sorted key index itself (no copy): valid until the next write to the table."""
        if self._dirty:
            self.keys.sort()
            self._dirty = False
        return self.keys

    def sorted_keys(self) -> list[str]:
        """A snapshot of the keys in order; writes to the table afterwards do not change it."""
        return list(self.live_keys())

    def value(self, row: Row, name: str) -> Any:
        return row[self.pos[name]]

    def get(self, key: str) -> Row | None:
        return self.rows.get(key.lower())

    def page_after(self, after: str | None, limit: int) -> tuple[list[Row], bool]:
        """Up to ``limit`` rows with a primary key greater than ``after``, and whether more exist."""
        keys = self.live_keys()
        i = 0 if after is None else bisect.bisect_right(keys, after)
        out = [self.rows[k] for k in keys[i : i + limit]]
        return out, i + limit < len(keys)

    def changes(
        self, since: int, upto: int, phase: int, index: int, limit: int
    ) -> tuple[list[Row | str], tuple[int, int] | None]:
        """Changes in ``(since, upto]``: current rows first (phase 0), then deleted keys (phase 1).

        ``index`` is a position in the change log; the returned cursor resumes after the last item.
        """
        start = bisect.bisect_right(self.log_versions, since)
        end = bisect.bisect_right(self.log_versions, upto)
        out: list[Row | str] = []
        i = max(index, start)
        while phase < 2:
            while i < end:
                version, key = self.log_versions[i], self.log_keys[i]
                i += 1
                if phase == 0:
                    row = self.rows.get(key)
                    if row is not None and row[self.vpos] == version:
                        out.append(row)
                elif self.tombstones.get(key) == version:
                    out.append(key)
                if len(out) >= limit:
                    if i < end:
                        return out, (phase, i)
                    return out, ((1, start) if phase == 0 else None)
            phase += 1
            i = start
        return out, None

    def as_dict(self, row: Row) -> dict[str, Any]:
        """A row with Python values: money as ``Decimal``, timestamps as aware datetimes."""
        out: dict[str, Any] = {}
        for c in self.entity.columns:
            v = row[self.pos[c.name]]
            if v is not None:
                if c.kind == "money":
                    v = from_units(v)
                elif c.kind == "datetime":
                    v = dt.datetime.fromtimestamp(v, dt.UTC)
            out[c.name] = v
            if c.kind == "lookup" and c.polymorphic:
                out[c.type_column] = row[self.pos[c.type_column]]
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        for k in self.sorted_keys():
            yield self.rows[k]

    # -- writing ------------------------------------------------------------------------------------

    def _coerce(self, col: Column, value: Any) -> Any:
        if value is None:
            return None
        match col.kind:
            case "money":
                return to_units(value)
            case "datetime":
                return to_epoch(value)
            case "decimal":
                return value if isinstance(value, Decimal) else Decimal(str(value))
            case "int" | "option" | "version":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise DataverseError(400, "0x80048d19", f"Invalid value for '{col.name}': {value!r}.")
                return value
            case "bool":
                if not isinstance(value, bool):
                    raise DataverseError(400, "0x80048d19", f"Invalid value for '{col.name}': {value!r}.")
                return value
            case "guid" | "lookup":
                return str(uuid.UUID(str(value)))
            case _:
                return str(value)

    def _log(self, version: int, key: str) -> None:
        self.log_versions.append(version)
        self.log_keys.append(key)

    def insert(self, values: Mapping[str, Any], *, system: bool = False) -> Row:
        """Create a row. ``system=True`` (seeding) may set read-only columns such as ``createdon``."""
        data: list[Any] = [None] * len(self.cols)
        for name, value in values.items():
            self._set(data, name, value, system=system)
        return self._insert(data)

    def insert_prepared(self, values: Mapping[str, Any]) -> Row:
        """Seeding fast path: values are already in stored form (money in units, epoch seconds)."""
        data: list[Any] = [None] * len(self.cols)
        pos = self.pos
        for name, value in values.items():
            data[pos[name]] = value
        return self._insert(data, bulk=True)

    def _insert(self, data: list[Any], *, bulk: bool = False) -> Row:
        now = int(self.org.clock.now())
        key_i = self.pos[self.entity.key]
        if data[key_i] is None:
            data[key_i] = new_guid()
        key = data[key_i]
        if key in self.rows:
            raise DataverseError(412, "0x80040237", "A record with matching key values already exists.")
        version = self.org.next_version()
        data[self.vpos] = version
        cpos = self.pos["createdon"]
        if data[cpos] is None:
            data[cpos] = now
        if data[self.mpos] is None:
            data[self.mpos] = data[cpos]
        row = tuple(data)
        self.rows[key] = row
        self._index(key, None, row)
        if bulk or self._dirty or not self.keys or self.keys[-1] < key:
            self.keys.append(key)  # bulk loads sort once, lazily, on the next read
            self._dirty = self._dirty or (len(self.keys) > 1 and self.keys[-2] > key)
        else:
            bisect.insort(self.keys, key)
        self._log(version, key)
        return row

    def _set(self, data: list[Any], name: str, value: Any, *, system: bool) -> None:
        col = self.by_name.get(name)
        if col is None:
            if name.endswith("#type") and name in self.pos:
                data[self.pos[name]] = value
                return
            raise DataverseError(
                400,
                "0x80060888",
                f"Could not find a property named '{name}' on type "
                f"'Microsoft.Dynamics.CRM.{self.entity.logical}'.",
            )
        if col.readonly and not system and col.name != self.entity.key:
            raise DataverseError(400, "0x80060888", f"The property '{name}' is read-only.")
        if col.kind == "lookup" and col.polymorphic:
            target = None
            if isinstance(value, tuple):
                target, value = value
            if value is not None and target is None:
                target = self.org.find_target(col, str(value))
            data[self.pos[col.type_column]] = target if value is not None else None
        data[self.pos[name]] = self._coerce(col, value)

    def update(self, key: str, changes: Mapping[str, Any], *, system: bool = False) -> Row:
        key = key.lower()
        old = self.rows.get(key)
        if old is None:
            raise not_found(self.entity, key)
        data = list(old)
        for name, value in changes.items():
            if name == self.entity.key:
                continue
            self._set(data, name, value, system=system)
        return self._commit(key, old, data, keep_modifiedon=system and "modifiedon" in changes)

    def write_stored(self, key: str, changes: Mapping[str, Any]) -> Row:
        """Update with values already in stored form (service-computed columns such as totals)."""
        key = key.lower()
        old = self.rows.get(key)
        if old is None:
            raise not_found(self.entity, key)
        data = list(old)
        for name, value in changes.items():
            data[self.pos[name]] = value
        return self._commit(key, old, data, keep_modifiedon="modifiedon" in changes)

    def _commit(self, key: str, old: Row, data: list[Any], *, keep_modifiedon: bool) -> Row:
        version = self.org.next_version()
        data[self.vpos] = version
        if not keep_modifiedon:
            data[self.mpos] = max(int(self.org.clock.now()), old[self.mpos] or 0)
        row = tuple(data)
        self.rows[key] = row
        self._index(key, old, row)
        self._log(version, key)
        return row

    def delete(self, key: str) -> None:
        key = key.lower()
        if key not in self.rows:
            raise not_found(self.entity, key)
        self._index(key, self.rows.pop(key), None)
        keys = self.live_keys()
        i = bisect.bisect_left(keys, key)
        del keys[i]
        version = self.org.next_version()
        self.tombstones[key] = version
        self._log(version, key)


def not_found(entity: Entity, key: str) -> DataverseError:
    return DataverseError(404, "0x80040217", f"Entity '{entity.logical}' With Id = {key} Does Not Exist")


class Org:
    """One Dataverse environment: tables, an org-wide version counter and its application users."""

    def __init__(
        self, name: str, tenant_id: str, clock: Clock, *, expirechangetrackingindays: int = 7
    ) -> None:
        self.name = name
        self.tenant_id = tenant_id
        self.clock = clock
        self.version = 1_000_000
        self.organization_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"flash-sandbox-org:{name}"))
        self.business_unit_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"flash-sandbox-bu:{name}"))
        self.tables: dict[str, Table] = {s: Table(self, e) for s, e in ENTITIES.items()}
        self.app_users: dict[str, AppUser] = {}
        # Organisation-defined status reasons: (logical, column) -> {value: label}, and order reason -> state.
        self.custom_labels: dict[tuple[str, str], dict[int, str]] = {}
        self.order_status_state: dict[int, int] = dict(ORDER_STATUS_STATE)
        self.tables["organizations"].insert(
            {
                "organizationid": self.organization_id,
                "name": name,
                "expirechangetrackingindays": expirechangetrackingindays,
            },
            system=True,
        )

    def next_version(self) -> int:
        self.version += 1
        return self.version

    def table(self, entity_set_or_logical: str) -> Table:
        t = self.tables.get(entity_set_or_logical)
        if t is None:
            ent = ENTITY_BY_LOGICAL.get(entity_set_or_logical)
            if ent is None:
                raise KeyError(entity_set_or_logical)
            t = self.tables[ent.entity_set]
        return t

    def find_target(self, col: Column, key: str) -> str:
        key = key.lower()
        for logical in col.targets:
            if key in self.table(logical).rows:
                return logical
        raise DataverseError(
            400, "0x80040217", f"None of the targets {', '.join(col.targets)} has a record with Id = {key}"
        )

    @property
    def expirechangetrackingindays(self) -> int:
        t = self.tables["organizations"]
        row = t.rows[self.organization_id]
        return int(row[t.pos["expirechangetrackingindays"]])

    def add_status_reason(self, logical: str, value: int, label: str, *, statecode: int) -> None:
        """Register an organisation-defined status reason (e.g. 100000001) under ``statecode``."""
        self.custom_labels.setdefault((logical, "statuscode"), {})[value] = label
        if logical == "salesorder":
            self.order_status_state[value] = statecode

    def label(self, logical: str, col: Column, value: int) -> str | None:
        custom = self.custom_labels.get((logical, col.name))
        if custom and value in custom:
            return custom[value]
        return col.labels.get(value)

    def add_application_user(self, client_id: str, *, readable: Iterable[str] | None = None) -> AppUser:
        user = AppUser(
            client_id=client_id,
            user_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"flash-sandbox-user:{self.name}:{client_id}")),
            readable=None if readable is None else frozenset(readable),
        )
        self.app_users[client_id] = user
        return user


class AppUser:
    """An application user bound to an app registration's client id.

    ``readable`` is the set of table logical names its security role may read/write; ``None`` means all.
    """

    def __init__(self, client_id: str, user_id: str, readable: frozenset[str] | None) -> None:
        self.client_id = client_id
        self.user_id = user_id
        self.readable = readable

    def may_read(self, entity: Entity) -> bool:
        return self.readable is None or entity.logical in self.readable
