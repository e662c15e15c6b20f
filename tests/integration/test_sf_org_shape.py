"""Org shape (issue 11): a Salesforce org without multicurrency and without person accounts is verified and
polled with SOQL built from its describe (the fixed field lists made it answer INVALID_FIELD); the own-ID
field is selected; an org that changes after verify (a field removed) is learned again on INVALID_FIELD."""

from __future__ import annotations

import json

import pytest
from test_sf_support import add_connection, read_raw

from normalizer.mappers.salesforce import map_record
from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import serve
from servicekit.connections import PgCursorStore
from servicekit.errors import ConfigError
from servicekit.runtime import Infra
from sf_poller import control
from sf_poller.sync import ConnectionSync
from sfconnect.client import build_client, http_client
from sfconnect.config import parse_connection
from sfconnect.shape import SHAPE_ENTITY, load_shape

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
async def test_plain_org_verifies_and_polls_with_its_own_fields(infra: Infra) -> None:
    state = SalesforceState(cometd_timeout_s=1.0)
    org = state.add_org("plain", multi_currency=False, person_accounts=False)
    seed_org(state, org, orders=40, person_accounts=0, seed=5)
    async with serve(build_app(state)) as sb:
        base = {"ca_bundle": str(sb.tls.ca_path), "objects": ["Account", "Contact", "Order", "OrderItem"],
                "cdc": False, "bulk_threshold": 0}
        # without default_currency the verify says what to set (a single-currency org carries no currency)
        conn = await add_connection(infra, "t1", "plain", sb.base_url, org.client_id, org.client_secret, base)
        with pytest.raises(ConfigError, match="default_currency"):
            await control.verify(conn, infra.settings)
        settings = {**base, "default_currency": "EUR", "external_id_field": "AccountNumber"}
        conn = await add_connection(infra, "t1", "plain", sb.base_url, org.client_id, org.client_secret, settings)
        report = await control.verify(conn, infra.settings)
        assert report["org_shape"] == {"multi_currency": False, "person_accounts": False, "order_management": False}
        cursors = PgCursorStore(infra.pool)
        shape = await load_shape(cursors, "t1", "plain")
        assert shape is not None and "CurrencyIsoCode" not in shape.fields["Order"]

        cc = parse_connection(conn)
        async with http_client(cc) as http:
            sync = ConnectionSync(cc, build_client(cc, http, infra), infra.publisher, cursors, infra.settings)
            await sync.ensure_shape()
            await sync.run_cycle()  # the old fixed field lists answered INVALID_FIELD here
        records = await read_raw(infra, ("Account", "Order"))
        orders = [r for r in records if r.entity == "Order" and r.op == "upsert"]
        assert len({r.source_id for r in orders}) == sum(1 for _ in org.records("Order"))
        for r in orders:
            assert "CurrencyIsoCode" not in json.loads(r.payload)
            result = map_record(r, settings)
            if not result.dead:
                (_, ev), = result.events
                assert getattr(ev, "order", None) is None or ev.order.currency == "EUR"
        accounts = [r for r in records if r.entity == "Account"]
        assert accounts and all("AccountNumber" in json.loads(r.payload) for r in accounts), "own-ID selected"


@pytest.mark.timeout(120)
async def test_invalid_field_after_verify_learns_the_shape_again(infra: Infra) -> None:
    state = SalesforceState(cometd_timeout_s=1.0)
    org = state.add_org("drift")
    seed_org(state, org, orders=10, seed=6)
    async with serve(build_app(state)) as sb:
        settings = {"ca_bundle": str(sb.tls.ca_path), "objects": ["Order"], "cdc": False, "bulk_threshold": 0,
                    "default_currency": "EUR"}
        conn = await add_connection(infra, "t2", "drift", sb.base_url, org.client_id, org.client_secret, settings)
        await control.verify(conn, infra.settings)
        cursors = PgCursorStore(infra.pool)
        before = await cursors.load("t2", "drift", SHAPE_ENTITY)
        assert before is not None and before["multi_currency"] is True
        org.multi_currency = False  # the admin turned it off after verify (simulated)
        cc = parse_connection(conn)
        async with http_client(cc) as http:
            sync = ConnectionSync(cc, build_client(cc, http, infra), infra.publisher, cursors, infra.settings)
            await sync.ensure_shape()
            res = await sync.run_cycle()
        assert res["Order"].upserts + res["Order"].deletes == len(org.tables["Order"])
        after = await cursors.load("t2", "drift", SHAPE_ENTITY)
        assert after is not None and after["multi_currency"] is False
