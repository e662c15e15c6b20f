"""Email identity is exact up to case: no case folding that merges distinct addresses, and addresses
carrying control or bidi characters are refused (dead-lettered with a reason), never parked forever."""

from __future__ import annotations

import pytest

from resolver.rules import match_customer, normalize_email
from servicekit.errors import Poison


def test_sharp_s_does_not_match_ss() -> None:
    members = {normalize_email("strasse@x.com"): ["M-1"]}
    probe = normalize_email("STRAßE@x.com")
    assert probe != "strasse@x.com"
    assert match_customer(None, probe, {}, members).member_id is None


def test_case_and_canonical_equivalence_still_match() -> None:
    assert normalize_email("  Ann.Smith@Example.COM ") == "ann.smith@example.com"
    assert normalize_email("Ame\u0301lie@x.com") == normalize_email("am\u00e9lie@X.com"), "NFC: same address"


@pytest.mark.parametrize("bad", ["ann\u202e@x.com", "ann\x00@x.com", "a\u200bnn@x.com", "ann\n@x.com",
                                 "ann\u2066@x.com", "ann\x7f@x.com"])
def test_control_and_bidi_characters_are_refused(bad: str) -> None:
    with pytest.raises(Poison, match="control or bidi"):
        normalize_email(bad)
