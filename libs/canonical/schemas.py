"""Generate the checked-in artefacts under ``schemas/`` from the models (the models are the truth).

    python -m canonical.schemas [--check] [DIR]

``--check`` exits 1 when the files on disk differ from what the models generate (CI runs it via a test).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic.json_schema import JsonSchemaMode

from canonical.events import EVENT_TYPES
from canonical.topics import TOPICS

__all__ = ["JSON_SCHEMA_DIALECT", "event_schema", "externally_produced", "generate", "main"]


JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def externally_produced() -> frozenset[str]:
    """Event types that others produce onto our topics (the loyalty core's members): their schema says what
    we accept (validation mode, defaults optional); every other schema says what we emit (serialization mode,
    every field present)."""
    return frozenset(et for t in TOPICS if t.producer != "flash" for et in t.event_types)


def event_schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema (2020-12) of one event type, ``event_type`` required and constant."""
    model = EVENT_TYPES[event_type]
    mode: JsonSchemaMode = "validation" if event_type in externally_produced() else "serialization"
    schema = model.model_json_schema(by_alias=True, mode=mode)
    schema["$schema"] = JSON_SCHEMA_DIALECT
    schema["$id"] = f"https://flash-connect.dev/schemas/events/{event_type}.v1.json"
    schema["properties"]["event_type"] = {
        "const": event_type, "type": "string", "title": "Event Type",
        "description": "What happened; selects this schema. Also in the message header event_type.",
    }
    required = schema.setdefault("required", [])
    if "event_type" not in required:
        required.insert(0, "event_type")
    return schema


def generate() -> dict[str, str]:
    """Relative path → file content for every generated artefact."""
    files: dict[str, str] = {}
    for event_type in sorted(EVENT_TYPES):
        schema = event_schema(event_type)
        files[f"events/{event_type}.v1.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    topics = {
        "topics": [
            {
                "name": t.name,
                "event_types": list(t.event_types),
                "key": t.key,
                "partitions": t.partitions,
                "retention_ms": t.retention_ms,
                "dlq": t.dlq,
                "replication_factor": t.replication_factor,
                "min_insync_replicas": t.min_insync_replicas,
                "producer": t.producer,
            }
            for t in TOPICS
        ]
    }
    header = "# Generated from libs/canonical/topics.py by `python -m canonical.schemas`; do not edit.\n"
    files["topics.yaml"] = header + yaml.safe_dump(topics, sort_keys=False)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", default="schemas")
    parser.add_argument("--check", action="store_true", help="fail if the files differ from the models")
    args = parser.parse_args(argv)
    root = Path(args.directory)
    wanted = generate()
    drift = [p for p, text in wanted.items() if not (root / p).exists() or (root / p).read_text() != text]
    stale = [
        str(p.relative_to(root)) for p in (root / "events").glob("*.json") if str(p.relative_to(root)) not in wanted
    ]
    if args.check:
        for p in drift + stale:
            print(f"schema drift: {root / p} (run `make schemas`)", file=sys.stderr)
        return 1 if drift or stale else 0
    for p, text in wanted.items():
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text(text)
    for p in stale:
        (root / p).unlink()
    print(f"wrote {len(wanted)} files under {root}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
