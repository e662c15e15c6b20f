"""The aiohttp app: Entra ID v2.0 token endpoint and each environment's OData service (``/data/``).

Addressing (``base`` = the server's ``https://host:port``): environment URL ``{base}/envs/{env}`` (stands for
``https://<env>.operations.dynamics.com``), OData root ``{env_url}/data/``, token scope ``{env_url}/.default``,
Entra authority ``{base}/{tenant_id}``.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import urllib.parse
import uuid
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from aiohttp import web

from sandbox.fo.odata import ODataError, parse_key, parse_query
from sandbox.fo.schema import ENTITIES, csdl
from sandbox.fo.state import Environment, FOState

__all__ = ["STATE_KEY", "build_app"]

STATE_KEY = web.AppKey("fo_state", FOState)

INDEXED: dict[str, tuple[str, ...]] = {
    "SalesOrderHeadersV2": ("SalesOrderNumber",),
    "SalesOrderLines": ("SalesOrderNumber", "InventoryLotId"),
    "ReturnOrderHeaders": ("ReturnOrderNumber",),
    "ReturnOrderLines": ("ReturnOrderNumber",),
    "SalesInvoiceHeadersV2": ("SalesOrderNumber",),
}
"""Fields whose values never change once a row is written: ``eq`` lookups on them use an index (the result
is the same as a scan; only faster, so benches measure the connector rather than the simulator)."""


def _default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return float(v)
    raise TypeError(type(v).__name__)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(body, default=_default), status=status, headers=headers,
                        content_type="application/json", charset="utf-8")


def _odata_error(err: ODataError) -> web.Response:
    body = {"error": {"code": "", "message": "An error has occurred.",
                      "innererror": {"message": err.message, "type": "Microsoft.OData.ODataException",
                                     "stacktrace": ""}}}
    return _json(body, err.status, err.headers)


def _entra_error(status: int, error: str, code: int, description: str) -> web.Response:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
    return _json({
        "error": error,
        "error_description": f"AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {corr} "
                             f"Timestamp: {stamp}",
        "error_codes": [code], "timestamp": stamp, "trace_id": trace, "correlation_id": corr,
    }, status)


async def openid_configuration(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    tenant = request.match_info["tenant"].lower()
    if tenant not in state.tenants:
        return _entra_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
    origin = str(request.url.origin())
    b = f"{origin}/{tenant}"
    return _json({
        "token_endpoint": f"{b}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": f"{b}/discovery/v2.0/keys", "issuer": f"{b}/v2.0",
        "authorization_endpoint": f"{b}/oauth2/v2.0/authorize",
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "subject_types_supported": ["pairwise"], "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "tenant_region_scope": "NA", "cloud_instance_name": "microsoftonline.com",
    })


async def jwks(request: web.Request) -> web.Response:
    return _json({"keys": []})


async def token(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    tenant = request.match_info["tenant"].lower()
    state.stats["token.requests"] += 1
    if tenant not in state.tenants:
        return _entra_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
    form = await request.post()
    grant = str(form.get("grant_type", ""))
    client_id = str(form.get("client_id", "")).lower()
    secret = str(form.get("client_secret", ""))
    if grant != "client_credentials":
        return _entra_error(400, "unsupported_grant_type", 70003,
                            f"The app requested an unsupported grant type '{grant}'.")
    app = state.tenants[tenant].get(client_id)
    if app is None:
        return _entra_error(400, "unauthorized_client", 700016,
                            f"Application with identifier '{client_id}' was not found in the directory '{tenant}'.")
    if secret != app.client_secret:
        return _entra_error(401, "invalid_client", 7000215, "Invalid client secret provided.")
    scopes = [s for s in str(form.get("scope", "")).split() if s not in {"openid", "profile", "offline_access"}]
    if len(scopes) != 1 or not scopes[0].endswith("/.default"):
        return _entra_error(400, "invalid_scope", 1002012,
                            f"The provided value for scope {' '.join(scopes)} is not valid. Client credential "
                            "flows must have a scope value with /.default suffixed to the resource identifier.")
    resource = scopes[0][: -len("/.default")].rstrip("/")
    origin = str(request.url.origin())
    env = None
    for e in state.environments.values():
        if resource.lower() == f"{origin}/envs/{e.name}".lower() and e.tenant_id == tenant:
            env = e
    if env is None:
        return _entra_error(400, "invalid_resource", 500011,
                            f"The resource principal named {resource} was not found in the tenant named {tenant}.")
    tok = state.issue_token(tenant, client_id, env.name)
    return _json({"token_type": "Bearer", "expires_in": int(state.token_lifetime),
                  "ext_expires_in": int(state.token_lifetime), "access_token": tok.value})


def _authorize(request: web.Request, env: Environment) -> str:
    state = request.app[STATE_KEY]
    auth = request.headers.get("Authorization", "")
    tok = state.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
    import time

    if tok is None or tok.environment != env.name or tok.expires_at < time.time():
        raise ODataError(401, "Unauthorized", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    retry = state.throttled(tok.client_id)
    if retry is not None:
        state.stats["throttled"] += 1
        raise ODataError(429, "Too many requests", {"Retry-After": str(retry)})
    return tok.client_id


def _env(request: web.Request) -> Environment:
    env = request.app[STATE_KEY].environments.get(request.match_info["env"])
    if env is None:
        raise web.HTTPNotFound()
    return env


def _etag(row: dict[str, Any]) -> str:
    blob = json.dumps(row, sort_keys=True, default=_default).encode()
    return 'W/"' + hashlib.sha1(blob, usedforsecurity=False).hexdigest()[:20] + '"'


def _public(row: dict[str, Any], select: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"@odata.etag": _etag(row)}
    for k, v in row.items():
        if k.startswith("_") or (select is not None and k not in select):
            continue
        out[k] = v
    return out


async def service_document(request: web.Request) -> web.Response:
    env = _env(request)
    try:
        _authorize(request, env)
    except ODataError as exc:
        return _odata_error(exc)
    root = f"{request.url.origin()}/envs/{env.name}/data"
    return _json({"@odata.context": f"{root}/$metadata",
                  "value": [{"name": es, "kind": "EntitySet", "url": es} for es in ENTITIES]})


async def metadata(request: web.Request) -> web.Response:
    env = _env(request)
    try:
        _authorize(request, env)
    except ODataError as exc:
        return _odata_error(exc)
    request.app[STATE_KEY].stats["metadata"] += 1
    return web.Response(text=csdl(env.variant), content_type="application/xml", charset="utf-8")


def _order_key(name: str, row: dict[str, Any]) -> tuple[bool, str]:
    return (row.get(name) is None, str(row.get(name)))


def _maxpagesize(request: web.Request) -> int | None:
    for part in request.headers.get("Prefer", "").split(","):
        k, _, v = part.strip().partition("=")
        if k.strip().lower() == "odata.maxpagesize" and v.strip().isdigit():
            return int(v.strip())
    return None


async def entity(request: web.Request) -> web.Response:
    env = _env(request)
    try:
        _authorize(request, env)
        return _entity(request, env)
    except ODataError as exc:
        return _odata_error(exc)


def _entity(request: web.Request, env: Environment) -> web.Response:
    state = request.app[STATE_KEY]
    path = request.match_info["path"]
    set_name, _, key_text = path.partition("(")
    if set_name not in ENTITIES:
        raise ODataError(404, f"No HTTP resource was found that matches the request URI '{request.url}'.")
    types = env.variant.fields(set_name)
    params = dict(request.query.items())
    q = parse_query(params, types)
    state.stats[f"get.{set_name}"] += 1
    rows = env.rows[set_name]
    root = f"{request.url.origin()}/envs/{env.name}/data"
    if key_text:
        if not key_text.endswith(")"):
            raise ODataError(400, f"Bad Request - Error in query syntax: '{path}'.")
        key_fields = env.variant.key(set_name)
        key = parse_key(key_text[:-1], key_fields)
        row = rows.get(tuple(key[k] for k in key_fields))
        if row is None or (not q.cross_company and row["dataAreaId"].lower() != env.default_company):
            raise ODataError(404, f"Resource not found for the segment '{set_name}'.")
        return _json({"@odata.context": f"{root}/$metadata#{set_name}/$entity", **_public(row, q.select)})
    candidates: Iterable[dict[str, Any]] = rows.values()
    if q.predicate is not None:
        for standard in INDEXED.get(set_name, ()):
            name = env.variant.name(set_name, standard)
            if name in q.predicate.hint:
                idx = env.index(set_name, name)
                candidates = [r for v in sorted(q.predicate.hint[name]) for r in idx.get(v, ())]
                break
    selected = [r for r in candidates
                if (q.cross_company or r["dataAreaId"].lower() == env.default_company)
                and (q.predicate is None or q.predicate(r))]
    key_fields = env.variant.key(set_name)
    selected.sort(key=lambda r: tuple(str(r.get(k)) for k in key_fields))
    for name, desc in reversed(q.orderby):
        selected.sort(key=functools.partial(_order_key, name), reverse=desc)
    total = len(selected)
    start = q.skip
    end = total if q.top is None else min(total, start + q.top)
    page = min(env.page_size, _maxpagesize(request) or env.page_size)
    chunk = selected[start:min(end, start + page)]
    body: dict[str, Any] = {"@odata.context": f"{root}/$metadata#{set_name}"}
    if q.count:
        body["@odata.count"] = total
    body["value"] = [_public(r, q.select) for r in chunk]
    if start + page < end:
        nxt = {k: v for k, v in params.items() if k not in ("$skip", "$skiptoken")}
        if q.top is not None:
            nxt["$top"] = str(end - (start + page))
        nxt["$skip"] = str(start + page)
        body["@odata.nextLink"] = f"{root}/{set_name}?" + urllib.parse.urlencode(nxt, safe="$,'=:()/ ").replace(
            " ", "%20")
    return _json(body)


async def not_supported(request: web.Request) -> web.Response:
    return _odata_error(ODataError(405, f"The HTTP method '{request.method}' is not supported by this simulator "
                                        "(it serves reads only)."))


def build_app(state: FOState) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = state
    app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", openid_configuration)
    app.router.add_get("/{tenant}/discovery/v2.0/keys", jwks)
    app.router.add_post("/{tenant}/oauth2/v2.0/token", token)
    app.router.add_get("/envs/{env}/data", service_document)
    app.router.add_get("/envs/{env}/data/", service_document)
    app.router.add_get("/envs/{env}/data/$metadata", metadata)
    app.router.add_get("/envs/{env}/data/{path:.+}", entity)
    app.router.add_route("*", "/envs/{env}/data/{path:.+}", not_supported)
    return app
