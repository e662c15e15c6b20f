"""The registry: connectors, simulators and dry-run stages come from entry points; without the sandbox
package the `flash` CLI still runs and the demo says what is missing."""

from __future__ import annotations

import contextlib

import pytest

from connectorkit.registry import connector_sources, load_connector, load_preview, load_sandboxes
from servicekit.errors import ConfigError

SANDBOX_MODULES = ("sandbox", "sandbox.dataverse", "sandbox.dataverse.demo", "sandbox.salesforce",
                   "sandbox.salesforce.demo", "sandbox.fo", "sandbox.fo.demo", "sandbox.server")


def test_installed_entry_points() -> None:
    assert "dynamics-ce" in connector_sources()
    assert load_connector("dynamics-ce").source == "dynamics-ce"
    assert {"dataverse", "salesforce"} <= set(load_sandboxes())
    assert all(load_preview(name) is not None for name in ("normalize", "resolve", "points"))
    with pytest.raises(ConfigError, match="no connector for source 'nope' is installed"):
        load_connector("nope")


async def test_without_the_sandbox_package_flash_runs_and_the_demo_says_why(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in SANDBOX_MODULES:
        monkeypatch.setitem(__import__("sys").modules, name, None)  # as if the package were not installed
    assert load_sandboxes() == {}
    from controlplane.cli import main
    from controlplane.demo import _setup_sandboxes

    with pytest.raises(SystemExit) as exit_:
        main(["connections", "--help"])
    assert exit_.value.code == 0
    assert "verify" in capsys.readouterr().out
    async with contextlib.AsyncExitStack() as stack:
        with pytest.raises(ConfigError, match="no simulators are installed"):
            await _setup_sandboxes(stack, 10)
