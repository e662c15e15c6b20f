"""A simulator of a Dynamics 365 Finance & Operations environment's OData service and Business Events.

Faithful to the published documentation (``docs/vendor-facts.md``, Finance & Operations): data entities
``SalesOrderHeadersV2``, ``SalesOrderLines``, ``CustomersV3``, ``ReleasedProductsV2``, ``ReturnOrderHeaders``,
``ReturnOrderLines`` and ``SalesInvoiceHeadersV2`` under ``{env_url}/data/``; company-scoped rows with
``dataAreaId`` (only the default company unless ``cross-company=true``); fully specified composite keys;
enums as strings; header totals zero until calculated; server-driven paging (``@odata.nextLink``, at most
``page_size`` rows, ``Prefer: odata.maxpagesize`` honoured); ``$metadata`` CSDL; 429 with ``Retry-After``;
the Entra ID v2.0 token endpoint with the ``{env_url}/.default`` scope; Business Events POSTed to registered
HTTPS endpoints with control numbers that grow with gaps. Unsupported query options and operators (``in``,
``has``, functions, ``$apply``...) are answered with an OData error, never with unfiltered rows.

Python API: :class:`FOState` (environments, apps, tokens, throttling, event delivery), :class:`Environment`
(writers: orders, lines, totals, status, invoices, returns, credit notes), :class:`Variant` (renamed and
extension fields), :func:`seed_environment`, :func:`build_app`.
"""

from sandbox.fo.app import build_app
from sandbox.fo.schema import ENTITIES, Variant, csdl
from sandbox.fo.seed import OrderTruth, seed_environment
from sandbox.fo.state import AppRegistration, BusinessEventSubscription, Environment, FOState

__all__ = [
    "ENTITIES",
    "AppRegistration",
    "BusinessEventSubscription",
    "Environment",
    "FOState",
    "OrderTruth",
    "Variant",
    "build_app",
    "csdl",
    "seed_environment",
]
