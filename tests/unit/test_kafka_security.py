"""Kafka client settings for real clusters: the FLASH_KAFKA_* variables become the keyword arguments every
aiokafka client (producer, admin, FastStream's consumers) is built with, and the topic definitions the
admin creates. No sockets: TLS is checked with an in-memory handshake, OAuth with a mock transport."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from canonical.topics import TOPICS, TopicSpec
from sandbox.tls import make_tls
from servicekit.errors import ConfigError
from servicekit.kafka import KafkaPublisher, OAuthClientCredentials, kafka_security, make_broker, new_topics
from servicekit.settings import FlashSettings

pytestmark = pytest.mark.unit


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> None:
    """A full TLS handshake between two contexts through memory buffers (raises on failure)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done_c = done_s = False
    for _ in range(20):
        for obj, name in ((c, "c"), (s, "s")):
            if (name == "c" and done_c) or (name == "s" and done_s):
                continue
            try:
                obj.do_handshake()
                if name == "c":
                    done_c = True
                else:
                    done_s = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done_c and done_s:
            return
    raise AssertionError("handshake did not finish")


def test_nothing_set_is_plaintext() -> None:
    sec = kafka_security(FlashSettings())
    assert sec.client_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert sec.faststream_security() is None


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    for name, value in {
        "FLASH_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "FLASH_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "FLASH_KAFKA_SASL_USERNAME": "flash", "FLASH_KAFKA_SASL_PASSWORD": "pw-123",
        "FLASH_KAFKA_SSL_CA_FILE": str(tls.ca_path), "FLASH_KAFKA_REPLICATION_FACTOR": "5",
        "FLASH_KAFKA_MIN_INSYNC_REPLICAS": "3",
    }.items():
        monkeypatch.setenv(name, value)
    settings = FlashSettings()
    kw = kafka_security(settings).client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("flash", "pw-123")
    assert isinstance(kw["ssl_context"], ssl.SSLContext)
    topic = new_topics(settings, TOPICS[:1])[0]
    assert (topic.replication_factor, topic.topic_configs["min.insync.replicas"]) == (5, "3")
    assert "pw-123" not in repr(settings) and "pw-123" not in repr(kafka_security(settings))


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_password_mechanisms_default_to_sasl_ssl_with_system_cas(mechanism: str) -> None:
    settings = FlashSettings(kafka_sasl_mechanism=mechanism, kafka_sasl_username="u", kafka_sasl_password="p")
    sec = kafka_security(settings)
    kw = sec.client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_mechanism"] == mechanism
    assert kw["ssl_context"].verify_mode == ssl.CERT_REQUIRED and kw["ssl_context"].check_hostname
    # FastStream's broker (the consumers) is given the same settings
    broker_kw = make_broker("kafka:9092", sec)._connection_kwargs
    assert {k: broker_kw[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                       "sasl_plain_password")} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": mechanism, "sasl_plain_username": "u",
        "sasl_plain_password": "p"}
    assert broker_kw["ssl_context"] is kw["ssl_context"]


def test_sasl_plaintext_without_tls_when_asked() -> None:
    settings = FlashSettings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                             kafka_sasl_username="u", kafka_sasl_password="p")
    kw = kafka_security(settings).client_kwargs()
    assert kw["security_protocol"] == "SASL_PLAINTEXT" and "ssl_context" not in kw


async def test_publisher_client_gets_the_security_and_acks_all(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    sec = kafka_security(FlashSettings(kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u",
                                       kafka_sasl_password="p", kafka_ssl_ca_file=tls.ca_path))
    publisher = KafkaPublisher("kafka:9092", security=sec)
    client = publisher._producer.client
    assert (client._security_protocol, client._sasl_mechanism) == ("SASL_SSL", "PLAIN")
    assert client._ssl_context is sec.ssl_context
    assert publisher._producer._sender._acks == -1  # "all"
    await publisher._producer.client.close()


def test_tls_ca_and_client_certificate_complete_a_mutual_handshake(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    settings = FlashSettings(kafka_ssl_ca_file=tls.ca_path, kafka_ssl_cert_file=tls.cert_path,
                             kafka_ssl_key_file=tls.key_path)
    sec = kafka_security(settings)
    assert sec.protocol == "SSL"
    server = tls.server_context()
    server.verify_mode = ssl.CERT_REQUIRED  # the broker demands a client certificate
    server.load_verify_locations(cafile=str(tls.ca_path))
    assert sec.ssl_context is not None
    _handshake(sec.ssl_context, server)
    # without the client certificate the same broker refuses
    no_cert = kafka_security(FlashSettings(kafka_ssl_ca_file=tls.ca_path))
    assert no_cert.ssl_context is not None
    with pytest.raises(ssl.SSLError):
        _handshake(no_cert.ssl_context, server)


def test_encrypted_client_key_needs_its_password(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    key = serialization.load_pem_private_key(tls.key_path.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"s3cret")))
    ok = FlashSettings(kafka_ssl_ca_file=tls.ca_path, kafka_ssl_cert_file=tls.cert_path, kafka_ssl_key_file=locked,
                       kafka_ssl_key_password="s3cret")
    assert kafka_security(ok).ssl_context is not None
    wrong = FlashSettings(kafka_ssl_ca_file=tls.ca_path, kafka_ssl_cert_file=tls.cert_path,
                          kafka_ssl_key_file=locked, kafka_ssl_key_password="nope")
    with pytest.raises(ConfigError, match="FLASH_KAFKA_SSL_KEY_PASSWORD"):
        kafka_security(wrong)


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"kafka_sasl_mechanism": "PLAIN"}, "FLASH_KAFKA_SASL_USERNAME"),
    ({"kafka_sasl_mechanism": "OAUTHBEARER"}, "FLASH_KAFKA_SASL_OAUTH_TOKEN_URL"),
    ({"kafka_security_protocol": "PLAINTEXT", "kafka_sasl_mechanism": "PLAIN", "kafka_sasl_username": "u",
      "kafka_sasl_password": "p"}, "SASL_SSL"),
    ({"kafka_security_protocol": "SASL_SSL"}, "FLASH_KAFKA_SASL_MECHANISM"),
    ({"kafka_ssl_ca_file": "/nonexistent/ca.pem"}, "not a readable file"),
    ({"kafka_security_protocol": "PLAINTEXT", "kafka_ssl_ca_file": "/etc/hosts"}, "does not use TLS"),
    ({"kafka_ssl_key_file": "/etc/hosts"}, "without FLASH_KAFKA_SSL_CERT_FILE"),
])
def test_wrong_or_missing_settings_say_what_to_set(kwargs: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        kafka_security(FlashSettings(**kwargs))  # type: ignore[arg-type]


async def test_oauthbearer_fetches_a_client_credentials_token_and_reuses_it() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json={"access_token": f"tok-{len(calls)}", "expires_in": 3600,
                                         "token_type": "Bearer"})

    settings = FlashSettings(kafka_sasl_mechanism="OAUTHBEARER", kafka_sasl_oauth_token_url="https://idp/token",
                             kafka_sasl_oauth_client_id="flash-app", kafka_sasl_oauth_client_secret="shh",
                             kafka_sasl_oauth_scope="kafka")
    sec = kafka_security(settings)
    kw = sec.client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "OAUTHBEARER"
    provider = kw["sasl_oauth_token_provider"]
    assert isinstance(provider, OAuthClientCredentials)
    assert make_broker("kafka:9092", sec)._connection_kwargs["sasl_oauth_token_provider"] is provider
    provider._transport = httpx.MockTransport(handler)
    assert await provider.token() == "tok-1"
    assert await provider.token() == "tok-1"  # reused, not fetched per connection
    assert len(calls) == 1
    form = dict(httpx.QueryParams(calls[0].content.decode()))
    assert form == {"grant_type": "client_credentials", "client_id": "flash-app", "client_secret": "shh",
                    "scope": "kafka"}
    provider._expires = 0.0  # expired: fetched again
    assert await provider.token() == "tok-2"


async def test_oauthbearer_refusal_is_a_config_error_without_the_secret() -> None:
    provider = OAuthClientCredentials("https://idp/token", "app", "very-secret",
                                      transport=httpx.MockTransport(lambda r: httpx.Response(401, json={})))
    with pytest.raises(ConfigError) as info:
        await provider.token()
    assert "very-secret" not in str(info.value) and "FLASH_KAFKA_SASL_OAUTH_CLIENT_ID" in str(info.value)


def test_topics_get_replication_and_min_isr_from_the_spec() -> None:
    topics = {t.name: t for t in new_topics(FlashSettings(topic_prefix="p."))}
    assert len(topics) == len(TOPICS)
    for spec in TOPICS:
        t = topics[f"p.{spec.name}"]
        assert t.num_partitions == spec.partitions
        assert t.replication_factor == spec.replication_factor == 3
        assert t.topic_configs == {"min.insync.replicas": str(spec.min_insync_replicas),
                                   "retention.ms": str(spec.retention_ms)}


def test_embedded_broker_gets_replication_one() -> None:
    for t in new_topics(FlashSettings(), extra=["x.y"], embedded=True):
        assert t.replication_factor == 1 and t.topic_configs["min.insync.replicas"] == "1"


def test_overrides_and_their_limits() -> None:
    spec = TopicSpec("a", (), "k", 2, 1000, replication_factor=3, min_insync_replicas=2)
    [t] = new_topics(FlashSettings(kafka_replication_factor=1), [spec])
    assert (t.replication_factor, t.topic_configs["min.insync.replicas"]) == (1, "1")  # min ISR follows down
    [t] = new_topics(FlashSettings(kafka_replication_factor=5, kafka_min_insync_replicas=3), [spec], embedded=True)
    assert (t.replication_factor, t.topic_configs["min.insync.replicas"]) == (5, "3")  # explicit wins
    with pytest.raises(ConfigError, match="exceeds the replication factor"):
        new_topics(FlashSettings(kafka_replication_factor=2, kafka_min_insync_replicas=3), [spec])
