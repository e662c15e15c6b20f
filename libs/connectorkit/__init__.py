"""The connector kit: what every source connector is built on, as ``servicekit.consumer`` serves consumers.

Public API (import from the submodules named; everything listed is stable for connectors to use):

``connectorkit.protocol``
    ``Connector`` protocol (``source``, ``producer``, ``parse(conn) -> config``, ``streams(config)``,
    ``await verify(config, settings) -> VerifyReport``, ``await sample(config, settings, limit=) ->
    Sample`` (a mapping {stream: [RawRecord]} plus ``.letters``; moves no cursor), ``await refetch(config,
    settings, Refetch) -> [OutMessage]``);
    ``SettingError(connection_id, setting, problem, expected)`` (a ConfigError naming the setting and what to
    put); ``Check`` / ``VerifyReport`` (one line per check with its fix; ``.ok``, ``.lines()``,
    ``.summary()``, ``.as_json()``); ``Stream``.
``connectorkit.endpoints``
    ``ENDPOINT_PATTERNS`` (the one table of vendor host patterns), ``check_endpoint(url, kinds=, setting=)``
    (the policy the control plane applies before storing a connection), ``check_resolved(host)`` (no
    private / loopback / link-local addresses), ``HostPin`` (hosts a connection's requests may reach),
    ``sandbox_endpoints_allowed()`` (``FLASH_ALLOW_SANDBOX_ENDPOINTS``), ``EndpointRefused``.
``connectorkit.http``
    ``VendorClient`` (httpx.AsyncClient + HostPin + ErrorTable + TokenSource + QuotaGovernor: timeouts,
    retries with jitter, Retry-After on 429/503, re-auth once on 401, same-host redirects only,
    ``token_post`` never redirected), ``ErrorRule`` / ``ErrorTable`` (the vendor's error table as data),
    ``parse_error_body``, ``retry_after_seconds``, ``scrub`` (trim + strip credential-like text from remote
    bodies), ``TokenSource`` / ``StaticTokenSource``, ``QuotaGovernor`` / ``NoQuota`` /
    ``shared_governor(key, factory)`` (one governor per credential, shared by every connection using it),
    ``Response``.
``connectorkit.entra``
    ``MsalTokenSource(authority=, client_id=, client_secret=, scope=, ca_bundle=)`` (Entra client-credentials
    tokens, a TokenSource; its session never follows a redirect) and ``ENTRA_ERRORS`` (AADSTS codes -> what
    to fix), for every Microsoft connector (Dataverse, Finance & Operations).
``connectorkit.cursors``
    ``Checkpoint[Model]`` (typed cursor: ``load`` / ``observe`` / ``checkpoint`` after the broker's ack),
    ``publish_then_checkpoint``, ``PgCursorStore`` (db outages -> InfrastructureUnavailable),
    ``PublishedVersions`` / ``PgPublishedVersions`` / ``FakePublishedVersions`` (re-reads never re-publish
    an unchanged record), ``Publisher``.
``connectorkit.deadletters``
    ``SourceLetter``, ``Refetch`` (what a replay needs to fetch the record again), ``SourceDeadLetters`` /
    ``PgSourceDeadLetters`` / ``FakeSourceDeadLetters`` (``dlq.<producer>.v1`` + ``dead_letters``, the
    consumers' headers plus ``x-flash-refetch``), ``refetch_of(headers)``.
``connectorkit.replay``
    ``source_rewriter(load_connection, settings)``: the ``servicekit.dlq.replay(rewrite=)`` hook that
    re-fetches source letters and publishes the fresh raw record.
``connectorkit.runner``
    ``supervise_connections`` (one task per live connection), ``poll_forever`` (ConfigError -> connection
    ``failed``; Transient, our own outages included -> wait and retry), ``mark_failed``, ``fingerprint``.
``connectorkit.registry``
    entry point groups ``flash_connect.connectors`` (source -> connector factory), ``flash_connect.sandboxes``
    (demo simulators), ``flash_connect.previews`` (dry-run stages); ``load_connector``, ``connector_sources``,
    ``load_sandboxes``, ``load_preview``; ``validate_connection(conn)`` (endpoint policy + the connector's
    parse: what must hold before a connection is stored, for the CLI and the HTTP API alike).
``connectorkit.dryrun``
    ``dry_run(connector, conn, settings, pool, limit=)``: sample -> normalize -> resolve -> points, read-only,
    and its report; the stage protocols ``NormalizeStage``, ``ResolveStage`` (``Resolution``),
    ``PointsStage`` (``PointsPreview``).

Tables: ``cursors`` (servicekit), ``dead_letters`` (servicekit), ``connector_published_versions``
(``MIGRATIONS``, component ``connectorkit``: add it to a connector service's migrations).
"""

from servicekit.db import Migrations

__all__ = ["MIGRATIONS"]

MIGRATIONS = Migrations("connectorkit", "connectorkit")
