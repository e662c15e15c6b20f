"""Dynamics 365 Sales (Dataverse Web API) poller: initial sync, then change tracking, per entity.

Every record goes to ``raw.dynamics-ce.<entity>`` as a :class:`canonical.events.RawRecord` whose payload is
the record's JSON text exactly as Dataverse sent it; the delta link / page position is saved in the
``cursors`` table only after the broker acknowledged the page (``ce_poller.streams``).

Connection (``connections`` row, ``source = 'dynamics-ce'``)
-------------------------------------------------------------
``endpoint``: the org URL (``https://contoso.crm.dynamics.com``); ``settings.org_url`` overrides it.

``credentials`` (encrypted): ``{"tenant_id": ..., "client_id": ..., "client_secret": ...}`` of the app
registration bound to an application user with organisation-level Read on the tables below.

``settings`` (all optional but ``org_url``/endpoint):

=========================  ==========================================================================
``org_url``                Org URL; the token scope is ``{org_url}/.default``.
``authority``              Entra authority; default ``https://login.microsoftonline.com/{tenant_id}``.
``ca_bundle``              CA file for the org and the authority (sandbox / TLS-inspecting proxies).
``page_size``              ``odata.maxpagesize`` (1..5000, default 5000).
``entities``               Tables to sync; default ``["account", "contact", "product", "salesorder",
                           "salesorderdetail"]`` plus the return source's tables.
``select``                 Extra columns per table: ``{"account": ["new_loyaltyid"]}``.
``external_id_field``      Column holding the tenant's own customer ID: a name (accounts; default
                           ``accountnumber``) or ``{"account": ..., "contact": ...}``.
``category_field``         Product category column (default ``new_category``).
``status_overrides``       ``{"<salesorder statuscode>": "awardable" | "pending" | "cancelled"}`` for
                           organisation-defined status reasons (unknown ones follow their statecode).
``return_source``          ``{"kind": "msdyn_rma"}`` (default; Field Service RMAs, original order number in
                           ``msdyn_referenceno``, amount ``msdyn_totalamount``, products ``msdyn_rmaproducts``),
                           ``{"kind": "msdyn_rma", "order_number_field": ..., "customer_field": ...,
                           "credited_only": true}``,
                           ``{"kind": "custom", "entity_set": "new_returns", "entity": "new_return",
                           "fields": {"id": ..., "number": ..., "order_number": ..., "order_id": ...,
                           "amount": ..., "status": ..., "customer": ...},
                           "effective_statuses": [...], "cancelled_statuses": [...]}``, or
                           ``{"kind": "none"}``.
``limits``                 ``{"requests_per_window": 6000, "window_seconds": 300, "concurrent": 52}``
                           per application user (shared by every connection of the same
                           authority + client id in the process).
``poll_interval_s``        Seconds between change-tracking polls (default 30).
``entity_concurrency``     Tables synced at the same time (default 4); each holds at most two pages.
``max_record_bytes``       Largest row published (default 900000, under the broker's usual 1 MB message
                           limit); a larger row (a long memo column added to ``select``) is dead-lettered on
                           ``dlq.ce-poller.v1``, the stream goes on, and ``flash dlq replay`` re-fetches it
                           once trimmed at the source.
``expiry_warning_days``    Warn this many days before the delta token reaches the organisation's
                           ``expirechangetrackingindays`` (default 2).
=========================  ==========================================================================

Currency: Dataverse rows carry only ``_transactioncurrencyid_value``. The poller reads the small
``transactioncurrencies`` table each cycle and adds the ISO code to each record as an instance annotation,
``"_transactioncurrencyid_value@flash.isocurrencycode": "EUR"`` (inserted first; the rest of the text is
untouched), so the normalizer stays a pure function of the payload.

Returns (``msdyn_rma``): an RMA's total is on its row (``msdyn_totalamount``), but which products are credited
lives on its products, which change tracking delivers separately;
the poller tracks both tables and publishes, for each RMA touched, the RMA row with its products under
``"msdyn_rmaproducts"`` (a Flash name, not the vendor's: ``$expand`` would name the collection
``msdyn_msdyn_rma_msdyn_rmaproduct_RMA``, docs/vendor-facts.md) and the original order's ``salesorderid``
(looked up by order number) as ``order_source_id``.
"""
