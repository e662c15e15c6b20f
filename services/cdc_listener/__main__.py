"""``python -m cdc_listener``: stream Salesforce change events until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio

from cdc_listener.app import SERVICE
from servicekit.logging import configure_logging
from servicekit.runtime import run_services
from servicekit.settings import FlashSettings


def main() -> int:
    settings = FlashSettings()
    configure_logging(settings.log_level, settings.log_format, service=SERVICE.name)
    return asyncio.run(run_services([SERVICE], settings))


if __name__ == "__main__":
    raise SystemExit(main())
