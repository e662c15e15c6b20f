"""``python -m sandbox.dataverse --port 8443 --seed 1 --orders 1000``: run the simulator for a demo."""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid

from sandbox.dataverse import DataverseState, build_app, seed_org
from sandbox.dataverse.mutations import random_mutation
from sandbox.server import serve


async def _run(args: argparse.Namespace) -> None:
    state = DataverseState()
    for i, name in enumerate(args.org or ["contoso"]):
        # Same seed, same credentials: a demo script can be written once.
        rng = random.Random(f"{args.seed}:{name}")
        state.add_org(
            name,
            tenant_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            client_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            client_secret="".join(
                rng.choice("abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789~._-") for _ in range(40)
            ),
        )
        summary = seed_org(
            state,
            name,
            customers=args.customers,
            products=args.products,
            orders=args.orders,
            seed=args.seed + i,
        )
        print(f"seeded {name}: {summary.to_json()}", flush=True)
    async with serve(build_app(state), host=args.host, port=args.port) as running:
        base = running.base_url
        print(f"base URL: {base}")
        print(f"CA bundle: {running.tls.ca_path}")
        for org in state.orgs.values():
            print(f"org {org.name}: org_url={base}/orgs/{org.name} api={base}/orgs/{org.name}/api/data/v9.2/")
            print(f"  authority={base}/{org.tenant_id} scope={base}/orgs/{org.name}/.default")
            for app in state.credentials(org.name):
                print(f"  client_id={app.client_id} client_secret={app.client_secret}")
        print(f"control API: {base}/_sandbox/orgs", flush=True)
        rng = random.Random(args.seed)
        while True:
            await asyncio.sleep(args.mutate_every if args.mutate_every > 0 else 3600)
            if args.mutate_every > 0:
                for org in state.orgs.values():
                    random_mutation(org, rng)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--orders", type=int, default=1000)
    p.add_argument("--customers", type=int, default=300)
    p.add_argument("--products", type=int, default=60)
    p.add_argument("--org", action="append", help="org name (repeatable); default contoso")
    p.add_argument(
        "--mutate-every", type=float, default=0.0, help="seconds between random mutations (0 = off)"
    )
    args = p.parse_args()
    try:
        asyncio.run(_run(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
