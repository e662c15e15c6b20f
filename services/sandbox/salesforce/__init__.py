"""A Salesforce org simulator over HTTPS: OAuth client credentials, REST query/queryAll/sobjects/composite,
Bulk API 2.0 query jobs, CometD Change Data Capture, fault injection and a deterministic seed.

In-process use::

    state = SalesforceState()
    org = state.add_org("acme")                      # client_id "acme-client-id", secret "acme-client-secret"
    seed_org(state, org, orders=500, seed=7)
    async with serve(build_app(state)) as sb:        # sandbox.server.serve
        token_url = f"{sb.base_url}/services/oauth2/token"   # instance_url: {base_url}/orgs/acme
"""

from sandbox.salesforce.app import build_app
from sandbox.salesforce.clock import SimClock
from sandbox.salesforce.domain import (
    amend_quantity,
    cancel_order,
    close_return,
    create_credit_memo,
    create_order,
    create_reduction_order,
    create_return,
    random_mutations,
    set_order_status,
    submit_cancel,
)
from sandbox.salesforce.errors import SalesforceError
from sandbox.salesforce.org import ORDER_STATUSES, CdcEvent, Org
from sandbox.salesforce.seed import OrderTruth, SeedSummary, ground_truth, seed_org
from sandbox.salesforce.state import FAULT_KINDS, SalesforceState

__all__ = [
    "FAULT_KINDS",
    "ORDER_STATUSES",
    "CdcEvent",
    "OrderTruth",
    "Org",
    "SalesforceError",
    "SalesforceState",
    "SeedSummary",
    "SimClock",
    "amend_quantity",
    "build_app",
    "cancel_order",
    "close_return",
    "create_credit_memo",
    "create_order",
    "create_reduction_order",
    "create_return",
    "ground_truth",
    "random_mutations",
    "seed_org",
    "set_order_status",
    "submit_cancel",
]
