"""Dataverse metadata as the Web API serves it: ``EntityDefinitions`` and the CSDL ``$metadata`` document.

Follows docs/vendor-facts.md ("query EntityDefinitions", "query service document"):

* ``EntityDefinitions`` honours ``$select`` (``MetadataId`` always returned) and ``$filter`` on primitive and
  enumeration properties (``LogicalName eq 'account'``, ``ChangeTrackingEnabled eq true``, enum literals such as
  ``Microsoft.Dynamics.CRM.OwnershipTypes'UserOwned'``, ``and`` / ``or`` / ``not`` / parentheses); there is no
  paging. A filter on a complex property path (``CanChangeTrackingBeEnabled/Value``) is not simulated: 501.
* ``EntityDefinitions(LogicalName='account')`` (alternate key) and ``EntityDefinitions(<MetadataId>)`` retrieve
  one definition; ``$expand=Attributes`` (optionally ``Attributes($select=...;$filter=...)``) and the
  ``.../Attributes`` and ``.../Attributes(LogicalName='x')`` paths give the common AttributeMetadata properties.
* ``$metadata`` is a CSDL document of the simulated tables; with ``?annotations=true`` change-tracked entity sets
  carry ``Org.OData.Capabilities.V1.ChangeTracking``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from xml.sax.saxutils import escape

from sandbox.dataverse.schema import ENTITIES, ENTITY_BY_LOGICAL, Column, Entity
from sandbox.dataverse.store import DataverseError

__all__ = ["attribute_rows", "csdl", "entity_definitions", "entity_row", "not_implemented"]

# Documented SchemaNames (entity references: "SchemaName" in each table's Properties).
_SCHEMA_NAMES = {
    "account": "Account", "contact": "Contact", "product": "Product", "salesorder": "SalesOrder",
    "salesorderdetail": "SalesOrderDetail", "invoice": "Invoice", "transactioncurrency": "TransactionCurrency",
    "organization": "Organization", "msdyn_rma": "msdyn_rma", "msdyn_rmaproduct": "msdyn_rmaproduct",
}
_ORG_OWNED = {"transactioncurrency", "organization"}
_EDM = {"guid": "Edm.Guid", "str": "Edm.String", "int": "Edm.Int32", "bool": "Edm.Boolean", "money": "Edm.Decimal",
        "decimal": "Edm.Decimal", "datetime": "Edm.DateTimeOffset", "option": "Edm.Int32", "lookup": "Edm.Guid",
        "version": "Edm.Int64"}
_ATTR_TYPE = {"guid": "Uniqueidentifier", "str": "String", "int": "Integer", "bool": "Boolean", "money": "Money",
              "decimal": "Decimal", "datetime": "DateTime", "option": "Picklist", "lookup": "Lookup",
              "version": "BigInt"}
_METADATA_TYPE = {"Uniqueidentifier": "UniqueIdentifier", "BigInt": "BigInt", "Customer": "Lookup"}


def not_implemented(what: str) -> DataverseError:
    """A Dataverse feature this simulator does not serve (docs/vendor-facts.md: refused, never ignored)."""
    return DataverseError(501, "0x0", f"{what} is not implemented by this Dataverse simulator.")


def _unknown(name: str, type_name: str) -> DataverseError:
    return DataverseError(400, "0x0", f"Could not find a property named '{name}' on type "
                                      f"'Microsoft.Dynamics.CRM.{type_name}'.")


def _label(text: str, metadata_id: str) -> dict[str, Any]:
    label = {"Label": text, "LanguageCode": 1033, "IsManaged": True, "MetadataId": metadata_id, "HasChanged": None}
    return {"LocalizedLabels": [label], "UserLocalizedLabel": label}


def _mid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(parts)))


def entity_row(e: Entity) -> dict[str, Any]:
    mid = _mid(e.logical)
    return {
        "MetadataId": mid,
        "LogicalName": e.logical,
        "SchemaName": _SCHEMA_NAMES.get(e.logical, e.logical),
        "EntitySetName": e.entity_set,
        "LogicalCollectionName": e.entity_set,
        "PrimaryIdAttribute": e.key,
        "PrimaryNameAttribute": e.primary_name,
        "ChangeTrackingEnabled": e.change_tracking,
        "IsCustomEntity": False,
        "IsPrivate": False,
        "IsActivity": False,
        "IsKnowledgeManagementEnabled": False,
        "OwnershipType": "OrganizationOwned" if e.logical in _ORG_OWNED else "UserOwned",
        "DisplayName": _label(_SCHEMA_NAMES.get(e.logical, e.logical), _mid(e.logical, "DisplayName")),
    }


def _attr_logical(col: Column) -> str:
    return col.name[1:-len("_value")] if col.kind == "lookup" else col.name


def attribute_rows(e: Entity) -> list[dict[str, Any]]:
    out = []
    for col in e.columns:
        kind = _ATTR_TYPE[col.kind]
        if col.name == "statecode":
            kind = "State"
        elif col.name == "statuscode":
            kind = "Status"
        elif col.kind == "lookup" and col.polymorphic and set(col.targets) == {"account", "contact"}:
            kind = "Customer"
        logical = _attr_logical(col)
        names = [(logical, kind)]
        if col.kind == "money" and col.base:
            names.append((f"{logical}_base", "Money"))
        for name, t in names:
            out.append({
                "@odata.type": f"#Microsoft.Dynamics.CRM.{_METADATA_TYPE.get(t, t)}AttributeMetadata",
                "MetadataId": _mid(e.logical, name),
                "LogicalName": name,
                "SchemaName": name,
                "EntityLogicalName": e.logical,
                "AttributeType": t,
                "IsPrimaryId": name == e.key,
                "IsPrimaryName": name == e.primary_name,
                "IsValidForRead": True,
                "IsCustomAttribute": name.startswith("new_"),
            })
    return out


# -- $filter on metadata properties -------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(Microsoft\.Dynamics\.CRM\.\w+'(?:[^']|'')*'|'(?:[^']|'')*'|\(|\)|[^\s()]+)")
Pred = Callable[[Mapping[str, Any]], bool]


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise DataverseError(400, "0x0", f"Syntax error at position {pos} in '{text}'.")
        out.append(m.group(1))
        pos = m.end()
    return out


def _literal(tok: str) -> Any:
    if tok == "null":
        return None
    if tok in ("true", "false"):
        return tok == "true"
    m = re.fullmatch(r"(?:Microsoft\.Dynamics\.CRM\.\w+)?'((?:[^']|'')*)'", tok)
    if m:
        return m.group(1).replace("''", "'")
    try:
        return int(tok)
    except ValueError:
        raise DataverseError(400, "0x0", f"Syntax error: '{tok}' is not a literal.") from None


def parse_filter(text: str, props: set[str], type_name: str) -> Pred:
    toks = _tokens(text)
    i = 0

    def peek() -> str | None:
        return toks[i] if i < len(toks) else None

    def take() -> str:
        nonlocal i
        if i >= len(toks):
            raise DataverseError(400, "0x0", f"Syntax error: unexpected end of '$filter' expression '{text}'.")
        i += 1
        return toks[i - 1]

    def primary() -> Pred:
        tok = take()
        if tok == "(":
            inner = or_expr()
            if take() != ")":
                raise DataverseError(400, "0x0", f"Syntax error: ')' expected in '{text}'.")
            return inner
        if tok.lower() == "not":
            inner = primary()
            return lambda r: not inner(r)
        if "/" in tok:
            raise not_implemented(f"A $filter on the complex property path '{tok}'")
        if tok not in props:
            raise _unknown(tok, type_name)
        op = take().lower()
        value = _literal(take())
        if op == "eq":
            return lambda r: r.get(tok) == value
        if op == "ne":
            return lambda r: r.get(tok) != value
        raise not_implemented(f"The operator '{op}' in a metadata $filter")

    def and_expr() -> Pred:
        left = primary()
        while (peek() or "").lower() == "and":
            take()
            right = primary()
            left = (lambda a, b: lambda r: a(r) and b(r))(left, right)
        return left

    def or_expr() -> Pred:
        left = and_expr()
        while (peek() or "").lower() == "or":
            take()
            right = and_expr()
            left = (lambda a, b: lambda r: a(r) or b(r))(left, right)
        return left

    pred = or_expr()
    if peek() is not None:
        raise DataverseError(400, "0x0", f"Syntax error at '{peek()}' in '$filter' expression '{text}'.")
    return pred


def _options(text: str) -> dict[str, str]:
    """Nested options of an ``$expand`` item: ``$select=a,b;$filter=...``."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if part.strip():
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip()
    return out


def _project(rows: list[dict[str, Any]], params: Mapping[str, str], type_name: str,
             always: tuple[str, ...]) -> list[dict[str, Any]]:
    props = set(rows[0]) if rows else set()
    for opt in params:
        if opt.startswith("$") and opt not in ("$select", "$filter", "$expand"):
            raise not_implemented(f"The query option '{opt}' on metadata")
    if params.get("$filter"):
        pred = parse_filter(params["$filter"], props, type_name)
        rows = [r for r in rows if pred(r)]
    if params.get("$select"):
        sel = [s.strip() for s in params["$select"].split(",") if s.strip()]
        for s in sel:
            if s not in props:
                raise _unknown(s, type_name)
        keep = [*always, *sel]
        rows = [{k: v for k, v in r.items() if k in keep} for r in rows]
    return rows


def _expand(e: Entity, row: dict[str, Any], expand: str | None) -> dict[str, Any]:
    if not expand:
        return row
    m = re.fullmatch(r"Attributes(?:\((.*)\))?", expand.strip())
    if not m:
        raise not_implemented(f"$expand={expand} on EntityDefinitions")
    opts = _options(m.group(1) or "")
    attrs = _project(attribute_rows(e), opts, "AttributeMetadata", ("@odata.type", "MetadataId"))
    return {**row, "Attributes": attrs}


def _find(key: str) -> Entity:
    m = re.fullmatch(r"LogicalName='((?:[^']|'')*)'", key)
    if m:
        ent = ENTITY_BY_LOGICAL.get(m.group(1).replace("''", "'"))
    else:
        ent = next((x for x in ENTITIES.values() if _mid(x.logical) == key.strip("{}").lower()), None)
    if ent is None:
        raise DataverseError(404, "0x80040217", f"Could not find an entity with key {key}.")
    return ent


_PATH = re.compile(r"^EntityDefinitions(?:\((?P<key>[^)]*)\))?(?:/Attributes(?:\((?P<akey>[^)]*)\))?)?/?$")


def entity_definitions(path: str, params: Mapping[str, str], api_root: str) -> dict[str, Any]:
    """The JSON body for a GET on an ``EntityDefinitions`` path (module docstring)."""
    m = _PATH.match(path)
    if not m:
        raise not_implemented(f"The metadata path '{path}'")
    sel = params.get("$select")
    ctx_sel = f"({sel})" if sel else ""
    attrs_path = "/Attributes" in path
    if m.group("key") is None:
        if attrs_path:
            raise DataverseError(404, "0x8006088a", "Resource not found for the segment 'Attributes'.")
        rows = _project([entity_row(e) for e in ENTITIES.values()], params, "EntityMetadata", ("MetadataId",))
        by_logical = {x.logical: x for x in ENTITIES.values()}
        rows = [_expand(by_logical[_logical_of(r)], r, params.get("$expand")) for r in rows]
        return {"@odata.context": f"{api_root}$metadata#EntityDefinitions{ctx_sel}", "value": rows}
    ent = _find(m.group("key"))
    mid = _mid(ent.logical)
    if not attrs_path:
        [row] = _project([entity_row(ent)], {k: v for k, v in params.items() if k != "$filter"}, "EntityMetadata",
                         ("MetadataId",))
        row = _expand(ent, row, params.get("$expand"))
        return {"@odata.context": f"{api_root}$metadata#EntityDefinitions{ctx_sel}/$entity", **row}
    attrs = attribute_rows(ent)
    if m.group("akey") is None:
        rows = _project(attrs, params, "AttributeMetadata", ("@odata.type", "MetadataId"))
        return {"@odata.context": f"{api_root}$metadata#EntityDefinitions({mid})/Attributes{ctx_sel}", "value": rows}
    ak = m.group("akey")
    lm = re.fullmatch(r"LogicalName='((?:[^']|'')*)'", ak)
    found = [a for a in attrs if (a["LogicalName"] == lm.group(1) if lm else a["MetadataId"] == ak.strip("{}"))]
    if not found:
        raise DataverseError(404, "0x80040217", f"Could not find an attribute with key {ak} on {ent.logical}.")
    [row] = _project(found, {k: v for k, v in params.items() if k != "$filter"}, "AttributeMetadata",
                     ("@odata.type", "MetadataId"))
    return {"@odata.context": f"{api_root}$metadata#EntityDefinitions({mid})/Attributes{ctx_sel}/$entity", **row}


def _logical_of(row: Mapping[str, Any]) -> str:
    mid = row["MetadataId"]
    return next(e.logical for e in ENTITIES.values() if _mid(e.logical) == mid)


def csdl(*, annotations: bool) -> str:
    """The ``$metadata`` CSDL document of the simulated tables."""
    parts = ['<?xml version="1.0" encoding="utf-8"?>',
             '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">',
             "<edmx:DataServices>",
             '<Schema Namespace="Microsoft.Dynamics.CRM" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">']
    for e in ENTITIES.values():
        parts.append(f'<EntityType Name="{e.logical}"><Key><PropertyRef Name="{e.key}" /></Key>')
        for c in e.columns:
            parts.append(f'<Property Name="{escape(c.name)}" Type="{_EDM[c.kind]}" />')
            if c.kind == "money" and c.base:
                parts.append(f'<Property Name="{escape(c.name)}_base" Type="Edm.Decimal" />')
        parts.append("</EntityType>")
    parts.append('<EntityContainer Name="System">')
    for e in ENTITIES.values():
        body = ""
        if annotations and e.change_tracking:
            body = ('<Annotation Term="Org.OData.Capabilities.V1.ChangeTracking"><Record>'
                    '<PropertyValue Property="Supported" Bool="true" /></Record></Annotation>')
        parts.append(f'<EntitySet Name="{e.entity_set}" EntityType="Microsoft.Dynamics.CRM.{e.logical}">{body}'
                     "</EntitySet>")
    parts += ["</EntityContainer>", "</Schema>", "</edmx:DataServices>", "</edmx:Edmx>"]
    return "\n".join(parts)
