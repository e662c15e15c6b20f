"""Salesforce REST/Bulk poller (``python -m sf_poller``): incremental SOQL on a compound cursor, Bulk API 2.0
for large initial loads, and the safety-net reconcile when the CDC listener (``services/cdc_listener``) is on.

The connection's settings, client and record shape are in :mod:`sfconnect` (shared with the CDC listener).
"""
