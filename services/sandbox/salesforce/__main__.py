"""Run the simulator: ``python -m sandbox.salesforce --port 8444 --seed 1 --orders 1000``.

Options: ``--mode order_management``, ``--org NAME`` (repeatable), ``--live SECONDS`` (random mutations).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random

from sandbox.salesforce.app import build_app
from sandbox.salesforce.domain import random_mutations
from sandbox.salesforce.seed import seed_org
from sandbox.salesforce.state import SalesforceState
from sandbox.server import serve


async def _main(args: argparse.Namespace) -> None:
    state = SalesforceState()
    names = args.org or ["acme"]
    for i, name in enumerate(names):
        org = state.add_org(name, mode=args.mode)
        seed_org(
            state,
            org,
            orders=args.orders,
            accounts=args.accounts,
            person_accounts=args.accounts,
            contacts=args.accounts * 2,
            products=args.products,
            seed=args.seed + i,
        )
    async with serve(build_app(state), host=args.host, port=args.port) as sb:
        print(f"Salesforce sandbox on {sb.base_url} (CA bundle: {sb.tls.ca_path})")
        print(f"  login.salesforce.com stand-in (rejects client credentials): {sb.url_for_host('localhost')}")
        print(f"  control API: {sb.base_url}/_sandbox/stats")
        for org in state.orgs.values():
            print(f"  org {org.name} ({org.mode}) id={org.org_id}")
            print(f"    token URL:    {sb.base_url}/services/oauth2/token")
            print(f"    client_id:    {org.client_id}")
            print(f"    client_secret:{org.client_secret}")
            print(f"    instance_url: {sb.base_url}/orgs/{org.name}", flush=True)
        rng = random.Random(args.seed)
        while True:
            await asyncio.sleep(args.live or 3600)
            if args.live:
                for org in state.orgs.values():
                    random_mutations(org, 1, rng)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.salesforce", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=8444)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--products", type=int, default=40)
    parser.add_argument("--mode", choices=["order", "order_management"], default="order")
    parser.add_argument("--org", action="append", help="org name (repeatable); default acme")
    parser.add_argument("--live", type=float, default=0.0, help="seconds between random mutations (0: none)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
