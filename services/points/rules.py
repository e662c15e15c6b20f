"""Pure points rules: the program, the points an order is worth, and how an order's ledger must move.

Nothing here does I/O; the handlers load state, call :func:`reconcile`, and write what it says.

The engine is *state-reconciling*: after every event it computes what the order should hold from the
order's latest facts, and writes the difference. For an order that is awarded (awardable status reached,
and the program's return window after that has passed) the earned part is the order's points and the
clawed part is ``-min(earned, points x returned / returnable)``; for any other order both are zero. So
duplicates, reordering and replays converge on the same ledger, no order ever holds less than zero, and
the sum clawed back never exceeds what the order earned.

One basis for earn and clawback (:func:`order_amounts`): the order earns on its basis amount (the program's
``basis``: total, without tax, or without tax and shipping), and a return takes back the same *share* of those
points as it is of what a return can carry. A return carries merchandise as the order's total counts it (lines
after discounts, with their tax; canonical ``ReturnData.amount`` is "on the same basis as the order's total")
but never the shipping, so the share is ``returned / (total - shipping)``, capped at 1: returning every line
leaves zero points whatever the order's tax, shipping and discounts. (The share used to be ``returned /
total``: an order with freight kept points after a full return.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from canonical.envelope import TenantId
from canonical.events import PointsKind
from servicekit.errors import Poison

__all__ = [
    "DEFAULT_PER_ORDER_CAP",
    "LineState",
    "OrderState",
    "Program",
    "Reconciled",
    "ReturnState",
    "base_amount",
    "clawback_points",
    "configure",
    "order_amounts",
    "order_points",
    "order_stage",
    "reconcile",
    "round_points",
    "version_key",
]

Basis = Literal["total", "total_ex_tax", "total_ex_tax_shipping"]
Rounding = Literal["floor", "ceil", "half_up", "half_even"]
_ROUNDING = {
    "floor": ROUND_FLOOR,
    "ceil": ROUND_CEILING,
    "half_up": ROUND_HALF_UP,
    "half_even": ROUND_HALF_EVEN,
}
_DIGITS_WIDTH = 40


def version_key(version: str) -> str:
    """Sortable form of a source version: digit-only versions (versionnumber, RecVersion, replay ids) are
    zero-padded so ``"10" > "9"``; others (ISO modifiedon/SystemModstamp) compare as they are."""
    v = version.strip()
    return v.rjust(_DIGITS_WIDTH, "0") if v.isdigit() else v


class Program(BaseModel):
    """A tenant's points program (``flash points program set FILE``, JSON or YAML)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant_id: TenantId
    base_currency: str = Field(pattern=r"^[A-Z]{3}$")
    points_per_unit: Decimal = Field(default=Decimal(1), ge=0)
    """Points per one unit of the base currency on the basis amount."""
    basis: Basis = "total_ex_tax_shipping"
    """Which header total earns: the grand total, without tax, or without tax and shipping."""
    rounding: Rounding = "floor"
    minimum_order: Decimal = Field(default=Decimal(0), ge=0)
    """Basis amount in base currency below which an order earns nothing."""
    category_multipliers: dict[str, Decimal] = Field(default_factory=dict)
    """Product category -> multiplier, applied by line amount share (products -> categories)."""
    per_order_cap: int | None = Field(default=None, ge=0)
    awardable_statuses: dict[str, list[str]] = Field(default_factory=dict)
    """Per source (dynamics-ce, dynamics-fo, salesforce): the vendor status values that make an order
    awardable. A source not listed falls back to the normalizer's lifecycle (``awardable``)."""
    return_window_days: Decimal = Field(default=Decimal(0), ge=0)
    """Days after reaching an awardable status before pending points are awarded (0: at once)."""
    negative_balance: Literal["allow", "record_shortfall"] = "allow"
    """When a clawback exceeds the member's balance: let it go negative, or take what is there and record
    the rest as a shortfall."""
    exchange_rates: dict[str, Decimal] = Field(default_factory=dict)
    """Fallback rates for orders that carry none: order-currency units per one base-currency unit."""

    @field_validator("category_multipliers")
    @classmethod
    def _not_negative(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        bad = [k for k, x in v.items() if x < 0]
        if bad:
            raise ValueError(f"category multipliers must be >= 0 (check {', '.join(bad)})")
        return v

    @field_validator("exchange_rates")
    @classmethod
    def _nonzero(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        bad = [k for k, x in v.items() if x <= 0]
        if bad:
            raise ValueError(f"exchange rates must be > 0 (check {', '.join(bad)})")
        return v

    @property
    def window(self) -> dt.timedelta:
        return dt.timedelta(days=float(self.return_window_days))


# ------------------------------------------------------------------------------------------ state


@dataclass(slots=True)
class LineState:
    line_id: str
    product_source_id: str | None
    amount: Decimal
    version_key: str
    deleted: bool = False


@dataclass(slots=True)
class ReturnState:
    tenant_id: str
    return_source_id: str
    anchor_order_source_id: str | None
    anchor_order_number: str | None
    version_key: str
    lifecycle: str
    currency: str
    exchange_rate: Decimal | None
    amount: Decimal
    deleted: bool = False
    dirty: bool = False


@dataclass(slots=True)
class OrderState:
    tenant_id: str
    order_source_id: str
    connection_id: str = ""
    source: str = ""
    member_id: str = ""
    order_number: str | None = None
    version: str = ""
    version_key: str = ""
    status: str = ""
    lifecycle: str = "pending"
    currency: str = ""
    exchange_rate: Decimal | None = None
    total_amount: Decimal = Decimal(0)
    tax_amount: Decimal = Decimal(0)
    shipping_amount: Decimal = Decimal(0)
    deleted: bool = False
    awardable_since: dt.datetime | None = None
    awarded: bool = False
    target_points: int = 0
    pending_points: int = 0
    earned: int = 0
    """Net of earn/adjust/void entries."""
    clawed: int = 0
    """Net of clawback entries (<= 0)."""
    shortfall: int = 0
    """Clawback the member could not cover (<= 0), when the program records shortfalls."""
    known: bool = False
    """True once the order's header has been seen (lines or returns may come first)."""
    lines: dict[str, LineState] = field(default_factory=dict)
    dirty: bool = False
    lines_dirty: bool = False
    """Lines changed in this batch: the row is written even while the header is unknown."""


# ----------------------------------------------------------------------------------------- money


def round_points(program: Program, value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=_ROUNDING[program.rounding]))


def base_amount(program: Program, amount: Decimal, currency: str, rate: Decimal | None, what: str) -> Decimal:
    """``amount`` in the program's base currency: divided by the rate (order-currency units per base
    unit); the record's own rate first, else the program's; none known is poison."""
    if currency == program.base_currency:
        return amount
    use = rate if rate is not None and rate > 0 else program.exchange_rates.get(currency)
    if use is None:
        raise Poison(
            f"{what} is in {currency} but carries no exchange rate and the program of tenant "
            f"{program.tenant_id} has no rate for {currency}; set exchange_rates.{currency} in the program "
            f"(flash points program set) or have the source send the order's exchange rate, then replay"
        )
    return amount / use


def order_stage(program: Program, order: OrderState) -> str:
    """pending | awardable | cancelled, by the program's per-source statuses or the canonical lifecycle."""
    if order.deleted or order.lifecycle == "cancelled":
        return "cancelled"
    statuses = program.awardable_statuses.get(order.source)
    if statuses is not None:
        return "awardable" if order.status in statuses else "pending"
    return order.lifecycle


def order_amounts(program: Program, order: OrderState) -> tuple[Decimal, Decimal]:
    """(earn basis, returnable) of ``order`` in its own currency: the amount points are earned on (the
    program's ``basis``) and the part of the total a return can carry (total without shipping). Earn and
    clawback both use this one function (module docstring)."""
    basis = order.total_amount
    if program.basis in ("total_ex_tax", "total_ex_tax_shipping"):
        basis -= order.tax_amount
    if program.basis == "total_ex_tax_shipping":
        basis -= order.shipping_amount
    return basis, order.total_amount - order.shipping_amount


def order_points(program: Program, order: OrderState, categories: dict[str, str | None]) -> int:
    """Points the order is worth at its current facts (before any return)."""
    basis, _ = order_amounts(program, order)
    base = base_amount(program, basis, order.currency, order.exchange_rate, f"order {order.order_source_id}")
    if base <= 0 or base < program.minimum_order:
        return 0
    multiplier = Decimal(1)
    if program.category_multipliers:
        live = [ln for ln in order.lines.values() if not ln.deleted and ln.amount > 0]
        weight = sum((ln.amount for ln in live), Decimal(0))
        if weight > 0:
            multiplier = (
                sum(
                    (
                        ln.amount
                        * program.category_multipliers.get(categories.get(ln.product_source_id or "") or "", Decimal(1))
                        for ln in live
                    ),
                    Decimal(0),
                )
                / weight
            )
    points = max(0, round_points(program, base * program.points_per_unit * multiplier))
    cap = program.per_order_cap if program.per_order_cap is not None else _DEFAULTS["per_order_cap"]
    if cap:
        points = min(points, cap)
    return points


DEFAULT_PER_ORDER_CAP = 1_000_000
"""Most points one order earns when its program sets no ``per_order_cap`` (FLASH_POINTS_MAX_PER_ORDER):
an implausible total (a unit error at the source, a hostile record) cannot mint unbounded points."""
_DEFAULTS: dict[str, int] = {"per_order_cap": DEFAULT_PER_ORDER_CAP}


def configure(*, default_per_order_cap: int) -> None:
    """Set this process's default per-order cap (at start, from settings); 0 means no default cap."""
    _DEFAULTS["per_order_cap"] = default_per_order_cap


def clawback_points(
    program: Program, earned: int, returned: Decimal, returnable: Decimal, *, any_return: bool = True
) -> int:
    """Points to take back (>= 0) for ``returned`` of an order whose returnable part (total without shipping,
    :func:`order_amounts`) is ``returnable``; both in one currency (the order's). An order with nothing
    returnable (lines all discounted to zero) loses everything to any effective return (``any_return``)."""
    if earned <= 0:
        return 0
    if returnable <= 0:
        return earned if any_return else 0
    if returned <= 0:
        return 0
    # earned x returned / returnable, multiplied before dividing (9 points x 2/6 is 3, not 2.99...), and
    # rounded to 9 places first: conversions through the base currency must not turn a full return into
    # 0.99999... of it.
    raw = Decimal(earned) * min(returned, returnable) / returnable
    return min(earned, max(0, round_points(program, raw.quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN))))


# ------------------------------------------------------------------------------------- reconcile


@dataclass(frozen=True, slots=True)
class Reconciled:
    earn_kind: PointsKind | None
    earn_delta: int
    claw_delta: int
    stage: str
    reason: str


def reconcile(
    program: Program,
    order: OrderState,
    categories: dict[str, str | None],
    returns: Iterable[ReturnState],
    *,
    now: dt.datetime,
    at: dt.datetime | None = None,
) -> Reconciled:
    """Bring ``order`` to what its facts say; returns the ledger deltas (not yet applied to earned/
    clawed: the caller applies them, after the negative-balance rule).

    ``at`` is when the triggering fact was observed; it starts the return window on the first
    awardable status.
    """
    stage = order_stage(program, order)
    if stage == "awardable":
        if order.awardable_since is None:
            order.awardable_since = at or now
        if program.return_window_days == 0 or order.awardable_since + program.window <= now:
            order.awarded = True
    elif stage == "cancelled":
        order.awarded = False
        order.awardable_since = None
    target = order_points(program, order, categories)
    order.target_points = target
    # What came back, in the order's own currency: a return in that currency is compared as it is (the share of
    # the goods returned does not depend on exchange rates, and converting the parts and the whole separately
    # left 199 of 200 points clawed after a full return in three parts); another currency goes through base.
    returned = Decimal(0)
    any_return = False
    for r in returns:
        if r.deleted or r.lifecycle != "effective":
            continue
        any_return = True
        if r.currency == order.currency:
            returned += r.amount
            continue
        in_base = base_amount(program, r.amount, r.currency, r.exchange_rate, f"return {r.return_source_id}")
        returned += in_base / base_amount(program, Decimal(1), order.currency, order.exchange_rate,
                                          f"order {order.order_source_id}")
    if order.awarded:
        want_earned = target
        _, returnable = order_amounts(program, order)
        want_clawed = -clawback_points(program, target, returned, returnable, any_return=any_return)
    else:
        want_earned = want_clawed = 0
    order.pending_points = target if (not order.awarded and stage != "cancelled") else 0
    earn_delta = want_earned - order.earned
    kind: PointsKind | None = None
    if earn_delta:
        kind = "void" if want_earned == 0 else ("earn" if order.earned == 0 else "adjust")
    claw_delta = want_clawed - (order.clawed + order.shortfall)
    name = order.order_number or order.order_source_id
    if kind is None:
        reason = ""
    elif kind == "earn":
        reason = f"order {name} awarded at status {order.status}"
    elif kind == "adjust":
        reason = f"order {name} now worth {target} points"
    else:
        reason = f"order {name} {stage}: points voided"
    return Reconciled(kind, earn_delta, claw_delta, stage, reason)
