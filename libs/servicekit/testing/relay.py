"""A two-hop pipe on the real runtime, for the exactly-once tests and ``bench/pipe.py``.

hop 1 consumes ``relay.in``, records an effect row and emits a derived event on ``relay.mid``;
hop 2 consumes ``relay.mid`` and records an effect row. A product whose sku starts with ``POISON`` is
rejected as poison by hop 1 until its source_id is listed in ``relay_fixes``. Run it as a process with
``python -m servicekit.testing.relay`` (settings from ``FLASH_`` variables; ``FLASH_RELAY_HOPS=hop1``
runs one hop only, so the hops can run as separate processes like real services).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from canonical.envelope import make_event_id
from canonical.events import ProductUpserted
from servicekit.consumer import Delivery, PipeConsumer, UnitOfWork
from servicekit.db import Migrations
from servicekit.errors import Poison
from servicekit.logging import configure_logging
from servicekit.runtime import Infra, Service, run_loop, run_services
from servicekit.settings import FlashSettings

__all__ = ["IN_TOPIC", "MID_TOPIC", "RELAY", "hop1", "hop2"]

IN_TOPIC = "relay.in"
MID_TOPIC = "relay.mid"
MIGRATIONS = Migrations("relay", "servicekit.testing")


async def hop1(batch: Sequence[Delivery[ProductUpserted]], uow: UnitOfWork) -> None:
    poison = [d.event for d in batch if (d.event.product.sku or "").startswith("POISON")]
    if poison:
        fixed = {
            (r["tenant_id"], r["source_id"])
            for r in await uow.conn.fetch(
                "SELECT tenant_id, source_id FROM relay_fixes WHERE source_id = ANY($1::text[])",
                [e.source_id for e in poison],
            )
        }
        for e in poison:
            if (e.tenant_id, e.source_id) not in fixed:
                raise Poison(f"product {e.source_id}: sku {e.product.sku} is not sellable (no fix recorded)")
    await uow.conn.copy_records_to_table(
        "relay_effects",
        records=[("hop1", d.event.tenant_id, d.event.source_id) for d in batch],
        columns=["hop", "tenant_id", "source_id"],
    )
    for d in batch:
        # A derived event: new entity, so a new deterministic id; the correlation id carries through.
        e = d.event
        event_id = make_event_id(e.event_type, e.tenant_id, e.connection_id, e.source, "relay-mid", e.source_id,
                                 e.source_version)
        uow.emit(MID_TOPIC, e.model_copy(update={"entity": "relay-mid", "event_id": event_id}))


async def hop2(batch: Sequence[Delivery[ProductUpserted]], uow: UnitOfWork) -> None:
    await uow.conn.copy_records_to_table(
        "relay_effects",
        records=[("hop2", d.event.tenant_id, d.event.source_id) for d in batch],
        columns=["hop", "tenant_id", "source_id"],
    )


def _consumers(infra: Infra) -> list[PipeConsumer[ProductUpserted]]:
    common = {"settings": infra.settings, "pool": infra.pool, "publisher": infra.publisher}
    accepted = frozenset({"product.upserted"})
    hops = os.environ.get("FLASH_RELAY_HOPS", "hop1,hop2").split(",")
    consumers = {
        "hop1": lambda: PipeConsumer("relay-hop1", [IN_TOPIC], hop1, accepted=accepted, **common),  # type: ignore[arg-type]
        "hop2": lambda: PipeConsumer("relay-hop2", [MID_TOPIC], hop2, accepted=accepted, **common),  # type: ignore[arg-type]
    }
    return [consumers[h.strip()]() for h in hops]


RELAY = Service("relay", migrations=[MIGRATIONS], consumers=_consumers, extra_topics=[IN_TOPIC, MID_TOPIC])


def main() -> int:
    settings = FlashSettings()
    configure_logging(settings.log_level, settings.log_format, service="relay")
    return run_loop(run_services([RELAY], settings), settings)


if __name__ == "__main__":
    raise SystemExit(main())
