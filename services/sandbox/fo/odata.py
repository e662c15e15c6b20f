"""The part of OData v4 URL conventions the F&O service supports (``docs/vendor-facts.md``, F&O).

Query options: ``$filter $count $orderby $skip $top $expand $select`` plus ``cross-company``. Filter operators
``eq ne gt ge lt le and or not`` with grouping; ``in`` and ``has`` and functions are refused, as documented.
Enum literals are ``Microsoft.Dynamics.DataEntities.<Enum>'<Member>'`` and support only ``eq``/``ne``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["ODataError", "Predicate", "Query", "parse_filter", "parse_key", "parse_query"]

SUPPORTED_OPTIONS = {"$filter", "$count", "$orderby", "$skip", "$top", "$expand", "$select", "$format",
                     "cross-company", "$skiptoken"}


class ODataError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class Predicate:
    """A compiled ``$filter``; ``hint`` = fields the filter pins to a set of values (``f eq a or f eq b``, under
    ``and``), which the simulator answers from an index, as the service's SQL would."""

    __slots__ = ("fn", "hint")

    def __init__(self, fn: Callable[[Mapping[str, Any]], bool], hint: dict[str, frozenset[str]] | None = None):
        self.fn = fn
        self.hint = hint or {}

    def __call__(self, row: Mapping[str, Any]) -> bool:
        return self.fn(row)

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<enum>[A-Za-z_][\w.]*'(?:[^']|'')*')
    | (?P<str>'(?:[^']|'')*')
    | (?P<dt>\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))?)
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<lp>\()|(?P<rp>\))|(?P<comma>,)
    | (?P<word>[A-Za-z_$][\w$]*)
    )""",
    re.VERBOSE,
)
_CMP = {"eq", "ne", "gt", "ge", "lt", "le"}


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ODataError(400, f"Syntax error at position {pos} in '{text}'.")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


@dataclass(frozen=True)
class _Lit:
    value: Any
    kind: str  # str | num | dt | enum | null | bool


def _to_time(v: Any) -> dt.datetime | None:
    if v is None or v == "":
        return None
    s = str(v)
    if len(s) == 10:
        s += "T00:00:00Z"
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


class _Parser:
    def __init__(self, text: str, types: Mapping[str, str]) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.types = types
        self.text = text

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        t = self.peek()
        if t is None:
            raise ODataError(400, f"Unexpected end of $filter expression '{self.text}'.")
        self.i += 1
        return t

    def parse(self) -> Predicate:
        p = self.or_()
        if self.peek() is not None:
            raise ODataError(400, f"Syntax error: unexpected '{self.peek()[1]}' in '{self.text}'.")  # type: ignore[index]
        return p

    def or_(self) -> Predicate:
        left = self.and_()
        while (t := self.peek()) and t == ("word", "or"):
            self.take()
            right = self.and_()
            hint = {f: left.hint[f] | right.hint[f] for f in left.hint.keys() & right.hint.keys()}
            left = Predicate((lambda a, b: lambda r: a(r) or b(r))(left, right), hint)
        return left

    def and_(self) -> Predicate:
        left = self.not_()
        while (t := self.peek()) and t == ("word", "and"):
            self.take()
            right = self.not_()
            hint = {**left.hint, **right.hint}
            left = Predicate((lambda a, b: lambda r: a(r) and b(r))(left, right), hint)
        return left

    def not_(self) -> Predicate:
        if self.peek() == ("word", "not"):
            self.take()
            inner = self.not_()
            return Predicate(lambda r: not inner(r))
        return self.cmp()

    def cmp(self) -> Predicate:
        if self.peek() and self.peek()[0] == "lp":  # type: ignore[index]
            self.take()
            inner = self.or_()
            if self.take()[0] != "rp":
                raise ODataError(400, f"Syntax error: ')' expected in '{self.text}'.")
            return inner
        kind, name = self.take()
        if kind != "word":
            raise ODataError(400, f"Syntax error: a property name expected, found '{name}'.")
        if self.peek() and self.peek()[0] == "lp":  # type: ignore[index]
            raise ODataError(400, f"The query function '{name}' is not supported.")
        if name not in self.types:
            raise ODataError(400, f"Could not find a property named '{name}' on type "
                             "'Microsoft.Dynamics.DataEntities'.")
        okind, op = self.take()
        if op in ("in", "has"):
            raise ODataError(501, f"The operator '{op}' is not supported.")
        if okind != "word" or op not in _CMP:
            raise ODataError(400, f"Syntax error: operator expected after '{name}', found '{op}'.")
        lit = self.literal()
        return self.compare(name, op, lit)

    def literal(self) -> _Lit:
        kind, text = self.take()
        if kind == "str":
            return _Lit(text[1:-1].replace("''", "'"), "str")
        if kind == "num":
            return _Lit(Decimal(text), "num")
        if kind == "dt":
            return _Lit(_to_time(text), "dt")
        if kind == "enum":
            type_name, _, rest = text.partition("'")
            return _Lit((type_name, rest[:-1].replace("''", "'")), "enum")
        if kind == "word" and text in ("null", "true", "false"):
            return _Lit(None if text == "null" else text == "true", "null" if text == "null" else "bool")
        raise ODataError(400, f"Syntax error: a literal expected, found '{text}'.")

    def compare(self, name: str, op: str, lit: _Lit) -> Predicate:
        ftype = self.types[name]
        value: Any = lit.value
        if ftype.startswith("Microsoft.Dynamics.DataEntities."):
            if lit.kind == "str":
                pass  # a quoted member name is accepted for enums
            elif lit.kind != "enum":
                raise ODataError(400, f"A binary operator with incompatible types was detected for '{name}'.")
            else:
                tname, member = value
                if tname != ftype:
                    raise ODataError(400, f"Enum type '{tname}' does not match the type of '{name}' ({ftype}).")
                value = member
            if op not in ("eq", "ne"):
                raise ODataError(400, f"The operator '{op}' is not supported for enum '{name}' (eq and ne only).")
        elif ftype in ("Edm.DateTimeOffset", "Edm.Date"):
            if lit.kind != "dt" and lit.kind != "null":
                raise ODataError(400, f"A binary operator with incompatible types was detected for '{name}'.")
        elif ftype in ("Edm.Decimal", "Edm.Int64", "Edm.Int32"):
            if lit.kind not in ("num", "null"):
                raise ODataError(400, f"A binary operator with incompatible types was detected for '{name}'.")
        elif lit.kind not in ("str", "null"):
            raise ODataError(400, f"A binary operator with incompatible types was detected for '{name}'.")
        if lit.kind == "str" and "*" in str(value) and op == "eq":
            pattern = re.compile("^" + ".*".join(re.escape(p) for p in str(value).split("*")) + "$", re.I)
            return Predicate(lambda r: r.get(name) is not None and bool(pattern.match(str(r.get(name)))))
        is_time = ftype in ("Edm.DateTimeOffset", "Edm.Date")

        def conv(v: Any) -> Any:
            if v is None:
                return None
            if is_time:
                return _to_time(v)
            if ftype in ("Edm.Decimal", "Edm.Int64", "Edm.Int32"):
                try:
                    return Decimal(str(v))
                except InvalidOperation:
                    return None
            return str(v).lower() if isinstance(v, str) else v  # string comparison is case-insensitive (SQL)

        target = conv(value) if lit.kind != "null" else None
        if isinstance(target, str):
            target = target.lower()

        def pred(r: Mapping[str, Any]) -> bool:
            v = conv(r.get(name))
            if op == "eq":
                return bool(v == target)
            if op == "ne":
                return bool(v != target)
            if v is None or target is None:
                return False
            return bool({"gt": v > target, "ge": v >= target, "lt": v < target, "le": v <= target}[op])

        hint = {name: frozenset({target})} if op == "eq" and isinstance(target, str) else None
        return Predicate(pred, hint)


def parse_filter(text: str, types: Mapping[str, str]) -> Predicate:
    return _Parser(text, types).parse()


@dataclass
class Query:
    predicate: Predicate | None
    select: list[str] | None
    orderby: list[tuple[str, bool]]
    top: int | None
    skip: int
    count: bool
    cross_company: bool


def parse_query(params: Mapping[str, str], types: Mapping[str, str]) -> Query:
    for k in params:
        if k.startswith("$") and k not in SUPPORTED_OPTIONS:
            raise ODataError(501, f"The query option '{k}' is not supported.")
    pred = parse_filter(params["$filter"], types) if params.get("$filter") else None
    select = None
    if params.get("$select"):
        select = [s.strip() for s in params["$select"].split(",") if s.strip()]
        for s in select:
            if s not in types:
                raise ODataError(400, f"Could not find a property named '{s}' on type "
                                 "'Microsoft.Dynamics.DataEntities'.")
    order: list[tuple[str, bool]] = []
    for part in (params.get("$orderby") or "").split(","):
        bits = part.split()
        if not bits:
            continue
        if bits[0] not in types:
            raise ODataError(400, f"Could not find a property named '{bits[0]}' for $orderby.")
        order.append((bits[0], len(bits) > 1 and bits[1].lower() == "desc"))

    def _int(name: str) -> int | None:
        v = params.get(name)
        if v is None:
            return None
        if not v.isdigit():
            raise ODataError(400, f"Invalid value '{v}' for {name}.")
        return int(v)

    return Query(
        predicate=pred,
        select=select,
        orderby=order,
        top=_int("$top"),
        skip=_int("$skip") or _int("$skiptoken") or 0,
        count=params.get("$count", "false").lower() == "true",
        cross_company=params.get("cross-company", "false").lower() == "true",
    )


_KEYPART = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*('(?:[^']|'')*'|[^,]+)\s*(?:,|$)")


def parse_key(text: str, key: tuple[str, ...]) -> dict[str, str]:
    """``dataAreaId='usmf',SalesOrderNumber='000123'`` -> dict; every key field must be given."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _KEYPART.match(text, pos)
        if not m:
            raise ODataError(400, f"Bad Request - Error in query syntax: key '{text}'.")
        v = m.group(2).strip()
        out[m.group(1)] = v[1:-1].replace("''", "'") if v.startswith("'") else v
        pos = m.end()
    missing = [k for k in key if k not in out]
    if missing or set(out) - set(key):
        raise ODataError(400, f"The number of keys specified in the URI does not match number of key properties "
                         f"for the resource; key is ({', '.join(key)}).")
    return out
