"""A SOQL subset: ``SELECT a, Parent.b FROM Obj [WHERE ..] [ORDER BY ..] [LIMIT n] [OFFSET n]``.

Conditions: ``= != <> < <= > >=``, ``[NOT] IN (..)``, ``LIKE``, ``AND``/``OR``/``NOT`` and parentheses.
As in Salesforce, ``AND`` and ``OR`` may not be mixed at one level without parentheses, datetime
literals are unquoted ISO 8601 (``2024-05-01T00:00:00Z``), strings are single-quoted, and string
comparisons are case-insensitive. Errors are :class:`SalesforceError` with ``MALFORMED_QUERY``,
``INVALID_FIELD`` or ``INVALID_TYPE``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox.salesforce.errors import SalesforceError
from sandbox.salesforce.schema import SCHEMA, FieldDef, ObjectDef, find_object

__all__ = [
    "And",
    "Cmp",
    "Cond",
    "FieldPath",
    "In",
    "Like",
    "Not",
    "Or",
    "Query",
    "compile_predicate",
    "parse_datetime",
    "parse_soql",
]

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2})
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<str>'(?:[^'\\]|\\.)*')
  | (?P<op>!=|<>|<=|>=|=|<|>)
  | (?P<punct>[(),])
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
    """,
    re.X,
)
_KEYWORDS = {
    "select",
    "from",
    "where",
    "and",
    "or",
    "not",
    "in",
    "like",
    "order",
    "by",
    "asc",
    "desc",
    "nulls",
    "first",
    "last",
    "limit",
    "offset",
    "true",
    "false",
    "null",
    "includes",
    "excludes",
    "group",
    "having",
    "with",
    "for",
    "typeof",
}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_datetime(text: str) -> int:
    """ISO 8601 with zone -> epoch milliseconds. Any number of fractional digits is accepted and cut to
    milliseconds (docs/vendor-facts.md, Salesforce: SOQL dateTime literal)."""
    text = re.sub(r"\.(\d{1,3})\d*", lambda m: "." + m.group(1).ljust(3, "0"), text.replace("Z", "+00:00"), count=1)
    value = dt.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return (value - _EPOCH) // dt.timedelta(milliseconds=1)


def malformed(message: str) -> SalesforceError:
    return SalesforceError(400, "MALFORMED_QUERY", message)


@dataclass(frozen=True)
class Tok:
    kind: str
    text: str
    pos: int

    @property
    def kw(self) -> str:
        return self.text.lower() if self.kind == "ident" else ""


@dataclass(frozen=True)
class FieldPath:
    """A resolved column: relationship hops then a field (``("Account", "Name")``)."""

    parts: tuple[str, ...]
    field: FieldDef

    @property
    def label(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class Cmp:
    path: FieldPath
    op: str
    value: Any  # python value after literal typing; datetimes as epoch ms


@dataclass(frozen=True)
class In:
    path: FieldPath
    values: tuple[Any, ...]
    negate: bool


@dataclass(frozen=True)
class Like:
    path: FieldPath
    regex: re.Pattern[str]


@dataclass(frozen=True)
class And:
    items: tuple[Cond, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Cond, ...]


@dataclass(frozen=True)
class Not:
    item: Cond


Cond = Cmp | In | Like | And | Or | Not


@dataclass(frozen=True)
class OrderKey:
    path: FieldPath
    ascending: bool
    nulls_first: bool


@dataclass(frozen=True)
class Query:
    text: str
    sobject: ObjectDef
    fields: tuple[FieldPath, ...]
    where: Cond | None
    order: tuple[OrderKey, ...]
    limit: int | None
    offset: int | None


def _tokenize(text: str) -> list[Tok]:
    out: list[Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.lastgroup is None:
            raise malformed(f"unexpected token: '{text[pos : pos + 10]}' at position {pos}")
        if m.lastgroup != "ws":
            out.append(Tok(m.lastgroup, m.group(), pos))
        pos = m.end()
    return out


def resolve_path(obj: ObjectDef, dotted: str) -> FieldPath:
    parts = dotted.split(".")
    if any(not p for p in parts):
        raise malformed(f"unexpected token: '{dotted}'")
    current = obj
    canonical: list[str] = []
    for hop in parts[:-1]:
        rel = current.relationship_ci(hop)
        if rel is None:
            raise SalesforceError(
                400,
                "INVALID_FIELD",
                f"Didn't understand relationship '{hop}' in field path. If you are attempting to use a "
                "custom relationship, be sure to append the '__r' after the custom relationship name.",
            )
        canonical.append(rel.relationship or hop)
        # polymorphic lookups resolve against the first target that has the next field
        targets = [SCHEMA[t] for t in rel.ref_to]
        nxt = parts[len(canonical)]
        current = next((t for t in targets if t.field_ci(nxt) or t.relationship_ci(nxt)), targets[0])
    fdef = current.field_ci(parts[-1])
    if fdef is None:
        raise SalesforceError(
            400,
            "INVALID_FIELD",
            f"No such column '{parts[-1]}' on entity '{current.name}'. If you are attempting to use a custom "
            "field, be sure to append the '__c' after the custom field name. Please reference your WSDL or "
            "the describe call for the appropriate names.",
        )
    canonical.append(fdef.name)
    return FieldPath(tuple(canonical), fdef)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.obj: ObjectDef | None = None

    def peek(self) -> Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> Tok:
        tok = self.peek()
        if tok is None:
            raise malformed("unexpected end of query")
        self.i += 1
        return tok

    def expect_kw(self, kw: str) -> None:
        tok = self.take()
        if tok.kw != kw:
            raise malformed(f"unexpected token: '{tok.text}', expected {kw.upper()}")

    def at_kw(self, *kws: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.kw in kws

    def parse(self) -> Query:
        self.expect_kw("select")
        raw_fields: list[Tok] = []
        while True:
            tok = self.take()
            if tok.kind != "ident" or tok.kw in _KEYWORDS:
                raise malformed(f"unexpected token: '{tok.text}'")
            nxt = self.peek()
            if nxt is not None and nxt.text == "(":
                raise malformed(f"unsupported function '{tok.text}' in this simulator")
            raw_fields.append(tok)
            if self.peek() is not None and self.peek().text == ",":  # type: ignore[union-attr]
                self.take()
                continue
            break
        self.expect_kw("from")
        otok = self.take()
        if otok.kind != "ident":
            raise malformed(f"unexpected token: '{otok.text}'")
        obj = find_object(otok.text)
        if obj is None:
            raise SalesforceError(
                400,
                "INVALID_TYPE",
                f"sObject type '{otok.text}' is not supported. If you are attempting to use a custom object, "
                "be sure to append the '__c' after the entity name. Please reference your WSDL or the "
                "describe call for the appropriate names.",
            )
        self.obj = obj
        fields: list[FieldPath] = []
        seen: set[str] = set()
        for ft in raw_fields:
            fp = resolve_path(obj, ft.text)
            if fp.label.lower() in seen:
                raise malformed(f"duplicate field selected: {ft.text}")
            seen.add(fp.label.lower())
            fields.append(fp)
        where = None
        if self.at_kw("where"):
            self.take()
            where = self.parse_cond()
        order: list[OrderKey] = []
        if self.at_kw("order"):
            self.take()
            self.expect_kw("by")
            while True:
                tok = self.take()
                if tok.kind != "ident" or tok.kw in _KEYWORDS:
                    raise malformed(f"unexpected token: '{tok.text}'")
                path = resolve_path(obj, tok.text)
                asc = True
                if self.at_kw("asc", "desc"):
                    asc = self.take().kw == "asc"
                nulls_first = asc
                if self.at_kw("nulls"):
                    self.take()
                    t = self.take()
                    if t.kw not in ("first", "last"):
                        raise malformed(f"unexpected token: '{t.text}'")
                    nulls_first = t.kw == "first"
                order.append(OrderKey(path, asc, nulls_first))
                if self.peek() is not None and self.peek().text == ",":  # type: ignore[union-attr]
                    self.take()
                    continue
                break
        limit = offset = None
        if self.at_kw("limit"):
            self.take()
            limit = self._int()
        if self.at_kw("offset"):
            self.take()
            offset = self._int()
        if self.peek() is not None:
            raise malformed(f"unexpected token: '{self.peek().text}'")  # type: ignore[union-attr]
        return Query(self.text, obj, tuple(fields), where, tuple(order), limit, offset)

    def _int(self) -> int:
        tok = self.take()
        if tok.kind != "num" or not tok.text.isdigit():
            raise malformed(f"unexpected token: '{tok.text}'")
        return int(tok.text)

    def parse_cond(self) -> Cond:
        first = self.parse_unary()
        items = [first]
        joiner: str | None = None
        while self.at_kw("and", "or"):
            kw = self.take().kw
            if joiner is not None and kw != joiner:
                raise malformed("unexpected token: '" + kw.upper() + "' (AND and OR must be grouped with parentheses)")
            joiner = kw
            items.append(self.parse_unary())
        if joiner is None:
            return first
        return And(tuple(items)) if joiner == "and" else Or(tuple(items))

    def parse_unary(self) -> Cond:
        if self.at_kw("not"):
            self.take()
            return Not(self.parse_unary())
        tok = self.peek()
        if tok is not None and tok.text == "(":
            self.take()
            cond = self.parse_cond()
            close = self.take()
            if close.text != ")":
                raise malformed(f"unexpected token: '{close.text}'")
            return cond
        return self.parse_simple()

    def parse_simple(self) -> Cond:
        assert self.obj is not None
        ftok = self.take()
        if ftok.kind != "ident" or ftok.kw in _KEYWORDS:
            raise malformed(f"unexpected token: '{ftok.text}'")
        path = resolve_path(self.obj, ftok.text)
        tok = self.take()
        if tok.kind == "op":
            op = "!=" if tok.text == "<>" else tok.text
            value = self.literal(path)
            if value is None and op not in ("=", "!="):
                raise malformed(f"invalid operator on null for field {path.label}")
            return Cmp(path, op, value)
        negate = False
        if tok.kw == "not":
            negate = True
            tok = self.take()
        if tok.kw == "in":
            open_ = self.take()
            if open_.text != "(":
                raise malformed(f"unexpected token: '{open_.text}'")
            values = [self.literal(path)]
            while True:
                t = self.take()
                if t.text == ")":
                    break
                if t.text != ",":
                    raise malformed(f"unexpected token: '{t.text}'")
                values.append(self.literal(path))
            return In(path, tuple(values), negate)
        if tok.kw == "like" and not negate:
            lit = self.take()
            if lit.kind != "str":
                raise malformed(f"unexpected token: '{lit.text}'")
            pattern = _unquote(lit.text)
            rx = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
            return Like(path, re.compile(f"^{rx}$", re.I | re.S))
        raise malformed(f"unexpected token: '{tok.text}'")

    def literal(self, path: FieldPath) -> Any:
        tok = self.take()
        ftype = path.field.type
        if tok.kw == "null":
            return None
        if ftype == "datetime":
            if tok.kind != "dt":
                raise malformed(
                    f"value of filter criterion for field '{path.label}' must be of type dateTime and should "
                    "not be enclosed in quotes"
                )
            return parse_datetime(tok.text)
        if ftype == "date":
            if tok.kind != "date":
                raise malformed(
                    f"value of filter criterion for field '{path.label}' must be of type date and should not "
                    "be enclosed in quotes"
                )
            return tok.text
        if ftype in ("double", "currency"):
            if tok.kind != "num":
                raise malformed(
                    f"value of filter criterion for field '{path.label}' must be of type double and should "
                    "not be enclosed in quotes"
                )
            return float(tok.text)
        if ftype == "boolean":
            if tok.kw not in ("true", "false"):
                raise malformed(
                    f"value of filter criterion for field '{path.label}' must be of type boolean and should "
                    "not be enclosed in quotes"
                )
            return tok.kw == "true"
        if tok.kind != "str":
            raise malformed(
                f"value of filter criterion for field '{path.label}' must be of type string and should be "
                "enclosed in quotes"
            )
        return _unquote(tok.text)


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), body)


def parse_soql(text: str) -> Query:
    if not text or not text.strip():
        raise malformed("empty query")
    return _Parser(text.strip()).parse()


Getter = Callable[[dict[str, Any], FieldPath], Any]


def _norm(ftype: str, value: Any) -> Any:
    if isinstance(value, str):
        if ftype in ("id", "reference") and len(value) in (15, 18):
            return value[:15]
        return value.lower()
    return value


def compile_predicate(cond: Cond, get: Getter) -> Callable[[dict[str, Any]], bool]:
    """Turn a condition tree into ``record -> bool`` using ``get`` to read (possibly parent) fields."""
    if isinstance(cond, And):
        parts = [compile_predicate(c, get) for c in cond.items]
        return lambda r: all(p(r) for p in parts)
    if isinstance(cond, Or):
        parts = [compile_predicate(c, get) for c in cond.items]
        return lambda r: any(p(r) for p in parts)
    if isinstance(cond, Not):
        inner = compile_predicate(cond.item, get)
        return lambda r: not inner(r)
    if isinstance(cond, Like):
        like = cond
        return lambda r: isinstance(v := get(r, like.path), str) and like.regex.match(v) is not None
    if isinstance(cond, In):
        inc = cond
        ftype = inc.path.field.type
        wanted = {_norm(ftype, v) for v in inc.values}
        if inc.negate:
            return lambda r: (v := get(r, inc.path)) is not None and _norm(ftype, v) not in wanted
        return lambda r: _norm(ftype, get(r, inc.path)) in wanted
    cmp = cond
    ftype = cmp.path.field.type
    target = _norm(ftype, cmp.value)
    op = cmp.op
    if target is None:
        if op == "=":
            return lambda r: get(r, cmp.path) is None
        return lambda r: get(r, cmp.path) is not None

    def check(r: dict[str, Any]) -> bool:
        v = get(r, cmp.path)
        if v is None:
            return op == "!="
        v = _norm(ftype, v)
        if op == "=":
            return bool(v == target)
        if op == "!=":
            return bool(v != target)
        if op == "<":
            return bool(v < target)
        if op == "<=":
            return bool(v <= target)
        if op == ">":
            return bool(v > target)
        return bool(v >= target)

    return check


def datetime_bounds(cond: Cond | None, field: str) -> tuple[int | None, int | None]:
    """An inclusive ``[lo, hi]`` hull of ``field`` values any matching row must lie in (None: open)."""
    if cond is None:
        return None, None
    if isinstance(cond, Cmp):
        if cond.path.parts != (field,) or cond.value is None:
            return None, None
        v = int(cond.value)
        return {
            "=": (v, v),
            ">": (v + 1, None),
            ">=": (v, None),
            "<": (None, v - 1),
            "<=": (None, v),
        }.get(cond.op, (None, None))
    if isinstance(cond, And):
        lo: int | None = None
        hi: int | None = None
        for item in cond.items:
            a, b = datetime_bounds(item, field)
            if a is not None:
                lo = a if lo is None else max(lo, a)
            if b is not None:
                hi = b if hi is None else min(hi, b)
        return lo, hi
    if isinstance(cond, Or):
        bounds = [datetime_bounds(item, field) for item in cond.items]
        los = [b[0] for b in bounds]
        his = [b[1] for b in bounds]
        return (
            None if any(x is None for x in los) else min(x for x in los if x is not None),
            None if any(x is None for x in his) else max(x for x in his if x is not None),
        )
    return None, None
