"""Salesforce client without sockets: auth on My Domain, instance_url for data, the error table, the
session re-auth, our own REQUEST_LIMIT_EXCEEDED backoff and the quota governor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from servicekit.errors import ConfigError, Poison, Transient
from sfconnect.client import (
    LocatorExpired,
    QueryTimeout,
    QuotaGovernor,
    QuotaPaused,
    RecordNotFound,
    RequestLimited,
    SalesforceClient,
    ShapeMismatch,
    classify,
)
from sfconnect.config import Quota

FIX = Path(__file__).parents[1] / "fixtures" / "salesforce"
TOKEN = json.loads((FIX / "token.json").read_text())
MY_DOMAIN = "https://acme.my.salesforce.com"
INSTANCE = "https://acme-instance.my.salesforce.com"


def _err(status: int, code: str, message: str = "x", limit: str | None = None) -> httpx.Response:
    headers = {"Sforce-Limit-Info": limit} if limit else {}
    return httpx.Response(status, json=[{"message": message, "errorCode": code}], headers=headers)


class FakeOrg:
    """A scripted org: token endpoint on My Domain, data endpoints answered by ``data``."""

    def __init__(self, data: Callable[[httpx.Request], httpx.Response]) -> None:
        self.data = data
        self.requests: list[httpx.Request] = []
        self.tokens = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/services/oauth2/token":
            assert str(request.url).startswith(MY_DOMAIN)
            self.tokens += 1
            return httpx.Response(200, json={**TOKEN, "instance_url": INSTANCE,
                                             "access_token": f"tok{self.tokens}"})
        assert str(request.url).startswith(INSTANCE), "data calls go to the token's instance_url"
        return self.data(request)


def _client(org: FakeOrg, **kw: Any) -> tuple[SalesforceClient, list[float]]:
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    http = httpx.AsyncClient(transport=httpx.MockTransport(org))
    return SalesforceClient(http, MY_DOMAIN, "cid", "secret", sleep=sleep, **kw), sleeps


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (403, "REQUEST_LIMIT_EXCEEDED", RequestLimited),
        (400, "QUERY_TIMEOUT", QueryTimeout),
        (400, "INVALID_QUERY_LOCATOR", LocatorExpired),
        (400, "MALFORMED_QUERY", ConfigError),
        (400, "INVALID_FIELD", ShapeMismatch),
        (400, "INVALID_TYPE", ShapeMismatch),
        (404, "NOT_FOUND", RecordNotFound),
        (400, "MALFORMED_ID", RecordNotFound),
        (400, "UNABLE_TO_LOCK_ROW", Transient),
        (500, "UNKNOWN_EXCEPTION", Transient),
        (503, "SERVER_UNAVAILABLE", Transient),
        (409, "INVALIDJOB", ConfigError),
        (414, "", ConfigError),
        (420, "", ConfigError),
        (400, "INVALID_INPUT", Poison),
    ],
)
def test_error_table(status: int, code: str, expected: type[Exception]) -> None:
    err = classify(status, code, "message")
    assert type(err) is expected
    if expected is RequestLimited:
        assert isinstance(err, Transient) and err.retry_after == 60.0


async def test_token_on_my_domain_then_data_on_instance_url() -> None:
    org = FakeOrg(lambda r: httpx.Response(200, json={"totalSize": 0, "done": True, "records": []},
                                           headers={"Sforce-Limit-Info": "api-usage=5/1000"}))
    client, _ = _client(org)
    body, url = await client.query_page("SELECT Id FROM Account")
    assert body["totalSize"] == 0
    assert url.startswith(f"{INSTANCE}/services/data/v66.0/query?q=SELECT")
    assert org.requests[0].url.path == "/services/oauth2/token"
    assert b"grant_type=client_credentials" in org.requests[0].content
    assert org.requests[1].headers["Authorization"] == "Bearer tok1"
    assert client.token is not None and client.token.org_id == TOKEN["id"].split("/")[-2]


async def test_invalid_session_reauthenticates_once_and_replays() -> None:
    answers = [_err(401, "INVALID_SESSION_ID"), httpx.Response(200, json={"totalSize": 0, "done": True,
                                                                          "records": []})]
    org = FakeOrg(lambda r: answers.pop(0))
    client, _ = _client(org)
    await client.query_page("SELECT Id FROM Account")
    assert org.tokens == 2 and client.reauths == 1
    assert org.requests[-1].headers["Authorization"] == "Bearer tok2"
    # a second rejection right after the re-auth is not retried forever
    org2 = FakeOrg(lambda r: _err(401, "INVALID_SESSION_ID"))
    client2, _ = _client(org2, attempts=2)
    with pytest.raises(Transient):
        await client2.query_page("SELECT Id FROM Account")
    assert org2.tokens == 2


async def test_invalid_grant_says_use_my_domain() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "invalid_grant",
                                         "error_description": "request not supported on this domain"})

    client = SalesforceClient(httpx.AsyncClient(transport=httpx.MockTransport(handler)),
                              "https://login.salesforce.com", "cid", "secret")
    with pytest.raises(ConfigError, match="My Domain"):
        await client.authenticate()


async def test_request_limit_backs_off_by_our_policy_without_retry_after() -> None:
    answers = [_err(403, "REQUEST_LIMIT_EXCEEDED"), _err(403, "REQUEST_LIMIT_EXCEEDED"),
               httpx.Response(200, json={"totalSize": 0, "done": True, "records": []})]
    org = FakeOrg(lambda r: answers.pop(0))
    client, sleeps = _client(org, governor=QuotaGovernor(Quota(limit_backoff_s=10.0)))
    await client.query_page("SELECT Id FROM Account")
    assert len(sleeps) == 2
    assert 8 <= sleeps[0] <= 12 * 2 and sleeps[1] > sleeps[0] * 1.2  # ~20s then ~40s: doubling with jitter


async def test_query_timeout_is_not_retried_here() -> None:
    org = FakeOrg(lambda r: _err(400, "QUERY_TIMEOUT", "Your query request was running for too long."))
    client, sleeps = _client(org)
    with pytest.raises(QueryTimeout):
        await client.query_page("SELECT Id FROM Order")
    assert sleeps == []


async def test_governor_stops_a_run_at_its_share_and_resumes_next_run() -> None:
    used = {"n": 100}

    def data(request: httpx.Request) -> httpx.Response:
        used["n"] += 1
        return httpx.Response(200, json={"totalSize": 0, "done": True, "records": []},
                              headers={"Sforce-Limit-Info": f"api-usage={used['n']}/1000"})

    org = FakeOrg(data)
    client, _ = _client(org, governor=QuotaGovernor(Quota(run_share=0.05, org_share=0.8, pause_s=7)))
    for _ in range(50):  # 5% of 1000
        await client.query_page("SELECT Id FROM Account")
    with pytest.raises(QuotaPaused, match="run share") as info:
        await client.query_page("SELECT Id FROM Account")
    assert info.value.retry_after == 7
    client.governor.begin_run()
    await client.query_page("SELECT Id FROM Account")  # a new run may go on


async def test_governor_respects_the_org_share() -> None:
    org = FakeOrg(lambda r: httpx.Response(200, json={"totalSize": 0, "done": True, "records": []},
                                           headers={"Sforce-Limit-Info": "api-usage=801/1000"}))
    client, _ = _client(org)
    await client.query_page("SELECT Id FROM Account")
    with pytest.raises(QuotaPaused, match="org share"):
        await client.query_page("SELECT Id FROM Account")


def test_limit_info_header_parsing() -> None:
    gov = QuotaGovernor(Quota())
    gov.observe((FIX / "limit_info.txt").read_text())
    assert gov.maximum and gov.used is not None
    gov.observe("api-usage=18/5000; per-app-api-usage=17/250(appName=x)")
    assert (gov.used, gov.maximum) == (18, 5000)


async def test_an_instance_url_off_salesforce_is_refused_before_any_token_goes_there() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "acme.my.salesforce.com", "nothing is sent to another host"
        return httpx.Response(200, json={**TOKEN, "instance_url": "https://evil.example.com"})

    client = SalesforceClient(httpx.AsyncClient(transport=httpx.MockTransport(handler)), MY_DOMAIN, "cid", "secret")
    with pytest.raises(ConfigError, match=r"evil\.example\.com"):
        await client.query_page("SELECT Id FROM Account")
