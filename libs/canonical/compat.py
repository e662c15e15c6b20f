"""Would a change of the published contract break someone who built on the previous release?

    python -m canonical.compat [RELEASED_DIR] [CURRENT_DIR]     # default schemas/released/v1 schemas

The rule (docs/events.md, "Compatibility") depends on who writes the messages of an event type:

* **We write, others read** (every event type on a topic whose producer is ``flash``): every message valid
  under the new schema must be valid under the released one, so a consumer built on the release still
  reads it. Breaking: removing a field, making an always-present field optional or nullable, widening a
  type or an enum (a new ``kind`` value), dropping a pattern or bound the release promised, removing an
  event type. Not breaking: adding a field (consumers ignore unknown fields), adding a pattern or a bound,
  making a field always present, adding an event type to a topic (consumers skip unknown ``event_type``).
* **Others write, we read** (the loyalty core's ``member.upserted``): every message valid under the
  released schema must stay valid under the new one, so their producer keeps working. Breaking: a newly
  required field (one without a default), narrowing a type or an enum, adding a pattern or a stricter bound,
  removing an event type.
* Topics (``topics.yaml``): removing a topic, changing its key or its partition count (keys would move to
  other partitions, so per-key order would break), or removing an event type from it.

The comparison is conservative: a change it cannot prove safe (a different pattern) counts as breaking.
A breaking change ships as a new version (``.v2`` event and topic) beside the old one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = ["ACCEPTED", "Direction", "breaking_changes", "compare_releases", "main", "topic_changes"]

Direction = Literal["read", "write"]
"""``read``: others read what we write; ``write``: others write what we read."""

Schema = Mapping[str, Any]

_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
_LOWER = ("minLength", "minimum", "exclusiveMinimum", "minItems")
_UPPER = ("maxLength", "maximum", "exclusiveMaximum", "maxItems")


ACCEPTED: dict[str, str] = {
    "member.upserted (write): /event_type: required, but the release allowed messages without it":
        "the resolver has always selected the model by event_type, so a v1 member message without it was "
        "dead-lettered; the v1 schema failed to say so",
}
"""Reported changes reviewed and accepted, each with the reason no one built on the released schema can
break (:func:`compare_releases` leaves them out)."""


def breaking_changes(released: Schema, current: Schema, direction: Direction) -> list[str]:
    """Why ``current`` breaks someone built on ``released`` (empty: compatible)."""
    old, new = _Doc(released), _Doc(current)
    if direction == "read":
        return _subset(new, current, old, released, "", "the new schema allows", "the release did not")
    return _subset(old, released, new, current, "", "the release allowed", "the new schema does not")


class _Doc:
    def __init__(self, root: Schema) -> None:
        self.defs: Mapping[str, Any] = root.get("$defs", {})

    def resolve(self, s: Schema) -> Schema:
        while "$ref" in s:
            s = self.defs[s["$ref"].rsplit("/", 1)[-1]]
        return s

    def alternatives(self, s: Schema) -> list[Schema]:
        s = self.resolve(s)
        alts = s.get("anyOf") or s.get("oneOf")
        if alts:
            return [a for alt in alts for a in self.alternatives(alt)]
        return [s]


def _type_of(s: Schema) -> str | None:
    t = s.get("type")
    if isinstance(t, str):
        return t
    if "const" in s:
        return _json_type(s["const"])
    if s.get("enum"):
        return _json_type(s["enum"][0])
    return None


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _values(s: Schema) -> set[str] | None:
    if "const" in s:
        return {json.dumps(s["const"])}
    if "enum" in s:
        return {json.dumps(v) for v in s["enum"]}
    return None


def _fits(t: str | None, u: str | None) -> bool:
    return u is None or t == u or (t == "integer" and u == "number")


def _subset(a: _Doc, sa: Schema, b: _Doc, sb: Schema, path: str, has: str, lacks: str) -> list[str]:
    """Reasons why some instance of ``sa`` is not an instance of ``sb``."""
    where = path or "/"
    out: list[str] = []
    alts_b = b.alternatives(sb)
    for alt in a.alternatives(sa):
        t = _type_of(alt)
        matches = [x for x in alts_b if _fits(t, _type_of(x))]
        if not matches:
            kinds = sorted({_type_of(x) or "any" for x in alts_b})
            out.append(f"{where}: {has} {t or 'any type'}, {lacks} (only {', '.join(kinds)})")
            continue
        best: list[str] | None = None
        for m in matches:
            reasons = _same_type(a, alt, b, m, path, has, lacks)
            if best is None or len(reasons) < len(best):
                best = reasons
            if not reasons:
                break
        out += best or []
    return out


def _same_type(a: _Doc, sa: Schema, b: _Doc, sb: Schema, path: str, has: str, lacks: str) -> list[str]:
    where = path or "/"
    out: list[str] = []
    va, vb = _values(sa), _values(sb)
    if vb is not None and (va is None or not va <= vb):
        extra = sorted(va - vb) if va is not None else ["any value"]
        out.append(f"{where}: {has} {', '.join(extra)}, {lacks}")
    if "pattern" in sb and sa.get("pattern") != sb["pattern"]:
        out.append(f"{where}: pattern {sa.get('pattern')!r} -> {sb['pattern']!r}")
    if "format" in sb and sa.get("format") != sb["format"]:
        out.append(f"{where}: format {sa.get('format')!r} -> {sb['format']!r}")
    for k in _LOWER:
        if k in sb and sa.get(k, float("-inf")) < sb[k]:
            out.append(f"{where}: {k} {sa.get(k)} -> {sb[k]}")
    for k in _UPPER:
        if k in sb and sa.get(k, float("inf")) > sb[k]:
            out.append(f"{where}: {k} {sa.get(k)} -> {sb[k]}")
    if _type_of(sa) == "object" or "properties" in sa or "properties" in sb:
        pa: Mapping[str, Any] = sa.get("properties", {})
        pb: Mapping[str, Any] = sb.get("properties", {})
        ra, rb = set(sa.get("required", ())), set(sb.get("required", ()))
        for name in sorted(rb - ra):
            out.append(f"{path}/{name}: required, but {has} messages without it")
        for name in sorted(pa.keys() & pb.keys()):
            out += _subset(a, pa[name], b, pb[name], f"{path}/{name}", has, lacks)
        if has.startswith("the new"):  # read: a field the release had is gone (in write: a new optional field)
            for name in sorted(pb.keys() - pa.keys()):
                out.append(f"{path}/{name}: field removed")
        if sb.get("additionalProperties") is False:
            for name in sorted(pa.keys() - pb.keys()):
                out.append(f"{path}/{name}: new field, and additional properties are not allowed")
    if "items" in sa or "items" in sb:
        out += _subset(a, sa.get("items", {}), b, sb.get("items", {}), f"{path}/items", has, lacks)
    return out


def topic_changes(released: Schema, current: Schema) -> list[str]:
    """Breaking changes between two ``topics.yaml`` documents."""
    old = {t["name"]: t for t in released["topics"]}
    new = {t["name"]: t for t in current["topics"]}
    out: list[str] = []
    for name, t in old.items():
        n = new.get(name)
        if n is None:
            out.append(f"topic {name}: removed")
            continue
        for field in ("key", "partitions"):
            if t[field] != n[field]:
                out.append(f"topic {name}: {field} {t[field]!r} -> {n[field]!r}")
        gone = sorted(set(t["event_types"]) - set(n["event_types"]))
        if gone:
            out.append(f"topic {name}: event types removed: {', '.join(gone)}")
    return out


def _load_dir(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    events = {p.name.removesuffix(".v1.json"): json.loads(p.read_text()) for p in (root / "events").glob("*.json")}
    topics = yaml.safe_load((root / "topics.yaml").read_text())
    return events, topics


def compare_releases(released_dir: Path, current_dir: Path) -> list[str]:
    """Every breaking change of ``current_dir`` against ``released_dir`` (both laid out like ``schemas/``)."""
    old_events, old_topics = _load_dir(released_dir)
    new_events, new_topics = _load_dir(current_dir)
    written_by_others = {
        et for t in new_topics["topics"] if t.get("producer", "flash") != "flash" for et in t["event_types"]
    }
    out = topic_changes(old_topics, new_topics)
    for event_type, old in sorted(old_events.items()):
        new = new_events.get(event_type)
        if new is None:
            out.append(f"{event_type}: event type removed")
            continue
        direction: Direction = "write" if event_type in written_by_others else "read"
        out += [f"{event_type} ({direction}): {r}" for r in breaking_changes(old, new, direction)]
    return [c for c in out if c not in ACCEPTED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("released", nargs="?", default="schemas/released/v1")
    parser.add_argument("current", nargs="?", default="schemas")
    args = parser.parse_args(argv)
    changes = compare_releases(Path(args.released), Path(args.current))
    for c in changes:
        print(f"breaking: {c}", file=sys.stderr)
    return 1 if changes else 0


if __name__ == "__main__":
    raise SystemExit(main())
