"""FLASH_EVENT_LOOP picks the loop long-running processes run on."""

from __future__ import annotations

import asyncio

import pytest

from servicekit.errors import ConfigError
from servicekit.runtime import run_loop
from servicekit.settings import FlashSettings


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


@pytest.mark.parametrize(("choice", "expected"), [("asyncio", "asyncio"), ("uvloop", "uvloop"), ("auto", "uvloop")])
def test_the_setting_picks_the_loop(choice: str, expected: str) -> None:
    assert run_loop(loop_module(), FlashSettings(event_loop=choice)) == expected  # type: ignore[arg-type]


def test_asking_for_uvloop_without_it_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # as on a platform without it
    assert run_loop(loop_module(), FlashSettings(event_loop="auto")) == "asyncio"
    with pytest.raises(ConfigError, match="FLASH_EVENT_LOOP=asyncio"):
        run_loop(loop_module(), FlashSettings(event_loop="uvloop"))
