"""Contract: the Dataverse simulator answers the documentation's own requests in the documented shape.

Each case replays the request of a fixture under ``tests/fixtures/vendor-docs/dynamics-ce`` (written from
Microsoft's documentation, never recorded from the simulator) against the simulator and compares the shape
of the answer with the documented one: status, ``Preference-Applied``, the keys of the body and of each row,
the context suffix, page and delta links, tombstones, error codes and messages. The data differs (the
simulator holds its own seeded rows); the shape may not.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from test_dataverse import ORG, Env, running_env

from sandbox.dataverse import mutations as mut

pytestmark = pytest.mark.integration

DOCS = Path(__file__).parents[1] / "fixtures" / "vendor-docs" / "dynamics-ce"


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with running_env() as e:
        yield e


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DOCS / name).read_text(encoding="utf-8"), parse_float=Decimal)
    return data


def local(env: Env, url: str) -> str:
    """A documented URL on the simulator's org (documented v9.0 examples are asked on v9.2)."""
    return re.sub(r"^\[Organization URI\]/api/data/v9\.\d/", env.api, url)


async def ask(env: Env, name: str) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    doc = fixture(name)
    req = doc["request"]
    resp = await env.client.get(local(env, req["url"]),
                                headers={**env.headers(req["headers"].get("Prefer"))})
    body = json.loads(resp.text, parse_float=Decimal)
    return doc["response"], resp, body


def context_suffix(ctx: str) -> str:
    return ctx.split("$metadata", 1)[1]


def row_keys(body: dict[str, Any]) -> list[set[str]]:
    return [set(r) for r in body["value"]]


@pytest.mark.parametrize("name", ["accounts-formatted-values.json", "accounts-select-revenue.json",
                                  "service-document.json", "entitydefinitions-filter-logicalname.json"])
async def test_documented_queries_answer_in_the_documented_shape(env: Env, name: str) -> None:
    want, resp, body = await ask(env, name)
    documented = want["body"]
    assert resp.status_code == want["status"], resp.text
    if "Preference-Applied" in want["headers"]:
        assert resp.headers.get("Preference-Applied") == want["headers"]["Preference-Applied"]
    assert resp.headers["OData-Version"] == "4.0"
    assert set(body) == set(documented)
    assert context_suffix(body["@odata.context"]) == context_suffix(documented["@odata.context"])
    assert body["value"], "the simulator answered no rows"
    assert all(keys == row_keys(documented)[0] for keys in row_keys(body)), (row_keys(body)[0], documented)
    if name == "accounts-formatted-values.json":
        row = body["value"][0]
        assert row["statecode@OData.Community.Display.V1.FormattedValue"] == {0: "Active", 1: "Inactive"}[
            row["statecode"]]


async def test_documented_paging(env: Env) -> None:
    want, resp, body = await ask(env, "contacts-page-1.json")
    assert resp.status_code == 200 and resp.headers["Preference-Applied"] == "odata.maxpagesize=2"
    assert set(body) == set(want["body"]) and len(body["value"]) == 2
    assert row_keys(body) == row_keys(want["body"])
    cookie = re.compile(r'\$select=fullname&\$skiptoken=<cookie pagenumber="(\d+)" pagingcookie="[^"]*" '
                        r'istracking="False" />$')
    for link in (body["@odata.nextLink"], want["body"]["@odata.nextLink"]):
        m = cookie.search(urllib.parse.unquote(link))
        assert m and m.group(1) == "2", link
    second = await env.client.get(body["@odata.nextLink"], headers=env.headers("odata.maxpagesize=2"))
    page2 = json.loads(second.text)
    want2 = fixture("contacts-page-2.json")["response"]["body"]
    assert set(page2) == set(want2) and row_keys(page2) == row_keys(want2)
    assert {r["contactid"] for r in page2["value"]}.isdisjoint({r["contactid"] for r in body["value"]})
    m = cookie.search(urllib.parse.unquote(page2["@odata.nextLink"]))
    assert m and m.group(1) == "3"


async def test_documented_change_tracking(env: Env) -> None:
    want, resp, body = await ask(env, "accounts-track-changes-initial.json")
    assert resp.status_code == 200 and resp.headers["Preference-Applied"] == "odata.track-changes"
    assert set(body) == set(want["body"])
    assert context_suffix(body["@odata.context"]) == context_suffix(want["body"]["@odata.context"])
    assert all(keys == row_keys(want["body"])[0] for keys in row_keys(body))
    token = re.compile(r"\$select=name,accountnumber,telephone1,fax&\$deltatoken=\d+!\d\d/\d\d/\d{4} "
                       r"\d\d:\d\d:\d\d$")
    assert token.search(urllib.parse.unquote(want["body"]["@odata.deltaLink"]))
    assert token.search(urllib.parse.unquote(body["@odata.deltaLink"])), body["@odata.deltaLink"]

    org = env.state.orgs[ORG]
    accounts = org.tables["accounts"]
    keep, gone = sorted(accounts.rows)[:2]
    mut.update(org, "accounts", keep, {"telephone1": "555000"})
    mut.delete(org, "accounts", gone)
    delta = await env.client.get(body["@odata.deltaLink"], headers=env.headers())
    got = json.loads(delta.text)
    documented = fixture("accounts-delta.json")["response"]["body"]
    assert set(got) == set(documented)
    assert got["@odata.context"].endswith("/$delta") and documented["@odata.context"].endswith("/$delta")
    upserts = [r for r in got["value"] if "reason" not in r]
    tombs = [r for r in got["value"] if "reason" in r]
    doc_tomb = documented["value"][1]
    assert [set(t) for t in tombs] == [set(doc_tomb)] and tombs[0]["id"] == gone and tombs[0]["reason"] == "deleted"
    assert context_suffix(tombs[0]["@odata.context"]) == context_suffix(doc_tomb["@odata.context"])
    assert [r["accountid"] for r in upserts] == [keep]
    assert set(upserts[0]) == set(want["body"]["value"][0])


@pytest.mark.parametrize("name", ["error-resource-not-found.json", "error-unknown-property.json"])
async def test_documented_errors(env: Env, name: str) -> None:
    want, resp, body = await ask(env, name)
    assert resp.status_code == want["status"]
    assert body == want["body"]


@pytest.mark.parametrize("name", sorted(p.name for p in DOCS.glob("salesorder-*.json")))
async def test_salesorder_shape_covers_the_documented_one(env: Env, name: str) -> None:
    """Orders written from the entity reference: every documented key is served; extra keys are only formatted
    values the simulator adds for the other requested columns."""
    want, resp, body = await ask(env, name)
    assert resp.status_code == 200, resp.text
    assert context_suffix(body["@odata.context"]) == context_suffix(want["body"]["@odata.context"])
    documented = set(want["body"]["value"][0])
    for row in body["value"][:20]:
        keys = set(row)
        assert documented <= keys, documented - keys
        assert all(k.endswith("@OData.Community.Display.V1.FormattedValue") for k in keys - documented)


@pytest.mark.parametrize(("url", "status"), [
    ("accounts?$skip=1", 400), ("accounts?$search=contoso", 400), ("accounts?$format=json", 400),
    ("accounts?$Select=name", 400), ("accounts?$unknown=1", 400),
    ("accounts?$apply=aggregate($count as n)", 501), ("accounts?$expand=primarycontactid", 501),
])
async def test_unsupported_query_options_are_refused_not_ignored(env: Env, url: str, status: int) -> None:
    resp = await env.get(url)
    assert resp.status_code == status, resp.text
    assert set(resp.json()["error"]) == {"code", "message"}


async def test_batch_is_refused_as_documented_in_vendor_facts(env: Env) -> None:
    resp = await env.client.post(env.api + "$batch", headers={**env.headers(),
                                 "Content-Type": "multipart/mixed; boundary=batch_1"}, content=b"--batch_1--")
    assert resp.status_code == 501 and "$batch" in resp.json()["error"]["message"]


async def test_entity_definitions_select_filter_key_and_attributes(env: Env) -> None:
    one = await env.get_json("EntityDefinitions(LogicalName='account')?$select=LogicalName,EntitySetName")
    assert set(one) == {"@odata.context", "MetadataId", "LogicalName", "EntitySetName"}
    assert one["@odata.context"].endswith("$metadata#EntityDefinitions(LogicalName,EntitySetName)/$entity")
    assert one["EntitySetName"] == "accounts"
    tracked = await env.get_json("EntityDefinitions?$select=LogicalName&$filter=ChangeTrackingEnabled eq true")
    names = {r["LogicalName"] for r in tracked["value"]}
    assert "salesorder" in names and "organization" not in names
    owned = await env.get_json(
        "EntityDefinitions?$select=LogicalName&$filter=OwnershipType eq Microsoft.Dynamics.CRM.OwnershipTypes"
        "'OrganizationOwned'")
    assert {r["LogicalName"] for r in owned["value"]} == {"transactioncurrency", "organization"}
    exp = await env.get_json("EntityDefinitions(LogicalName='msdyn_rma')?$select=LogicalName"
                             "&$expand=Attributes($select=LogicalName;$filter=AttributeType eq "
                             "Microsoft.Dynamics.CRM.AttributeTypeCode'Picklist')")
    assert {a["LogicalName"] for a in exp["Attributes"]} == {"msdyn_systemstatus"}
    attrs = await env.get_json(f"EntityDefinitions({one['MetadataId']})/Attributes?$select=LogicalName"
                               "&$filter=LogicalName eq 'accountnumber'")
    assert [a["LogicalName"] for a in attrs["value"]] == ["accountnumber"]
    bad = await env.get("EntityDefinitions?$select=NoSuchProperty")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "0x0"
    complex_path = await env.get("EntityDefinitions?$filter=CanChangeTrackingBeEnabled/Value eq false")
    assert complex_path.status_code == 501
    missing = await env.get("EntityDefinitions(LogicalName='nosuchtable')")
    assert missing.status_code == 404


async def test_metadata_document(env: Env) -> None:
    plain = await env.get("$metadata")
    assert plain.status_code == 200 and plain.headers["Content-Type"].startswith("application/xml")
    assert '<EntitySet Name="salesorders" EntityType="Microsoft.Dynamics.CRM.salesorder">' in plain.text
    assert "Org.OData.Capabilities.V1.ChangeTracking" not in plain.text
    annotated = await env.get("$metadata?annotations=true")
    assert "Org.OData.Capabilities.V1.ChangeTracking" in annotated.text
