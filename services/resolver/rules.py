"""Pure resolution rules: email normalisation, version ordering, matching a customer to a member."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from servicekit.errors import Poison

__all__ = ["InvalidEmail", "Match", "match_customer", "normalize_email", "version_key"]

_DIGITS_WIDTH = 40


class InvalidEmail(Poison):
    """An address no member can hold (control or bidi characters); refused with a reason, not parked."""


def normalize_email(email: str | None) -> str | None:
    """Trimmed, NFC-normalised and lower-cased; no other rewriting (no dots/plus stripping: no fuzzy matching).

    ``lower()``, not ``casefold()``: case folding also merges distinct letters (``ß`` and ``ss``, so
    ``STRAßE@x.com`` would match ``strasse@x.com``), which is matching someone else's address. NFC only
    joins canonically equivalent spellings of the same character. An address with a control, format
    (bidi overrides, zero-width) or separator character raises :class:`InvalidEmail` (poison): it can never
    match honestly, and parking it would keep it forever.
    """
    if not email:
        return None
    value = unicodedata.normalize("NFC", email.strip()).lower()
    if not value.isprintable():  # cheap: printable means no C* or Z* character but the space
        bad = [c for c in value if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")]
        if bad:
            raise InvalidEmail(
                f"email {value.encode('unicode_escape').decode()!r} contains control or bidi characters "
                f"({', '.join(f'U+{ord(c):04X}' for c in bad[:5])}); fix the address at the source"
            )
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
