"""Plausibility limits of the canonical contract: what no real record holds, refused at the schema.

Values a source can send but no commerce record has - an exchange rate of 0, a negative or 1e-20 rate,
an order of 10^18 - are refused when an event is validated (a SchemaViolation dead letter naming the
field), instead of flowing on to the ledger. Bodies nested deeper than any event are refused before a
parser recurses into them (:func:`json_depth_exceeds`).

The limits have defaults here (documented in the README's settings table) and each process sets them
from its ``FLASH_`` settings once at start (:func:`configure`); validation reads the module-level
:data:`LIMITS`, so the hot path costs one comparison per value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

__all__ = [
    "LIMITS",
    "Limits",
    "check_amount",
    "check_rate",
    "configure",
    "json_depth",
    "json_depth_exceeds",
]


@dataclass(frozen=True, slots=True)
class Limits:
    max_amount: Decimal = Decimal(10) ** 12
    """Largest absolute money amount (order total, line, tax, return) in any currency."""
    min_exchange_rate: Decimal = Decimal("1e-9")
    """Smallest exchange rate (order-currency units per base unit); 0 and negatives are always refused."""
    max_exchange_rate: Decimal = Decimal("1e9")
    max_json_depth: int = 64
    """Deepest nesting of a message body or vendor payload (objects and arrays)."""


LIMITS = Limits()


def configure(**values: Any) -> Limits:
    """Set the process-wide limits (at start, from settings); returns them."""
    global LIMITS
    converted: dict[str, Any] = {k: (int(v) if k == "max_json_depth" else Decimal(str(v))) for k, v in values.items()}
    LIMITS = replace(LIMITS, **converted)
    return LIMITS


def check_amount(value: Decimal) -> Decimal:
    """Pydantic after-validator of money fields."""
    if not value.is_finite():
        raise ValueError("amount must be a finite number")
    if abs(value) > LIMITS.max_amount:
        raise ValueError(f"amount {value} is beyond the plausible {LIMITS.max_amount} (FLASH_MAX_AMOUNT)")
    return value


def check_rate(value: Decimal | None) -> Decimal | None:
    """Pydantic after-validator of exchange rates."""
    if value is None:
        return None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"exchange rate {value} must be a positive number")
    if not LIMITS.min_exchange_rate <= value <= LIMITS.max_exchange_rate:
        raise ValueError(
            f"exchange rate {value} is outside the plausible {LIMITS.min_exchange_rate}..{LIMITS.max_exchange_rate} "
            "(FLASH_MIN_EXCHANGE_RATE / FLASH_MAX_EXCHANGE_RATE)"
        )
    return value


# A JSON string (with escapes) or one bracket: strings are skipped whole, so brackets inside them don't count.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_TOKENS_STR = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def json_depth(text: bytes | str) -> int:
    """The deepest nesting of objects/arrays in ``text`` (well-formed or not), in one C-speed scan."""
    depth = deepest = 0
    tokens = _TOKENS.finditer(text) if isinstance(text, bytes) else _TOKENS_STR.finditer(text)
    for m in tokens:
        c = m.group()[0]
        if c in (0x5B, 0x7B, "[", "{"):
            depth += 1
            if depth > deepest:
                deepest = depth
        elif c in (0x5D, 0x7D, "]", "}"):
            depth -= 1
    return deepest


def json_depth_exceeds(text: bytes | str, limit: int | None = None) -> bool:
    """True when ``text`` nests deeper than ``limit`` (default: the configured max_json_depth).

    Cheap for ordinary bodies: a body with no more brackets than the limit cannot nest deeper, and
    counting two bytes runs at memory speed; only bodies with more brackets are scanned."""
    limit = LIMITS.max_json_depth if limit is None else limit
    if isinstance(text, bytes):
        if text.count(b"{") + text.count(b"[") <= limit:
            return False
    elif text.count("{") + text.count("[") <= limit:
        return False
    return json_depth(text) > limit
