"""Every FLASH_ variable the README names is one the code reads (a FlashSettings field), and every
FlashSettings field is in the README's settings table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from servicekit.settings import FlashSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
#: variables the README names that are not service settings (the test harness's own)
NOT_SETTINGS = {"FLASH_TEST_KAFKA_BOOTSTRAP", "FLASH_TEST_DATABASE_URL", "FLASH_TEST_USE_CONTAINERS"}


def setting_names() -> set[str]:
    return {f"FLASH_{name.upper()}" for name in FlashSettings.model_fields}


def test_every_flash_variable_in_the_readme_is_read_by_the_code() -> None:
    named = set(re.findall(r"\bFLASH_[A-Z0-9_]*[A-Z0-9]\b", (ROOT / "README.md").read_text())) - NOT_SETTINGS
    assert named - setting_names() == set()


def test_every_setting_is_in_the_readme_settings_table() -> None:
    table = "\n".join(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `FLASH_"))
    documented = set(re.findall(r"`(FLASH_[A-Z0-9_]+)`", table))
    assert setting_names() - documented == set()
