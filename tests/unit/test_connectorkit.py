"""The connector kit on httpx.MockTransport (no sockets): endpoint policy, host pinning, retries, re-auth,
the error table, scrubbing, typed cursors and source dead letters."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from connectorkit.cursors import Checkpoint, FakePublishedVersions, publish_then_checkpoint
from connectorkit.deadletters import FakeSourceDeadLetters, Refetch, SourceLetter, refetch_of
from connectorkit.endpoints import EndpointRefused, HostPin, check_endpoint, check_resolved, host_matches
from connectorkit.http import (
    ErrorRule,
    ErrorTable,
    StaticTokenSource,
    VendorClient,
    parse_error_body,
    retry_after_seconds,
    scrub,
)
from connectorkit.protocol import VerifyReport
from servicekit.connections import FakeCursorStore
from servicekit.errors import ConfigError, InfrastructureUnavailable, Poison, Transient
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings

ORG = "https://contoso.crm.dynamics.com"


# ------------------------------------------------------------------------------------ endpoint policy


@pytest.mark.parametrize("url", [
    "https://contoso.crm.dynamics.com", "https://contoso.crm4.dynamics.com/", "https://a.b.crm11.dynamics.com",
    "https://contoso.crm.microsoftdynamics.us",
])
def test_dataverse_org_urls_are_accepted(url: str) -> None:
    assert check_endpoint(url, kinds=["dynamics-ce"], allow_sandbox=False).endswith((".com", ".us"))


@pytest.mark.parametrize(("url", "why"), [
    ("http://contoso.crm.dynamics.com", "only https"),
    ("https://contoso.crm.dynamics.com.evil.example", "is not a dynamics-ce endpoint"),
    ("https://evil.example/contoso.crm.dynamics.com", "is not a dynamics-ce endpoint"),
    ("https://127.0.0.1", "IP address"),
    ("https://[::1]/", "IP address"),
    ("https://user:pw@contoso.crm.dynamics.com", "must not carry a user or password"),
    ("contoso", "is not a URL"),
])
def test_bad_endpoints_are_refused_with_what_to_put(url: str, why: str) -> None:
    with pytest.raises(EndpointRefused, match=why) as err:
        check_endpoint(url, kinds=["dynamics-ce"], setting="endpoint", allow_sandbox=False)
    assert "endpoint" in str(err.value)
    assert isinstance(err.value, ConfigError)


def test_salesforce_my_domain_patterns() -> None:
    assert host_matches("acme.my.salesforce.com", ["*.my.salesforce.com"])
    assert host_matches("acme--uat.sandbox.my.salesforce.com", ["*.my.salesforce.com"])
    assert not host_matches("my.salesforce.com.attacker.io", ["*.my.salesforce.com"])
    assert not host_matches("acme.my.salesforce.com", ["*.crm*.dynamics.com"])


def test_sandbox_setting_admits_loopback_http() -> None:
    assert check_endpoint("http://127.0.0.1:8443/orgs/x", kinds=["dynamics-ce"], allow_sandbox=True) == "127.0.0.1"


async def test_names_resolving_to_loopback_are_refused() -> None:
    with pytest.raises(EndpointRefused, match="loopback"):
        await check_resolved("localhost", allow_sandbox=False)
    await check_resolved("localhost", allow_sandbox=True)


async def test_the_client_checks_a_new_hosts_addresses_before_sending() -> None:
    """A pinned host that resolves into our own network (DNS pointed at loopback) gets no request."""
    sent: list[httpx.Request] = []
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200)))
    client = VendorClient(http, "X", "https://localhost/api/", HostPin(frozenset({"localhost"})), TABLE,
                          tokens=StaticTokenSource("t"))
    with pytest.raises(EndpointRefused, match="private/loopback/link-local"):
        await client.get("things")
    assert sent == []


# ------------------------------------------------------------------------------------------- client

TABLE = ErrorTable("Dataverse", [
    ErrorRule(ConfigError, "grant the application user's role organisation-level {1}", status=403,
              message=r"missing (prv\w+) privilege"),
    ErrorRule(Poison, "the record is gone", status=404, code="0x80040217"),
])


class Script:
    """A MockTransport answering from a list of responses (or callables), recording requests."""

    def __init__(self, *answers: httpx.Response | Callable[[httpx.Request], httpx.Response]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        a = self.answers.pop(0)
        return a(request) if callable(a) else a


def _client(script: Script, **kw: Any) -> tuple[VendorClient, list[float]]:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    http = httpx.AsyncClient(transport=httpx.MockTransport(script))
    kw.setdefault("tokens", StaticTokenSource("t1", "t2"))
    client = VendorClient(http, "Dataverse", f"{ORG}/api/data/v9.2/", HostPin.for_urls([ORG], allow_sandbox=False),
                          TABLE, sleep=sleep, backoff_base_s=0.01, max_attempts=4, secrets=("s3cr3t-value",),
                          check_addresses=False, **kw)
    return client, slept


def _err(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


async def test_retry_after_on_429_and_503_then_success() -> None:
    script = Script(_err(429, "0x80072322", "throttled", **{"Retry-After": "7"}),
                    _err(503, "", "busy", **{"Retry-After": "2"}), httpx.Response(200, json={"value": []}))
    client, slept = _client(script)
    resp = await client.get("accounts")
    assert resp.json() == {"value": []}
    assert slept == [7.0, 2.0]
    assert [r.headers["Authorization"] for r in script.requests] == ["Bearer t1"] * 3


async def test_network_errors_back_off_with_jitter_and_give_up_transient() -> None:
    def boom(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=req)

    client, slept = _client(Script(boom, boom, boom, boom))
    with pytest.raises(Transient, match=r"cannot reach contoso\.crm\.dynamics\.com"):
        await client.get("accounts")
    assert len(slept) == 3
    assert all(0.005 <= s <= 0.15 for s in slept)


async def test_401_renews_once_then_second_401_is_config_error() -> None:
    script = Script(_err(401, "0x8004a102", "expired"), httpx.Response(200, json={}))
    client, _ = _client(script)
    await client.get("WhoAmI")
    assert [r.headers["Authorization"] for r in script.requests] == ["Bearer t1", "Bearer t2"]
    script2 = Script(_err(401, "0x8004a102", "expired"), _err(401, "0x8004a102", "still"))
    client2, _ = _client(script2)
    with pytest.raises(ConfigError, match="credentials were refused"):
        await client2.get("WhoAmI")


async def test_error_table_rows_say_what_to_fix() -> None:
    msg = "Principal user (Id=1) is missing prvReadSalesOrder privilege (Id=2) on OTC=1088"
    client, _ = _client(Script(_err(403, "0x80040220", msg)))
    with pytest.raises(ConfigError, match="organisation-level prvReadSalesOrder"):
        await client.get("salesorders")
    client, _ = _client(Script(_err(404, "0x80040217", "Does Not Exist")))
    with pytest.raises(Poison, match="the record is gone"):
        await client.get("accounts(1)")


async def test_next_link_to_another_host_is_refused_before_the_token_is_sent() -> None:
    script = Script()
    client, _ = _client(script)
    with pytest.raises(EndpointRefused, match=r"evil\.example"):
        await client.get("https://evil.example/api/data/v9.2/accounts?$skiptoken=1")
    with pytest.raises(EndpointRefused, match="only https"):
        await client.get("http://contoso.crm.dynamics.com/api/data/v9.2/accounts")
    assert script.requests == []


async def test_redirects_followed_on_the_same_host_only() -> None:
    script = Script(httpx.Response(302, headers={"Location": "/api/data/v9.2/accounts?x=1"}),
                    httpx.Response(200, json={"ok": 1}))
    client, _ = _client(script)
    assert (await client.get("accounts")).json() == {"ok": 1}
    assert script.requests[1].url.path == "/api/data/v9.2/accounts"
    script = Script(httpx.Response(302, headers={"Location": "https://evil.example/steal"}))
    client, _ = _client(script)
    with pytest.raises(EndpointRefused, match="another host"):
        await client.get("accounts")
    assert len(script.requests) == 1


async def test_token_post_never_follows_a_redirect() -> None:
    script = Script(httpx.Response(307, headers={"Location": f"{ORG}/token2"}))
    client, _ = _client(script, tokens=None)
    with pytest.raises(EndpointRefused, match="never redirected"):
        await client.token_post(f"{ORG}/token", {"client_secret": "s3cr3t-value"})
    assert len(script.requests) == 1


async def test_token_post_errors_are_scrubbed_of_the_secret() -> None:
    body = {"error": "invalid_client", "error_codes": [7000215],
            "error_description": "AADSTS7000215: Invalid client secret provided: s3cr3t-value"}
    client, _ = _client(Script(httpx.Response(401, json=body)), tokens=None)
    with pytest.raises(ConfigError) as err:
        await client.token_post(f"{ORG}/token", {"client_secret": "s3cr3t-value"})
    assert "s3cr3t-value" not in str(err.value)
    assert "AADSTS7000215" in str(err.value)


def test_scrub_strips_tokens_sessions_and_trims() -> None:
    text = ('Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc access_token="zzz123" '
            "sid 00D5g000000abcd!AQ0AQE.xyz client_secret=hunter22 " + "x" * 500)
    out = scrub(text)
    for leaked in ("eyJhbGci", "zzz123", "AQ0AQE", "hunter22"):
        assert leaked not in out
    assert len(out) <= 300


def test_error_body_shapes_and_retry_after_dates() -> None:
    assert parse_error_body(400, '{"error":{"code":"0x1","message":"m"}}') == ("0x1", "m")
    assert parse_error_body(400, '[{"errorCode":"INVALID_FIELD","message":"m"}]') == ("INVALID_FIELD", "m")
    assert parse_error_body(400, '{"error":"invalid_request","error_codes":[90002],"error_description":"d"}') == (
        "AADSTS90002", "d")
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412470.0) == 10.0
    assert retry_after_seconds("soon") is None


# ------------------------------------------------------------------------------------------ cursors


class Pos(BaseModel):
    phase: str
    next: str | None = None


class FailingPublisher:
    async def send_all(self, messages: Any) -> None:
        raise InfrastructureUnavailable("broker down")


class OkPublisher:
    def __init__(self) -> None:
        self.sent: list[OutMessage] = []

    async def send_all(self, messages: Any) -> None:
        self.sent.extend(messages)


async def test_checkpoint_saved_only_after_the_broker_acknowledged() -> None:
    store = FakeCursorStore()
    cp = Checkpoint(store, Pos, "t", "c", "account")
    assert await cp.load() is None
    with pytest.raises(InfrastructureUnavailable):
        await publish_then_checkpoint(FailingPublisher(), [OutMessage("x", b"1")], cp, Pos(phase="initial", next="n2"))
    assert store.saves == []
    pub = OkPublisher()
    await publish_then_checkpoint(pub, [OutMessage("x", b"1")], cp, Pos(phase="initial", next="n2"))
    assert store.saves == [("t", "c", "account", {"phase": "initial", "next": "n2"})]
    assert await cp.load() == Pos(phase="initial", next="n2")


async def test_a_corrupt_stored_cursor_is_a_config_error() -> None:
    store = FakeCursorStore()
    await store.save("t", "c", "account", {"nope": 1})
    with pytest.raises(ConfigError, match="not a valid Pos"):
        await Checkpoint(store, Pos, "t", "c", "account").load()


async def test_published_versions_filter_re_reads() -> None:
    pv = FakePublishedVersions()
    assert await pv.unseen("t", "c", "s", [("a", "1"), ("b", "1")]) == {"a", "b"}
    await pv.record("t", "c", "s", [("a", "1"), ("b", "1")])
    assert await pv.unseen("t", "c", "s", [("a", "1"), ("b", "2")]) == {"b"}
    assert await pv.unseen("t", "other", "s", [("a", "1")]) == {"a"}


# ------------------------------------------------------------------------------------- dead letters


async def test_source_letters_carry_consumer_headers_and_the_refetch() -> None:
    settings = FlashSettings(topic_prefix="p.")
    sink = FakeSourceDeadLetters(settings, "ce-poller")
    ref = Refetch("dynamics-ce", "acme", "ce-main", "salesorder", "42", {"entity_set": "salesorders", "key": "42"})
    await sink.send([SourceLetter(ref, "p.raw.dynamics-ce.salesorder.v1", Poison("bad row"),
                                  body='{"access_token":"abc123"}')])
    msg = sink.messages[0]
    assert msg.topic == "p.dlq.ce-poller.v1"
    headers = dict(msg.headers)
    for h in ("x-flash-consumer", "x-flash-error-class", "x-flash-error-message", "x-flash-stage",
              "x-flash-original-topic", "x-flash-attempts", "x-flash-first-failure-at", "x-flash-last-failure-at"):
        assert h in headers
    assert headers["x-flash-stage"] == b"fetch"
    assert headers["x-flash-original-topic"] == b"p.raw.dynamics-ce.salesorder.v1"
    assert refetch_of(msg.headers) == ref
    assert b"abc123" not in msg.value
    assert json.loads(msg.value)["refetch"] == {"entity_set": "salesorders", "key": "42"}


def test_verify_report_lines() -> None:
    r = VerifyReport("c")
    r.add("auth", True, "token issued")
    r.add("read salesorder", False, "403", "grant prvReadSalesOrder")
    assert not r.ok
    assert r.lines() == ["ok    auth: token issued", "FAIL  read salesorder: 403 -> fix: grant prvReadSalesOrder"]
    assert r.summary() == "read salesorder: 403 -> fix: grant prvReadSalesOrder"


async def test_one_governor_per_credential_shared_by_its_connections() -> None:
    from ce_poller.limiter import budget_for, reset_budgets

    reset_budgets()
    a = budget_for("https://login.microsoftonline.com/T", "App-1")
    b = budget_for("https://login.microsoftonline.com/t/", "app-1")  # another connection, same app registration
    c = budget_for("https://login.microsoftonline.com/t", "app-2")
    assert a is b and a is not c
    a.pause(5)
    assert b.throttled == 1, "a 429 seen by one connection holds every connection of the credential"
    reset_budgets()
    assert budget_for("https://login.microsoftonline.com/t", "app-1") is not a


async def test_stream_hands_over_a_2xx_body_after_retrying_failures_before_it() -> None:
    script = Script(_err(503, "", "busy", **{"Retry-After": "1"}), httpx.Response(200, content=b"a,b\n1,2\n"))
    client, slept = _client(script)
    async with client.stream("GET", "jobs/1/results", what="results") as resp:
        body = b"".join([chunk async for chunk in resp.aiter_bytes()])
    assert body == b"a,b\n1,2\n" and slept == [1.0]
    client, _ = _client(Script(_err(404, "0x80040217", "gone")))
    with pytest.raises(Poison, match="the record is gone"):
        async with client.stream("GET", "jobs/2/results", what="results"):
            pass
