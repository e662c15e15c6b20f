"""Seed an environment with customers, released products and orders across its companies; the ground truth
the tests compare against is computed from the seeding itself (net of lines per order, status, company)."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from decimal import Decimal

from sandbox.fo.state import Environment

__all__ = ["OrderTruth", "seed_environment"]

_STATUSES = (("Invoiced", 50), ("Delivered", 15), ("Backorder", 25), ("Canceled", 10))


@dataclass(frozen=True)
class OrderTruth:
    company: str
    number: str
    customer: str
    status: str
    net: Decimal
    """Sum of line amounts (after line discounts, before tax and charges)."""
    total: Decimal | None
    """The header total when calculated, else None."""


def seed_environment(env: Environment, *, customers: int = 20, products: int = 10, orders: int = 50,
                     seed: int = 1, calculated_share: float = 0.7,
                     start: dt.datetime | None = None) -> list[OrderTruth]:
    """Deterministic content (same ``seed`` -> same customers, items, orders and order numbers in every
    environment, whatever its field names), so two environments can be compared."""
    rng = random.Random(seed)
    start = start or dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    truth: list[OrderTruth] = []
    for company in env.companies:
        for i in range(1, customers + 1):
            acct = f"{company.upper()}-C{i:05d}"
            env.add_customer(company, acct, f"Customer {i} {company}", f"c{i}.{company}@example.com")
        for i in range(1, products + 1):
            env.add_product(company, f"I{i:04d}", f"Item {i}", Decimal(rng.randint(5, 200)),
                            rng.choice(["Bikes", "Parts", "Apparel"]))
    per_company = max(1, orders // len(env.companies))
    n = 0
    for company in env.companies:
        for _ in range(per_company):
            n += 1
            number = f"SO-{n:06d}"
            cust = f"{company.upper()}-C{rng.randint(1, customers):05d}"
            lines = []
            for _ in range(rng.randint(1, 4)):
                item = f"I{rng.randint(1, products):04d}"
                qty = Decimal(rng.randint(1, 5))
                price = Decimal(rng.randint(5, 200))
                disc = Decimal(rng.choice([0, 0, 0, 5]))
                lines.append((item, qty, price, disc))
            created = start + dt.timedelta(minutes=n)
            env.create_order(company, number, cust, "USD", lines, email=f"{cust.lower()}@example.com",
                             created=created, charges=Decimal(rng.choice([0, 0, 10])),
                             tax_rate=Decimal(rng.choice(["0", "0.1"])))
            status = rng.choices([s for s, _ in _STATUSES], [w for _, w in _STATUSES])[0]
            total: Decimal | None = None
            if status == "Invoiced":
                env.invoice_order(company, number)
                total = Decimal(str(env.header(company, number)[env.f("SalesOrderHeadersV2", "OrderTotalAmount")]))
            else:
                env.set_status(company, number, status)
                if rng.random() < calculated_share:
                    total = env.calculate_totals(company, number)
            truth.append(OrderTruth(company, number, cust, status, env.net_of_lines(company, number), total))
    env.outbox.clear()  # seeding is history: no business events are pending for it
    return truth
