"""Dynamics 365 Finance & Operations poller: data entities over OData, a per-connection field mapping
confirmed against ``$metadata``, incremental reads from what the environment offers, and Business Events.

Modules: :mod:`fo_poller.config` (the connection's settings and their documented defaults),
:mod:`fo_poller.client` (OData client and error tables on the connector kit), :mod:`fo_poller.metadata`
(``$metadata`` and the field confirmation), :mod:`fo_poller.streams` (initial load and incremental reads),
:mod:`fo_poller.events` (the Business Events HTTPS receiver), :mod:`fo_poller.control` (verify, sample,
refetch), :mod:`fo_poller.app` (composition root). Vendor facts: ``docs/vendor-facts.md``.

Run: ``flash run fo-poller`` or ``python -m fo_poller``.
"""
