"""The F&O simulator driven by an OData v4 client nobody here wrote (python-odata), as a user would point it at
an environment: it must reflect the entity sets from our ``$metadata``, type the enum and decimal fields, filter,
and follow the server-driven paging to every row of the default company (and none of the others)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
import requests
from odata import ODataService  # type: ignore[import-untyped]

from sandbox.fo import Environment, FOState, build_app, seed_environment
from sandbox.server import RunningSandbox, serve

pytestmark = pytest.mark.integration


@dataclass
class Running:
    env: Environment
    running: RunningSandbox
    session: requests.Session


@pytest.fixture
def sim() -> Iterator[Running]:
    state = FOState()
    env, app = state.add_environment("contoso", companies=("usmf", "demf"), page_size=4)
    seed_environment(env, orders=12)
    ready: list[RunningSandbox] = []
    stop = threading.Event()

    def run() -> None:  # python-odata is synchronous: the simulator gets its own loop and thread
        async def main() -> None:
            async with serve(build_app(state)) as running:
                ready.append(running)
                while not stop.is_set():
                    await asyncio.sleep(0.05)

        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not ready and time.monotonic() < deadline:
        time.sleep(0.05)
    running = ready[0]
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the simulator's CA
    session.verify = str(running.tls.ca_path)
    token = session.post(f"{running.base_url}/{app.tenant_id}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": app.client_id, "client_secret": app.client_secret,
        "scope": f"{running.base_url}/envs/contoso/.default"}).json()["access_token"]
    session.headers["Authorization"] = f"Bearer {token}"
    try:
        yield Running(env, running, session)
    finally:
        stop.set()
        thread.join(10)


def test_python_odata_reads_metadata_filters_and_pages(sim: Running) -> None:
    svc: Any = ODataService(f"{sim.running.base_url}/envs/contoso/data/", reflect_entities=True,
                            session=sim.session)
    assert {"SalesOrderHeadersV2", "SalesOrderLines", "CustomersV3", "ReleasedProductsV2", "ReturnOrderHeaders",
            "ReturnOrderLines", "SalesInvoiceHeadersV2"} <= set(svc.entities)
    Lines = svc.entities["SalesOrderLines"]
    got = [(ln.dataAreaId, ln.InventoryLotId) for ln in svc.query(Lines)]
    want = sorted(k for k in sim.env.rows["SalesOrderLines"] if k[0] == "usmf")
    assert sorted(got) == want and len(want) > 4  # several pages of 4, default company only
    Orders = svc.entities["SalesOrderHeadersV2"]
    number = next(n for (c, n) in sim.env.rows["SalesOrderHeadersV2"] if c == "usmf")
    (order,) = svc.query(Orders).filter(Orders.SalesOrderNumber == number).all()
    head = sim.env.header("usmf", number)
    # The client types enum fields from the $metadata EnumType: the wire value is the member name.
    assert type(order.SalesOrderStatus).__name__ == "SalesStatus"
    assert order.SalesOrderStatus.name == head["SalesOrderStatus"]
    assert order.AreTotalsCalculated.name == head["AreTotalsCalculated"]
    assert Decimal(str(order.OrderTotalAmount)) == head["OrderTotalAmount"]
    assert svc.query(Orders).filter(Orders.dataAreaId == "demf").all() == []  # another company: cross-company only
