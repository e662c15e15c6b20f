"""Kafka adapters: a publisher that sends a batch without awaiting each send, topic creation, a broker
factory, and the security every client shares (SASL, TLS: :func:`kafka_security`). aiokafka errors are
translated here into our error tree."""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from faststream.kafka import KafkaBroker
from faststream.security import BaseSecurity, SASLOAuthBearer, SASLPlaintext, SASLScram256, SASLScram512

from canonical.topics import TOPICS, TopicSpec
from servicekit.errors import ConfigError, InfrastructureUnavailable
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings

__all__ = [
    "KafkaPublisher", "KafkaSecurity", "OAuthClientCredentials", "OutMessage", "ensure_topics", "kafka_security",
    "make_broker", "murmur2", "new_topics",
]

log = get_logger(__name__)

Headers = list[tuple[str, bytes]]


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 key hash (the Java client's ``Utils.murmur2``), as aiokafka's default partitioner
    computes it, in ~40% of the time of aiokafka's pure-Python version: whole words are unpacked at once
    and the masks are folded. It runs for every keyed message we publish."""
    length = len(data)
    h = 0x9747B28C ^ length
    n4 = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:n4]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) ^ (k * _M)) & _MASK
    extra = length & 3
    if extra:
        if extra >= 3:
            h ^= data[n4 + 2] << 16
        if extra >= 2:
            h ^= data[n4 + 1] << 8
        h = ((h ^ data[n4]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


@dataclass(frozen=True, slots=True)
class OutMessage:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers = field(default_factory=list)


class KafkaPublisher:
    """Publishes batches: every send is issued, then all acknowledgements are awaited together."""

    def __init__(self, bootstrap: str, *, client_id: str = "flash", security: KafkaSecurity | None = None) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            **(security or PLAINTEXT).client_kwargs(),
            # acks=all: a write counts once every in-sync replica has it (with min.insync.replicas >= 2 on
            # the topic, a broker loss loses nothing that was acknowledged).
            acks="all",
            linger_ms=5,
            max_batch_size=512 * 1024,
            request_timeout_ms=30000,
            # No idempotent producer: the embedded broker lacks it. Exactly-once is ours, by event ids.
            enable_idempotence=False,
        )
        self._started = False

    async def start(self) -> None:
        try:
            await self._producer.start()
        except (KafkaError, OSError) as exc:
            raise InfrastructureUnavailable(f"Kafka unavailable: {exc}") from exc
        self._started = True

    async def stop(self) -> None:
        if self._started:
            await self._producer.stop()
            self._started = False

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        """Send every message and return once the broker acknowledged all of them.

        Messages are packed into one record batch per partition (aiokafka's batch API: ~3x less CPU per
        message than one ``send`` each), keys mapped to partitions exactly as the default partitioner
        does (murmur2, so producers in other languages agree), and per-partition order is kept.
        """
        if not messages:
            return
        try:
            futures: list[asyncio.Future[Any]] = []
            builders: dict[tuple[str, int], Any] = {}
            partitions: dict[str, list[int]] = {}
            for i, m in enumerate(messages):
                parts = partitions.get(m.topic)
                if parts is None:
                    parts = partitions[m.topic] = sorted(await self._producer.partitions_for(m.topic))
                if m.key is None:
                    partition = parts[i % len(parts)]
                else:
                    partition = parts[(murmur2(m.key) & 0x7FFFFFFF) % len(parts)]
                slot = (m.topic, partition)
                builder = builders.get(slot)
                if builder is None:
                    builder = builders[slot] = self._producer.create_batch()
                if builder.append(key=m.key, value=m.value, timestamp=None, headers=m.headers) is None:
                    if builder.record_count():
                        futures.append(await self._producer.send_batch(builder, m.topic, partition=partition))
                    builder = builders[slot] = self._producer.create_batch()
                    if builder.append(key=m.key, value=m.value, timestamp=None, headers=m.headers) is None:
                        # Larger than a batch: the producer sends it on its own (or says it is too large).
                        futures.append(await self._producer.send(m.topic, m.value, key=m.key, partition=partition,
                                                                 headers=m.headers or None))
            for (topic, partition), builder in builders.items():
                if builder.record_count():
                    futures.append(await self._producer.send_batch(builder, topic, partition=partition))
            await asyncio.gather(*futures)
        except (KafkaError, OSError) as exc:
            raise InfrastructureUnavailable(f"Kafka publish failed: {exc}") from exc


async def ensure_topics(
    bootstrap: str, settings: FlashSettings, specs: Iterable[TopicSpec] = TOPICS, *, extra: Iterable[str] = (),
    embedded: bool = False,
) -> None:
    """Create the topics of the pipe (partitions, replication factor, min ISR, retention) if they do not
    exist yet; ``embedded`` says the broker is the single-node embedded one (replication 1)."""
    wanted = new_topics(settings, specs, extra=extra, embedded=embedded)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="flash-admin",
                                **kafka_security(settings).client_kwargs())
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created them first
            log.info("topics created", topics=[t.name for t in missing],
                     replication_factor=sorted({t.replication_factor for t in missing}))
    except (KafkaError, OSError) as exc:
        raise InfrastructureUnavailable(f"Kafka admin failed: {exc}") from exc
    finally:
        await admin.close()


_EXTRA_TOPIC = TopicSpec("", (), "", 4, 7 * 24 * 3600 * 1000)
"""Shape of an ``extra`` topic (tests, benches): the pipe's defaults."""


def new_topics(
    settings: FlashSettings, specs: Iterable[TopicSpec] = TOPICS, *, extra: Iterable[str] = (), embedded: bool = False
) -> list[NewTopic]:
    """The topic definitions :func:`ensure_topics` creates.

    Replication factor: ``FLASH_KAFKA_REPLICATION_FACTOR``, else 1 on the embedded broker, else the spec's.
    min.insync.replicas: ``FLASH_KAFKA_MIN_INSYNC_REPLICAS`` (at most the replication factor, else the
    topics could never be written with acks=all), else the spec's capped at the replication factor.
    """
    out: list[NewTopic] = []
    all_specs = [*specs, *(TopicSpec(n, (), "", _EXTRA_TOPIC.partitions, _EXTRA_TOPIC.retention_ms) for n in extra)]
    for spec in all_specs:
        rf = settings.kafka_replication_factor or (1 if embedded else spec.replication_factor)
        if settings.kafka_min_insync_replicas is not None:
            if settings.kafka_min_insync_replicas > rf:
                raise ConfigError(
                    f"FLASH_KAFKA_MIN_INSYNC_REPLICAS={settings.kafka_min_insync_replicas} exceeds the replication "
                    f"factor {rf} of topic {spec.name}: no write could ever succeed with acks=all; lower it or raise "
                    "FLASH_KAFKA_REPLICATION_FACTOR"
                )
            isr = settings.kafka_min_insync_replicas
        else:
            isr = min(spec.min_insync_replicas, rf)
        out.append(NewTopic(
            settings.topic(spec.name), spec.partitions, rf,
            topic_configs={"min.insync.replicas": str(isr), "retention.ms": str(spec.retention_ms)},
        ))
    return out


# ------------------------------------------------------------------------------------------- security


class OAuthClientCredentials(AbstractTokenProvider):  # type: ignore[misc]
    """SASL/OAUTHBEARER tokens from an OAuth 2.0 token endpoint by the client-credentials grant (RFC 6749
    section 4.4), reused until a minute before they expire, so reconnects do not fetch a token each."""

    def __init__(self, token_url: str, client_id: str, client_secret: str, scope: str | None = None,
                 *, ca_file: str | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self._verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._transport = transport
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or time.monotonic() >= self._expires:
                self._token, lifetime = await self._fetch()
                self._expires = time.monotonic() + max(lifetime - 60.0, lifetime / 2)
            return self._token

    async def _fetch(self) -> tuple[str, float]:
        form = {"grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self._secret}
        if self.scope:
            form["scope"] = self.scope
        try:
            async with httpx.AsyncClient(verify=self._verify, timeout=30.0, transport=self._transport,
                                         trust_env=False) as http:
                resp = await http.post(self.token_url, data=form)
        except httpx.HTTPError as exc:
            raise InfrastructureUnavailable(f"Kafka OAuth token endpoint {self.token_url} unreachable: {exc}") from exc
        if resp.status_code in (400, 401, 403):
            # The body may name the client but never holds the secret (it was sent, not echoed).
            raise ConfigError(
                f"Kafka OAuth token endpoint {self.token_url} refused client {self.client_id!r} "
                f"(HTTP {resp.status_code}); check FLASH_KAFKA_SASL_OAUTH_CLIENT_ID/_SECRET/_SCOPE"
            )
        if resp.status_code >= 300:
            raise InfrastructureUnavailable(f"Kafka OAuth token endpoint answered HTTP {resp.status_code}")
        body = resp.json()
        return str(body["access_token"]), float(body.get("expires_in", 3600))


@dataclass(frozen=True)
class KafkaSecurity:
    """How every Kafka client of a process authenticates and encrypts (built by :func:`kafka_security`)."""

    protocol: str = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token_provider: AbstractTokenProvider | None = None

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's producer, consumer and admin client."""
        kw: dict[str, Any] = {"security_protocol": self.protocol}
        if self.ssl_context is not None:
            kw["ssl_context"] = self.ssl_context
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism == "OAUTHBEARER":
                kw["sasl_oauth_token_provider"] = self.token_provider
            else:
                kw["sasl_plain_username"] = self.username
                kw["sasl_plain_password"] = self.password
        return kw

    def faststream_security(self) -> BaseSecurity | None:
        """The same, as FastStream's broker takes it (``security=``; OAUTHBEARER's provider goes separately)."""
        use_ssl = self.protocol in ("SSL", "SASL_SSL")
        ctx = self.ssl_context
        if self.sasl_mechanism is None:
            return BaseSecurity(ctx, use_ssl) if use_ssl else None
        if self.sasl_mechanism == "OAUTHBEARER":
            return SASLOAuthBearer(ctx, use_ssl)
        classes = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}
        return classes[self.sasl_mechanism](self.username or "", self.password or "", ctx, use_ssl)


PLAINTEXT = KafkaSecurity()


def kafka_security(settings: FlashSettings) -> KafkaSecurity:
    """Security from the ``FLASH_KAFKA_*`` settings; a missing or contradictory value is a ConfigError
    saying which variable to set."""
    mech = settings.kafka_sasl_mechanism
    tls_files = settings.kafka_ssl_ca_file or settings.kafka_ssl_cert_file
    protocol = settings.kafka_security_protocol or (
        "SASL_SSL" if mech else "SSL" if tls_files else "PLAINTEXT"
    )
    if mech and not protocol.startswith("SASL_"):
        raise ConfigError(
            f"FLASH_KAFKA_SASL_MECHANISM={mech} needs FLASH_KAFKA_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT), "
            f"not {protocol}"
        )
    if protocol.startswith("SASL_") and not mech:
        raise ConfigError(f"FLASH_KAFKA_SECURITY_PROTOCOL={protocol} needs FLASH_KAFKA_SASL_MECHANISM "
                          "(PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)")
    if settings.kafka_ssl_key_file and not settings.kafka_ssl_cert_file:
        raise ConfigError("FLASH_KAFKA_SSL_KEY_FILE is set without FLASH_KAFKA_SSL_CERT_FILE")
    ctx: ssl.SSLContext | None = None
    if protocol in ("SSL", "SASL_SSL"):
        for name in ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file"):
            path = getattr(settings, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"FLASH_{name.upper()}={path} is not a readable file")
        key_pw = settings.kafka_ssl_key_password.get_secret_value() if settings.kafka_ssl_key_password else None
        try:
            ctx = create_ssl_context(
                cafile=str(settings.kafka_ssl_ca_file) if settings.kafka_ssl_ca_file else None,
                certfile=str(settings.kafka_ssl_cert_file) if settings.kafka_ssl_cert_file else None,
                keyfile=str(settings.kafka_ssl_key_file) if settings.kafka_ssl_key_file else None,
                password=key_pw,
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"Kafka TLS files cannot be loaded ({type(exc).__name__}: {exc}); check "
                              "FLASH_KAFKA_SSL_CA_FILE, FLASH_KAFKA_SSL_CERT_FILE, FLASH_KAFKA_SSL_KEY_FILE and "
                              "FLASH_KAFKA_SSL_KEY_PASSWORD") from exc
    elif tls_files:
        raise ConfigError(f"FLASH_KAFKA_SSL_* files are set but FLASH_KAFKA_SECURITY_PROTOCOL={protocol} does not "
                          "use TLS; use SSL or SASL_SSL")
    if mech in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        if not settings.kafka_sasl_username or not settings.kafka_sasl_password:
            raise ConfigError(f"SASL {mech} needs FLASH_KAFKA_SASL_USERNAME and FLASH_KAFKA_SASL_PASSWORD")
        return KafkaSecurity(protocol, ctx, mech, settings.kafka_sasl_username,
                             settings.kafka_sasl_password.get_secret_value())
    if mech == "OAUTHBEARER":
        secret = settings.kafka_sasl_oauth_client_secret
        if not (settings.kafka_sasl_oauth_token_url and settings.kafka_sasl_oauth_client_id and secret):
            raise ConfigError("SASL OAUTHBEARER needs FLASH_KAFKA_SASL_OAUTH_TOKEN_URL, "
                              "FLASH_KAFKA_SASL_OAUTH_CLIENT_ID and FLASH_KAFKA_SASL_OAUTH_CLIENT_SECRET")
        provider = OAuthClientCredentials(
            settings.kafka_sasl_oauth_token_url, settings.kafka_sasl_oauth_client_id, secret.get_secret_value(),
            settings.kafka_sasl_oauth_scope,
            ca_file=str(settings.kafka_ssl_ca_file) if settings.kafka_ssl_ca_file else None,
        )
        return KafkaSecurity(protocol, ctx, mech, token_provider=provider)
    return KafkaSecurity(protocol, ctx)


def make_broker(bootstrap: str, security: KafkaSecurity | None = None, **kwargs: Any) -> KafkaBroker:
    """The FastStream broker every service uses; logging goes through our structlog setup."""
    # FastStream logs every batch at INFO; our runtime logs what matters (failures, dead letters).
    kwargs.setdefault("logger", None)
    sec = security or PLAINTEXT
    if sec.token_provider is not None:
        kwargs["sasl_oauth_token_provider"] = sec.token_provider
    return KafkaBroker(bootstrap, client_id="flash", security=sec.faststream_security(), **kwargs)
