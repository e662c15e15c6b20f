"""Deterministic seed data for a simulated org, and the ground truth a reference calculation can check.

``seed_org(state, "contoso", customers=500, products=80, orders=5000, seed=1)`` fills an org with
currencies (USD base, EUR, GBP), accounts and contacts, product families and products (category in the
custom column ``new_category`` and as the parent family ``_parentproductid_value``), sales orders with
lines across currencies and statuses (including organisation-defined reasons 100000001 "Delivered" under
Fulfilled and 100000002 "Fraud Suspected" under Canceled, and 700970000 "In Progress" under Active),
invoices for invoiced orders and RMAs (``msdyn_rmas`` + ``msdyn_rmaproducts``) for some fulfilled orders.
The same arguments always give the same GUIDs and values (timestamps are relative to the org clock).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sandbox.dataverse.mutations import TAX_RATES, add_rma, line_amounts, order_totals, round_cents
from sandbox.dataverse.store import Org, from_units

if TYPE_CHECKING:
    from sandbox.dataverse.state import DataverseState

__all__ = ["LineTruth", "OrderTruth", "SeedSummary", "ground_truth", "seed_org", "verify_consistency"]

_FIRST = (
    "Ada Alan Grace Linus Ken Barbara Edsger Margaret Donald John Frances Radia Tim Vint Guido Anders "
    "Sophie Maria Lukas Emma Noah Mia Liam Olivia Yuki Chen Priya Omar Elena Ivan"
).split()
_LAST = (
    "Lovelace Turing Hopper Torvalds Thompson Liskov Dijkstra Hamilton Knuth Backus Allen Perlman "
    "Berners-Lee Cerf Rossum Hejlsberg Wilson Garcia Muller Schmidt Rossi Dubois Tanaka Wang Patel "
    "Haddad Petrova Novak"
).split()
_CO_A = (
    "Northwind Contoso Fabrikam Litware Adatum Tailspin Wingtip Proseware Lucerne Alpine Coho Humongous"
).split()
_CO_B = "Traders Pharma Airlines Insurance Outdoors Toys Bikes Foods Books Energy Labs Logistics".split()
_CATEGORIES = ("Bikes", "Components", "Clothing", "Accessories", "Nutrition", "Services")
_ADJ = "Classic Pro Ultra Light Carbon Trail Urban Road Mountain Compact Deluxe Eco".split()
_NOUN = {
    "Bikes": ["Road Bike", "Mountain Bike", "City Bike", "E-Bike"],
    "Components": ["Chain", "Brake Set", "Crankset", "Wheelset", "Saddle"],
    "Clothing": ["Jersey", "Gloves", "Jacket", "Socks", "Cap"],
    "Accessories": ["Helmet", "Lock", "Light", "Pump", "Bottle"],
    "Nutrition": ["Energy Bar", "Gel Pack", "Electrolyte Mix"],
    "Services": ["Tune-Up", "Fitting", "Extended Warranty"],
}
CURRENCIES = (
    ("USD", "US Dollar", "$", Decimal("1.0000000000")),
    ("EUR", "Euro", "€", Decimal("0.9214000000")),
    ("GBP", "Pound Sterling", "£", Decimal("0.7890000000")),
)
# (statecode, statuscode, weight)
_STATUS_MIX = (
    (0, 1, 9),
    (0, 2, 3),
    (0, 700970000, 2),
    (1, 3, 9),
    (2, 4, 6),
    (2, 100000002, 1),
    (3, 100001, 28),
    (3, 100002, 5),
    (3, 100000001, 8),
    (4, 100003, 29),
)


@dataclass
class SeedSummary:
    org: str
    accounts: int = 0
    contacts: int = 0
    products: int = 0
    orders: int = 0
    lines: int = 0
    invoices: int = 0
    rmas: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def seed_org(
    state: DataverseState,
    org_name: str,
    *,
    customers: int = 200,
    products: int = 40,
    orders: int = 1000,
    seed: int = 1,
    days: int = 365,
    rma_rate: float = 0.06,
) -> SeedSummary:
    """Fill ``org_name`` (created if missing) with deterministic, internally consistent sample data."""
    org = state.orgs.get(org_name) or state.add_org(org_name)
    rng = random.Random(seed)
    summary = SeedSummary(org_name)
    now = int(org.clock.now())
    start = now - days * 86400
    t = org.tables

    org.add_status_reason("salesorder", 100000001, "Delivered", statecode=3)
    org.add_status_reason("salesorder", 100000002, "Fraud Suspected", statecode=2)
    org.add_status_reason("salesorder", 700970000, "In Progress", statecode=0)

    cur_ids: dict[str, tuple[str, Decimal]] = {}
    ct = t["transactioncurrencies"]
    for iso, name, symbol, rate in CURRENCIES:
        existing = next((r for r in ct.rows.values() if r[ct.pos["isocurrencycode"]] == iso), None)
        if existing is not None:
            cur_ids[iso] = (existing[0], existing[ct.pos["exchangerate"]])
            continue
        row = ct.insert_prepared(
            {
                "transactioncurrencyid": _guid(rng),
                "isocurrencycode": iso,
                "currencyname": name,
                "currencysymbol": symbol,
                "currencyprecision": 2,
                "exchangerate": rate,
                "statecode": 0,
                "statuscode": 1,
                "createdon": start - 86400,
                "modifiedon": start - 86400,
            }
        )
        cur_ids[iso] = (row[0], rate)
    org_t = t["organizations"]
    org_t.write_stored(org.organization_id, {"_basecurrencyid_value": cur_ids["USD"][0]})

    # customers: ~40 % accounts, the rest contacts (70 % of them under an account)
    n_accounts = max(1, customers * 2 // 5)
    accounts: list[str] = []
    acc_t = t["accounts"]
    base_no = len(acc_t)
    for i in range(n_accounts):
        name = f"{rng.choice(_CO_A)} {rng.choice(_CO_B)} {base_no + i + 1}"
        slug = name.lower().replace(" ", "")
        created = start - rng.randint(1, 400) * 86400
        row = acc_t.insert_prepared(
            {
                "accountid": _guid(rng),
                "name": name,
                "accountnumber": f"CUST-{seed % 1000:03d}{base_no + i + 1:06d}",
                "emailaddress1": f"orders@{slug}.example.com",
                "telephone1": f"+1-555-{rng.randint(1000000, 9999999)}",
                "address1_city": rng.choice(["Seattle", "Berlin", "London", "Paris", "Austin", "Dublin"]),
                "address1_country": rng.choice(["US", "DE", "GB", "FR", "IE"]),
                "statecode": 0,
                "statuscode": 1,
                "_transactioncurrencyid_value": cur_ids["USD"][0],
                "createdon": created,
                "modifiedon": created + rng.randint(0, 86400 * 30),
            }
        )
        accounts.append(row[0])
    contacts: list[str] = []
    con_t = t["contacts"]
    base_no = len(con_t)
    for i in range(customers - n_accounts):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        parent = rng.choice(accounts) if rng.random() < 0.7 else None
        created = start - rng.randint(1, 400) * 86400
        row = con_t.insert_prepared(
            {
                "contactid": _guid(rng),
                "firstname": first,
                "lastname": last,
                "fullname": f"{first} {last}",
                "emailaddress1": f"{first}.{last}.{base_no + i + 1}@example.com".lower().replace("-", ""),
                "telephone1": f"+44-20-{rng.randint(10000000, 99999999)}",
                "_parentcustomerid_value": parent,
                "_parentcustomerid_value#type": "account" if parent else None,
                "statecode": 0,
                "statuscode": 1,
                "createdon": created,
                "modifiedon": created + rng.randint(0, 86400 * 30),
            }
        )
        contacts.append(row[0])
    summary.accounts, summary.contacts = len(accounts), len(contacts)

    # product families (categories) and products priced in the base currency
    prod_t = t["products"]
    families: dict[str, str] = {}
    for cat in _CATEGORIES:
        row = prod_t.insert_prepared(
            {
                "productid": _guid(rng),
                "productnumber": f"FAM-{cat[:4].upper()}",
                "name": cat,
                "productstructure": 2,
                "new_category": cat,
                "statecode": 0,
                "statuscode": 1,
                "_transactioncurrencyid_value": cur_ids["USD"][0],
                "exchangerate": Decimal("1.0000000000"),
                "createdon": start - 500 * 86400,
                "modifiedon": start - 500 * 86400,
            }
        )
        families[cat] = row[0]
    active: list[tuple[str, int]] = []
    for i in range(products):
        cat = rng.choice(_CATEGORIES)
        price = round_cents(Decimal(rng.randint(500, 250000)))  # 0.05 .. 25.00 in units -> scale below
        price = round_cents(Decimal(price) * rng.choice([1, 4, 10, 40]))
        pstate = rng.choices([(0, 1), (1, 2), (2, 0), (3, 3)], weights=[85, 8, 4, 3])[0]
        row = prod_t.insert_prepared(
            {
                "productid": _guid(rng),
                "productnumber": f"SKU-{i + 1:05d}",
                "name": f"{rng.choice(_ADJ)} {rng.choice(_NOUN[cat])}",
                "description": f"{cat} item",
                "price": price,
                "standardcost": round_cents(Decimal(price) * Decimal("0.6")),
                "productstructure": 1,
                "_parentproductid_value": families[cat],
                "new_category": cat,
                "statecode": pstate[0],
                "statuscode": pstate[1],
                "_transactioncurrencyid_value": cur_ids["USD"][0],
                "exchangerate": Decimal("1.0000000000"),
                "createdon": start - 400 * 86400,
                "modifiedon": start - rng.randint(1, 300) * 86400,
            }
        )
        if pstate[0] == 0:
            active.append((row[0], price))
    summary.products = products
    if not active:
        return summary

    customers_all = [(a, "account") for a in accounts] + [(c, "contact") for c in contacts]
    cust_email = {r[0]: r[acc_t.pos["emailaddress1"]] for r in acc_t.rows.values()}
    cust_email.update({r[0]: r[con_t.pos["emailaddress1"]] for r in con_t.rows.values()})
    so, sod, inv = t["salesorders"], t["salesorderdetails"], t["invoices"]
    statuses = [(s, r) for s, r, _ in _STATUS_MIX]
    weights = [w for _, _, w in _STATUS_MIX]
    quantities = [Decimal(q) for q in range(11)]
    rma_candidates: list[str] = []
    step = max(1, (now - 3600 - start) // max(1, orders))
    order_base = len(so)
    for n in range(orders):
        created = start + n * step + rng.randint(0, step)
        cust, kind = rng.choice(customers_all)
        iso = rng.choices(["USD", "EUR", "GBP"], weights=[60, 25, 15])[0]
        cur_id, rate = cur_ids[iso]
        statecode, statuscode = rng.choices(statuses, weights=weights)[0]
        number = f"ORD-{order_base + n + 10001:05d}-{rng.getrandbits(16):04X}"
        oid = _guid(rng)
        modified = min(now - 60, created + rng.randint(0, 5 * 86400))
        pct = rng.choice([Decimal(5), Decimal(10)]) if rng.random() < 0.15 else None
        fixed_disc = (
            round_cents(Decimal(rng.randint(5, 50) * 10000)) if pct is None and rng.random() < 0.08 else 0
        )
        freight = rng.choice([0, 0, 49900, 99900, 149900])
        order_values: dict[str, Any] = {
            "salesorderid": oid,
            "ordernumber": number,
            "name": f"Online order {number[4:9]}",
            "statecode": statecode,
            "statuscode": statuscode,
            "_customerid_value": cust,
            "_customerid_value#type": kind,
            "_accountid_value": cust if kind == "account" else None,
            "_contactid_value": cust if kind == "contact" else None,
            "_transactioncurrencyid_value": cur_id,
            "exchangerate": rate,
            "emailaddress": cust_email.get(cust),
            "discountpercentage": pct,
            "discountamount": fixed_disc,
            "freightamount": freight,
            "submitdate": created + 600 if statecode >= 1 else None,
            "datefulfilled": modified if statecode in (3, 4) else None,
            "createdon": created,
            "modifiedon": modified,
        }
        order_row = so.insert_prepared(order_values)
        line_rows = []
        for ln in range(rng.choices([1, 2, 3, 4, 5], weights=[30, 30, 20, 12, 8])[0]):
            pid, base_price = rng.choice(active)
            qty = quantities[rng.choices(range(1, 11), weights=[40, 20, 12, 8, 6, 4, 4, 2, 2, 2])[0]]
            price = round_cents(Decimal(base_price) * rate)
            disc = round_cents(Decimal(price) * qty * Decimal("0.1")) if rng.random() < 0.1 else 0
            amounts = line_amounts(price, qty, disc)
            shipped = qty if statecode in (3, 4) else quantities[0]
            if statuscode == 100002 and ln == 0 and qty > 1:
                shipped = qty - 1
            line_rows.append(
                sod.insert_prepared(
                    {
                        "salesorderdetailid": _guid(rng),
                        "_salesorderid_value": oid,
                        "_productid_value": pid,
                        "isproductoverridden": False,
                        "lineitemnumber": ln + 1,
                        "quantity": qty,
                        "priceperunit": price,
                        "manualdiscountamount": disc,
                        **amounts,
                        "quantityshipped": shipped,
                        "quantitycancelled": qty if statecode == 2 else quantities[0],
                        "quantitybackordered": qty - shipped if statuscode == 100002 else quantities[0],
                        "_transactioncurrencyid_value": cur_id,
                        "exchangerate": rate,
                        "createdon": created,
                        "modifiedon": created,
                    }
                )
            )
        totals = order_totals(org, order_row, line_rows)
        order_row = so.write_stored(oid, {**totals, "modifiedon": modified})
        summary.lines += len(line_rows)
        if statecode == 4:
            inv.insert_prepared(
                {
                    "invoiceid": _guid(rng),
                    "invoicenumber": f"INV-{order_base + n + 10001:05d}",
                    "name": f"Invoice for {number}",
                    "_salesorderid_value": oid,
                    "_customerid_value": cust,
                    "_customerid_value#type": kind,
                    "statecode": 2,
                    "statuscode": 100001,
                    "_transactioncurrencyid_value": cur_id,
                    "exchangerate": rate,
                    "discountpercentage": pct,
                    **totals,
                    "createdon": modified,
                    "modifiedon": modified,
                }
            )
            summary.invoices += 1
        if statecode in (3, 4) and rng.random() < rma_rate:
            rma_candidates.append(oid)
    summary.orders = orders
    for oid in rma_candidates:
        lines = sod.lookup("_salesorderid_value", oid)
        pick = lines[rng.randrange(len(lines))]
        qty = min(pick[sod.pos["quantity"]], Decimal(rng.randint(1, 2)))
        add_rma(
            org,
            oid,
            lines=[(pick[0], qty)],
            credit_to_account=rng.random() < 0.8,
            systemstatus=rng.choice([690970000, 690970002, 690970002]),
        )
    summary.rmas = len(rma_candidates)
    return summary


# -- ground truth ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineTruth:
    salesorderdetailid: str
    productid: str | None
    productnumber: str | None
    category: str | None
    quantity: Decimal
    priceperunit: Decimal
    manualdiscountamount: Decimal
    extendedamount: Decimal


@dataclass(frozen=True)
class OrderTruth:
    salesorderid: str
    ordernumber: str
    statecode: int
    statuscode: int
    customer_id: str
    customer_type: str
    customer_email: str | None
    accountnumber: str | None
    currency: str
    exchangerate: Decimal
    totallineitemamount: Decimal
    discountamount: Decimal
    freightamount: Decimal
    totaltax: Decimal
    totalamount: Decimal
    totalamount_base: Decimal
    modifiedon: int
    lines: tuple[LineTruth, ...] = field(default_factory=tuple)
    returns: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def ground_truth(org: Org) -> Iterator[OrderTruth]:
    """Every current order with its totals, status, customer identity, lines and RMAs (key order)."""
    t = org.tables
    so, sod, prod, ct = t["salesorders"], t["salesorderdetails"], t["products"], t["transactioncurrencies"]
    rmas, rp = t["msdyn_rmas"], t["msdyn_rmaproducts"]
    p = so.pos
    for order in so:
        cust, kind = order[p["_customerid_value"]], order[p["_customerid_value#type"]]
        ctab = org.table(kind)
        crow = ctab.rows.get(cust)
        lines = []
        for ln in sod.lookup("_salesorderid_value", order[0]):
            prow = prod.rows.get(ln[sod.pos["_productid_value"]] or "")
            lines.append(
                LineTruth(
                    ln[0],
                    ln[sod.pos["_productid_value"]],
                    None if prow is None else prow[prod.pos["productnumber"]],
                    None if prow is None else prow[prod.pos["new_category"]],
                    ln[sod.pos["quantity"]],
                    from_units(ln[sod.pos["priceperunit"]] or 0),
                    from_units(ln[sod.pos["manualdiscountamount"]] or 0),
                    from_units(ln[sod.pos["extendedamount"]] or 0),
                )
            )
        returns = []
        for rma in rmas.lookup("msdyn_referenceno", order[p["ordernumber"]]):
            for item in rp.lookup("_msdyn_rma_value", rma[0]):
                returns.append(
                    {
                        "msdyn_rmaid": rma[0],
                        "msdyn_name": rma[rmas.pos["msdyn_name"]],
                        "msdyn_rmaproductid": item[0],
                        "productid": item[rp.pos["_msdyn_product_value"]],
                        "quantity": item[rp.pos["msdyn_quantitytoreturn"]],
                        "totalamount": from_units(item[rp.pos["msdyn_totalamount"]] or 0),
                        "credittoaccount": item[rp.pos["msdyn_credittoaccount"]],
                    }
                )
        rate = order[p["exchangerate"]] or Decimal(1)
        cur = ct.rows.get(order[p["_transactioncurrencyid_value"]] or "")
        total = order[p["totalamount"]] or 0
        yield OrderTruth(
            salesorderid=order[0],
            ordernumber=order[p["ordernumber"]],
            statecode=order[p["statecode"]],
            statuscode=order[p["statuscode"]],
            customer_id=cust,
            customer_type=kind,
            customer_email=None if crow is None else crow[ctab.pos["emailaddress1"]],
            accountnumber=None if crow is None or kind != "account" else crow[ctab.pos["accountnumber"]],
            currency="" if cur is None else cur[ct.pos["isocurrencycode"]],
            exchangerate=rate,
            totallineitemamount=from_units(order[p["totallineitemamount"]] or 0),
            discountamount=from_units(order[p["discountamount"]] or 0),
            freightamount=from_units(order[p["freightamount"]] or 0),
            totaltax=from_units(order[p["totaltax"]] or 0),
            totalamount=from_units(total),
            totalamount_base=from_units(int((Decimal(total) / rate).quantize(Decimal(1)))),
            modifiedon=order[p["modifiedon"]],
            lines=tuple(lines),
            returns=tuple(returns),
        )


def verify_consistency(org: Org) -> list[str]:
    """Problems found in the money rules of :mod:`sandbox.dataverse.mutations` (empty when consistent)."""
    problems: list[str] = []
    for o in ground_truth(org):
        lines = sum((ln.extendedamount for ln in o.lines), Decimal(0))
        if lines != o.totallineitemamount:
            problems.append(f"{o.ordernumber}: lines {lines} != totallineitemamount {o.totallineitemamount}")
        for ln in o.lines:
            if (ln.priceperunit * ln.quantity).quantize(
                Decimal("0.01")
            ) - ln.manualdiscountamount != ln.extendedamount:
                problems.append(f"{o.ordernumber}: line {ln.salesorderdetailid} amounts inconsistent")
        expect = o.totallineitemamount - o.discountamount + o.freightamount + o.totaltax
        if expect != o.totalamount:
            problems.append(f"{o.ordernumber}: totalamount {o.totalamount} != {expect}")
        rate = TAX_RATES.get(o.currency, Decimal(0))
        if (o.totallineitemamount - o.discountamount) * rate - o.totaltax > Decimal("0.005"):
            problems.append(f"{o.ordernumber}: tax {o.totaltax} not {rate} of net")
    return problems
