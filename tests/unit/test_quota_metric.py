"""flash_vendor_quota_used / _limit follow what the vendors report (Dataverse x-ms-ratelimit headers,
Salesforce Sforce-Limit-Info)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from ce_poller.limiter import BURST_HEADER, UserBudget
from sfconnect.client import Quota, QuotaGovernor


def _used(source: str) -> float | None:
    return REGISTRY.get_sample_value("flash_vendor_quota_used", {"source": source})


def test_dataverse_budget_headers_set_the_quota_gauges() -> None:
    UserBudget(requests_per_window=6000).observe({BURST_HEADER: "5400"})
    assert _used("dynamics-ce") == 600
    assert REGISTRY.get_sample_value("flash_vendor_quota_limit", {"source": "dynamics-ce"}) == 6000


def test_salesforce_limit_info_sets_the_quota_gauges() -> None:
    QuotaGovernor(Quota()).observe("api-usage=1234/15000")
    assert _used("salesforce") == 1234
    assert REGISTRY.get_sample_value("flash_vendor_quota_limit", {"source": "salesforce"}) == 15000
