"""The resolver's parked sweep: an order parked while another resolver copy linked its customer (each
transaction blind to the other's uncommitted write) is released by the sweep, once, with its member.
The scale-out test (tests/e2e/test_scale_out.py, 3 resolver copies) stranded 25 of 1,104 orders so."""

from __future__ import annotations

from test_points_engine import Pipe, customer, order, prepare, program, ret

from canonical.topics import RESOLVED_ORDER, RESOLVED_RETURN
from points.cli import set_program
from resolver.app import sweep_stranded_once
from servicekit.outbox import TaskOutbox
from servicekit.runtime import Infra


async def test_an_order_stranded_by_concurrent_copies_is_released(infra: Infra) -> None:
    await prepare(infra)
    pipe = Pipe(infra)
    t = "acme"
    await set_program(infra.pool, program(t))
    await pipe.feed([customer(t, "c1", email="ann@example.com"), order(t, "o1", "c1")])
    assert pipe.published(RESOLVED_ORDER) == []  # no member yet: parked
    # what the other copy committed meanwhile: the customer now resolves, but nothing released o1
    await infra.pool.execute("""INSERT INTO members (tenant_id, member_id, email_normalized, relinked)
                                VALUES ($1, 'm1', 'ann@example.com', true)""", t)
    await infra.pool.execute("""UPDATE customer_links SET member_id = 'm1', match = 'email'
                                WHERE tenant_id = $1 AND customer_source_id = 'c1'""", t)
    await infra.pool.execute("UPDATE parked SET parked_at = now() - interval '1 minute'")
    box = TaskOutbox("resolver-sweep", infra.pool, pipe.pub, infra.settings)  # type: ignore[arg-type]
    await sweep_stranded_once(box)
    released = pipe.published(RESOLVED_ORDER)
    assert [(e.source_id, e.member_id) for e in released] == [("o1", "m1")]
    assert await infra.pool.fetchval("SELECT count(*) FROM parked WHERE tenant_id = $1", t) == 0
    await sweep_stranded_once(box)  # nothing left: nothing more
    assert len(pipe.published(RESOLVED_ORDER)) == 1
    await pipe.pump()
    assert await infra.pool.fetchval("SELECT count(*) FROM ledger WHERE tenant_id = $1", t) == 1


async def test_a_return_stranded_by_concurrent_copies_is_released(infra: Infra) -> None:
    await prepare(infra)
    pipe = Pipe(infra)
    t = "acme"
    await set_program(infra.pool, program(t))
    await pipe.feed([ret(t, "r5", order_id="o5", amount="100")])  # its order is not resolved yet: parked
    assert pipe.published(RESOLVED_RETURN) == []
    # another copy resolved o5 meanwhile, blind to the return parked here
    await infra.pool.execute("""INSERT INTO order_members (tenant_id, order_source_id, order_number, member_id)
                                VALUES ($1, 'o5', 'N-o5', 'm1')""", t)
    await infra.pool.execute("UPDATE parked SET parked_at = now() - interval '1 minute'")
    box = TaskOutbox("resolver-sweep", infra.pool, pipe.pub, infra.settings)  # type: ignore[arg-type]
    await sweep_stranded_once(box)
    assert [(e.source_id, e.member_id) for e in pipe.published(RESOLVED_RETURN)] == [("r5", "m1")]
    assert await infra.pool.fetchval("SELECT count(*) FROM parked WHERE tenant_id = $1", t) == 0
