"""``flash demo``'s Dataverse org (entry point ``flash_connect.sandboxes``: ``dataverse``)."""

from __future__ import annotations

import contextlib
import random

from canonical.events import MemberData
from connectorkit.sandbox import DemoSandbox
from sandbox.dataverse.app import build_app
from sandbox.dataverse.mutations import random_mutation
from sandbox.dataverse.seed import ground_truth, seed_org
from sandbox.dataverse.state import DataverseState
from sandbox.dataverse.store import Org
from sandbox.server import serve

__all__ = ["demo_setup"]


def _members(org: Org) -> tuple[list[MemberData], int, int]:
    """Members for the org's customers, leaving every 12th out (their orders park until they join).

    Returns the members, how many customers were left out, and how many orders belong to members.
    """
    truths = list(ground_truth(org))
    seen: dict[str, MemberData] = {}
    for truth in truths:
        if truth.customer_id in seen or not (truth.customer_email or truth.accountnumber):
            continue
        seen[truth.customer_id] = MemberData(
            member_id=f"M-{len(seen) + 1:05d}", external_id=truth.accountnumber or None, email=truth.customer_email,
        )
    kept = {cid: m for i, (cid, m) in enumerate(seen.items()) if i % 12 != 11}
    member_orders = sum(1 for t in truths if t.customer_id in kept)
    return list(kept.values()), len(seen) - len(kept), member_orders


async def demo_setup(stack: contextlib.AsyncExitStack, n_orders: int) -> DemoSandbox:
    state = DataverseState()
    summary = seed_org(state, "contoso", customers=max(20, n_orders // 5), products=40, orders=n_orders, seed=7)
    running = await stack.enter_async_context(serve(build_app(state)))
    org = state.orgs["contoso"]
    app = state.credentials("contoso")[0]
    members, left_out, member_orders = _members(org)
    rng = random.Random(11)

    def mutate() -> str:
        change = random_mutation(org, rng)
        return f"Dataverse: {change.get('op', 'change')} {change.get('ordernumber') or change.get('id') or ''}".strip()

    return DemoSandbox(
        tenant_id="acme", connection_id="contoso-ce", source="dynamics-ce", label="acme (Dynamics 365 CE)",
        expected_orders=member_orders, members=members, mutate=mutate,
        endpoint=f"{running.base_url}/orgs/contoso",
        credentials={"tenant_id": app.tenant_id, "client_id": app.client_id, "client_secret": app.client_secret},
        settings={"authority": f"{running.base_url}/{app.tenant_id}", "ca_bundle": str(running.tls.ca_path),
                  "page_size": 500, "poll_interval_s": 2, "external_id_field": "accountnumber"},
        notes=[f"Dataverse sandbox  {running.base_url}/orgs/contoso  ({summary})",
               f"  {len(members)} members to import for tenant acme ({left_out} customers are not members yet: "
               f"{n_orders - member_orders} of their orders will park)"],
    )
