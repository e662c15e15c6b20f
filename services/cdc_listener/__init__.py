"""Salesforce Change Data Capture listener (``python -m cdc_listener``): its own service.

It shares the connection settings, HTTP client and SOQL reads with the poller through :mod:`sfconnect`, never
by importing ``sf_poller`` (services never import each other).
"""
