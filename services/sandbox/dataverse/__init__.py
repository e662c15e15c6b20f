"""A faithful simulator of the Dataverse (Dynamics 365 Sales) Web API and the Entra ID v2.0 token endpoint.

Addressing (one aiohttp app, any number of tenants and orgs; ``base`` is the server's ``https://host:port``):

* Entra authority ``{base}/{tenant_id}``: tenant discovery at
  ``{base}/{tenant}/v2.0/.well-known/openid-configuration``,
  token endpoint ``POST {base}/{tenant}/oauth2/v2.0/token`` (client credentials; errors with the AADSTS codes
  Entra uses: 7000215 bad secret, 700016 unknown client, 90002 unknown tenant, 500011 unknown resource).
* Org URL ``{base}/orgs/{org}``; the scope is ``{org_url}/.default``; the Web API root is
  ``{org_url}/api/data/v9.2/``.  ``{base}/api/data/v9.2/`` also serves the first org (tokens must still be
  for it).
* Each org has application users bound to app registrations (client id/secret) of its tenant; an optional
  ``readable`` set of table logical names simulates a security role (others answer 403 ``0x80040220``).

Tables (entity sets): salesorders, salesorderdetails, accounts, contacts, products, invoices,
transactioncurrencies, organizations (``expirechangetrackingindays``), msdyn_rmas, msdyn_rmaproducts.
Tenant conventions chosen here: an RMA names its original order by order number in
``msdyn_rma.msdyn_referenceno`` (contact in ``_msdyn_requestedbycontact_value``, account in
``_msdyn_serviceaccount_value``); a product's category is the custom column ``new_category`` and, equally,
its parent product family (``_parentproductid_value`` -> a product row with ``productstructure`` 2).

Python API: :class:`DataverseState` (orgs, tokens, limits, faults, clock, stats), :func:`build_app`,
:func:`seed_org` / :func:`ground_truth` / :func:`verify_consistency`, and the write helpers in
:mod:`sandbox.dataverse.mutations`.  The ``/_sandbox/...`` control API (JSON, no auth) exposes the same:
``GET|POST /_sandbox/orgs``, ``POST /_sandbox/orgs/{org}/seed``, ``POST /_sandbox/orgs/{org}/mutate``,
``GET /_sandbox/orgs/{org}/truth``, ``GET|POST|DELETE /_sandbox/faults``, ``POST /_sandbox/tokens/expire``,
``POST /_sandbox/clock/advance``, ``GET|POST /_sandbox/limits``, ``GET|DELETE /_sandbox/stats``.
"""

from sandbox.dataverse.app import build_app
from sandbox.dataverse.seed import OrderTruth, SeedSummary, ground_truth, seed_org, verify_consistency
from sandbox.dataverse.state import DataverseState, Fault, Limits
from sandbox.dataverse.store import DataverseError, Org

__all__ = [
    "DataverseError",
    "DataverseState",
    "Fault",
    "Limits",
    "OrderTruth",
    "Org",
    "SeedSummary",
    "build_app",
    "ground_truth",
    "seed_org",
    "verify_consistency",
]
