"""Settings -> Data Sources in headless Chromium (Debian's ``chromium`` driven by Playwright): sign in with
a tenant token, add a Dynamics 365 CE sandbox connection, verify it, preview it (match rate, points that
would be earned), take it live, watch orders land, then inspect and replay a dead letter. Screenshots go
to ``test-artifacts/browser/`` (gitignored).

When Chromium or Playwright is missing the test is skipped and says why (``make setup`` installs both:
Chromium with apt-get when run as root, Playwright from PyPI); it never passes without a browser.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from canonical.events import MemberData
from ce_poller.app import MIGRATIONS as CE_MIGRATIONS
from connectorkit import MIGRATIONS as KIT_MIGRATIONS
from controlplane.api import serve_api
from controlplane.cli import load_service
from controlplane.ops import CONTROLPLANE_MIGRATIONS
from controlplane.tokens import create_token
from points.app import build_service
from points.cli import set_program
from points.rules import Program
from resolver.cli import import_members
from sandbox.dataverse import DataverseState, build_app, ground_truth, seed_org
from sandbox.dataverse.mutations import update
from sandbox.server import serve
from servicekit.db import migrate
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra, run_services

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts" / "browser"
PROGRAM: dict[str, Any] = {"tenant_id": "acme", "base_currency": "USD", "points_per_unit": "1", "rounding": "floor",
                           "exchange_rates": {"EUR": "0.9", "USD": "1"}}  # no GBP rate: GBP orders carry their own
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = os.environ.get("FLASH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no Chromium on this machine: `make setup` installs Debian's chromium with apt-get when run as "
                    "root (or set FLASH_CHROMIUM to a Chromium binary)")
    return path


async def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.mark.timeout(240)
async def test_add_verify_preview_go_live_and_replay_in_the_browser(
    infra: Infra, monkeypatch: pytest.MonkeyPatch
) -> None:
    executable = chromium_path()
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        pytest.skip("Playwright is not installed: `make setup` installs the dev dependencies (pip install -e .[dev])")
    monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "1")  # the sandbox runs on loopback
    services = [load_service("ce-poller"), load_service("normalizer"), load_service("resolver"),
                build_service(mature_interval_s=0.5)]
    await migrate(infra.pool, [KIT_MIGRATIONS, CE_MIGRATIONS, *(m for s in services for m in s.migrations),
                               CONTROLPLANE_MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings)

    state = DataverseState()
    state.add_org("contoso")
    seed_org(state, "contoso", customers=12, products=8, orders=25, seed=3)
    org, app = state.orgs["contoso"], state.credentials("contoso")[0]
    truths = list(ground_truth(org))
    members = {t.customer_id: MemberData(member_id=f"M-{i}", external_id=t.accountnumber or None,
                                         email=t.customer_email)
               for i, t in enumerate(truths) if t.customer_email or t.accountnumber}
    await import_members(infra.pool, "acme", list(members.values())[: max(1, 2 * len(members) // 3)])
    await set_program(infra.pool, Program.model_validate(PROGRAM))
    token, _ = await create_token(infra.pool, tenant_id="acme", name="browser test", created_by="test")
    operator, _ = await create_token(infra.pool, tenant_id=None, name="browser operator", created_by="test")
    stop = asyncio.Event()
    async with serve(build_app(state)) as sb, serve_api(infra.pool, infra.settings, infra.publisher, port=0) as url:
        pipe = asyncio.create_task(run_services(services, infra.settings, stop=stop, infra=infra))
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(url + "/")
                await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
                await page.get_by_label("API token").fill(token)
                await page.keyboard.press("Enter")  # the form submits from the keyboard
                await expect(page.get_by_text("Tenant acme")).to_be_visible()
                await expect(page.get_by_text("No connections yet")).to_be_visible()
                await shot(page, "01-signed-in")

                # An endpoint the policy refuses: the page shows the API's own words.
                await page.get_by_role("button", name="Add a connection").click()
                add = page.locator("#add-form")
                await add.get_by_label("Connection name").fill("ce-main")
                await add.get_by_label("Source", exact=True).select_option("dynamics-ce")
                await add.get_by_label("Endpoint").fill("https://10.0.0.7")
                await add.get_by_label("Directory (tenant) ID").fill(org.tenant_id)
                await add.get_by_label("Application (client) ID").fill(app.client_id)
                await add.get_by_label("Client secret").fill("the-secret-id-not-its-value")  # a classic slip
                monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "0")
                await page.get_by_role("button", name="Save as draft").click()
                await expect(page.get_by_role("alert")).to_contain_text("an IP address is not a vendor endpoint")
                await expect(add.get_by_label("Endpoint")).to_be_focused()  # where the fix goes
                await expect(add.get_by_label("Endpoint")).to_have_attribute("aria-invalid", "true")
                await shot(page, "02-endpoint-refused")
                monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "1")

                await add.get_by_label("Endpoint").fill(f"{sb.base_url}/orgs/contoso")
                await add.get_by_label("Settings").fill(json.dumps({
                    "authority": f"{sb.base_url}/{org.tenant_id}", "ca_bundle": str(sb.tls.ca_path),
                    "page_size": 10, "poll_interval_s": 1}))
                unlabeled = await page.evaluate("""() => [...document.querySelectorAll('input,select,textarea')]
                    .filter(e => e.offsetParent !== null && !(e.labels && e.labels.length)).map(e => e.id)""")
                assert unlabeled == [], f"every visible control has a label: {unlabeled}"
                await shot(page, "03-add-form")
                await page.get_by_role("button", name="Save as draft").click()
                await expect(page.locator("#detail-title")).to_have_text("ce-main")
                assert await add.get_by_label("Client secret").count() == 0 or \
                    await add.get_by_label("Client secret").input_value() == "", "the secret leaves the page"

                # The wrong secret: verify fails and says what to fix, in the connector's words.
                await page.get_by_role("button", name="Verify").click()
                await expect(page.get_by_role("heading", name="Verification failed")).to_be_visible(timeout=30_000)
                await expect(page.locator("#verify-result")).to_contain_text(
                    "put the secret's Value (not its Secret ID)")
                await expect(page.locator("#detail-sub .badge")).to_have_text("Failed")
                await shot(page, "04-verify-failed")
                # Edit: the right secret (the others are kept); the connection is a draft again.
                await page.get_by_role("button", name="Edit").click()
                edit = page.locator("#edit")
                await expect(edit.get_by_label("Client secret")).to_have_attribute(
                    "placeholder", "stored (leave empty to keep)")
                await edit.get_by_label("Client secret").fill(app.client_secret)
                await page.get_by_role("button", name="Save changes").click()
                await expect(page.get_by_role("status")).to_contain_text("it is a draft again")
                await expect(page.locator("#detail-sub .badge")).to_have_text("Draft")

                await page.get_by_role("button", name="Verify").click()
                await expect(page.get_by_text("Verified: the connection works")).to_be_visible(timeout=30_000)
                await shot(page, "05-verified")
                await page.get_by_role("button", name="Preview (dry-run)").click()
                await expect(page.get_by_text("Preview: what would land")).to_be_visible(timeout=30_000)
                await expect(page.get_by_role("table", name="Records per entity")).to_contain_text("salesorder")
                await expect(page.get_by_role("table", name="Events it becomes")).to_contain_text(
                    "canonical.order.v1")
                await expect(page.get_by_role("table", name="Points per sample order")).to_be_visible()
                rate = page.locator(".stat", has_text="Member match rate").locator("dd")
                await expect(rate).to_have_text(re.compile(r"^\d+%$"))
                earned = page.locator(".stat", has_text="Points that would be earned").locator("dd")
                await expect(earned).not_to_have_text(re.compile(r"^(—|0)$"))
                await shot(page, "06-preview")
                assert await infra.pool.fetchval("SELECT count(*) FROM cursors") == 0, "the preview wrote nothing"

                await page.get_by_role("button", name="Go live").click()
                await expect(page.locator("#detail-sub .badge")).to_have_text("Live")
                # Orders land: the status (refreshed every 3 s) shows them.
                deadline = time.monotonic() + 120
                landed = 0
                while time.monotonic() < deadline:
                    landed = await infra.pool.fetchval(
                        "SELECT count(*) FROM orders WHERE tenant_id = 'acme' AND connection_id = 'ce-main' AND known")
                    if landed >= 5:
                        break
                    await asyncio.sleep(1)
                assert landed >= 5, "orders landed through the pipe"
                stat = page.locator(".stat", has_text="Orders landed").locator("dd")
                await expect(stat).not_to_have_text("0", timeout=15_000)
                await expect(page.locator(".stat", has_text="Points in ledger").locator("dd")).not_to_have_text(
                    "0", timeout=30_000)
                await shot(page, "07-live-orders-landed")

                # A GBP order changes at the vendor and arrives without an exchange rate; the program has
                # none for GBP either, so the points engine dead-letters it with the reason. The operator adds
                # the rate to the program and replays it from the page: it lands, once.
                gbp = next(t.salesorderid for t in truths if t.currency == "GBP")
                org.table("salesorders").write_stored(gbp.lower(), {"exchangerate": None})  # read-only in the API
                update(org, "salesorders", gbp, {"description": "rate lost upstream"})
                letter = None
                deadline = time.monotonic() + 60
                while letter is None and time.monotonic() < deadline:
                    letter = await infra.pool.fetchval(
                        """SELECT min(id) FROM dead_letters WHERE tenant_id = 'acme' AND consumer = 'points'
                           AND replayed_at IS NULL""")
                    await asyncio.sleep(0.5)
                assert letter is not None, "the GBP order without a rate is dead-lettered"
                body = json.loads(await infra.pool.fetchval(
                    "SELECT convert_from(value, 'UTF8') FROM dead_letters WHERE id = $1", letter))
                order_id, version = body["source_id"], body["source_version"]
                assert order_id.lower() == gbp.lower()
                await page.get_by_role("button", name="Refresh dead letters").click()
                await page.get_by_role("button", name=f"Inspect dead letter {letter}").click()
                await expect(page.locator("#letter")).to_contain_text("has no rate for GBP")
                await shot(page, "08-dead-letter")
                await set_program(infra.pool, Program.model_validate({**PROGRAM, "exchange_rates": {
                    **PROGRAM["exchange_rates"], "GBP": "0.8"}}))  # the fix (flash points program set)
                await page.get_by_role("button", name=f"Replay #{letter}").click()
                await expect(page.get_by_role("status")).to_contain_text(f"Replayed dead letter {letter}")
                await shot(page, "09-replayed")
                landed = None
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and landed != version:
                    landed = await infra.pool.fetchval(
                        "SELECT version FROM orders WHERE tenant_id = 'acme' AND order_source_id = $1", order_id)
                    await asyncio.sleep(0.5)
                assert landed == version, "after the fix the replayed version of the order landed"
                await asyncio.sleep(1)
                entries = await infra.pool.fetch(
                    "SELECT kind, source_version, count(*) AS n FROM ledger WHERE order_source_id = $1 "
                    "GROUP BY kind, source_version", order_id)
                assert all(r["n"] == 1 for r in entries), f"no ledger entry twice: {entries}"
                assert await infra.pool.fetchval(
                    "SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL AND consumer = 'points'") == 0, \
                    "not dead-lettered again"
                row = await infra.pool.fetchrow("SELECT replayed_at, replay_id FROM dead_letters WHERE id = $1", letter)
                assert row["replayed_at"] is not None
                who = await infra.pool.fetchval("SELECT requested_by FROM dlq_replays WHERE id = $1", row["replay_id"])
                assert who.startswith("token:"), who
                # An operator sees every tenant and picks the tenant when adding; a wrong token is refused.
                await page.get_by_role("button", name="Sign out").click()
                await page.get_by_label("API token").fill(token[:-2] + "xx")
                await page.get_by_role("button", name="Sign in").click()
                await expect(page.get_by_role("alert")).to_contain_text("a valid API token is required")
                await page.get_by_label("API token").fill(operator)
                await page.get_by_role("button", name="Sign in").click()
                await expect(page.get_by_text("Operator (all tenants)")).to_be_visible()
                await page.get_by_role("button", name="Add a connection").click()
                await expect(page.get_by_label("Tenant", exact=True)).to_be_visible()
                await page.keyboard.press("Escape")
                await expect(page.locator("#add")).to_be_hidden()
                await shot(page, "10-operator")
                assert errors == [], errors
                await browser.close()
        finally:
            stop.set()
            await pipe
