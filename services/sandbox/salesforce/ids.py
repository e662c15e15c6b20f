"""Salesforce record ids: 15-character case-sensitive ids and their 18-character checksummed form."""

from __future__ import annotations

__all__ = ["EMPTY_ID", "IdFactory", "base62", "to_18"]

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"

#: The "empty key" Salesforce uses in GAP_OVERFLOW headers; never a real record.
EMPTY_ID = "000000000000000AAA"


def base62(n: int, width: int) -> str:
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out)).rjust(width, "0")[-width:]


def to_18(id15: str) -> str:
    """Append the case-encoding checksum: one char per 5-char chunk, bit i set when char i is A-Z."""
    suffix = []
    for chunk in range(3):
        bits = 0
        for i, ch in enumerate(id15[chunk * 5 : chunk * 5 + 5]):
            if "A" <= ch <= "Z":
                bits |= 1 << i
        suffix.append(_SUFFIX[bits])
    return id15 + "".join(suffix)


class IdFactory:
    """Mints ids ``<prefix><pod>0000<counter>`` per key prefix, deterministic for a given ``pod``/``base``."""

    def __init__(self, pod: str = "Dn", base: int = 0) -> None:
        if len(pod) != 2:
            raise ValueError("pod must be two characters")
        self._pod = pod
        self._base = base
        self._counters: dict[str, int] = {}

    def next(self, prefix: str) -> str:
        n = self._counters.get(prefix, self._base) + 1
        self._counters[prefix] = n
        return to_18(f"{prefix}{self._pod}0000{base62(n, 6)}")
