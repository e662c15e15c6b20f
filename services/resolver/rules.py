"""Pure resolution rules: email normalisation, version ordering, matching a customer to a member."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Match", "match_customer", "normalize_email", "version_key"]

_DIGITS_WIDTH = 40


def normalize_email(email: str | None) -> str | None:
    """Trimmed and case-folded; no other rewriting (no dots/plus stripping: no fuzzy matching)."""
    if not email:
        return None
    value = email.strip().casefold()
    return value or None


def version_key(version: str) -> str:
    """A key whose byte order is the order of ``version``.

    Digit-only versions (Dataverse versionnumber, F&O RecVersion, CDC replay ids) are left-padded with
    zeros so ``"10" > "9"``; anything else (ISO timestamps: modifiedon, SystemModstamp) compares as is,
    which is chronological for the fixed-width ISO formats the sources use. Compared with COLLATE "C".
    """
    v = version.strip()
    return v.rjust(_DIGITS_WIDTH, "0") if v.isdigit() else v


@dataclass(frozen=True, slots=True)
class Match:
    member_id: str | None
    how: str
    """external_id | email | unmatched | ambiguous | deleted"""
    note: str = ""


def match_customer(
    external_id: str | None,
    email: str | None,
    by_external: Mapping[str, Sequence[str]],
    by_email: Mapping[str, Sequence[str]],
) -> Match:
    """The tenant's own ID first, then the normalised email; a value shared by members matches neither.

    ``by_external`` and ``by_email`` map a value to the member ids of ONE tenant holding it.
    """
    if external_id:
        ids = sorted(set(by_external.get(external_id, ())))
        if len(ids) == 1:
            return Match(ids[0], "external_id")
        if len(ids) > 1:
            return Match(None, "ambiguous", f"external id {external_id!r} is held by members {', '.join(ids)}")
    if email:
        ids = sorted(set(by_email.get(email, ())))
        if len(ids) == 1:
            return Match(ids[0], "email")
        if len(ids) > 1:
            return Match(None, "ambiguous", f"email {email!r} is shared by members {', '.join(ids)}")
    return Match(None, "unmatched")
