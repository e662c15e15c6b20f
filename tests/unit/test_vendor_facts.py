"""Every vendor field name and option value our code relies on is listed in ``docs/vendor-facts.md``.

The method (``docs/vendor-facts.md#method``): each vendor area of the document has ``field`` rows
(`` `table`: `name`, ... ``) and ``option`` rows (``<value> <Label>, ...``). ``AREAS`` registers, per area, the
modules that speak to that vendor and how to read the names each one uses:

* a mapper module exports ``VENDOR_FIELDS: dict[str, frozenset[str]]`` (table -> names it reads), and an AST scan
  of the module checks the declaration is complete (every literal read off a record is declared);
* a poller contributes its ``$select`` lists; a simulator its table definitions (columns and option labels).

The Salesforce and Finance & Operations owners add their section's modules to ``AREAS`` the same way.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "vendor-facts.md"
Names = dict[str, set[str]]


def _section(title: str) -> list[list[str]]:
    """The table rows (cells) of the ``## title`` section of the document."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    body = text[start: end if end != -1 else len(text)]
    rows = []
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("| fact") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


_FIELD_VALUE = re.compile(r"^`([A-Za-z0-9_]+)`:\s*(.*)$")  # F&O entity sets and Salesforce objects are CamelCase


def documented_fields(title: str) -> Names:
    out: Names = {}
    for cells in _section(title):
        if not cells[0].startswith("field ") or " has no" in cells[0]:
            continue
        m = _FIELD_VALUE.match(cells[1])
        if m:
            out.setdefault(m.group(1), set()).update(re.findall(r"`([^`]+)`", m.group(2)))
    return out


def documented_options(title: str) -> dict[str, dict[int, str]]:
    """``table.column`` -> {value: label} from the ``option table.column`` rows."""
    out: dict[str, dict[int, str]] = {}
    for cells in _section(title):
        m = re.fullmatch(r"option ([a-z0-9_]+\.[a-z0-9_]+)", cells[0])
        if not m:
            continue
        value = re.sub(r"\([^)]*\)", "", cells[1]).split(";")[0]
        out[m.group(1)] = {int(v): label.strip() for v, label in re.findall(r"(\d+) ([A-Za-z][^,]*)", value)}
    return out


def documented_absent(title: str) -> Names:
    """Names the document says a table does NOT have (``field <table> has no`` rows)."""
    out: Names = {}
    for cells in _section(title):
        m = re.fullmatch(r"field ([a-z0-9_]+) has no", cells[0])
        if m:
            out.setdefault(m.group(1), set()).update(re.findall(r"`([^`]+)`", cells[1]))
    return out


# ------------------------------------------------------------------------------------ registered modules


def _mapper(module: str) -> Callable[[], Names]:
    def names() -> Names:
        mod = importlib.import_module(module)
        return {t: set(v) for t, v in mod.VENDOR_FIELDS.items()}
    return names


def _ce_poller() -> Names:
    from ce_poller.config import BASE_SELECT

    return {t: set(cols) for t, cols in BASE_SELECT.items()}


def _dataverse_simulator() -> Names:
    from sandbox.dataverse.schema import ENTITIES

    return {e.logical: {c.name for c in e.columns} for e in ENTITIES.values()}


def _fo_poller() -> Names:
    from fo_poller.config import ENTITY_SETS, FIELD_DEFAULTS
    from fo_poller.metadata import FIELD_SPECS

    out: Names = {}
    for name, (role, _, _) in FIELD_SPECS.items():
        field = FIELD_DEFAULTS.get(name)
        out.setdefault(ENTITY_SETS[role], {"dataAreaId"}).update({field} if field else set())
    return out


def _fo_simulator() -> Names:
    from sandbox.fo.schema import ENTITIES

    return {es: set(e.fields) for es, e in ENTITIES.items()}


def _fo_events() -> Names:
    from fo_poller.config import DEFAULT_EVENTS

    return {event: {"BusinessEventId", "ControlNumber", "EventTime", *spec.values()}
            for event, spec in DEFAULT_EVENTS.items()}


AREAS: dict[str, list[tuple[str, Callable[[], Names]]]] = {
    "Finance & Operations": [
        ("mapper normalizer.mappers.dynamics_fo", _mapper("normalizer.mappers.dynamics_fo")),
        ("poller fo_poller.config FIELD_DEFAULTS", _fo_poller),
        ("poller fo_poller.config DEFAULT_EVENTS", _fo_events),
        ("simulator sandbox.fo.schema", _fo_simulator),
    ],
    "Dynamics 365 CE (Dataverse)": [
        ("mapper normalizer.mappers.dynamics_ce", _mapper("normalizer.mappers.dynamics_ce")),
        ("poller ce_poller.config BASE_SELECT", _ce_poller),
        ("simulator sandbox.dataverse.schema", _dataverse_simulator),
    ],
}
MAPPERS = {"Dynamics 365 CE (Dataverse)": ["normalizer.mappers.dynamics_ce"],
           "Finance & Operations": ["normalizer.mappers.dynamics_fo"]}
CASES = [(area, label, fn) for area, mods in AREAS.items() for label, fn in mods]


@pytest.mark.parametrize(("area", "label", "names"), CASES, ids=[f"{a}:{lbl}" for a, lbl, _ in CASES])
def test_every_vendor_field_used_is_documented(area: str, label: str, names: Callable[[], Names]) -> None:
    doc = documented_fields(area)
    missing = {t: sorted(n - doc.get(t, set())) for t, n in names().items() if n - doc.get(t, set())}
    assert not missing, (
        f"{label} uses vendor names that docs/vendor-facts.md ## {area} does not list: {missing}. Look each up in "
        "the vendor's published reference and add it with its source, or mark it UNCONFIRMED and make it a setting"
    )


@pytest.mark.parametrize(("area", "label", "names"), CASES, ids=[f"{a}:{lbl}" for a, lbl, _ in CASES])
def test_no_vendor_field_the_documentation_rules_out(area: str, label: str, names: Callable[[], Names]) -> None:
    absent = documented_absent(area)
    bad = {t: sorted(n & absent.get(t, set())) for t, n in names().items() if n & absent.get(t, set())}
    assert not bad, f"{label} uses names the documented table does not have: {bad}"


def _record_reads(module: str) -> set[str]:
    """String literals a mapper reads off a record: ``rec.get("x")``, ``p.get("x" + SUFFIX)``, ``_money(rec, "x")``."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    out: set[str] = set()

    def literal(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return literal(node.left)
        return None

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Name) \
                and f.value.id in ("rec", "p", "obj"):
            name = literal(node.args[0])
        elif isinstance(f, ast.Name) and f.id in ("_money", "_str_field") and len(node.args) >= 2:
            name = literal(node.args[1])
        else:
            continue
        if name is not None and not name.startswith("@"):
            out.add(name)
    return out


@pytest.mark.parametrize(("area", "module"), [(a, m) for a, ms in MAPPERS.items() for m in ms])
def test_mapper_declares_every_field_it_reads(area: str, module: str) -> None:
    declared = set().union(*importlib.import_module(module).VENDOR_FIELDS.values())
    undeclared = _record_reads(module) - declared
    assert not undeclared, f"{module} reads {sorted(undeclared)} without declaring them in VENDOR_FIELDS"


def test_simulator_option_labels_are_the_documented_ones() -> None:
    from sandbox.dataverse.schema import ENTITY_BY_LOGICAL

    wrong = {}
    for key, want in documented_options("Dynamics 365 CE (Dataverse)").items():
        table, column = key.split(".")
        ent = ENTITY_BY_LOGICAL.get(table)
        if ent is None or column not in ent.by_name:
            continue
        have = {int(k): v for k, v in ent.by_name[column].labels.items()}
        if have != want:
            wrong[key] = {"simulator": have, "documented": want}
    assert not wrong, f"simulator option sets differ from docs/vendor-facts.md: {wrong}"


def test_ce_mapper_reads_rma_system_status_as_documented() -> None:
    from normalizer.mappers import dynamics_ce

    labels = documented_options("Dynamics 365 CE (Dataverse)")["msdyn_rma.msdyn_systemstatus"]
    by_label = {v: k for k, v in labels.items()}
    assert dynamics_ce.RMA_LIFECYCLE[by_label["Pending"]] == "pending"
    assert dynamics_ce.RMA_LIFECYCLE[by_label["Canceled"]] == "cancelled"
    assert dynamics_ce.RMA_LIFECYCLE[by_label["Products Received"]] == "effective"


def test_ce_mapper_order_states_are_the_documented_ones() -> None:
    from normalizer.mappers import dynamics_ce

    states = documented_options("Dynamics 365 CE (Dataverse)")["salesorder.statecode"]
    by_label = {v: k for k, v in states.items()}
    assert set(dynamics_ce.ORDER_STATE_LIFECYCLE) == set(states)
    assert dynamics_ce.ORDER_STATE_LIFECYCLE[by_label["Canceled"]] == "cancelled"
    assert dynamics_ce.ORDER_STATE_LIFECYCLE[by_label["Fulfilled"]] == "awardable"
    assert dynamics_ce.ORDER_STATE_LIFECYCLE[by_label["Invoiced"]] == "awardable"
    assert dynamics_ce.ORDER_STATE_LIFECYCLE[by_label["Active"]] == "pending"
