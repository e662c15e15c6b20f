"""The aiohttp application: OAuth token endpoint, REST data API, Bulk 2.0, CometD and the control API.

URL scheme (one server, many orgs):
* My Domain = ``https://127.0.0.1:PORT``. ``POST /services/oauth2/token`` picks the org by ``client_id``
  and answers ``instance_url = https://127.0.0.1:PORT/orgs/<org>``. Any other Host (``localhost``) plays
  ``login.salesforce.com``: 400 ``invalid_grant`` "request not supported on this domain".
* Data API under ``{instance_url}/services/data/vXX.X/...`` and CometD under ``{instance_url}/cometd/XX.X``.
  The same routes also answer without the ``/orgs/<org>`` prefix (the org comes from the token), so a
  client that joins ``nextRecordsUrl`` to the bare host still works.
* Control API under ``/_sandbox/...`` (JSON, no auth): see :func:`_control_routes`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sandbox.salesforce import domain
from sandbox.salesforce.bulk import BulkJob, csv_chunks, decode_locator, encode_locator, new_job_id
from sandbox.salesforce.cometd import CometdHub
from sandbox.salesforce.errors import SalesforceError
from sandbox.salesforce.ids import base62, to_18
from sandbox.salesforce.org import Cursor, Org, format_rest
from sandbox.salesforce.schema import SCHEMA, find_object
from sandbox.salesforce.seed import seed_org
from sandbox.salesforce.soql import parse_soql
from sandbox.salesforce.state import SalesforceState

__all__ = ["build_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_VERSION = re.compile(r"^v(\d{2,3}\.\d)$")
_CURSOR_TTL_MS = 2 * 86_400_000
STATE_KEY = web.AppKey("salesforce_state", SalesforceState)
ORG_KEY = web.RequestKey("sf_org", Org)


def _not_found() -> SalesforceError:
    return SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _org_from_path(request: web.Request) -> str | None:
    m = re.match(r"^/orgs/([^/]+)/", request.path)
    return m.group(1) if m else None


class _Api:
    def __init__(self, state: SalesforceState) -> None:
        self.state = state

    # ------------------------------------------------------------------ plumbing
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sandbox"):
            return await handler(request)
        resp: web.StreamResponse
        try:
            org_name = _org_from_path(request)
            if org_name is None:
                token = self._bearer(request)
                session = self.state.sessions.get(token or "")
                org_name = session.org if session else None
            fault = self.state.take_fault(request.path_qs, org_name)
            if fault is not None:
                if fault.kind == "slow":
                    await asyncio.sleep(fault.delay_s or 1.0)
                else:
                    raise fault.error()
            resp = await handler(request)
        except SalesforceError as exc:
            resp = web.json_response(exc.body(), status=exc.status)
        except web.HTTPNotFound:
            resp = web.json_response(_not_found().body(), status=404)
        except web.HTTPMethodNotAllowed as exc:
            body = [
                {
                    "message": f"HTTP Method '{request.method}' not allowed. "
                    f"Allowed are {','.join(sorted(exc.allowed_methods))}",
                    "errorCode": "METHOD_NOT_ALLOWED",
                }
            ]
            resp = web.json_response(body, status=405)
        org = request.get(ORG_KEY)
        if org is not None and not resp.prepared:
            used, maximum = org.api_usage()
            resp.headers["Sforce-Limit-Info"] = f"api-usage={used}/{maximum}"
        return resp

    @staticmethod
    def _bearer(request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        for scheme in ("Bearer ", "OAuth "):
            if auth.startswith(scheme):
                return auth[len(scheme) :].strip()
        return None

    def _auth(self, request: web.Request, *, count: bool = True) -> Org:
        org = self.state.authenticate(self._bearer(request))
        path_org = request.match_info.get("org")
        if path_org is not None and path_org != org.name:
            raise SalesforceError(401, "INVALID_SESSION_ID", "Session expired or invalid")
        request[ORG_KEY] = org
        ver = request.match_info.get("ver")
        if ver is not None:
            m = _VERSION.match(ver)
            if not m:
                raise _not_found()
            org.api_versions[m.group(1)] = org.api_versions.get(m.group(1), 0) + 1
        if count:
            org.count_api_call()
        return org

    @staticmethod
    def _version(request: web.Request) -> str:
        return request.match_info["ver"][1:]

    @staticmethod
    async def _json_body(request: web.Request) -> Any:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SalesforceError(400, "JSON_PARSER_ERROR", f"Unexpected character: {exc}") from exc

    @staticmethod
    def _origin(request: web.Request, api: str = "rest") -> str:
        origin = f"com/salesforce/api/{api}/{request.match_info.get('ver', 'v66.0')[1:]}"
        options = request.headers.get("Sforce-Call-Options", "")
        m = re.search(r"client=([^,;\s]+)", options)
        return f"{origin};client={m.group(1)}" if m else origin

    # ------------------------------------------------------------------ OAuth
    async def token(self, request: web.Request) -> web.Response:
        host = request.host.rsplit(":", 1)[0].strip("[]")
        form = await request.post()
        grant = str(form.get("grant_type", ""))
        client_id, client_secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return _oauth_error(400, "invalid_client", "invalid client credentials")
        self.state.bump("token_requests")
        if host not in self.state.my_domain_hosts:
            return _oauth_error(400, "invalid_grant", "request not supported on this domain")
        if grant not in ("client_credentials", "refresh_token"):
            return _oauth_error(400, "unsupported_grant_type", "grant type not supported")
        org = self.state.org_for_client(client_id)
        if org is None or not client_id:
            return _oauth_error(400, "invalid_client_id", "client identifier invalid")
        if grant == "refresh_token":
            # docs/vendor-facts.md (Salesforce, refresh_token grant): the secret is optional for this grant
            if client_secret and client_secret != org.client_secret:
                return _oauth_error(400, "invalid_client", "invalid client credentials")
            if str(form.get("refresh_token", "")) != org.refresh_token:
                return _oauth_error(400, "invalid_grant", "expired access/refresh token")
        elif client_secret != org.client_secret:
            return _oauth_error(400, "invalid_client", "invalid client credentials")
        path_org = request.match_info.get("org")
        if path_org is not None and path_org != org.name:
            return _oauth_error(400, "invalid_client", "invalid client credentials")
        instance_url = f"{request.scheme}://{request.host}/orgs/{org.name}"
        return web.json_response(self.state.issue_token(org, instance_url))

    # ------------------------------------------------------------------ REST
    async def versions(self, request: web.Request) -> web.Response:
        return web.json_response(
            [
                {"label": "Spring '26", "url": "/services/data/v66.0", "version": "66.0"},
                {"label": "Summer '26", "url": "/services/data/v67.0", "version": "67.0"},
            ]
        )

    async def limits(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        used, maximum = org.api_usage()
        now = org.clock.now_ms()
        while org.bulk_job_times and org.bulk_job_times[0] <= now - 86_400_000:
            org.bulk_job_times.popleft()
        return web.json_response(
            {
                "DailyApiRequests": {"Max": maximum, "Remaining": max(0, maximum - used)},
                "DailyBulkApiBatches": {"Max": 15000, "Remaining": 15000},
                "DailyBulkV2QueryJobs": {
                    "Max": org.bulk_jobs_max,
                    "Remaining": org.bulk_jobs_max - len(org.bulk_job_times),
                },
                "DailyBulkV2QueryFileStorageMB": {"Max": 976562, "Remaining": 976562},
                "DailyStreamingApiEvents": {"Max": 1000000, "Remaining": 1000000},
                "MonthlyPlatformEventsUsageEntitlement": {"Max": 50000, "Remaining": 50000},
            }
        )

    async def query(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        include_deleted = request.match_info["kind"] == "queryAll"
        q = request.query.get("q")
        if q is None:
            raise SalesforceError(400, "MALFORMED_QUERY", "A query string has to be specified")
        query = parse_soql(q)
        self._check_features(org, query.sobject.name, q)
        batch = self._batch_size(request)
        ids = org.execute(query, include_deleted=include_deleted)
        org.bump("queries")
        n = org.stats.get("seq:cursor", 0) + 1
        org.stats["seq:cursor"] = n
        cursor_id = to_18(f"01g{org.org_id[3:5]}0000{base62(n * 104729 + 77, 6)}")
        cursor = Cursor(query.sobject.name, query, ids, batch, org.clock.now_ms())
        if len(ids) > batch:
            org.cursors[cursor_id] = cursor
        return self._page(request, org, cursor_id, cursor, 0, batch)

    @staticmethod
    def _check_features(org: Org, obj: str, soql: str) -> None:
        """An org without multicurrency / person accounts / Order Management has no such fields or
        objects: Salesforce answers INVALID_TYPE / INVALID_FIELD (docs/vendor-facts.md, Salesforce)."""
        if not org.has_object(obj):
            raise SalesforceError(400, "INVALID_TYPE", f"sObject type '{obj}' is not supported. If you are attempting "
                                  "to use a custom object, be sure to append the '__c' after the entity name.")
        hidden = org.hidden_fields()
        if not hidden:
            return
        for token in re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", soql):
            name = token.rsplit(".", 1)[-1]
            if name in hidden:
                raise SalesforceError(400, "INVALID_FIELD", f"No such column '{name}' on entity '{obj}'. If you are "
                                      "attempting to use a custom field, be sure to append the '__c' after the "
                                      "custom field name. Please reference your WSDL or the describe call for the "
                                      "appropriate names.")
        for obj_name in re.findall(r"\bFROM\s+([A-Za-z_][A-Za-z0-9_]*)", soql, re.I):
            if not org.has_object(obj_name):
                raise SalesforceError(400, "INVALID_TYPE", f"sObject type '{obj_name}' is not supported.")

    def _batch_size(self, request: web.Request) -> int:
        m = re.search(r"batchSize=(\d+)", request.headers.get("Sforce-Query-Options", ""))
        return min(2000, max(200, int(m.group(1)))) if m else 2000

    def _page(
        self, request: web.Request, org: Org, cursor_id: str, cursor: Cursor, start: int, size: int
    ) -> web.Response:
        ver = self._version(request)
        end = min(len(cursor.ids), start + size)
        table = org.tables[cursor.object]
        body: dict[str, Any] = {"totalSize": len(cursor.ids), "done": end >= len(cursor.ids)}
        if end < len(cursor.ids):
            kind = request.match_info["kind"]
            body["nextRecordsUrl"] = f"/services/data/v{ver}/{kind}/{cursor_id}-{end}"
        else:
            org.cursors.pop(cursor_id, None) if start > 0 else None
        body["records"] = [org.render(cursor.object, table[i], cursor.query.fields, ver) for i in cursor.ids[start:end]]
        return web.json_response(body)

    async def query_more(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        locator = request.match_info["locator"]
        cursor_id, _, offset = locator.rpartition("-")
        cursor = org.cursors.get(cursor_id)
        if cursor is None or not offset.isdigit() or org.clock.now_ms() - cursor.created_ms > _CURSOR_TTL_MS:
            org.cursors.pop(cursor_id, None)
            raise SalesforceError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        size = self._batch_size(request) if "Sforce-Query-Options" in request.headers else cursor.batch_size
        return self._page(request, org, cursor_id, cursor, int(offset), size)

    def _object(self, name: str) -> str:
        od = find_object(name)
        if od is None:
            raise SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")
        return od.name

    def _fields(self, obj: str, names: list[str] | None) -> list[Any]:
        from sandbox.salesforce.soql import resolve_path

        od = SCHEMA[obj]
        if not names:
            return [resolve_path(od, f) for f in od.fields]
        return [resolve_path(od, f.strip()) for f in names if f.strip()]

    async def sobject_get(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        obj = self._object(request.match_info["sobject"])
        rec = org.get(obj, request.match_info["id"]) if len(request.match_info["id"]) in (15, 18) else None
        if rec is None or rec.get("IsDeleted"):
            raise _not_found()
        fields = request.query.get("fields")
        return web.json_response(
            org.render(obj, rec, self._fields(obj, fields.split(",") if fields else None), self._version(request))
        )

    async def describe_global(self, request: web.Request) -> web.Response:
        """Describe Global (docs/vendor-facts.md, Salesforce: REST resources_describeGlobal)."""
        org = self._auth(request)
        ver = self._version(request)
        base = f"/services/data/v{ver}/sobjects"
        return web.json_response({
            "encoding": "UTF-8",
            "maxBatchSize": 200,
            "sobjects": [
                {"name": od.name, "label": od.name, "labelPlural": od.name, "keyPrefix": od.prefix,
                 "custom": False, "queryable": True, "retrieveable": True, "replicateable": True,
                 "searchable": True, "createable": True, "updateable": True, "deletable": True,
                 "undeletable": True, "triggerable": True, "layoutable": True, "activateable": False,
                 "customSetting": False, "deprecatedAndHidden": False, "feedEnabled": False, "mergeable": False,
                 "urls": {"sobject": f"{base}/{od.name}", "describe": f"{base}/{od.name}/describe",
                          "rowTemplate": f"{base}/{od.name}/{{ID}}"}}
                for od in SCHEMA.values() if org.has_object(od.name)
            ],
        })

    async def bulk_v1(self, request: web.Request) -> web.Response:
        """Bulk API 1.0 is not served: the vendor's Bulk 1.0 error body (XML), never 200."""
        self._auth(request, count=False)
        body = ('<?xml version="1.0" encoding="UTF-8"?><error xmlns="http://www.force.com/2009/06/asyncapi/dataload">'
                "<exceptionCode>FeatureNotEnabled</exceptionCode><exceptionMessage>Bulk API 1.0 is not enabled in "
                "this simulated org; use Bulk API 2.0 (/services/data/vXX.X/jobs/query)</exceptionMessage></error>")
        return web.Response(status=400, text=body, content_type="application/xml")

    async def sobject_describe(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        od = SCHEMA[self._object(request.match_info["sobject"])]
        if not org.has_object(od.name):
            raise _not_found()
        hidden = org.hidden_fields()
        return web.json_response(
            {
                "name": od.name,
                "keyPrefix": od.prefix,
                "queryable": True,
                "retrieveable": True,
                "fields": [
                    {
                        "name": f.name,
                        "type": f.type,
                        "referenceTo": list(f.ref_to),
                        "relationshipName": f.relationship,
                        "nillable": f.name not in ("Id", "IsDeleted"),
                    }
                    for f in od.fields.values() if f.name not in hidden
                ],
            }
        )

    async def sobject_create(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        obj = self._object(request.match_info["sobject"])
        body = await self._json_body(request)
        if not isinstance(body, dict):
            raise SalesforceError(400, "JSON_PARSER_ERROR", "Expected a JSON object")
        body.pop("attributes", None)
        rid = org.create(obj, body, origin=self._origin(request))
        return web.json_response({"id": rid, "success": True, "errors": []}, status=201)

    async def sobject_update(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        obj = self._object(request.match_info["sobject"])
        body = await self._json_body(request)
        if not isinstance(body, dict):
            raise SalesforceError(400, "JSON_PARSER_ERROR", "Expected a JSON object")
        body.pop("attributes", None)
        org.update(obj, request.match_info["id"], body, origin=self._origin(request))
        return web.Response(status=204)

    async def sobject_delete(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        obj = self._object(request.match_info["sobject"])
        org.delete(obj, request.match_info["id"], origin=self._origin(request))
        return web.Response(status=204)

    async def composite_get(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        fields = [f for f in request.query.get("fields", "").split(",") if f]
        return self._composite(request, org, ids, fields)

    async def composite_post(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        body = await self._json_body(request)
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("ids"), list)
            or not isinstance(body.get("fields"), list)
        ):
            raise SalesforceError(400, "JSON_PARSER_ERROR", 'Expected {"ids": [..], "fields": [..]}')
        return self._composite(request, org, [str(i) for i in body["ids"]], [str(f) for f in body["fields"]])

    def _composite(self, request: web.Request, org: Org, ids: list[str], fields: list[str]) -> web.Response:
        obj = self._object(request.match_info["sobject"])
        if not ids:
            raise SalesforceError(400, "MISSING_ARGUMENT", "ids is required")
        if not fields:
            raise SalesforceError(400, "MISSING_ARGUMENT", "fields is required")
        if len(ids) > 2000:
            raise SalesforceError(
                400,
                "EXCEEDED_ID_LIMIT",
                "record limit reached. cannot submit more than 2000 records into this call",
            )
        paths = self._fields(obj, fields)
        out: list[Any] = []
        for rid in ids:
            rec = org.get(obj, rid) if len(rid) in (15, 18) and rid[:3] == SCHEMA[obj].prefix else None
            out.append(
                None if rec is None or rec.get("IsDeleted") else org.render(obj, rec, paths, self._version(request))
            )
        return web.json_response(out)

    async def submit_cancel(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        body = await self._json_body(request)
        changes = [(str(c["orderItemSummaryId"]), float(c["quantity"])) for c in body.get("changeItems", [])]
        reason = next((str(c.get("reason")) for c in body.get("changeItems", []) if c.get("reason")), "Unknown")
        with org.transaction(self._origin(request)):
            change_id = domain.submit_cancel(org, request.match_info["id"], changes, reason)
        return web.json_response({"changeOrderId": change_id, "success": True}, status=201)

    # ------------------------------------------------------------------ Bulk 2.0
    async def bulk_create(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        body = await self._json_body(request)
        if not isinstance(body, dict) or body.get("operation") not in ("query", "queryAll"):
            raise SalesforceError(400, "INVALIDJOB", "InvalidJob : Invalid operation; expected query or queryAll")
        if (
            body.get("contentType", "CSV") != "CSV"
            or body.get("columnDelimiter", "COMMA") != "COMMA"
            or body.get("lineEnding", "LF") != "LF"
        ):
            raise SalesforceError(400, "INVALIDJOB", "InvalidJob : the simulator supports CSV, COMMA and LF only")
        query = parse_soql(str(body.get("query", "")))
        self._check_features(org, query.sobject.name, str(body.get("query", "")))
        if query.offset is not None:
            raise SalesforceError(400, "INVALIDJOB", "InvalidJob : OFFSET is not supported by Bulk API 2.0 query")
        now = org.clock.now_ms()
        job = BulkJob(new_job_id(org), body["operation"], query, self._version(request), now, org.user_id)
        stuck = self.state.stuck_bulk.get(org.name, 0)
        if stuck:
            job.stuck = True
            self.state.stuck_bulk[org.name] = stuck - 1
        org.bulk_jobs[job.id] = job
        org.bulk_job_times.append(now)
        org.bump("bulk_jobs_created")
        return web.json_response(job.info())

    def _job(self, org: Org, request: web.Request) -> BulkJob:
        job = org.bulk_jobs.get(request.match_info["job"])
        if job is None:
            raise SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")
        return job

    async def bulk_list(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        return web.json_response(
            {"done": True, "records": [j.info() for j in org.bulk_jobs.values()], "nextRecordsUrl": None}
        )

    async def bulk_get(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        job = self._job(org, request)
        job.advance(org, self.state.bulk_polls_to_complete, self.state.bulk_seconds_to_complete)
        return web.json_response(job.info(detail=True))

    async def bulk_patch(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        job = self._job(org, request)
        body = await self._json_body(request)
        if not isinstance(body, dict) or body.get("state") != "Aborted":
            raise SalesforceError(400, "INVALIDJOB", 'InvalidJob : only {"state":"Aborted"} is accepted')
        if job.state in ("JobComplete", "Failed", "Aborted"):
            raise SalesforceError(400, "INVALIDJOB", f"InvalidJob : Job {job.id} is already {job.state}")
        job.state = "Aborted"
        job.modstamp_ms = org.clock.now_ms()
        return web.json_response(job.info())

    async def bulk_delete(self, request: web.Request) -> web.Response:
        org = self._auth(request)
        job = self._job(org, request)
        if job.state in ("UploadComplete", "InProgress"):
            raise SalesforceError(
                400, "INVALIDJOB", f"InvalidJob : Job {job.id} must be completed or aborted before deletion"
            )
        del org.bulk_jobs[job.id]
        return web.Response(status=204)

    async def bulk_results(self, request: web.Request) -> web.StreamResponse:
        org = self._auth(request)
        job = self._job(org, request)
        if job.api_version != self._version(request):
            raise SalesforceError(
                409,
                "INVALIDJOB",
                f"InvalidJob : Job {job.id} was created with API version {job.api_version}; "
                "use the same version to retrieve its results",
            )
        if job.state != "JobComplete" or job.ids is None:
            if job.state in ("Failed", "Aborted"):
                raise SalesforceError(400, "INVALIDJOB", f"InvalidJob : Job {job.id} is {job.state}")
            raise SalesforceError(400, "JOB_NOT_COMPLETE", f"Job {job.id} is not complete; state {job.state}")
        locator = request.query.get("locator")
        start = decode_locator(locator) if locator and locator != "null" else 0
        try:
            max_records = int(request.query.get("maxRecords", self.state.bulk_default_max_records))
        except ValueError as exc:
            raise SalesforceError(400, "INVALIDREQUEST", "maxRecords must be an integer") from exc
        if max_records <= 0 or start < 0 or start > len(job.ids):
            raise SalesforceError(400, "INVALIDLOCATOR", "Invalid locator or maxRecords")
        end = min(len(job.ids), start + max_records)
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/csv",
                "Sforce-NumberOfRecords": str(end - start),
                "Sforce-Locator": encode_locator(end) if end < len(job.ids) else "null",
            }
        )
        used, maximum = org.api_usage()
        resp.headers["Sforce-Limit-Info"] = f"api-usage={used}/{maximum}"
        await resp.prepare(request)
        for chunk in csv_chunks(org, job, start, end):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    # ------------------------------------------------------------------ CometD
    async def cometd(self, request: web.Request) -> web.Response:
        hub: CometdHub = self.state.streams
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response([{"successful": False, "error": "400::Malformed message"}], status=400)
        messages = raw if isinstance(raw, list) else [raw]
        try:
            org = self._auth(request, count=False)
        except SalesforceError:
            if any(m.get("channel") == "/meta/handshake" for m in messages):
                return web.json_response(
                    [
                        {
                            "ext": {"sfdc": {"failureReason": "401::Authentication invalid"}},
                            "advice": {"reconnect": "none"},
                            "channel": "/meta/handshake",
                            "error": "403::Handshake denied",
                            "successful": False,
                        }
                    ]
                )
            return web.json_response(
                [
                    {
                        "channel": m.get("channel"),
                        "clientId": m.get("clientId"),
                        "successful": False,
                        "error": "401::Authentication invalid",
                        "advice": {"reconnect": "handshake"},
                    }
                    for m in messages
                ],
                status=401,
            )
        replies = await hub.handle(org, messages)
        return web.json_response(replies)

    # ------------------------------------------------------------------ control API
    def _ctl_org(self, request: web.Request) -> Org:
        org = self.state.orgs.get(request.match_info["org"])
        if org is None:
            raise web.HTTPNotFound(text=json.dumps({"error": "unknown org"}), content_type="application/json")
        return org

    async def _ctl_body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        body = await request.json()
        return body if isinstance(body, dict) else {}

    def _org_info(self, request: web.Request, org: Org) -> dict[str, Any]:
        port = request.host.rsplit(":", 1)[1] if ":" in request.host else ""
        my_domain = f"https://127.0.0.1:{port}" if port else f"https://{request.host}"
        return {
            "name": org.name,
            "org_id": org.org_id,
            "user_id": org.user_id,
            "mode": org.mode,
            "multi_currency": org.multi_currency,
            "person_accounts": org.person_accounts,
            "refresh_token": org.refresh_token,
            "client_id": org.client_id,
            "client_secret": org.client_secret,
            "my_domain": my_domain,
            "token_url": f"{my_domain}/services/oauth2/token",
            "instance_url": f"{my_domain}/orgs/{org.name}",
            "statuses": org.status_categories,
        }

    async def ctl_orgs(self, request: web.Request) -> web.Response:
        return web.json_response([self._org_info(request, o) for o in self.state.orgs.values()])

    async def ctl_add_org(self, request: web.Request) -> web.Response:
        body = await self._ctl_body(request)
        try:
            org = self.state.add_org(
                str(body["name"]),
                mode=str(body.get("mode", "order")),
                client_id=body.get("client_id"),
                client_secret=body.get("client_secret"),
                multi_currency=bool(body.get("multi_currency", True)),
                person_accounts=bool(body.get("person_accounts", True)),
            )
        except (KeyError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self._org_info(request, org), status=201)

    async def ctl_seed(self, request: web.Request) -> web.Response:
        org = self._ctl_org(request)
        body = await self._ctl_body(request)
        keys = ("accounts", "person_accounts", "contacts", "products", "orders", "seed")
        summary = seed_org(self.state, org, mode=body.get("mode"), **{k: int(body[k]) for k in keys if k in body})
        return web.json_response(vars(summary))

    async def ctl_fault(self, request: web.Request) -> web.Response:
        body = await self._ctl_body(request)
        try:
            fault = self.state.inject_fault(
                str(body["kind"]),
                int(body.get("count", 1)),
                path=body.get("path"),
                org=body.get("org"),
                delay_s=float(body.get("delay_s", 0.0)),
            )
        except (KeyError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(vars(fault), status=201)

    async def ctl_faults_clear(self, request: web.Request) -> web.Response:
        self.state.clear_faults()
        return web.json_response({"cleared": True})

    async def ctl_limits(self, request: web.Request) -> web.Response:
        org = self._ctl_org(request)
        body = await self._ctl_body(request)
        self.state.set_api_limit(org.name, body.get("max"), body.get("used"))
        used, maximum = org.api_usage()
        return web.json_response({"used": used, "max": maximum})

    async def ctl_stuck(self, request: web.Request) -> web.Response:
        org = self._ctl_org(request)
        body = await self._ctl_body(request)
        job_id = body.get("job_id")
        if job_id:
            org.bulk_jobs[job_id].stuck = True
        else:
            self.state.stick_bulk_jobs(org.name, int(body.get("count", 1)))
        return web.json_response({"ok": True})

    async def ctl_drop(self, request: web.Request) -> web.Response:
        org = self._ctl_org(request)
        return web.json_response({"dropped": self.state.drop_streams(org.name)})

    async def ctl_gap(self, request: web.Request) -> web.Response:
        org = self._ctl_org(request)
        body = await self._ctl_body(request)
        org.emit_gap(
            str(body["entity"]),
            [str(i) for i in body["recordIds"]],
            str(body.get("changeType", "GAP_UPDATE")),
        )
        return web.json_response({"latest_replay_id": org.latest_replay_id()})

    async def ctl_overflow(self, request: web.Request) -> web.Response:
        org = self._ctl_org(request)
        body = await self._ctl_body(request)
        org.emit_overflow(str(body["entity"]))
        return web.json_response({"latest_replay_id": org.latest_replay_id()})

    async def ctl_expire(self, request: web.Request) -> web.Response:
        org = request.match_info.get("org")
        return web.json_response({"expired": self.state.expire_sessions(org)})

    async def ctl_clock(self, request: web.Request) -> web.Response:
        body = await self._ctl_body(request)
        return web.json_response({"now_ms": self.state.advance_clock(float(body.get("seconds", 0)))})

    async def ctl_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.stats())

    async def ctl_random(self, request: web.Request) -> web.Response:
        org = self._ctl_org(request)
        body = await self._ctl_body(request)
        rng = random.Random(body["seed"]) if "seed" in body else None
        done = domain.random_mutations(org, int(body.get("count", 10)), rng)
        return web.json_response({"mutations": [{"kind": k, "id": i} for k, i in done]})

    async def ctl_order(self, request: web.Request) -> web.Response:
        org = self._ctl_org(request)
        b = await self._ctl_body(request)
        oid = domain.create_order(
            org,
            str(b["accountId"]),
            [(str(ln["productId"]), float(ln.get("quantity", 1))) for ln in b["lines"]],
            currency=str(b.get("currency", "EUR")),
            status=str(b.get("status", "Activated")),
            bill_to_contact_id=b.get("billToContactId"),
        )
        return web.json_response({"id": oid}, status=201)

    async def ctl_order_action(self, request: web.Request) -> web.Response:
        org = self._ctl_org(request)
        b = await self._ctl_body(request)
        oid, action = request.match_info["id"], request.match_info["action"]
        result: Any = None
        if action == "status":
            domain.set_order_status(org, oid, str(b["status"]))
        elif action == "cancel":
            result = domain.cancel_order(org, oid, str(b.get("reason", "Customer Request")))
        elif action == "returns":
            result = domain.create_return(
                org,
                oid,
                [
                    (str(ln["orderItemId"]), float(ln.get("quantity", 1)), str(ln.get("reason", "Damaged")))
                    for ln in b["lines"]
                ],
                status=str(b.get("status", "Submitted")),
            )
        elif action == "reduction":
            result = domain.create_reduction_order(
                org, oid, [(str(ln["orderItemId"]), float(ln["quantity"])) for ln in b["lines"]]
            )
        else:
            raise web.HTTPNotFound()
        return web.json_response({"ok": True, "id": result})

    async def ctl_misc(self, request: web.Request) -> web.Response:
        org = self._ctl_org(request)
        b = await self._ctl_body(request)
        what = request.match_info["what"]
        rid = request.match_info["id"]
        result: Any = None
        if what == "close-return":
            result = domain.close_return(org, rid, refund=b.get("refund"))
        elif what == "quantity":
            domain.amend_quantity(org, rid, float(b["quantity"]))
        elif what == "credit-memo":
            result = domain.create_credit_memo(
                org, rid, [(str(ln["itemId"]), float(ln["amount"])) for ln in b["lines"]]
            )
        elif what == "undelete":
            obj = org.object_of(rid)
            if obj is None:
                raise web.HTTPNotFound()
            org.undelete(obj, rid)
        elif what == "delete":
            obj = org.object_of(rid)
            if obj is None:
                raise web.HTTPNotFound()
            org.delete(obj, rid)
        else:
            raise web.HTTPNotFound()
        return web.json_response({"ok": True, "id": result})

    async def ctl_transaction(self, request: web.Request) -> web.Response:
        """Several writes in one transaction: one timestamp, one transactionKey, sequenceNumbers in op order.

        Body: ``{"ops": [{"op": "create|update|delete|undelete", "object": "Order", "id"?, "fields"?}],
        "startedSecondsAgo"?: 5}``; the latter makes it a long transaction committing now with rows stamped
        that long ago (``SystemModstamp`` behind what a poller may already have read).
        """
        org = self._ctl_org(request)
        b = await self._ctl_body(request)
        ids: list[str | None] = []
        with org.transaction(b.get("origin"), started_s_ago=float(b.get("startedSecondsAgo") or 0)):
            for op in b.get("ops", []):
                obj = SCHEMA[str(op["object"])].name
                kind = op["op"]
                if kind == "create":
                    ids.append(org.create(obj, op.get("fields", {})))
                elif kind == "update":
                    org.update(obj, str(op["id"]), op.get("fields", {}))
                    ids.append(str(op["id"]))
                elif kind == "delete":
                    org.delete(obj, str(op["id"]))
                    ids.append(str(op["id"]))
                elif kind == "undelete":
                    org.undelete(obj, str(op["id"]))
                    ids.append(str(op["id"]))
        return web.json_response({"ids": ids})

    @web.middleware
    async def ctl_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/_sandbox"):
            return await handler(request)
        try:
            return await handler(request)
        except SalesforceError as exc:
            return web.json_response({"error": exc.error_code, "message": exc.message}, status=exc.status)
        except (KeyError, ValueError, TypeError) as exc:
            return web.json_response({"error": type(exc).__name__, "message": str(exc)}, status=400)


def build_app(state: SalesforceState) -> web.Application:
    """The HTTP surface over ``state`` (see module docstring for URLs)."""
    api = _Api(state)
    if state.streams is None:
        state.streams = CometdHub(state)
    app = web.Application(middlewares=[api.ctl_errors, api.middleware], client_max_size=32 * 1024 * 1024)
    app[STATE_KEY] = state
    r = app.router
    for prefix in ("", "/orgs/{org}"):
        r.add_post(prefix + "/services/oauth2/token", api.token)
        r.add_get(prefix + "/services/data", api.versions)
        r.add_get(prefix + "/services/data/", api.versions)
        d = prefix + "/services/data/{ver}"
        r.add_get(d + "/limits", api.limits)
        r.add_get(d + "/limits/", api.limits)
        r.add_get(d + "/{kind:query|queryAll}", api.query)
        r.add_get(d + "/{kind:query|queryAll}/", api.query)
        r.add_get(d + "/{kind:query|queryAll}/{locator}", api.query_more)
        r.add_get(d + "/sobjects", api.describe_global)
        r.add_get(d + "/sobjects/", api.describe_global)
        r.add_get(d + "/sobjects/{sobject}/describe", api.sobject_describe)
        r.add_get(d + "/sobjects/{sobject}/describe/", api.sobject_describe)
        r.add_post(d + "/sobjects/{sobject}", api.sobject_create)
        r.add_post(d + "/sobjects/{sobject}/", api.sobject_create)
        r.add_get(d + "/sobjects/{sobject}/{id}", api.sobject_get)
        r.add_patch(d + "/sobjects/{sobject}/{id}", api.sobject_update)
        r.add_delete(d + "/sobjects/{sobject}/{id}", api.sobject_delete)
        r.add_get(d + "/composite/sobjects/{sobject}", api.composite_get)
        r.add_post(d + "/composite/sobjects/{sobject}", api.composite_post)
        r.add_post(d + "/commerce/order-management/order-summaries/{id}/actions/submit-cancel", api.submit_cancel)
        r.add_post(d + "/jobs/query", api.bulk_create)
        r.add_get(d + "/jobs/query", api.bulk_list)
        r.add_get(d + "/jobs/query/{job}", api.bulk_get)
        r.add_patch(d + "/jobs/query/{job}", api.bulk_patch)
        r.add_delete(d + "/jobs/query/{job}", api.bulk_delete)
        r.add_get(d + "/jobs/query/{job}/results", api.bulk_results)
        r.add_route("*", prefix + "/services/async/{aver}/{tail:.*}", api.bulk_v1)
        r.add_post(prefix + "/cometd/{cver}", api.cometd)
        r.add_post(prefix + "/cometd/{cver}/{tail:.*}", api.cometd)
    _control_routes(r, api)
    return app


def _control_routes(r: web.UrlDispatcher, api: _Api) -> None:
    """Control API (JSON bodies, no auth)::

    GET  /_sandbox/orgs                               orgs with credentials and URLs
    POST /_sandbox/orgs                               {name, mode?, client_id?, client_secret?}
    POST /_sandbox/orgs/{org}/seed                    {accounts, person_accounts, contacts, products,
                                                       orders, seed, mode}
    POST /_sandbox/faults                             {kind, count?, path?, org?, delay_s?}
    DELETE /_sandbox/faults
    POST /_sandbox/orgs/{org}/limits                  {max?, used?}
    POST /_sandbox/orgs/{org}/bulk/stuck              {count?} or {job_id}
    POST /_sandbox/orgs/{org}/streams/drop
    POST /_sandbox/orgs/{org}/cdc/gap                 {entity, recordIds, changeType?}
    POST /_sandbox/orgs/{org}/cdc/overflow            {entity}
    POST /_sandbox/sessions/expire, /_sandbox/orgs/{org}/sessions/expire
    POST /_sandbox/clock/advance                      {seconds}
    GET  /_sandbox/stats
    POST /_sandbox/orgs/{org}/mutations/random        {count, seed?}
    POST /_sandbox/orgs/{org}/orders                  {accountId, lines:[{productId, quantity}],
                                                       currency?, status?}
    POST /_sandbox/orgs/{org}/orders/{id}/{status|cancel|returns|reduction}
    POST /_sandbox/orgs/{org}/records/{id}/{close-return|quantity|credit-memo|undelete|delete}
    POST /_sandbox/orgs/{org}/transaction             {ops:[{op, object, id?, fields?}], origin?,
                                                       startedSecondsAgo?}  (a long transaction)
    """
    s = "/_sandbox"
    r.add_get(s + "/orgs", api.ctl_orgs)
    r.add_post(s + "/orgs", api.ctl_add_org)
    r.add_post(s + "/orgs/{org}/seed", api.ctl_seed)
    r.add_post(s + "/faults", api.ctl_fault)
    r.add_delete(s + "/faults", api.ctl_faults_clear)
    r.add_post(s + "/orgs/{org}/limits", api.ctl_limits)
    r.add_post(s + "/orgs/{org}/bulk/stuck", api.ctl_stuck)
    r.add_post(s + "/orgs/{org}/streams/drop", api.ctl_drop)
    r.add_post(s + "/orgs/{org}/cdc/gap", api.ctl_gap)
    r.add_post(s + "/orgs/{org}/cdc/overflow", api.ctl_overflow)
    r.add_post(s + "/sessions/expire", api.ctl_expire)
    r.add_post(s + "/orgs/{org}/sessions/expire", api.ctl_expire)
    r.add_post(s + "/clock/advance", api.ctl_clock)
    r.add_get(s + "/stats", api.ctl_stats)
    r.add_post(s + "/orgs/{org}/mutations/random", api.ctl_random)
    r.add_post(s + "/orgs/{org}/orders", api.ctl_order)
    r.add_post(s + "/orgs/{org}/orders/{id}/{action}", api.ctl_order_action)
    r.add_post(s + "/orgs/{org}/records/{id}/{what}", api.ctl_misc)
    r.add_post(s + "/orgs/{org}/transaction", api.ctl_transaction)


_ = format_rest  # re-exported helper kept importable for connectors' tests
