"""OData v4 as Dataverse speaks it: Prefer headers, $select/$filter/$orderby, rendering, paging cookies.

Rows are rendered straight to JSON text so money keeps its four decimals (``20000.0000``) exactly as the
service sends it (clients parse with ``json.loads(..., parse_float=Decimal)``).
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import json
import re
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn

from sandbox.dataverse.schema import Column, Entity
from sandbox.dataverse.store import DataverseError, Org, Row, Table, from_units, to_epoch, to_units

__all__ = [
    "Annotations",
    "Query",
    "Renderer",
    "decode_cookie",
    "decode_deltatoken",
    "encode_cookie",
    "encode_deltatoken",
    "parse_prefer",
    "parse_query",
]

FORMATTED = "OData.Community.Display.V1.FormattedValue"
LOOKUP_LOGICAL = "Microsoft.Dynamics.CRM.lookuplogicalname"
NAV_PROPERTY = "Microsoft.Dynamics.CRM.associatednavigationproperty"
QUERY_ERROR = "0x0"
"""OData-layer query errors (unknown property, syntax): code ``0x0`` as documented for "Could not find a property
named" (docs/vendor-facts.md "error unknown property")."""
# docs/vendor-facts.md "query supported options" / "query unsupported options".
SUPPORTED_OPTIONS = {"$select", "$filter", "$orderby", "$top", "$count", "$skiptoken", "$deltatoken"}
NOT_SIMULATED_OPTIONS = {"$expand", "$apply"}


def query_error(message: str) -> DataverseError:
    return DataverseError(400, QUERY_ERROR, message)


# -- Prefer ------------------------------------------------------------------------------------------------


def parse_prefer(values: Iterable[str]) -> dict[str, str | None]:
    """``Prefer`` preferences (several headers or one comma list; quoted values may contain commas)."""
    out: dict[str, str | None] = {}
    for header in values:
        for part in re.findall(r'(?:[^,"]|"[^"]*")+', header):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.partition("=")
            out[name.strip().lower()] = value.strip() if sep else None
    return out


class Annotations:
    """Which instance annotations ``odata.include-annotations`` asked for ("*" or a list with wildcards)."""

    def __init__(self, spec: str | None) -> None:
        self.spec = spec
        patterns = (spec or "").strip('"').split(",") if spec else []
        self.patterns = [p.strip() for p in patterns if p.strip()]

    def wants(self, term: str) -> bool:
        return any(p == "*" or fnmatch.fnmatchcase(term, p) for p in self.patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)


# -- $filter -----------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*('(?:[^']|'')*'|\(|\)|,|[^\s(),']+)")
_OPS = {"eq", "ne", "gt", "ge", "lt", "le"}
Predicate = Callable[[Row], bool]


class _FilterParser:
    def __init__(self, table: Table, text: str) -> None:
        self.table = table
        self.tokens: list[str] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise query_error(f"Syntax error at position {pos} in '{text}'.")
            self.tokens.append(m.group(1))
            pos = m.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1
        self.i = 0
        self.text = text

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def next(self) -> str:
        tok = self.peek()
        if tok is None:
            raise query_error(f"Syntax error: unexpected end of '$filter' expression '{self.text}'.")
        self.i += 1
        return tok

    def parse(self) -> Predicate:
        pred = self.or_expr()
        if self.peek() is not None:
            raise query_error(f"Syntax error at '{self.peek()}' in '$filter' expression '{self.text}'.")
        return pred

    def or_expr(self) -> Predicate:
        left = self.and_expr()
        while (self.peek() or "").lower() == "or":
            self.next()
            right = self.and_expr()
            left = (lambda a, b: lambda r: a(r) or b(r))(left, right)
        return left

    def and_expr(self) -> Predicate:
        left = self.not_expr()
        while (self.peek() or "").lower() == "and":
            self.next()
            right = self.not_expr()
            left = (lambda a, b: lambda r: a(r) and b(r))(left, right)
        return left

    def not_expr(self) -> Predicate:
        if (self.peek() or "").lower() == "not":
            self.next()
            inner = self.not_expr()
            return lambda r: not inner(r)
        return self.primary()

    def column(self, name: str) -> tuple[Column, int]:
        col = self.table.by_name.get(name)
        if col is None:
            raise query_error(
                f"Could not find a property named '{name}' on type "
                f"'Microsoft.Dynamics.CRM.{self.table.entity.logical}'."
            )
        return col, self.table.pos[name]

    def primary(self) -> Predicate:
        tok = self.next()
        if tok == "(":
            inner = self.or_expr()
            if self.next() != ")":
                raise query_error(f"Syntax error: ')' expected in '{self.text}'.")
            return inner
        if tok.lower() in {"contains", "startswith", "endswith"} and self.peek() == "(":
            self.next()
            col, i = self.column(self.next())
            if self.next() != ",":
                raise query_error(f"Syntax error: ',' expected in '{self.text}'.")
            needle = str(literal(col, self.next())).lower()
            if self.next() != ")":
                raise query_error(f"Syntax error: ')' expected in '{self.text}'.")
            fn = tok.lower()
            if fn == "contains":
                return lambda r: r[i] is not None and needle in str(r[i]).lower()
            if fn == "startswith":
                return lambda r: r[i] is not None and str(r[i]).lower().startswith(needle)
            return lambda r: r[i] is not None and str(r[i]).lower().endswith(needle)
        col, i = self.column(tok)
        op = self.next().lower()
        if op not in _OPS:
            raise query_error(f"Syntax error: unknown operator '{op}' in '{self.text}'.")
        value = literal(col, self.next())
        return _compare(i, op, value)


def _compare(i: int, op: str, value: Any) -> Predicate:
    if value is None:
        if op == "eq":
            return lambda r: r[i] is None
        if op == "ne":
            return lambda r: r[i] is not None
        return lambda r: False
    if isinstance(value, str):
        value = value.lower()
        get: Callable[[Row], Any] = lambda r: None if r[i] is None else str(r[i]).lower()  # noqa: E731
    else:
        get = lambda r: r[i]  # noqa: E731
    match op:
        case "eq":
            return lambda r: get(r) == value
        case "ne":
            return lambda r: get(r) != value
        case "gt":
            return lambda r: (v := get(r)) is not None and v > value
        case "ge":
            return lambda r: (v := get(r)) is not None and v >= value
        case "lt":
            return lambda r: (v := get(r)) is not None and v < value
        case _:
            return lambda r: (v := get(r)) is not None and v <= value


def literal(col: Column, tok: str) -> Any:
    """A $filter literal converted to the stored representation of ``col``."""
    if tok == "null":
        return None
    quoted = tok.startswith("'") and tok.endswith("'") and len(tok) >= 2
    raw = tok[1:-1].replace("''", "'") if quoted else tok
    try:
        match col.kind:
            case "str":
                return raw if quoted else _bad_literal(col, tok)
            case "money":
                return to_units(Decimal(raw))
            case "decimal":
                return Decimal(raw)
            case "int" | "option" | "version":
                return int(raw)
            case "bool":
                return raw == "true" if raw in {"true", "false"} else _bad_literal(col, tok)
            case "datetime":
                if len(raw) == 10:
                    raw += "T00:00:00Z"
                return to_epoch(raw)
            case _:
                return str(uuid.UUID(raw))
    except (ValueError, InvalidOperation, TypeError):
        return _bad_literal(col, tok)


def _bad_literal(col: Column, tok: str) -> NoReturn:
    raise query_error(
        f"A binary operator with incompatible types was detected. Found operand types for "
        f"'{col.name}' and literal {tok}."
    )


# -- query options ------------------------------------------------------------------------------------------


@dataclass
class Query:
    select: list[str] | None
    predicate: Predicate | None
    orderby: list[tuple[str, bool]]
    top: int | None
    count: bool
    skiptoken: str | None
    deltatoken: str | None
    has: set[str]


def parse_query(table: Table, params: Mapping[str, str]) -> Query:
    ent = table.entity
    has = {k for k in params if k.startswith("$")}
    for opt in sorted(has):
        if opt in NOT_SIMULATED_OPTIONS:
            # Dataverse supports these; the simulator refuses them rather than answer unfiltered rows.
            raise DataverseError(501, QUERY_ERROR, f"The query option '{opt}' is not implemented by this "
                                                   "Dataverse simulator.")
        if opt not in SUPPORTED_OPTIONS:
            # $skip, $search, $format are documented as unsupported; option names are case-sensitive.
            raise query_error(f"The query parameter '{opt}' is not supported.")
    select = None
    if "$select" in params:
        select = [s.strip() for s in params["$select"].split(",") if s.strip()]
        names = set(_renderable(ent))
        for s in select:
            if s not in names:
                raise query_error(
                    f"Could not find a property named '{s}' on type 'Microsoft.Dynamics.CRM.{ent.logical}'."
                )
    predicate = _FilterParser(table, params["$filter"]).parse() if params.get("$filter") else None
    orderby: list[tuple[str, bool]] = []
    for part in (params.get("$orderby") or "").split(","):
        bits = part.split()
        if not bits:
            continue
        if (
            bits[0] not in table.by_name
            or len(bits) > 2
            or (len(bits) == 2 and bits[1] not in {"asc", "desc"})
        ):
            raise query_error(
                f"Could not find a property named '{bits[0]}' on type 'Microsoft.Dynamics.CRM.{ent.logical}'."
            )
        orderby.append((bits[0], len(bits) == 2 and bits[1] == "desc"))
    top = None
    if "$top" in params:
        text = params["$top"]
        if not text.isdigit():
            raise query_error(f"Invalid value '{text}' for $top query option found.")
        top = int(text)
    count = params.get("$count", "").lower() == "true"
    return Query(
        select, predicate, orderby, top, count, params.get("$skiptoken"), params.get("$deltatoken"), has
    )


def _renderable(ent: Entity) -> list[str]:
    names: list[str] = []
    for c in ent.columns:
        names.append(c.name)
        if c.kind == "money" and c.base:
            names.append(f"{c.name}_base")
    return names


# -- sort keys for $orderby paging --------------------------------------------------


class _Desc:
    __slots__ = ("v",)

    def __init__(self, v: Any) -> None:
        self.v = v

    def __lt__(self, other: _Desc) -> bool:
        return bool(other.v < self.v)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.v == other.v

    def __hash__(self) -> int:
        return hash(self.v)


def sort_key(table: Table, orderby: list[tuple[str, bool]], row: Row) -> tuple[Any, ...]:
    parts: list[Any] = []
    for name, desc in orderby:
        v = row[table.pos[name]]
        comp = (v is not None, v if v is not None else 0)
        parts.append(_Desc(comp) if desc else comp)
    parts.append(row[table.pos[table.entity.key]])
    return tuple(parts)


def cookie_values(table: Table, orderby: list[tuple[str, bool]], row: Row) -> list[Any]:
    out: list[Any] = []
    for name, _ in orderby:
        v = row[table.pos[name]]
        out.append(str(v) if isinstance(v, Decimal) else v)
    return out


def key_from_cookie(
    table: Table, orderby: list[tuple[str, bool]], values: list[Any], pk: str
) -> tuple[Any, ...]:
    fake: list[Any] = [None] * len(table.cols)
    for (name, _), v in zip(orderby, values, strict=True):
        col = table.by_name[name]
        fake[table.pos[name]] = Decimal(v) if col.kind == "decimal" and v is not None else v
    fake[table.pos[table.entity.key]] = pk
    return sort_key(table, orderby, tuple(fake))


# -- paging cookie and delta token ---------------------------------------------------------------------------


def encode_cookie(page: int, state: dict[str, Any], *, tracking: bool) -> str:
    inner = base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode()
    return f'<cookie pagenumber="{page}" pagingcookie="{inner}" istracking="{tracking}" />'


_COOKIE = re.compile(r'<cookie pagenumber="(\d+)" pagingcookie="([^"]*)" istracking="(True|False)" />')


def decode_cookie(token: str) -> tuple[int, dict[str, Any]]:
    m = _COOKIE.fullmatch(token.strip())
    if not m:
        raise query_error("Invalid $skiptoken: the paging cookie is malformed.")
    try:
        state = json.loads(base64.urlsafe_b64decode(m.group(2).encode()))
    except ValueError:
        raise query_error("Invalid $skiptoken: the paging cookie is malformed.") from None
    if not isinstance(state, dict):
        raise query_error("Invalid $skiptoken: the paging cookie is malformed.")
    return int(m.group(1)), state


def encode_deltatoken(version: int, epoch: float) -> str:
    stamp = dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%m/%d/%Y %H:%M:%S")
    return f"{version}!{stamp}"


def decode_deltatoken(token: str) -> tuple[int, float]:
    version, _, stamp = token.partition("!")
    when = dt.datetime.strptime(stamp, "%m/%d/%Y %H:%M:%S").replace(tzinfo=dt.UTC)
    return int(version), when.timestamp()


def quote_lower(value: str) -> str:
    """Percent-encode everything reserved, with lower-case hex digits as Dataverse writes them."""
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), urllib.parse.quote(value, safe=""))


_QUERY_SAFE = ",()$:'"


def build_query(params: Iterable[tuple[str, str]]) -> str:
    return "&".join(f"{k}={urllib.parse.quote(v, safe=_QUERY_SAFE)}" for k, v in params)


# -- rendering -------------------------------------------------------------------------------------------


def _money_text(units: int) -> str:
    sign = "-" if units < 0 else ""
    a = abs(units)
    return f"{sign}{a // 10000}.{a % 10000:04d}"


def _fmt_money(units: int, symbol: str) -> str:
    d = from_units(units)
    text = f"{abs(d):,.2f}"
    return f"-{symbol}{text}" if d < 0 else f"{symbol}{text}"


def _fmt_datetime(epoch: int) -> str:
    t = dt.datetime.fromtimestamp(epoch, dt.UTC)
    hour = t.hour % 12 or 12
    return f"{t.month}/{t.day}/{t.year} {hour}:{t.minute:02d} {'AM' if t.hour < 12 else 'PM'}"


_Q4 = Decimal("0.0001")


class Renderer:
    """Renders rows of one table for one request ($select + requested annotations)."""

    def __init__(self, org: Org, table: Table, select: list[str] | None, annotations: Annotations) -> None:
        self.org = org
        self.table = table
        ent = table.entity
        names = list(select) if select is not None else _renderable(ent)
        if ent.key not in names:
            names.append(ent.key)
        if (
            any((n in ent.by_name and ent.by_name[n].kind == "money") or n.endswith("_base") for n in names)
            and "_transactioncurrencyid_value" in ent.by_name
            and "_transactioncurrencyid_value" not in names
        ):
            names.append("_transactioncurrencyid_value")
        self.names = names
        self.ann = annotations
        self.want_fmt = annotations.wants(FORMATTED)
        self.want_logical = annotations.wants(LOOKUP_LOGICAL)
        self.want_nav = annotations.wants(NAV_PROPERTY)
        self._symbols: dict[str | None, str] = {}
        self._rates: dict[str | None, Decimal] = {}
        self.base_symbol = "$"
        plan: list[tuple[str, Column, bool]] = []
        for n in names:
            if n.endswith("_base") and n[:-5] in ent.by_name and ent.by_name[n[:-5]].kind == "money":
                plan.append((n, ent.by_name[n[:-5]], True))
            else:
                plan.append((n, ent.by_name[n], False))
        self.plan = plan
        self.cur_pos = table.pos.get("_transactioncurrencyid_value")
        self.rate_pos = table.pos.get("exchangerate")
        cur = org.tables["transactioncurrencies"]
        for row in cur.rows.values():
            cid = row[cur.pos["transactioncurrencyid"]]
            self._symbols[cid] = row[cur.pos["currencysymbol"]] or ""
            self._rates[cid] = row[cur.pos["exchangerate"]] or Decimal(1)
            if self._rates[cid] == 1:
                self.base_symbol = row[cur.pos["currencysymbol"]] or "$"

    def _rate(self, row: Row) -> Decimal:
        if self.rate_pos is not None and row[self.rate_pos]:
            return Decimal(row[self.rate_pos])
        if self.cur_pos is not None:
            return self._rates.get(row[self.cur_pos], Decimal(1))
        return Decimal(1)

    def etag(self, row: Row) -> str:
        return f'W/"{row[self.table.vpos]}"'

    def render(self, row: Row, *, extra: str = "") -> str:
        t = self.table
        parts = [f'"@odata.etag":{json.dumps(self.etag(row))}'] if extra == "" else [extra]
        for name, col, is_base in self.plan:
            raw = row[t.pos[col.name]]
            if is_base:
                v = None if raw is None else int((Decimal(raw) / self._rate(row)).quantize(Decimal(1)))
                if v is not None and self.want_fmt:
                    parts.append(f'"{name}@{FORMATTED}":{json.dumps(_fmt_money(v, self.base_symbol))}')
                parts.append(f'"{name}":{"null" if v is None else _money_text(v)}')
                continue
            if raw is not None and self.ann:
                parts.extend(self._annotations(name, col, raw, row))
            parts.append(f'"{name}":{self._value(col, raw)}')
        return "{" + ",".join(parts) + "}"

    def _value(self, col: Column, v: Any) -> str:
        if v is None:
            return "null"
        match col.kind:
            case "money":
                return _money_text(v)
            case "decimal":
                return f"{Decimal(v):.{col.scale}f}"
            case "datetime":
                return f'"{dt.datetime.fromtimestamp(v, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}"'
            case "bool":
                return "true" if v else "false"
            case "int" | "option" | "version":
                return str(v)
            case _:
                return json.dumps(v, ensure_ascii=False)

    def _annotations(self, name: str, col: Column, v: Any, row: Row) -> list[str]:
        out: list[str] = []
        fmt: str | None = None
        if col.kind == "lookup":
            target = row[self.table.pos[col.type_column]] if col.polymorphic else col.targets[0]
            if self.want_fmt:
                fmt = self._lookup_name(target, v)
            if self.want_nav:
                nav = f"{col.nav}_{target}" if col.polymorphic else col.nav
                out.append(f'"{name}@{NAV_PROPERTY}":"{nav}"')
            if self.want_logical:
                out.append(f'"{name}@{LOOKUP_LOGICAL}":"{target}"')
        elif self.want_fmt:
            match col.kind:
                case "option":
                    fmt = self.org.label(self.table.entity.logical, col, v) or str(v)
                case "money":
                    cid = row[self.cur_pos] if self.cur_pos is not None else None
                    fmt = _fmt_money(v, self._symbols.get(cid, self.base_symbol))
                case "datetime":
                    fmt = _fmt_datetime(v)
                case "bool":
                    fmt = "Yes" if v else "No"
                case "decimal":
                    fmt = f"{Decimal(v):,.2f}"
                case "int" if col.name != "versionnumber":
                    fmt = f"{v:,}"
                case _:
                    fmt = None
        if fmt is not None:
            out.insert(0, f'"{name}@{FORMATTED}":{json.dumps(fmt, ensure_ascii=False)}')
        return out

    def _lookup_name(self, logical: str | None, key: str) -> str | None:
        if not logical:
            return None
        try:
            t = self.org.table(logical)
        except KeyError:
            return None
        row = t.rows.get(key)
        if row is None:
            return None
        v = row[t.pos[t.entity.primary_name]]
        return None if v is None else str(v)
