"""Every FLASH_ variable the README names is one the code reads (a FlashSettings field, or a variable a
module reads from the environment by name), and every FlashSettings field is in the README's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from servicekit.settings import FlashSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
#: variables the README names that configure the test harness, not a service
NOT_SETTINGS = {"FLASH_TEST_KAFKA_BOOTSTRAP", "FLASH_TEST_DATABASE_URL", "FLASH_TEST_USE_CONTAINERS"}
_VAR = re.compile(r"\bFLASH_[A-Z0-9_]*[A-Z0-9]\b")


def setting_names() -> set[str]:
    return {f"FLASH_{name.upper()}" for name in FlashSettings.model_fields}


def read_by_code() -> set[str]:
    """FlashSettings fields, plus FLASH_ names the code reads from the environment directly (quoted names
    in libs/ and services/: ``os.environ.get("FLASH_...")``, ``SANDBOX_ENV = "FLASH_..."``)."""
    quoted = re.compile(r"[\"'](FLASH_[A-Z0-9_]*[A-Z0-9])[\"']")
    direct = {m for folder in ("libs", "services") for path in (ROOT / folder).rglob("*.py")
              for m in quoted.findall(path.read_text())}
    return setting_names() | direct


def test_every_flash_variable_in_the_readme_is_read_by_the_code() -> None:
    named = set(_VAR.findall((ROOT / "README.md").read_text())) - NOT_SETTINGS
    assert named - read_by_code() == set()


def test_every_setting_is_in_the_readme_settings_table() -> None:
    table = "\n".join(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `FLASH_"))
    documented = set(re.findall(r"`(FLASH_[A-Z0-9_]+)`", table))
    assert setting_names() - documented == set()
