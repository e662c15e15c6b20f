"""Salesforce Change Data Capture listener (``python -m cdc_listener``).

The implementation lives in :mod:`sf_poller.cdc`: it shares the poller's HTTP client, quota governor and SOQL
reconcile code, and services must not import each other, so both services are defined in one package and
this one only re-exports the listener's ``SERVICE``.
"""
