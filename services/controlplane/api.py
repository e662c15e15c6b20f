"""The control plane over HTTP (aiohttp): the API under ``/api/v1``, the Data Sources page under ``/``.

Served by ``flash serve`` (and by ``flash demo``). Every ``/api/v1`` request needs
``Authorization: Bearer <token>`` (``flash tokens create``); the answers are the ones the CLI gives,
from the same :mod:`controlplane.ops`. ``openapi.json`` (checked in beside this module, served at
``/api/v1/openapi.json``) describes every route. Errors are JSON ``{"error": {"status", "message"}}`` with
the message saying what to do. ``/metrics``, ``/healthz`` and ``/readyz`` are served without a token.

Logging: one line per request (method, route, status, actor, correlation id); never a body, header or
query string, so a credential sent in a request can never reach a log line.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import asyncpg
from aiohttp import web

from controlplane.ops import Invalid, NotFound, Operations, OpError
from controlplane.tokens import Actor, authenticate
from servicekit.errors import ConfigError, FlashError
from servicekit.kafka import KafkaPublisher
from servicekit.logging import get_logger
from servicekit.metrics import metrics_routes
from servicekit.settings import FlashSettings

__all__ = ["build_app", "serve_api"]

log = get_logger(__name__)

OPS: web.AppKey[Operations] = web.AppKey("ops", Operations)
ACTOR: web.RequestKey[Actor] = web.RequestKey("actor", Actor)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}}, status=status)


def _ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda v: json.dumps(v, default=str))


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    correlation = request.headers.get("X-Correlation-Id") or uuid.uuid4().hex
    actor: Actor | None = None
    status = 500
    try:
        if request.path.startswith("/api/") and request.path != "/api/v1/openapi.json":
            auth = request.headers.get("Authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else None
            actor = await authenticate(request.app[OPS].pool, token)
            if actor is None:
                status = 401
                resp: web.StreamResponse = _error(401, "a valid API token is required: send 'Authorization: Bearer "
                                                  "<token>' (create one with `flash tokens create`)")
                return resp
            request[ACTOR] = actor
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            resp = _error(exc.status, exc.reason or "request refused")
        except OpError as exc:
            resp = _error(exc.status, str(exc))
        except (ConfigError, FlashError) as exc:
            resp = _error(400, str(exc))
        except json.JSONDecodeError:
            resp = _error(400, "the request body is not valid JSON")
        except asyncpg.PostgresError as exc:
            log.error("database error", error_class=type(exc).__name__,  # noqa: TRY400 - no traceback: it may
                      correlation_id=correlation)  # quote parameters (credentials) of the failed statement
            resp = _error(503, f"the database refused the request; try again (correlation id {correlation})")
        status = resp.status
        resp.headers["X-Correlation-Id"] = correlation
        return resp
    except Exception as exc:  # noqa: BLE001 - the caller gets a 500 with a correlation id, never a traceback
        log.error("request failed", error_class=type(exc).__name__, correlation_id=correlation,  # noqa: TRY400
                  route=request.match_info.route.resource.canonical if request.match_info.route.resource else None)
        return _error(500, f"internal error (correlation id {correlation})")
    finally:
        if not request.path.startswith("/static/") and request.path not in ("/metrics", "/healthz", "/readyz"):
            resource = request.match_info.route.resource
            log.info("request", method=request.method, route=resource.canonical if resource else request.path,
                     status=status, actor=actor.name if actor else None,
                     tenant_id=actor.tenant_id if actor else None, correlation_id=correlation)


def _actor(request: web.Request) -> Actor:
    return request[ACTOR]


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = json.loads(await request.text() or "{}")
    if not isinstance(data, dict):
        raise Invalid("the request body must be a JSON object")
    return data


def _int(value: str | None, name: str, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise Invalid(f"{name} must be a whole number") from None


# ------------------------------------------------------------------------------------------- routes

routes = web.RouteTableDef()
CONN = "/api/v1/connections/{tenant_id}/{connection_id}"


@routes.get("/api/v1/me")
async def me(request: web.Request) -> web.Response:
    a = _actor(request)
    return _ok({"actor": a.name, "tenant_id": a.tenant_id, "role": "operator" if a.is_operator else "tenant"})


@routes.get("/api/v1/connections")
async def list_connections(request: web.Request) -> web.Response:
    return _ok(await request.app[OPS].list_connections(_actor(request), source=request.query.get("source") or None))


@routes.post("/api/v1/connections")
async def create_connection(request: web.Request) -> web.Response:
    return _ok(await request.app[OPS].create_connection(_actor(request), await _body(request)), 201)


@routes.get(CONN)
async def get_connection(request: web.Request) -> web.Response:
    m = request.match_info
    return _ok(await request.app[OPS].get_connection(_actor(request), m["tenant_id"], m["connection_id"]))


@routes.patch(CONN)
async def update_connection(request: web.Request) -> web.Response:
    m = request.match_info
    return _ok(await request.app[OPS].update_connection(_actor(request), m["tenant_id"], m["connection_id"],
                                                        await _body(request)))


@routes.delete(CONN)
async def delete_connection(request: web.Request) -> web.Response:
    m = request.match_info
    return _ok(await request.app[OPS].delete_connection(_actor(request), m["tenant_id"], m["connection_id"]))


@routes.post(CONN + "/verify")
async def verify(request: web.Request) -> web.Response:
    m = request.match_info
    return _ok(await request.app[OPS].verify(_actor(request), m["tenant_id"], m["connection_id"]))


@routes.post(CONN + "/dry-run")
async def dry_run(request: web.Request) -> web.Response:
    m = request.match_info
    limit = _int(request.query.get("limit"), "limit", 5)
    return _ok(await request.app[OPS].dry_run(_actor(request), m["tenant_id"], m["connection_id"], limit=limit))


@routes.post(CONN + "/{action:go-live|pause|resume}")
async def set_state(request: web.Request) -> web.Response:
    m = request.match_info
    return _ok(await request.app[OPS].set_state(_actor(request), m["tenant_id"], m["connection_id"], m["action"]))


@routes.get(CONN + "/status")
async def status(request: web.Request) -> web.Response:
    m = request.match_info
    return _ok(await request.app[OPS].status(_actor(request), m["tenant_id"], m["connection_id"]))


@routes.get("/api/v1/dead-letters")
async def list_dead_letters(request: web.Request) -> web.Response:
    q = dict(request.query)
    limit = _int(q.pop("limit", None), "limit", 100)
    return _ok(await request.app[OPS].list_dead_letters(_actor(request), q, limit=limit))


@routes.get("/api/v1/dead-letters/depth")
async def dlq_depth(request: web.Request) -> web.Response:
    return _ok(await request.app[OPS].depth(_actor(request)))


@routes.get("/api/v1/dead-letters/{letter_id:\\d+}")
async def show_dead_letter(request: web.Request) -> web.Response:
    return _ok(await request.app[OPS].show_dead_letter(_actor(request), int(request.match_info["letter_id"])))


@routes.post("/api/v1/dead-letters/{letter_id:\\d+}/replay")
async def replay_one(request: web.Request) -> web.Response:
    letter_id = int(request.match_info["letter_id"])
    return _ok(await request.app[OPS].replay(_actor(request), {"ids": [letter_id]}))


@routes.post("/api/v1/dead-letters/replay")
async def replay(request: web.Request) -> web.Response:
    body = await _body(request)
    dry = bool(body.pop("dry_run", False))
    return _ok(await request.app[OPS].replay(_actor(request), body, dry_run=dry))


@routes.get("/api/v1/audit")
async def audit(request: web.Request) -> web.Response:
    return _ok(await request.app[OPS].audit(_actor(request), limit=_int(request.query.get("limit"), "limit", 100)))


@routes.get("/api/v1/openapi.json")
async def openapi(_: web.Request) -> web.Response:
    return web.Response(text=openapi_text(), content_type="application/json")


def openapi_text() -> str:
    return resources.files("controlplane").joinpath("openapi.json").read_text()


def _web_file(name: str) -> Handler:
    kinds = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

    async def serve(_: web.Request) -> web.Response:
        path = resources.files("controlplane").joinpath("web").joinpath(name)
        if not path.is_file():
            raise NotFound(f"no page {name}")
        ext = name[name.rfind("."):]
        return web.Response(body=path.read_bytes(), content_type=kinds.get(ext, "application/octet-stream"),
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                     "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"})

    return serve


def build_app(ops: Operations) -> web.Application:
    """The API + page application over ``ops`` (its pool, settings and, for replays, publisher)."""
    app = web.Application(middlewares=[_middleware], client_max_size=1024 * 1024)
    app[OPS] = ops
    app.add_routes(routes)
    app.router.add_get("/", _web_file("index.html"))
    for name in ("app.js", "app.css"):
        app.router.add_get(f"/static/{name}", _web_file(name))

    async def ready() -> str | None:
        await ops.pool.fetchval("SELECT 1")
        return None

    metrics_routes(app, ready)
    return app


@contextlib.asynccontextmanager
async def serve_api(
    pool: asyncpg.Pool, settings: FlashSettings, publisher: KafkaPublisher | None, *, host: str = "127.0.0.1",
    port: int = 8080,
) -> AsyncIterator[str]:
    """Serve the API and page on ``host:port`` while the block runs; yields the base URL."""
    runner = web.AppRunner(build_app(Operations(pool, settings, publisher)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = getattr(site, "_server", None)
    bound = int(server.sockets[0].getsockname()[1]) if server is not None and server.sockets else port
    url = f"http://{host}:{bound}"
    log.info("control plane serving", url=url)
    try:
        yield url
    finally:
        await runner.cleanup()
