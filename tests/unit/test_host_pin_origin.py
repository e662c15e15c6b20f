"""Found by the chaos test (tests/e2e/test_chaos.py, long variant): the connector kit's host pin compares host
names only, so a nextLink to ANOTHER PORT of the pinned host receives the bearer token (in the chaos run: a
sandbox page's @odata.nextLink to http://127.0.0.1:<other port> was fetched with the token; the foreign
server's empty page then left the poller's cursor pointing there, crashing the connection forever).
Credentials go only to the origins (host, port) the connection names (libs/connectorkit/endpoints.py
HostPin.check)."""

from __future__ import annotations

import pytest

from connectorkit.endpoints import EndpointRefused, HostPin


def test_another_port_of_the_pinned_host_is_refused() -> None:
    pin = HostPin.for_urls(["https://acme.crm.dynamics.com"], kinds=["dynamics-ce"], allow_sandbox=False)
    with pytest.raises(EndpointRefused):
        pin.check("https://acme.crm.dynamics.com:8443/api/data/v9.2/salesorders?$skiptoken=x")


def test_the_configured_port_and_the_vendor_default_port_are_allowed() -> None:
    pin = HostPin.for_urls(["http://127.0.0.1:8081/"], kinds=["dynamics-ce"], allow_sandbox=True)
    assert pin.check("http://127.0.0.1:8081/api/data/v9.2/salesorders") == "127.0.0.1"
    with pytest.raises(EndpointRefused):
        pin.check("http://127.0.0.1:8082/api/data/v9.2/salesorders")
    vendor = HostPin.for_urls(["https://acme.my.salesforce.com"], kinds=["salesforce"], allow_sandbox=False)
    assert vendor.check("https://acme.my.salesforce.com/services/data/v66.0/query") == "acme.my.salesforce.com"
