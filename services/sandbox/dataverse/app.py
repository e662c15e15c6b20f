"""The aiohttp app: Entra ID v2.0 token endpoint, Dataverse Web API and the ``/_sandbox`` control API."""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import json
import re
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from aiohttp import web

from sandbox.dataverse import mutations
from sandbox.dataverse.metadata import csdl, entity_definitions, not_implemented
from sandbox.dataverse.odata import (
    Annotations,
    Renderer,
    build_query,
    cookie_values,
    decode_cookie,
    decode_deltatoken,
    encode_cookie,
    encode_deltatoken,
    key_from_cookie,
    parse_prefer,
    parse_query,
    query_error,
    quote_lower,
    sort_key,
)
from sandbox.dataverse.schema import ENTITIES
from sandbox.dataverse.seed import ground_truth, seed_org
from sandbox.dataverse.state import DataverseState, Fault, FaultKind, Token
from sandbox.dataverse.store import DataverseError, Org, Row, Table

__all__ = ["build_app"]

API = "/api/data/v9.2"
MAX_PAGE = 5000
STATE_KEY = web.AppKey("dataverse_state", DataverseState)
FAULT_DELAY = web.RequestKey("dataverse_fault_delay", float)
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_PATH = re.compile(r"^(?P<set>[A-Za-z_]+)(?:\((?P<key>[^)]*)\))?(?:/(?P<sub>\$count))?$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(body),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


def _odata(text: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


def _error(err: DataverseError) -> web.Response:
    return _json({"error": {"code": err.code, "message": err.message}}, err.status, err.headers)


# -- Entra ID ------------------------------------------------------------------------------------------------


def _entra_error(status: int, error: str, code: int, description: str) -> web.Response:
    now = dt.datetime.now(dt.UTC)
    trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    return _json(
        {
            "error": error,
            "error_description": f"AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {corr} "
            f"Timestamp: {stamp}",
            "error_codes": [code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": corr,
            "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        },
        status,
    )


def _origin(request: web.Request) -> str:
    return str(request.url.origin())


async def openid_configuration(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    tenant = request.match_info["tenant"].lower()
    if tenant not in state.tenants:
        return _entra_error(
            400,
            "invalid_tenant",
            90002,
            f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
            "into the correct cloud.",
        )
    b = f"{_origin(request)}/{tenant}"
    return _json(
        {
            "token_endpoint": f"{b}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{_origin(request)}/{tenant}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{b}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{_origin(request)}/oidc/userinfo",
            "authorization_endpoint": f"{b}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{b}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{b}/oauth2/v2.0/logout",
            "claims_supported": [
                "sub",
                "iss",
                "cloud_instance_name",
                "cloud_instance_host_name",
                "cloud_graph_host_name",
                "msgraph_host",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "acr",
                "nonce",
                "preferred_username",
                "name",
                "tid",
                "ver",
                "at_hash",
                "c_hash",
                "email",
            ],
            "kerberos_endpoint": f"{b}/kerberos",
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }
    )


async def jwks(request: web.Request) -> web.Response:
    return _json({"keys": []})


async def token(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    tenant = request.match_info["tenant"].lower()
    state.stats["token.requests"] += 1
    if tenant not in state.tenants:
        return _entra_error(
            400,
            "invalid_request",
            90002,
            f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
            "into the correct cloud.",
        )
    form = await request.post()
    grant = str(form.get("grant_type", ""))
    client_id = str(form.get("client_id", "")).lower()
    secret = str(form.get("client_secret", ""))
    if not client_id and request.headers.get("Authorization", "").startswith("Basic "):
        import base64  # client_secret_basic

        raw = base64.b64decode(request.headers["Authorization"][6:]).decode()
        client_id, _, secret = (urllib.parse.unquote(x) for x in raw.partition(":"))
        client_id = client_id.lower()
    if grant != "client_credentials":
        return _entra_error(
            400, "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant}'."
        )
    app = state.tenants[tenant].get(client_id)
    if app is None:
        return _entra_error(
            400,
            "unauthorized_client",
            700016,
            f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. "
            "This can happen if the application has not been installed by the administrator of the tenant "
            "or consented to by any "
            "user in the tenant. You may have sent your authentication request to the wrong tenant.",
        )
    if not secret:
        return _entra_error(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )
    if secret != app.client_secret:
        return _entra_error(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the "
            "client secret "
            f"value, not the client secret ID, for a secret added to app '{client_id}'.",
        )
    scopes = [
        s for s in str(form.get("scope", "")).split() if s not in {"openid", "profile", "offline_access"}
    ]
    if len(scopes) != 1 or not scopes[0].endswith("/.default"):
        return _entra_error(
            400,
            "invalid_scope",
            1002012,
            f"The provided value for scope {' '.join(scopes)} is not valid. "
            "Client credential flows must have a "
            "scope value with /.default suffixed to the resource identifier (application ID URI).",
        )
    resource = scopes[0][: -len("/.default")].rstrip("/")
    org = _org_for_resource(state, tenant, resource)
    if org is None:
        return _entra_error(
            400,
            "invalid_resource",
            500011,
            f"The resource principal named {resource} was not found in the tenant named {tenant}. "
            "This can happen if the application has not been installed by the administrator of the tenant "
            "or consented to by any "
            "user in the tenant. You might have sent your authentication request to the wrong tenant.",
        )
    tok = state.issue_token(tenant, client_id, org, resource)
    lifetime = int(state.token_lifetime)
    return _json(
        {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": tok.value,
        }
    )


def _org_for_resource(state: DataverseState, tenant: str, resource: str) -> Org | None:
    path = urllib.parse.urlsplit(resource).path.rstrip("/")
    m = re.fullmatch(r"/orgs/([^/]+)", path)
    if m:
        org = state.orgs.get(m.group(1))
    elif path == "" and state.orgs:
        org = state.default_org
    else:
        org = None
    if org is None or org.tenant_id != tenant:
        return None
    return org


# -- Dataverse Web API ------------------------------------------------------------


def _unauthorized(request: web.Request, org: Org, message: str, code: str = "0x8004a102") -> DataverseError:
    origin = _origin(request)
    return DataverseError(
        401,
        code,
        message,
        {
            "WWW-Authenticate": (
                f'Bearer error="invalid_token", error_description="{message}", '
                f'authorization_uri="{origin}/{org.tenant_id}/oauth2/authorize", '
                f'resource_id="{origin}/orgs/{org.name}"'
            ),
        },
    )


def _authenticate(request: web.Request, state: DataverseState, org: Org) -> Token:
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("bearer "):
        raise _unauthorized(request, org, "Bearer token is missing.", "0x8004a101")
    tok = state.tokens.get(header[7:].strip())
    if tok is None or tok.org_name != org.name:
        raise _unauthorized(request, org, "The access token is invalid.", "0x8004a101")
    if tok.expires_at <= time.time():
        raise _unauthorized(request, org, "The access token expired.", "0x8004a102")
    if tok.client_id not in org.app_users:
        raise DataverseError(403, "0x80072560", "The user is not a member of the organization.")
    return tok


def _org_from_request(request: web.Request, state: DataverseState) -> tuple[Org, str]:
    name = request.match_info.get("org")
    if name is None:
        return state.default_org, f"{_origin(request)}{API}/"
    org = state.orgs.get(name)
    if org is None:
        raise DataverseError(404, "0x80040217", f"Organization '{name}' does not exist.")
    return org, f"{_origin(request)}/orgs/{name}{API}/"


async def data_api(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    try:
        org, api_root = _org_from_request(request, state)
        tok = _authenticate(request, state, org)
    except DataverseError as err:
        resp = _error(err)
        resp.headers["OData-Version"] = "4.0"
        return resp
    headers = {"OData-Version": "4.0"}
    try:
        state.acquire_slot(org.name, tok.client_id)
    except DataverseError as err:
        resp = _error(err)
        resp.headers.update(headers)
        resp.headers.update(state.ratelimit_headers(org.name, tok.client_id))
        return resp
    started = time.monotonic()
    try:
        if request.get(FAULT_DELAY):
            await asyncio.sleep(request[FAULT_DELAY])
        resp = await _dispatch(request, state, org, api_root, tok)
    except DataverseError as err:
        resp = _error(err)
    finally:
        state.release_slot(org.name, tok.client_id, time.monotonic() - started)
    resp.headers.update(headers)
    resp.headers.update(state.ratelimit_headers(org.name, tok.client_id))
    return resp


async def _dispatch(
    request: web.Request, state: DataverseState, org: Org, api_root: str, tok: Token
) -> web.Response:
    path = request.match_info["path"]
    user = org.app_users[tok.client_id]
    if path in ("", "/"):
        return _json(
            {
                "@odata.context": f"{api_root}$metadata",
                "value": [{"name": s, "kind": "EntitySet", "url": s} for s in ENTITIES],
            }
        )
    if path in ("WhoAmI", "WhoAmI()"):
        return _json(
            {
                "@odata.context": f"{api_root}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
                "BusinessUnitId": org.business_unit_id,
                "UserId": user.user_id,
                "OrganizationId": org.organization_id,
            }
        )
    if path == "$metadata":
        return web.Response(text=csdl(annotations=request.query.get("annotations") == "true"),
                             content_type="application/xml", charset="utf-8")
    if path.startswith("EntityDefinitions"):
        if request.method != "GET":
            raise not_implemented(f"{request.method} on EntityDefinitions")
        return _json(entity_definitions(path, request.query, api_root))
    if path == "$batch":
        # docs/vendor-facts.md "query $batch": refused, no Flash component sends batches.
        raise not_implemented("$batch")
    m = _PATH.match(path)
    if not m or m.group("set") not in ENTITIES:
        segment = (m.group("set") if m else path.split("/")[0].split("(")[0]) or path
        raise DataverseError(404, "0x8006088a", f"Resource not found for the segment '{segment}'.")
    table = org.tables[m.group("set")]
    if not user.may_read(table.entity):
        raise DataverseError(
            403,
            "0x80040220",
            f"Principal user (Id={user.user_id}, type=8, roleCount=1, privilegeCount=0, accessMode=4), "
            f"is missing prvRead{table.entity.privilege} privilege "
            f"(Id={uuid.uuid5(uuid.NAMESPACE_URL, table.entity.privilege)}) "
            f"on OTC=0 for entity '{table.entity.logical}'.",
        )
    key = m.group("key")
    if key is not None:
        key = key.strip().strip("{}")
        if not _GUID.match(key):
            raise query_error(f"Bad Request - Error in query syntax: invalid key '{key}'.")
        key = key.lower()
    method = request.method
    if m.group("sub") == "$count":
        if method != "GET":
            raise DataverseError(405, "0x80060888", "Method not allowed.")
        return web.Response(text=str(min(len(table), MAX_PAGE)), content_type="text/plain")
    if method == "GET":
        if key is not None:
            return _get_one(request, org, table, api_root, key)
        return _list(request, state, org, table, api_root)
    if method == "POST" and key is None:
        return await _create(request, org, table, api_root)
    if method == "PATCH" and key is not None:
        return await _update(request, org, table, api_root, key)
    if method == "DELETE" and key is not None:
        mutations.delete(org, table.entity.entity_set, key)
        return web.Response(status=204)
    raise DataverseError(405, "0x80060888", f"The HTTP method '{method}' is not allowed on this resource.")


def _prefs(request: web.Request) -> dict[str, str | None]:
    return parse_prefer(request.headers.getall("Prefer", []))


def _context_select(params: Any) -> str:
    sel = params.get("$select")
    return f"({sel})" if sel else ""


def _get_one(request: web.Request, org: Org, table: Table, api_root: str, key: str) -> web.Response:
    prefs = _prefs(request)
    q = parse_query(table, request.query)
    row = table.rows.get(key)
    if row is None:
        raise DataverseError(
            404, "0x80040217", f"Entity '{table.entity.logical}' With Id = {key} Does Not Exist"
        )
    ann = Annotations(prefs.get("odata.include-annotations"))
    r = Renderer(org, table, q.select, ann)
    ctx = f"{api_root}$metadata#{table.entity.entity_set}{_context_select(request.query)}/$entity"
    body = r.render(row, extra=f'"@odata.context":{json.dumps(ctx)},"@odata.etag":{json.dumps(r.etag(row))}')
    headers = {"ETag": r.etag(row)}
    if ann:
        headers["Preference-Applied"] = f"odata.include-annotations={prefs['odata.include-annotations']}"
    return _odata(body, headers=headers)


_TRACKING_REJECTS = ("$filter", "$orderby", "$expand", "$top")


def _list(request: web.Request, state: DataverseState, org: Org, table: Table, api_root: str) -> web.Response:
    prefs = _prefs(request)
    params = request.query
    applied: list[str] = []
    page_size = MAX_PAGE
    if "odata.maxpagesize" in prefs:
        try:
            page_size = max(1, min(MAX_PAGE, int(str(prefs["odata.maxpagesize"]))))
        except ValueError:
            raise query_error("Invalid value for the odata.maxpagesize preference.") from None
        applied.append(f"odata.maxpagesize={page_size}")
    ann = Annotations(prefs.get("odata.include-annotations"))
    if ann:
        applied.append(f"odata.include-annotations={prefs['odata.include-annotations']}")
    cookie = None
    if "$skiptoken" in params:
        cookie = decode_cookie(params["$skiptoken"])
    wants_tracking = "odata.track-changes" in prefs
    tracking = table.entity.change_tracking and (
        wants_tracking
        or "$deltatoken" in params
        or (cookie is not None and 'istracking="True"' in params["$skiptoken"])
    )
    if tracking:
        for opt in _TRACKING_REJECTS:
            if opt in params:
                raise query_error(
                    f'The "{opt}" query parameter isn\'t supported when Change Tracking is enabled.'
                )
        if wants_tracking:
            applied.insert(0, "odata.track-changes")
    q = parse_query(table, params)
    renderer = Renderer(org, table, q.select, ann)
    es = table.entity.entity_set
    sel = _context_select(params)
    select_param = [("$select", params["$select"])] if "$select" in params else []
    head: list[str] = []
    tail: list[str] = []
    items: list[str] = []
    if tracking and "$deltatoken" in params:
        items, tail = _delta_page(org, table, renderer, api_root, params, cookie, page_size, select_param)
        ctx = f"{api_root}$metadata#{es}{sel}/$delta"
    elif tracking:
        fresh: dict[str, Any] = {"v": org.version, "w": org.clock.now()}
        page_no, cs = cookie if cookie else (1, fresh)
        rows, more = table.page_after(cs.get("k"), page_size)
        items = [renderer.render(r) for r in rows]
        if more:
            nxt = {"k": rows[-1][0], "v": cs["v"], "w": cs["w"]}
            link = _link(api_root, es, [*select_param, ("$skiptoken", _cookie_param(page_no + 1, nxt, True))])
            tail = [f'"@odata.nextLink":{json.dumps(link)}']
        else:
            tail = [
                f'"@odata.deltaLink":{json.dumps(_delta_link(api_root, es, select_param, cs["v"], cs["w"]))}'
            ]
        ctx = f"{api_root}$metadata#{es}{sel}"
    else:
        ctx = f"{api_root}$metadata#{es}{sel}"
        if q.top is not None and "odata.maxpagesize" not in prefs:
            page_size = min(q.top, MAX_PAGE)
        page_no, cs = cookie if cookie else (1, {})
        rows, more = _plain_page(table, q, cs, page_size)
        if q.top is not None and "odata.maxpagesize" not in prefs:
            more = False
        items = [renderer.render(r) for r in rows]
        if q.count:
            total = _count(table, q)
            head.append(f'"@odata.count":{min(total, MAX_PAGE)}')
            if total > MAX_PAGE:
                head.append('"@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded":true')
        if more and rows:
            nxt = {"k": rows[-1][0]}
            if q.orderby:
                nxt["o"] = cookie_values(table, q.orderby, rows[-1])
            keep = [(k, v) for k, v in params.items() if k != "$skiptoken"]
            link = _link(api_root, es, [*keep, ("$skiptoken", _cookie_param(page_no + 1, nxt, False))])
            tail = [f'"@odata.nextLink":{json.dumps(link)}']
    body = (
        "{"
        + ",".join([f'"@odata.context":{json.dumps(ctx)}', *head, '"value":[' + ",".join(items) + "]", *tail])
        + "}"
    )
    headers = {"Preference-Applied": ",".join(applied)} if applied else {}
    return _odata(body, headers=headers)


def _cookie_param(page: int, st: dict[str, Any], tracking: bool) -> str:
    return encode_cookie(page, st, tracking=tracking)


def _link(api_root: str, es: str, params: list[tuple[str, str]]) -> str:
    parts = []
    for k, v in params:
        if k == "$skiptoken":
            parts.append(f"{k}={urllib.parse.quote(v, safe='=')}")
        elif k == "$deltatoken":
            parts.append(f"{k}={quote_lower(v)}")
        else:
            parts.append(build_query([(k, v)]))
    return f"{api_root}{es}?" + "&".join(parts)


def _delta_link(
    api_root: str, es: str, select_param: list[tuple[str, str]], version: int, when: float
) -> str:
    return _link(api_root, es, [*select_param, ("$deltatoken", encode_deltatoken(version, when))])


def _plain_page(table: Table, q: Any, cs: dict[str, Any], page_size: int) -> tuple[list[Row], bool]:
    after = cs.get("k")
    if q.orderby:
        rows = [r for r in table.rows.values() if q.predicate is None or q.predicate(r)]
        rows.sort(key=lambda r: sort_key(table, q.orderby, r))
        start = 0
        if after is not None:
            cursor = key_from_cookie(table, q.orderby, cs.get("o", []), after)
            sort_keys = [sort_key(table, q.orderby, r) for r in rows]
            start = bisect.bisect_right(sort_keys, cursor)
        page = rows[start : start + page_size]
        return page, start + page_size < len(rows)
    if q.predicate is None:
        return table.page_after(after, page_size)
    keys = table.live_keys()  # read through without yielding: no write can come in between
    i = 0 if after is None else bisect.bisect_right(keys, after)
    out: list[Row] = []
    while i < len(keys):
        row = table.rows[keys[i]]
        i += 1
        if q.predicate(row):
            if len(out) == page_size:
                return out, True
            out.append(row)
    return out, False


def _count(table: Table, q: Any) -> int:
    if q.predicate is None:
        return len(table)
    return sum(1 for r in table.rows.values() if q.predicate(r))


def _delta_page(
    org: Org,
    table: Table,
    renderer: Renderer,
    api_root: str,
    params: Any,
    cookie: tuple[int, dict[str, Any]] | None,
    page_size: int,
    select_param: list[tuple[str, str]],
) -> tuple[list[str], list[str]]:
    es = table.entity.entity_set
    expired = DataverseError(
        400, "0x80044352", "Version stamp associated with the client has expired. Please perform a full sync."
    )
    try:
        since, issued = decode_deltatoken(params["$deltatoken"])
    except ValueError:
        raise expired from None
    if since > org.version or org.clock.now() - issued > org.expirechangetrackingindays * 86400:
        raise expired
    if cookie:
        page_no, cs = cookie
    else:
        page_no, cs = 1, {"u": org.version, "w": org.clock.now(), "p": 0, "i": 0}
    found, cursor = table.changes(since, cs["u"], cs["p"], cs["i"], page_size)
    deleted_ctx = json.dumps(f"{api_root}$metadata#{es}/$deletedEntity")
    items = [
        renderer.render(x)
        if isinstance(x, tuple)
        else f'{{"@odata.context":{deleted_ctx},"id":"{x}","reason":"deleted"}}'
        for x in found
    ]
    if cursor is not None:
        nxt = {"u": cs["u"], "w": cs["w"], "p": cursor[0], "i": cursor[1]}
        link = _link(
            api_root,
            es,
            [
                *select_param,
                ("$deltatoken", params["$deltatoken"]),
                ("$skiptoken", _cookie_param(page_no + 1, nxt, True)),
            ],
        )
        return items, [f'"@odata.nextLink":{json.dumps(link)}']
    return items, [
        f'"@odata.deltaLink":{json.dumps(_delta_link(api_root, es, select_param, cs["u"], cs["w"]))}'
    ]


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.text(), parse_float=Decimal)
    except ValueError:
        raise DataverseError(400, "0x80048d19", "Error identified in Payload provided by the user.") from None
    if not isinstance(data, dict):
        raise DataverseError(400, "0x80048d19", "Error identified in Payload provided by the user.")
    return data


_BIND = re.compile(r"^/?(?:.*/)?(?P<set>[A-Za-z_]+)\((?P<key>[0-9a-fA-F-]{36})\)$")


def _write_values(table: Table, data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    navs: dict[str, tuple[str, str | None]] = {}
    for col in table.entity.columns:
        if col.kind == "lookup":
            if col.polymorphic:
                for target in col.targets:
                    navs[f"{col.nav}_{target}"] = (col.name, target)
            else:
                navs[col.nav] = (col.name, None)
    for name, value in data.items():
        if name.endswith("@odata.bind"):
            nav = name[: -len("@odata.bind")]
            if nav not in navs:
                raise DataverseError(
                    400,
                    "0x80060888",
                    f"An undeclared property '{nav}' which only has property annotations in the payload "
                    "but no "
                    "property value was found in the payload.",
                )
            column, bind_target = navs[nav]
            m = _BIND.match(str(value)) if value is not None else None
            if value is not None and m is None:
                raise DataverseError(400, "0x80060888", f"Invalid @odata.bind value '{value}'.")
            key = None if m is None else m.group("key").lower()
            out[column] = (bind_target, key) if bind_target else key
        elif name.startswith("@odata") or name.startswith("_"):
            raise DataverseError(
                400,
                "0x80060888",
                f"The property '{name}' does not exist on type "
                f"'Microsoft.Dynamics.CRM.{table.entity.logical}'. Make "
                "sure to only use property names that are defined by the type.",
            )
        else:
            out[name] = value
    return out


async def _create(request: web.Request, org: Org, table: Table, api_root: str) -> web.Response:
    values = _write_values(table, await _body(request))
    row = mutations.create(org, table.entity.entity_set, values)
    return _written(request, org, table, api_root, row, created=True)


async def _update(request: web.Request, org: Org, table: Table, api_root: str, key: str) -> web.Response:
    values = _write_values(table, await _body(request))
    if key not in table.rows:
        if request.headers.get("If-Match") == "*":
            raise DataverseError(
                404, "0x80040217", f"Entity '{table.entity.logical}' With Id = {key} Does Not Exist"
            )
        row = mutations.create(org, table.entity.entity_set, {**values, table.entity.key: key})
        return _written(request, org, table, api_root, row, created=True)
    row = mutations.update(org, table.entity.entity_set, key, values)
    return _written(request, org, table, api_root, row, created=False)


def _written(
    request: web.Request, org: Org, table: Table, api_root: str, row: Row, *, created: bool
) -> web.Response:
    key = row[table.pos[table.entity.key]]
    entity_id = f"{api_root}{table.entity.entity_set}({key})"
    prefs = _prefs(request)
    if prefs.get("return") == "representation":
        r = Renderer(org, table, None, Annotations(prefs.get("odata.include-annotations")))
        ctx = f"{api_root}$metadata#{table.entity.entity_set}/$entity"
        body = r.render(
            row, extra=f'"@odata.context":{json.dumps(ctx)},"@odata.etag":{json.dumps(r.etag(row))}'
        )
        return _odata(
            body,
            201 if created else 200,
            {"OData-EntityId": entity_id, "Preference-Applied": "return=representation"},
        )
    return web.Response(status=204, headers={"OData-EntityId": entity_id})


# -- faults and stats middleware --------------------------------------------------


def _fault_response(fault: Fault, request: web.Request) -> web.Response:
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
    if fault.status == 429:
        headers.setdefault("Retry-After", "2")
        return _json(
            {
                "error": {
                    "code": "0x80072322",
                    "message": (
                        "Number of requests exceeded the limit of 6000 over time window of 300 seconds."
                    ),
                }
            },
            429,
            headers,
        )
    if fault.status == 401:
        headers["WWW-Authenticate"] = (
            'Bearer error="invalid_token", error_description="The access token expired."'
        )
        return _json({"error": {"code": "0x8004a102", "message": "The access token expired."}}, 401, headers)
    if fault.status >= 502:
        reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}.get(
            fault.status, "Error"
        )
        return web.Response(
            text=f"<html><body><h1>{fault.status} {reason}</h1></body></html>",
            status=fault.status,
            headers=headers,
            content_type="text/html",
        )
    return _json(
        {"error": {"code": "0x80040216", "message": "An unexpected error occurred."}}, fault.status, headers
    )


@web.middleware
async def sandbox_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if request.path.startswith("/_sandbox"):
        return await handler(request)
    state.stats["requests"] += 1
    resp: web.StreamResponse | None = None
    delay = 0.0
    for fault in state.faults.take(request.path_qs):
        if fault.kind == "delay":
            delay += fault.delay
        else:
            resp = _fault_response(fault, request)
            state.stats["faults"] += 1
    if resp is None and delay and API not in request.path:
        await asyncio.sleep(delay)
    elif resp is None and delay:
        request[FAULT_DELAY] = delay  # slept while holding a concurrency slot, like a slow request
    if resp is None:
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            resp = exc
        except DataverseError as err:
            resp = _error(err)
    state.stats[f"status.{resp.status}"] += 1
    return resp


# -- control API -------------------------------------------------------------------------------------------


def _org_info(state: DataverseState, org: Org, origin: str) -> dict[str, Any]:
    return {
        "name": org.name,
        "tenant_id": org.tenant_id,
        "org_url": f"{origin}/orgs/{org.name}",
        "api_url": f"{origin}/orgs/{org.name}{API}/",
        "authority": f"{origin}/{org.tenant_id}",
        "scope": f"{origin}/orgs/{org.name}/.default",
        "version": org.version,
        "expirechangetrackingindays": org.expirechangetrackingindays,
        "credentials": [
            {
                "client_id": a.client_id,
                "client_secret": a.client_secret,
                "readable": None
                if org.app_users[a.client_id].readable is None
                else sorted(org.app_users[a.client_id].readable or ()),
            }
            for a in state.credentials(org.name)
        ],
        "counts": {s: len(t) for s, t in org.tables.items()},
    }


async def _ctl_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = await request.json()
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="JSON object expected")
    return data


def _ctl_org(request: web.Request) -> Org:
    state = request.app[STATE_KEY]
    org = state.orgs.get(request.match_info["org"])
    if org is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "unknown org"}), content_type="application/json")
    return org


async def ctl_orgs(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        b = await _ctl_body(request)
        state.add_org(
            b["name"],
            tenant_id=b.get("tenant_id"),
            client_id=b.get("client_id"),
            client_secret=b.get("client_secret"),
            readable=b.get("readable"),
            expirechangetrackingindays=int(b.get("expirechangetrackingindays", 7)),
        )
        return _json(_org_info(state, state.orgs[b["name"]], _origin(request)), 201)
    return _json({"orgs": [_org_info(state, o, _origin(request)) for o in state.orgs.values()]})


async def ctl_seed(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    b = await _ctl_body(request)
    summary = seed_org(
        state,
        request.match_info["org"],
        customers=int(b.get("customers", 200)),
        products=int(b.get("products", 40)),
        orders=int(b.get("orders", 1000)),
        seed=int(b.get("seed", 1)),
    )
    return _json(summary.to_json())


def _jsonable(table: Table, row: Row) -> dict[str, Any]:
    out = table.as_dict(row)
    return {
        k: (
            str(v)
            if isinstance(v, Decimal)
            else v.strftime("%Y-%m-%dT%H:%M:%SZ")
            if isinstance(v, dt.datetime)
            else v
        )
        for k, v in out.items()
    }


async def ctl_mutate(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    org = _ctl_org(request)
    b = await _ctl_body(request)
    op = b.get("op")
    try:
        result: Any
        if op == "create":
            row = mutations.create(org, b["entity_set"], b["values"])
            result = _jsonable(org.table(b["entity_set"]), row)
        elif op == "update":
            row = mutations.update(org, b["entity_set"], b["id"], b["values"])
            result = _jsonable(org.table(b["entity_set"]), row)
        elif op == "delete":
            mutations.delete(org, b["entity_set"], b["id"])
            result = {"deleted": b["id"]}
        elif op == "set_status":
            row = mutations.set_order_status(org, b["id"], int(b["statecode"]), b.get("statuscode"))
            result = _jsonable(org.tables["salesorders"], row)
        elif op == "cancel_order":
            result = _jsonable(org.tables["salesorders"], mutations.cancel_order(org, b["id"]))
        elif op == "amend_order":
            q = b.get("quantity")
            row = mutations.amend_order(
                org, b["id"], quantity=None if q is None else Decimal(str(q)), line_id=b.get("line_id")
            )
            result = _jsonable(org.tables["salesorders"], row)
        elif op == "add_rma":
            lines = [(ln[0], Decimal(str(ln[1]))) for ln in b["lines"]] if b.get("lines") else None
            row = mutations.add_rma(
                org, b["id"], lines=lines, credit_to_account=bool(b.get("credit_to_account", True))
            )
            result = _jsonable(org.tables["msdyn_rmas"], row)
        elif op == "random":
            result = [mutations.random_mutation(org, state.rng) for _ in range(int(b.get("count", 1)))]
        else:
            return _json({"error": f"unknown op {op!r}"}, 400)
    except DataverseError as err:
        return _json({"error": {"code": err.code, "message": err.message}}, err.status)
    except KeyError as exc:
        return _json({"error": f"missing or unknown {exc}"}, 400)
    return _json({"op": op, "result": result, "version": org.version})


async def ctl_faults(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "DELETE":
        state.faults.clear()
    elif request.method == "POST":
        b = await _ctl_body(request)
        kind: FaultKind = (
            "delay" if b.get("kind") == "delay" or ("delay" in b and "status" not in b) else "status"
        )
        state.faults.add(
            Fault(
                kind=kind,
                status=int(b.get("status", 503)),
                count=None if b.get("count", 1) is None else int(b.get("count", 1)),
                match=b.get("match"),
                retry_after=None if b.get("retry_after") is None else int(b["retry_after"]),
                delay=float(b.get("delay", 0.0)),
                probability=float(b.get("probability", 1.0)),
            )
        )
    return _json({"faults": [f.to_json() for f in state.faults.rules]})


async def ctl_expire_tokens(request: web.Request) -> web.Response:
    return _json({"expired": request.app[STATE_KEY].expire_tokens()})


async def ctl_clock(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    b = await _ctl_body(request)
    state.advance_clock(float(b.get("seconds", 0)) + float(b.get("days", 0)) * 86400)
    return _json(
        {
            "offset_seconds": state.clock.offset,
            "now": dt.datetime.fromtimestamp(state.clock.now(), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )


async def ctl_limits(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        b = await _ctl_body(request)
        for name in ("requests_per_window", "concurrent"):
            if name in b:
                setattr(state.limits, name, int(b[name]))
        for name in ("window_seconds", "execution_seconds"):
            if name in b:
                setattr(state.limits, name, float(b[name]))
        if "token_lifetime" in b:
            state.token_lifetime = float(b["token_lifetime"])
        if b.get("reset"):
            state.reset_limits()
    return _json({**state.limits.__dict__, "token_lifetime": state.token_lifetime})


async def ctl_stats(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "DELETE":
        state.stats.clear()
    return _json(dict(state.stats))


async def ctl_truth(request: web.Request) -> web.Response:
    org = _ctl_org(request)
    out = []
    for o in ground_truth(org):
        d = dict(o.__dict__)
        d["lines"] = [dict(ln.__dict__) for ln in o.lines]
        out.append(d)
    return web.Response(text=json.dumps({"orders": out}, default=str), content_type="application/json")


def build_app(state: DataverseState) -> web.Application:
    """The simulator as an aiohttp app over ``state`` (serve it with :func:`sandbox.server.serve`)."""
    app = web.Application(middlewares=[sandbox_middleware], client_max_size=8 * 1024 * 1024)
    app[STATE_KEY] = state
    r = app.router
    r.add_get("/_sandbox/orgs", ctl_orgs)
    r.add_post("/_sandbox/orgs", ctl_orgs)
    r.add_post("/_sandbox/orgs/{org}/seed", ctl_seed)
    r.add_post("/_sandbox/orgs/{org}/mutate", ctl_mutate)
    r.add_get("/_sandbox/orgs/{org}/truth", ctl_truth)
    r.add_route("*", "/_sandbox/faults", ctl_faults)
    r.add_post("/_sandbox/tokens/expire", ctl_expire_tokens)
    r.add_post("/_sandbox/clock/advance", ctl_clock)
    r.add_route("*", "/_sandbox/limits", ctl_limits)
    r.add_route("*", "/_sandbox/stats", ctl_stats)
    r.add_route("*", "/orgs/{org}" + API + "/{path:.*}", data_api)
    r.add_route("*", API + "/{path:.*}", data_api)
    r.add_get("/{tenant}/v2.0/.well-known/openid-configuration", openid_configuration)
    r.add_get("/{tenant}/.well-known/openid-configuration", openid_configuration)
    r.add_get("/{tenant}/discovery/v2.0/keys", jwks)
    r.add_post("/{tenant}/oauth2/v2.0/token", token)
    return app
