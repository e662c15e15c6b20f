"""Every Salesforce vendor name the connector and the mapper rely on (objects, fields, relationships, CDC
header fields, change types, headers) is listed in docs/vendor-facts.md under ``## Salesforce``, where each
fact carries its published source or UNCONFIRMED. Fails when code starts using a name the file does not list."""

from __future__ import annotations

import re
from pathlib import Path

from sfconnect.config import FIELDS

ROOT = Path(__file__).parents[2]


def _salesforce_section() -> str:
    text = (ROOT / "docs" / "vendor-facts.md").read_text()
    start = text.index("## Salesforce")
    nxt = text.find("\n## ", start + 5)
    return text[start:] if nxt < 0 else text[start:nxt]


def _tokens() -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", _salesforce_section()))


def _names_used() -> set[str]:
    names: set[str] = set()
    for obj, fields in FIELDS.items():
        names.add(obj)
        for f in fields:
            names.update(f.split("."))
    mapper = (ROOT / "services" / "normalizer" / "mappers" / "salesforce.py").read_text()
    for m in re.findall(r'_(?:str|get|dec|bool)\(rec, "([A-Za-z0-9_.]+)"', mapper):
        names.update(m.split("."))
    cdc = (ROOT / "libs" / "sfconnect" / "cdc.py").read_text() + (
        ROOT / "services" / "cdc_listener" / "listener.py").read_text()
    names.update(re.findall(r'header\.get\("([A-Za-z]+)"\)', cdc))
    names.update(re.findall(r'"((?:GAP_)?(?:CREATE|UPDATE|DELETE|UNDELETE|OVERFLOW))"', cdc))
    client = (ROOT / "libs" / "sfconnect" / "client.py").read_text()
    names.update(re.findall(r'"(Sforce-[A-Za-z-]+)"', client))
    names.update(re.findall(r'code (?:==|in) \(?"([A-Z_]+)"', client))
    return names


def test_every_salesforce_name_in_use_is_in_vendor_facts() -> None:
    listed = _tokens() | set(re.findall(r"Sforce-[A-Za-z-]+", _salesforce_section()))
    missing = sorted(n for n in _names_used() if n not in listed)
    assert not missing, f"add these to docs/vendor-facts.md (## Salesforce) with their source: {missing}"


def test_every_fact_row_has_a_source_or_unconfirmed() -> None:
    for line in _salesforce_section().splitlines():
        if line.startswith("| ") and not line.startswith("| fact") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[-1] or "UNCONFIRMED" in line, line
