"""``flash demo``'s Finance & Operations environment (entry point ``flash_connect.sandboxes``: ``fo``).

One environment with two companies (``usmf``, ``demf``), whose status field is a customer extension
(``ZZOrderState``) and which adds a modified date-time (``ZZModifiedDateTime``): the connection maps both, as an
operator does after verify named them. Live changes: orders delivered, invoiced (raising the invoice-posted
business event), cancelled, and returns credited.
"""

from __future__ import annotations

import contextlib
import random
from decimal import Decimal

from canonical.events import MemberData
from connectorkit.sandbox import DemoSandbox
from sandbox.fo.app import build_app
from sandbox.fo.schema import Variant
from sandbox.fo.seed import seed_environment
from sandbox.fo.state import FOState
from sandbox.server import serve

__all__ = ["demo_setup"]

VARIANT = Variant(renames={"SalesOrderHeadersV2": {"SalesOrderStatus": "ZZOrderState"}},
                  extensions={"SalesOrderHeadersV2": {"ZZModifiedDateTime": "Edm.DateTimeOffset"}})


async def demo_setup(stack: contextlib.AsyncExitStack, n_orders: int) -> DemoSandbox:
    state = FOState(seed=7)
    env, app = state.add_environment("initech", companies=("usmf", "demf"), variant=VARIANT,
                                     stamp_field="ZZModifiedDateTime")
    truth = seed_environment(env, customers=max(10, n_orders // 10), products=30, orders=n_orders, seed=7)
    running = await stack.enter_async_context(serve(build_app(state)))
    accounts = [r["CustomerAccount"] for r in env.rows["CustomersV3"].values()]
    members = [MemberData(member_id=f"F-{i + 1:05d}", external_id=a) for i, a in enumerate(accounts)]
    rng = random.Random(13)
    status = env.f("SalesOrderHeadersV2", "SalesOrderStatus")

    def mutate() -> str:
        heads = env.rows["SalesOrderHeadersV2"]
        (company, number), head = rng.choice(list(heads.items()))
        if head[status] == "Backorder":
            if rng.random() < 0.5:
                env.invoice_order(company, number)
                return f"F&O: {company}/{number} invoiced"
            env.set_status(company, number, "Delivered")
            return f"F&O: {company}/{number} delivered"
        if head[status] == "Invoiced" and rng.random() < 0.3:
            lot = next(k[1] for k, r in env.rows["SalesOrderLines"].items()
                       if k[0] == company and r["SalesOrderNumber"] == number)
            rma = f"D{len(env.rows['ReturnOrderHeaders']) + 1:05d}"
            env.create_return(company, rma, head["OrderingCustomerAccountNumber"], "USD", [(lot, Decimal(1))],
                              status="Received")
            env.credit_return(company, f"RET-{rma}")
            return f"F&O: {company}/{number} return {rma} credited"
        if head[status] in ("Backorder", "Delivered"):
            env.set_status(company, number, "Canceled")
            return f"F&O: {company}/{number} cancelled"
        return f"F&O: {company}/{number} unchanged"

    return DemoSandbox(
        tenant_id="initech", connection_id="initech-fo", source="dynamics-fo",
        label="initech (Dynamics 365 F&O)", expected_orders=len(truth), members=members, mutate=mutate,
        endpoint=f"{running.base_url}/envs/initech",
        credentials={"tenant_id": app.tenant_id, "client_id": app.client_id, "client_secret": app.client_secret},
        settings={"authority": f"{running.base_url}/{app.tenant_id}", "ca_bundle": str(running.tls.ca_path),
                  "page_size": 500, "poll_interval_s": 2, "scan_interval_s": 30,
                  "field_map": {"status": "ZZOrderState", "change_date": "ZZModifiedDateTime"}},
        notes=[f"F&O simulator  {running.base_url}/envs/initech/data/  ({len(truth)} orders in usmf and demf; "
               "status field ZZOrderState and ZZModifiedDateTime mapped)",
               f"  {len(members)} members to import for tenant initech (every customer account)"],
    )
