"""``flash demo``'s Salesforce org (entry point ``flash_connect.sandboxes``: ``salesforce``)."""

from __future__ import annotations

import contextlib
import random

from canonical.events import MemberData
from connectorkit.sandbox import DemoSandbox
from sandbox.salesforce import SalesforceState, build_app, ground_truth, random_mutations, seed_org
from sandbox.server import serve

__all__ = ["demo_setup"]


async def demo_setup(stack: contextlib.AsyncExitStack, n_orders: int) -> DemoSandbox:
    state = SalesforceState()
    seed_org(state, "globex", accounts=max(20, n_orders // 5), person_accounts=10, contacts=20, products=40,
             orders=n_orders, seed=9)
    running = await stack.enter_async_context(serve(build_app(state)))
    org = state.orgs["globex"]
    truths = [t for t in ground_truth(org).values() if not t.is_deleted]
    # The loyalty core knows globex's customers by their account number (the connection's external ID).
    by_account: dict[str, MemberData] = {}
    for account in org.records("Account"):
        by_account[account["Id"]] = MemberData(
            member_id=f"G-{len(by_account) + 1:05d}", external_id=account.get("AccountNumber"),
            email=account.get("PersonEmail"),
        )
    kept_accounts = {a: m for i, (a, m) in enumerate(by_account.items()) if i % 12 != 11}
    kept = list(kept_accounts.values())
    member_orders = sum(1 for t in truths if t.account_id in kept_accounts)
    rng = random.Random(13)

    def mutate() -> str:
        random_mutations(org, 1, rng)
        return "Salesforce: random change"

    return DemoSandbox(
        tenant_id="globex", connection_id="globex-sf", source="salesforce", label="globex (Salesforce)",
        expected_orders=member_orders, members=kept, mutate=mutate, endpoint=running.base_url,
        credentials={"client_id": org.client_id, "client_secret": org.client_secret},
        settings={"ca_bundle": str(running.tls.ca_path), "poll_interval_s": 2},
        notes=[f"Salesforce sandbox {running.base_url}  (org globex, {n_orders} orders)",
               f"  {len(kept)} members to import for tenant globex"],
    )
