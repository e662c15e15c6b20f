"""Salesforce connection library shared by the two Salesforce services, ``sf-poller`` and ``cdc-listener``.

Services never import each other, so what both need lives here: the connection settings
(:mod:`sfconnect.config`), the HTTP client with its error table and quota governor (:mod:`sfconnect.client`),
vendor record -> RawRecord (:mod:`sfconnect.records`) and the SOQL reads both publish from (fetch by ids,
reconcile; :mod:`sfconnect.reader`). Vendor facts it relies on are listed with their sources in
``docs/vendor-facts.md`` (``## Salesforce``).

Every record goes to ``raw.salesforce.<Object>`` as a :class:`canonical.events.RawRecord` whose payload is
the record's JSON as Salesforce sent it (Bulk CSV rows as a JSON object of strings); cursors and replay
ids are saved in ``cursors`` only after the broker acknowledged the records they cover.

Connection (``connections`` row, ``source = 'salesforce'``)
-----------------------------------------------------------
``endpoint``: the org's My Domain URL (``https://acme.my.salesforce.com``). The token comes from
``{endpoint}/services/oauth2/token`` (client credentials); every data call goes to the ``instance_url``
of the token response.

``credentials`` (encrypted): ``{"client_id": ..., "client_secret": ...}`` of the External Client App.

``settings`` (all optional)::

    {"instance_version": "66.0",            # API version pinned for REST, Bulk and CometD
     "ca_bundle": "/path/ca.pem",           # CA file (sandbox / TLS-inspecting proxies)
     "objects": ["Account", "Contact", ...],  # default by mode (sfconnect.config.DEFAULT_OBJECTS)
     "mode": "order" | "order_management" | "order_summary",   # order_summary: orders from OrderSummary
     "summary_status_map": {"Created": "pending", "Fulfilled": "awardable", "Canceled": "cancelled"},
     "default_currency": "EUR",             # required when the org has no multicurrency (no CurrencyIsoCode)
     "status_map": {"Cancelled": "cancelled", "Fulfilled": "awardable", "Activated": "pending"},
     "external_id_field": "AccountNumber",  # the tenant's own customer id: a field of Account, or
                                            #   {"Account": "Loyalty_Id__c", "Contact": "Member_No__c"}; selected
                                            #   in every SOQL of those objects, checked at verify
     "memo_status_map": {"Posted": "effective"},  # CreditMemo.Status -> pending|effective|cancelled
     "price_currency": "EUR",               # PricebookEntry currency that prices products (default any)
     "refunds": "return_order" | "credit_memo",   # default: order -> return_order, OM -> credit_memo
     "bulk_threshold": 2000,                # initial loads above this many rows use Bulk API 2.0 (0: never)
     "bulk_max_records": 50000, "bulk_timeout_s": 900, "bulk_poll_s": 2,
     "page_size": 2000,                     # REST batchSize (200..2000)
     "poll_interval_s": 30,                 # incremental polling without CDC
     "overlap_s": 60,                       # re-read this far behind the cursor (late commits; 0: off)
     "cdc": true,                           # CDC listener on: backfill waits for its subscription, then
     "reconcile_interval_s": 3600,          #   the poller only runs a safety-net poll this often
     "quota": {"run_share": 0.25, "org_share": 0.8, "pause_s": 300, "limit_backoff_s": 60}}

Every vendor fact these settings stand in for (UNCONFIRMED values, org-defined picklists) is listed with
its source in ``docs/vendor-facts.md`` (``## Salesforce``). The org's shape (which fields and objects exist)
is not a setting: verify learns it (:mod:`sfconnect.shape`).
"""
