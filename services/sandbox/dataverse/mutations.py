"""Business operations on a simulated org that keep the data internally consistent.

Money rules (kept by every helper here and by the seed generator):

* order line: ``baseamount = priceperunit * quantity``; ``extendedamount = baseamount - manualdiscountamount
  + tax`` with line ``tax`` = 0 (this sandbox taxes at order level);
* order: ``totallineitemamount = sum(extendedamount)``, ``totallineitemdiscountamount =
  sum(manualdiscountamount)``, ``discountamount`` = ``discountpercentage`` % of the lines when a percentage is
  set, ``totalamountlessfreight = lines - discountamount``,
  ``totaltax = round(lessfreight * TAX_RATES[iso])``,
  ``totalamount = lessfreight + freightamount + totaltax``, ``totaldiscountamount = discountamount +
  totallineitemdiscountamount``; all rounded to cents; ``<money>_base = value / exchangerate`` at read time.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from sandbox.dataverse.store import DataverseError, Org, Row, Table, not_found, to_units

__all__ = [
    "TAX_RATES",
    "add_rma",
    "amend_order",
    "cancel_order",
    "create",
    "create_order",
    "delete",
    "random_mutation",
    "recompute_order",
    "set_order_status",
    "update",
]

TAX_RATES = {"USD": Decimal("0.0725"), "EUR": Decimal("0.19"), "GBP": Decimal("0.20")}
DEFAULT_STATUS = {0: 1, 1: 3, 2: 4, 3: 100001, 4: 100003}


def round_cents(units: int | Decimal) -> int:
    """Round an amount in ten-thousandths to whole cents (currency precision 2)."""
    return int((Decimal(units) / 100).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)) * 100


def currency_iso(org: Org, currency_id: str | None) -> str:
    cur = org.tables["transactioncurrencies"]
    row = cur.rows.get(currency_id or "")
    return "" if row is None else str(row[cur.pos["isocurrencycode"]])


def currency_by_iso(org: Org, iso: str) -> Row:
    cur = org.tables["transactioncurrencies"]
    for row in cur.rows.values():
        if row[cur.pos["isocurrencycode"]] == iso:
            return row
    raise KeyError(iso)


def line_amounts(price_units: int, quantity: Decimal, discount_units: int) -> dict[str, int]:
    base = round_cents(Decimal(price_units) * quantity)
    return {"baseamount": base, "extendedamount": base - discount_units, "tax": 0}


def order_totals(org: Org, order: Row, lines: Sequence[Row]) -> dict[str, Any]:
    so = org.tables["salesorders"]
    sod = org.tables["salesorderdetails"]
    p = so.pos
    lines_total = sum(ln[sod.pos["extendedamount"]] or 0 for ln in lines)
    line_disc = sum(ln[sod.pos["manualdiscountamount"]] or 0 for ln in lines)
    pct = order[p["discountpercentage"]]
    if pct is not None:
        discount = round_cents(Decimal(lines_total) * Decimal(pct) / 100)
    else:
        discount = min(order[p["discountamount"]] or 0, lines_total)
    less = lines_total - discount
    freight = order[p["freightamount"]] or 0
    rate = TAX_RATES.get(currency_iso(org, order[p["_transactioncurrencyid_value"]]), Decimal(0))
    tax = round_cents(Decimal(less) * rate)
    return {
        "totallineitemamount": lines_total,
        "totallineitemdiscountamount": line_disc,
        "discountamount": discount,
        "totaldiscountamount": discount + line_disc,
        "totalamountlessfreight": less,
        "freightamount": freight,
        "totaltax": tax,
        "totalamount": less + freight + tax,
    }


def recompute_order(org: Org, order_id: str) -> Row:
    so = org.tables["salesorders"]
    order = so.rows.get(order_id)
    if order is None:
        raise not_found(so.entity, order_id)
    lines = org.tables["salesorderdetails"].lookup("_salesorderid_value", order_id)
    totals = order_totals(org, order, lines)
    if all(order[so.pos[k]] == v for k, v in totals.items()):
        return order
    return so.write_stored(order_id, totals)


# -- generic writes (Python API and HTTP) ----------------------------------------------------------------


def create(org: Org, entity_set: str, values: Mapping[str, Any]) -> Row:
    table = org.table(entity_set)
    for name in values:
        col = table.by_name.get(name)
        if col is not None and col.readonly and name != table.entity.key:
            raise DataverseError(400, "0x80060888", f"The property '{name}' is read-only.")
    if table.entity.logical == "salesorderdetail":
        values = _line_values(org, dict(values))
    row = table.insert(values, system=True)
    _after_write(org, table, row)
    return row


def update(org: Org, entity_set: str, key: str, changes: Mapping[str, Any]) -> Row:
    table = org.table(entity_set)
    key = key.lower()
    row = table.update(key, changes)
    if table.entity.logical == "salesorderdetail" and {
        "quantity",
        "priceperunit",
        "manualdiscountamount",
    } & set(changes):
        p = table.pos
        amounts = line_amounts(
            row[p["priceperunit"]] or 0, row[p["quantity"]] or Decimal(0), row[p["manualdiscountamount"]] or 0
        )
        row = table.write_stored(key, amounts)
    _after_write(org, table, row)
    return row


def delete(org: Org, entity_set: str, key: str) -> None:
    table = org.table(entity_set)
    key = key.lower()
    row = table.rows.get(key)
    if row is None:
        raise not_found(table.entity, key)
    if table.entity.logical == "salesorder":  # cascade delete of order products, like Dataverse
        sod = org.tables["salesorderdetails"]
        for line in sod.lookup("_salesorderid_value", key):
            sod.delete(line[sod.pos["salesorderdetailid"]])
    if table.entity.logical == "msdyn_rma":
        rp = org.tables["msdyn_rmaproducts"]
        for line in rp.lookup("_msdyn_rma_value", key):
            rp.delete(line[rp.pos["msdyn_rmaproductid"]])
    table.delete(key)
    if table.entity.logical == "salesorderdetail":
        parent = row[table.pos["_salesorderid_value"]]
        if parent in org.tables["salesorders"].rows:
            recompute_order(org, parent)


def _line_values(org: Org, values: dict[str, Any]) -> dict[str, Any]:
    """Fill an order line's currency and computed amounts from its order and product."""
    so = org.tables["salesorders"]
    order = so.rows.get(str(values.get("_salesorderid_value", "")).lower())
    if order is None:
        raise DataverseError(400, "0x80040217", "An order product needs an existing salesorder.")
    values.setdefault("_transactioncurrencyid_value", order[so.pos["_transactioncurrencyid_value"]])
    values["exchangerate"] = order[so.pos["exchangerate"]]
    if values.get("priceperunit") is None and values.get("_productid_value"):
        prod = org.tables["products"]
        prow = prod.rows.get(str(values["_productid_value"]).lower())
        if prow is not None:
            price = Decimal(prow[prod.pos["price"]] or 0) * Decimal(order[so.pos["exchangerate"]] or 1)
            values["priceperunit"] = Decimal(round_cents(price)) / 10000
    qty = Decimal(str(values.get("quantity", 1)))
    values["quantity"] = qty
    price_units = to_units(values.get("priceperunit") or 0)
    disc_units = to_units(values.get("manualdiscountamount") or 0)
    amounts = line_amounts(price_units, qty, disc_units)
    values.update({k: Decimal(v) / 10000 for k, v in amounts.items()})
    return values


def _after_write(org: Org, table: Table, row: Row) -> None:
    if table.entity.logical == "salesorderdetail":
        parent = row[table.pos["_salesorderid_value"]]
        if parent in org.tables["salesorders"].rows:
            recompute_order(org, parent)
    elif table.entity.logical == "salesorder":
        p = table.pos
        cust, kind = row[p["_customerid_value"]], row[p["_customerid_value#type"]]
        want = {
            "_accountid_value": cust if kind == "account" else None,
            "_contactid_value": cust if kind == "contact" else None,
        }
        if any(row[p[k]] != v for k, v in want.items()):
            table.write_stored(row[p["salesorderid"]], want)


# -- convenience operations ---------------------------------------------------------------------------


def set_order_status(org: Org, order_id: str, statecode: int, statuscode: int | None = None) -> Row:
    so = org.tables["salesorders"]
    statuscode = statuscode if statuscode is not None else DEFAULT_STATUS[statecode]
    if org.order_status_state.get(statuscode) != statecode:
        raise DataverseError(
            400,
            "0x8004431a",
            f"{statuscode} is not a valid status code for state code SalesOrderState.{statecode}",
        )
    changes: dict[str, Any] = {"statecode": statecode, "statuscode": statuscode}
    now = int(org.clock.now())
    order = so.rows.get(order_id.lower())
    if order is None:
        raise not_found(so.entity, order_id)
    if statecode >= 1 and order[so.pos["submitdate"]] is None:
        changes["submitdate"] = now
    if statecode in (3, 4) and order[so.pos["datefulfilled"]] is None:
        changes["datefulfilled"] = now
    return so.update(order_id, changes, system=True)


def cancel_order(org: Org, order_id: str) -> Row:
    """``CancelSalesOrder``: statecode 2 (Canceled), statuscode 4 (No Money)."""
    return set_order_status(org, order_id, 2, 4)


def amend_order(
    org: Org, order_id: str, *, quantity: Decimal | int | None = None, line_id: str | None = None
) -> Row:
    """Change one line's quantity (default: the first line, +1) and recompute the order totals."""
    sod = org.tables["salesorderdetails"]
    lines = sod.lookup("_salesorderid_value", order_id.lower())
    if not lines:
        raise DataverseError(400, "0x80040217", f"Order {order_id} has no lines to amend.")
    line = next((ln for ln in lines if ln[sod.pos["salesorderdetailid"]] == line_id), lines[0])
    qty = Decimal(quantity) if quantity is not None else (line[sod.pos["quantity"]] or Decimal(0)) + 1
    update(org, "salesorderdetails", line[sod.pos["salesorderdetailid"]], {"quantity": qty})
    return org.tables["salesorders"].rows[order_id.lower()]


def create_order(
    org: Org,
    customer_id: str,
    lines: Sequence[tuple[str, Decimal | int]],
    *,
    currency: str = "USD",
    ordernumber: str | None = None,
    freight: Decimal | int = 0,
    discountpercentage: Decimal | None = None,
) -> Row:
    so = org.tables["salesorders"]
    cur = currency_by_iso(org, currency)
    ct = org.tables["transactioncurrencies"]
    kind = org.find_target(so.by_name["_customerid_value"], customer_id)
    cust = org.table(kind).rows[customer_id.lower()]
    email = cust[org.table(kind).pos["emailaddress1"]]
    number = (
        ordernumber
        or f"ORD-{org.next_version() % 100000:05d}-{random.Random(customer_id).randint(0, 9999):04X}"
    )
    order = so.insert_prepared(
        {
            "ordernumber": number,
            "name": f"Order {number}",
            "statecode": 0,
            "statuscode": 1,
            "_customerid_value": customer_id.lower(),
            "_customerid_value#type": kind,
            "_accountid_value": customer_id.lower() if kind == "account" else None,
            "_contactid_value": customer_id.lower() if kind == "contact" else None,
            "_transactioncurrencyid_value": cur[ct.pos["transactioncurrencyid"]],
            "exchangerate": cur[ct.pos["exchangerate"]],
            "emailaddress": email,
            "freightamount": to_units(freight),
            "discountpercentage": discountpercentage,
            "discountamount": 0,
        }
    )
    oid = order[so.pos["salesorderid"]]
    for i, (product_id, qty) in enumerate(lines, start=1):
        create(
            org,
            "salesorderdetails",
            {
                "_salesorderid_value": oid,
                "_productid_value": product_id,
                "quantity": Decimal(qty),
                "lineitemnumber": i,
                "quantityshipped": Decimal(0),
                "quantitycancelled": Decimal(0),
                "quantitybackordered": Decimal(0),
            },
        )
    return recompute_order(org, oid)


def add_rma(
    org: Org,
    order_id: str,
    *,
    lines: Sequence[tuple[str, Decimal | int]] | None = None,
    credit_to_account: bool = True,
    name: str | None = None,
    systemstatus: int = 690970002,
) -> Row:
    """Create an ``msdyn_rma`` for an order (order number in ``msdyn_referenceno``) with products.

    ``lines`` are ``(salesorderdetailid, quantity)``; default: one unit of the first line.  Each RMA product
    is valued at the line's net unit price including tax (``extendedamount / quantity``); the RMA's
    ``msdyn_totalamount`` is the sum of its products (docs/vendor-facts.md: "all RMA products including tax").
    ``systemstatus`` defaults to 690970002 Products Received.
    """
    so = org.tables["salesorders"]
    sod = org.tables["salesorderdetails"]
    order = so.rows.get(order_id.lower())
    if order is None:
        raise not_found(so.entity, order_id)
    p = so.pos
    order_lines = {
        ln[sod.pos["salesorderdetailid"]]: ln for ln in sod.lookup("_salesorderid_value", order_id.lower())
    }
    chosen = (
        list(lines) if lines is not None else [(next(iter(order_lines)), Decimal(1))] if order_lines else []
    )
    rmas = org.tables["msdyn_rmas"]
    cust, kind = order[p["_customerid_value"]], order[p["_customerid_value#type"]]
    account = cust if kind == "account" else _parent_account(org, cust)
    number = name or f"RMA-{len(rmas) + 1:05d}"
    items: list[tuple[Row, Decimal, int]] = []
    for line_id, qty in chosen:
        ln = order_lines[line_id.lower()]
        lq = ln[sod.pos["quantity"]] or Decimal(1)
        unit = round_cents(Decimal(ln[sod.pos["extendedamount"]] or 0) / lq)
        items.append((ln, min(Decimal(qty), lq), unit))
    rma = rmas.insert_prepared(
        {
            "msdyn_name": number,
            "msdyn_referenceno": order[p["ordernumber"]],
            "_msdyn_serviceaccount_value": account,
            "_msdyn_billingaccount_value": account,
            "_msdyn_requestedbycontact_value": cust if kind == "contact" else None,
            "msdyn_description": f"Return for {order[p['ordernumber']]}",
            "msdyn_systemstatus": systemstatus,
            "msdyn_taxable": True,
            "msdyn_totalamount": sum(round_cents(Decimal(unit) * q) for _, q, unit in items),
            "statecode": 0,
            "statuscode": 1,
            "_transactioncurrencyid_value": order[p["_transactioncurrencyid_value"]],
            "exchangerate": order[p["exchangerate"]],
        }
    )
    rid = rma[rmas.pos["msdyn_rmaid"]]
    rp = org.tables["msdyn_rmaproducts"]
    for i, (ln, q, unit) in enumerate(items, start=1):
        rp.insert_prepared(
            {
                "msdyn_name": f"{number}-{i}",
                "_msdyn_rma_value": rid,
                "_msdyn_product_value": ln[sod.pos["_productid_value"]],
                "msdyn_quantitytoreturn": q,
                "msdyn_unitamount": unit,
                "msdyn_totalamount": round_cents(Decimal(unit) * q),
                "msdyn_credittoaccount": credit_to_account,
                "msdyn_taxable": True,
                "msdyn_itemstatus": 690970001 if systemstatus == 690970002 else 690970000,
                "statecode": 0,
                "statuscode": 1,
                "_transactioncurrencyid_value": order[p["_transactioncurrencyid_value"]],
                "exchangerate": order[p["exchangerate"]],
            }
        )
    return rma


def _parent_account(org: Org, contact_id: str) -> str | None:
    c = org.tables["contacts"]
    row = c.rows.get(contact_id)
    if row is None or row[c.pos["_parentcustomerid_value#type"]] != "account":
        return None
    return str(row[c.pos["_parentcustomerid_value"]])


def random_mutation(org: Org, rng: random.Random) -> dict[str, Any]:
    """One plausible change for live demos: new order, status move, cancel, amend, RMA, email change."""
    so = org.tables["salesorders"]
    keys = so.sorted_keys()
    ops = ["create_order", "advance_status", "cancel", "amend", "rma", "email"]
    op = rng.choices(ops, weights=[30, 30, 8, 12, 8, 12])[0] if keys else "create_order"
    if op == "create_order":
        customers = org.tables["accounts"].sorted_keys() + org.tables["contacts"].sorted_keys()
        prod = org.tables["products"]
        products = [
            k
            for k, r in prod.rows.items()
            if r[prod.pos["productstructure"]] == 1 and r[prod.pos["statecode"]] == 0
        ]
        if not customers or not products:
            return {"op": "noop"}
        picked = [(rng.choice(products), rng.randint(1, 4)) for _ in range(rng.randint(1, 4))]
        row = create_order(
            org, rng.choice(customers), picked, currency=rng.choice(["USD", "USD", "EUR", "GBP"])
        )
        return {
            "op": op,
            "salesorderid": row[so.pos["salesorderid"]],
            "ordernumber": row[so.pos["ordernumber"]],
        }
    oid = rng.choice(keys)
    order = so.rows[oid]
    state = order[so.pos["statecode"]]
    if op == "advance_status" and state in (0, 1, 3):
        nxt = {0: 1, 1: 3, 3: 4}[state]
        set_order_status(org, oid, nxt)
        return {"op": op, "salesorderid": oid, "statecode": nxt}
    if op == "cancel" and state in (0, 1):
        cancel_order(org, oid)
        return {"op": op, "salesorderid": oid}
    if op == "amend" and state in (0, 1):
        amend_order(org, oid)
        return {"op": op, "salesorderid": oid}
    if op == "rma" and state in (3, 4):
        rma = add_rma(org, oid)
        return {"op": op, "salesorderid": oid, "msdyn_rmaid": rma[0]}
    contacts = org.tables["contacts"]
    if contacts.rows:
        cid = rng.choice(contacts.sorted_keys())
        email = f"updated.{rng.randint(1000, 9999)}@example.org"
        contacts.update(cid, {"emailaddress1": email})
        return {"op": "email", "contactid": cid, "emailaddress1": email}
    return {"op": "noop"}
