"""The environment's ``$metadata`` (CSDL) and the field-mapping confirmation verify reports.

A real environment's ``$metadata`` describes thousands of entities (tens of MB), so :class:`CsdlReader` is
fed the body chunk by chunk (an XML pull parser) and keeps only the entity types of the sets it is asked
about. :func:`check_fields` compares the connection's field mapping with what the environment offers: one
:class:`FieldCheck` per mapping, present or missing, with its type, and for a missing or mistyped field the
environment's fields of a fitting type, most similar name first.
"""

from __future__ import annotations

import difflib
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import cast

from fo_poller.config import FIELD_DEFAULTS, RETURN_STATUS_DEFAULTS, STATUS_DEFAULTS, FoConnection

__all__ = ["FIELD_SPECS", "CsdlReader", "EntityInfo", "FieldCheck", "StatusCheck", "check_fields", "check_statuses",
           "parse_csdl"]

_EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


@dataclass(frozen=True)
class EntityInfo:
    entity_set: str
    entity_type: str
    key: tuple[str, ...]
    fields: Mapping[str, str]
    enums: Mapping[str, tuple[str, ...]] = dc_field(default_factory=dict)
    """Members of each enum-typed field (from the ``EnumType`` the field names)."""


class CsdlReader:
    """Incremental CSDL parser: ``feed(chunk)`` then ``close()`` -> entity sets by name (only ``wanted``)."""

    def __init__(self, wanted: Iterable[str]) -> None:
        self.wanted = set(wanted)
        self._parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("end",))
        self._types: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {}
        self._sets: dict[str, str] = {}
        self._enums: dict[str, tuple[str, ...]] = {}

    def feed(self, chunk: bytes | str) -> None:
        self._parser.feed(chunk)
        self._drain()

    def _drain(self) -> None:
        for event in self._parser.read_events():
            elem = cast(ET.Element, cast(tuple[str, object], event)[1])
            tag = elem.tag
            if tag == f"{_EDM}EntityType":
                name = elem.get("Name", "")
                key = tuple(p.get("Name", "") for p in elem.iter(f"{_EDM}PropertyRef"))
                props = {p.get("Name", ""): p.get("Type", "") for p in elem.findall(f"{_EDM}Property")}
                self._types[name] = (key, props)
                elem.clear()
            elif tag == f"{_EDM}EnumType":
                self._enums[elem.get("Name", "")] = tuple(m.get("Name", "") for m in elem.findall(f"{_EDM}Member"))
                elem.clear()
            elif tag == f"{_EDM}EntitySet":
                self._sets[elem.get("Name", "")] = elem.get("EntityType", "").rsplit(".", 1)[-1]
            elif tag == f"{_EDM}Schema":
                elem.clear()

    def close(self) -> dict[str, EntityInfo]:
        self._parser.close()
        self._drain()
        out: dict[str, EntityInfo] = {}
        for es, type_name in self._sets.items():
            if es in self.wanted and type_name in self._types:
                key, props = self._types[type_name]
                enums = {f: self._enums[t.rsplit(".", 1)[-1]] for f, t in props.items()
                         if t.startswith("Microsoft.Dynamics.DataEntities.") and t.rsplit(".", 1)[-1] in self._enums}
                out[es] = EntityInfo(es, type_name, key, props, enums)
        return out


def parse_csdl(text: str | bytes, wanted: Iterable[str]) -> dict[str, EntityInfo]:
    r = CsdlReader(wanted)
    r.feed(text)
    return r.close()


# mapping name -> (entity role, kind, required)
FIELD_SPECS: dict[str, tuple[str, str, bool]] = {
    "order_number": ("orders", "string", True),
    "order_total": ("orders", "money", True),
    "order_tax": ("orders", "money", False),
    "order_charges": ("orders", "money", False),
    "order_discount": ("orders", "money", False),
    "totals_calculated": ("orders", "flag", True),
    "currency": ("orders", "string", True),
    "status": ("orders", "status", True),
    "customer": ("orders", "string", True),
    "email": ("orders", "string", False),
    "created": ("orders", "datetime", True),
    "change_date": ("orders", "datetime", False),
    "line_id": ("lines", "string", True),
    "line_order_number": ("lines", "string", True),
    "line_item": ("lines", "string", False),
    "line_description": ("lines", "string", False),
    "line_quantity": ("lines", "number", False),
    "line_price": ("lines", "money", False),
    "line_amount": ("lines", "money", True),
    "customer_account": ("customers", "string", True),
    "customer_name": ("customers", "string", False),
    "customer_email": ("customers", "string", False),
    "product_item": ("products", "string", True),
    "product_name": ("products", "string", False),
    "product_category": ("products", "string", False),
    "product_price": ("products", "money", False),
    "return_number": ("returns", "string", True),
    "return_rma": ("returns", "string", False),
    "return_status": ("returns", "status", True),
    "return_customer": ("returns", "string", False),
    "return_currency": ("returns", "string", True),
    "return_line_id": ("return_lines", "string", True),
    "return_line_order_number": ("return_lines", "string", True),
    "return_reference": ("return_lines", "string", True),
    "return_line_item": ("return_lines", "string", False),
    "return_line_quantity": ("return_lines", "number", False),
    "return_line_amount": ("return_lines", "money", True),
    "invoice_number": ("invoices", "string", True),
    "invoice_order_number": ("invoices", "string", True),
    "invoice_date": ("invoices", "date", True),
    "credit_note_total": ("invoices", "money", True),
}

_KINDS: dict[str, tuple[str, ...]] = {
    "string": ("Edm.String",),
    "money": ("Edm.Decimal", "Edm.Double"),
    "number": ("Edm.Decimal", "Edm.Double", "Edm.Int32", "Edm.Int64"),
    "datetime": ("Edm.DateTimeOffset",),
    "date": ("Edm.Date", "Edm.DateTimeOffset"),
    "flag": ("Microsoft.Dynamics.DataEntities.NoYes", "Edm.Boolean"),
    "status": ("Microsoft.Dynamics.DataEntities.*", "Edm.String"),
}

ROLES_BY_STREAM: dict[str, tuple[str, ...]] = {
    "orders": ("orders", "lines", "invoices"),
    "customers": ("customers",),
    "products": ("products",),
    "returns": ("returns", "return_lines", "invoices", "lines"),
}


def _fits(kind: str, edm: str) -> bool:
    for t in _KINDS[kind]:
        if (t.endswith(".*") and edm.startswith(t[:-1])) or edm == t:
            return True
    return False


def _short(edm: str) -> str:
    return edm.rsplit(".", 1)[-1] if edm.startswith("Microsoft.Dynamics.DataEntities.") else edm


@dataclass(frozen=True)
class FieldCheck:
    name: str
    entity_set: str
    field: str | None
    required: bool
    present: bool
    type: str | None
    fits: bool
    alternatives: tuple[tuple[str, str], ...] = dc_field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        if self.field is None or not self.present:
            return not self.required
        return self.fits

    def line(self) -> str:
        if self.field is None:
            return f"field_map.{self.name}: not mapped" + ("" if self.required else " (optional)")
        where = f"{self.entity_set}.{self.field}"
        if self.present:
            state = f"present, {_short(self.type or '?')}" + ("" if self.fits else f", not a {self.kind_text}")
        else:
            state = "MISSING" if self.required else "absent (optional, not read)"
        return f"field_map.{self.name} = {where}: {state}"

    @property
    def kind_text(self) -> str:
        kind = FIELD_SPECS[self.name][1]
        return f"{kind} field (" + ", ".join(_short(t) for t in _KINDS[kind]) + ")"

    def offer(self) -> str:
        if not self.alternatives:
            return f"{self.entity_set} has no {self.kind_text}"
        return f"{self.entity_set} offers " + ", ".join(f"{n} ({_short(t)})" for n, t in self.alternatives)


def check_fields(cc: FoConnection, meta: Mapping[str, EntityInfo]) -> list[FieldCheck]:
    """One check per mapping of the streams the connection syncs (see the module docstring)."""
    roles = {r for s in cc.streams for r in ROLES_BY_STREAM[s]}
    mapped = {v for v in cc.field_map.values() if v}
    out: list[FieldCheck] = []
    for name, (role, kind, required) in FIELD_SPECS.items():
        if role not in roles:
            continue
        es = cc.entity_sets[role]
        info = meta.get(es)
        fld = cc.field_map.get(name)
        # An optional default the environment lacks is fine; one the operator named explicitly must exist.
        need = required or name in cc.explicit_fields
        if info is None:
            out.append(FieldCheck(name, es, fld, need, False, None, False))
            continue
        edm = info.fields.get(fld) if fld else None
        present = edm is not None
        fits = present and _fits(kind, edm or "")
        alternatives: tuple[tuple[str, str], ...] = ()
        if fld and not (present and fits):
            target = (FIELD_DEFAULTS.get(name) or fld).lower()
            cands = [(n, t) for n, t in info.fields.items() if _fits(kind, t) and (n not in mapped or n == fld)]
            cands.sort(key=lambda nt: -difflib.SequenceMatcher(None, target, nt[0].lower()).ratio())
            alternatives = tuple(cands[:6])
        if not need and fld and not present:
            out.append(FieldCheck(name, es, fld, False, False, None, False, alternatives))
            continue
        out.append(FieldCheck(name, es, fld, need, present, edm, fits, alternatives))
    return out


@dataclass(frozen=True)
class StatusCheck:
    """The status values of an enum status field against the connection's lifecycle table."""

    name: str
    """``status`` or ``return_status``."""
    detail: str
    ok: bool
    fix: str = ""


def check_statuses(cc: FoConnection, meta: Mapping[str, EntityInfo]) -> list[StatusCheck]:
    """For each mapped status field whose type is an enum: its members, which of them are awardable/effective
    and cancelled under the connection's table, and a failure for a table entry the enum does not have (a typo
    would silently leave orders pending) or when no member earns at all."""
    out: list[StatusCheck] = []
    specs = [("status", "orders", "status_lifecycle", STATUS_DEFAULTS, "awardable"),
             ("return_status", "returns", "return_status_lifecycle", RETURN_STATUS_DEFAULTS, "effective")]
    for name, stream, setting, defaults, earning in specs:
        if stream not in cc.streams:
            continue
        info, fld = meta.get(cc.entity_sets[stream]), cc.field_map.get(name)
        members = info.enums.get(fld) if info is not None and fld else None
        if not members:
            continue  # a string status (or a missing field, reported by check_fields)
        given: Mapping[str, str] = cc.settings.get(setting) or {}
        unknown = sorted(set(given) - set(members))
        table = {**defaults, **given}
        groups = {life: [m for m in members if table.get(m, "pending") == life]
                  for life in (earning, "cancelled", "pending")}
        enum_name = _short(info.fields[fld]) if info is not None and fld else "?"
        detail = (f"{fld} ({enum_name}) has {', '.join(members)}; "
                  + "; ".join(f"{life}: {', '.join(ms) or '-'}" for life, ms in groups.items()))
        if unknown:
            out.append(StatusCheck(name, f"settings.{setting} names {', '.join(unknown)}, which {enum_name} does not "
                                   f"have; {detail}", False, f"use the members of {enum_name} as keys"))
        elif not groups[earning]:
            out.append(StatusCheck(name, f"no value of {enum_name} is {earning}; {detail}", False,
                                   f"map at least one value to {earning} in settings.{setting}"))
        else:
            out.append(StatusCheck(name, detail, True))
    return out
