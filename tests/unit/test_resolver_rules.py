"""Pure resolution rules: no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver.cli import read_members
from resolver.rules import match_customer, normalize_email


def test_email_is_trimmed_and_casefolded_only() -> None:
    assert normalize_email("  Ann.Smith+x@Example.COM ") == "ann.smith+x@example.com"
    assert normalize_email("   ") is None
    assert normalize_email(None) is None


def test_external_id_first_then_email_and_shared_values_match_nobody() -> None:
    by_ext = {"C-1": ["m1"], "C-2": ["m2", "m3"]}
    by_email = {"a@x": ["m4"], "dup@x": ["m5", "m6"]}
    assert match_customer("C-1", "a@x", by_ext, by_email).member_id == "m1"
    assert match_customer("C-9", "a@x", by_ext, by_email).how == "email"
    shared = match_customer(None, "dup@x", by_ext, by_email)
    assert (shared.member_id, shared.how) == (None, "ambiguous") and "m5, m6" in shared.note
    assert match_customer("C-2", None, by_ext, by_email).how == "ambiguous"
    assert match_customer(None, "b@x", by_ext, by_email).how == "unmatched"


def test_member_files_csv_and_jsonl(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("member_id,external_id,email,consent_marketing\nm1,C-1,a@x.com,yes\nm2,,b@x.com,\n")
    got = [m for _, m in read_members(csv)]
    assert [(m.member_id, m.external_id, m.consent_marketing, m.consent_profiling) for m in got] == [
        ("m1", "C-1", True, False),
        ("m2", None, False, False),
    ]
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"member_id": "m1", "email": "a@x.com"}\n\n{"email": "b@x.com"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:3: invalid member"):
        list(read_members(jl))
