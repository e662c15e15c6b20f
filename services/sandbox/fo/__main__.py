"""``python -m sandbox.fo --port 8444 --orders 200``: run the F&O simulator for a demo (one environment)."""

from __future__ import annotations

import argparse
import asyncio

from sandbox.fo import FOState, build_app, seed_environment
from sandbox.server import serve


async def _run(args: argparse.Namespace) -> None:
    state = FOState(seed=args.seed)
    env, app = state.add_environment(args.env, companies=tuple(args.company or ["usmf"]))
    seed_environment(env, orders=args.orders, seed=args.seed)
    async with serve(build_app(state), host=args.host, port=args.port) as running:
        base = running.base_url
        print(f"environment URL: {base}/envs/{env.name}  OData: {base}/envs/{env.name}/data/")
        print(f"authority: {base}/{env.tenant_id}  scope: {base}/envs/{env.name}/.default")
        print(f"client_id={app.client_id} client_secret={app.client_secret}")
        print(f"CA bundle: {running.tls.ca_path}", flush=True)
        await asyncio.Event().wait()  # until Ctrl-C


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8444)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--orders", type=int, default=200)
    p.add_argument("--env", default="contoso")
    p.add_argument("--company", action="append", help="company (dataAreaId), repeatable; default usmf")
    args = p.parse_args()
    try:
        asyncio.run(_run(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
