"""Stream clients (trainer.ingest.streams) against real brokers: a Mosquitto of the test's own
(password file, a plain and a TLS listener that requires client certificates) that stays up
while consumers come and go, the machine's NATS JetStream (a stream per test, deleted after it)
and a NATS server of the test's own with TLS, client certificates and a password.

Shown: messages fetched in order; what was acknowledged never comes again; what was not comes
again flagged as a redelivery after the consumer process is killed with SIGKILL and another
opens with the same name; oversized messages acknowledged, dropped and counted; bad URLs,
refused connections, wrong passwords and missing certificates refused in one line that names
the URL and holds no password.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import pwd
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import paho.mqtt.client as mqtt
import pytest

from control_plane.services.broker import MqttSettings
from fleetcore import pki
from fleetcore.errors import InvalidInputError, TransportError
from scripts.broker import Mosquitto
from tests.mqtt_support import MOSQUITTO, free_port
from tests.support import WAIT
from trainer.ingest.streams import (
    StreamLimits,
    StreamMessage,
    StreamSource,
    client_name,
    open_stream,
    parse_stream_url,
)

NATS_URL = "nats://127.0.0.1:4222"
NATS_SERVER = "/usr/sbin/nats-server"
PASSWORD = "s3cret-Pa55word"
USER = "ingest"
ENV = "EF_TEST_STREAM_PASSWORD"


# -- brokers and certificates -----------------------------------------------------------------

@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    server_cert: Path
    server_key: Path
    other_ca: Path  # a CA that signed nothing here


def make_pki(out: Path) -> Pki:
    now = dt.datetime.now(dt.UTC)
    ttl = dt.timedelta(days=1)
    ca_key, ca = pki.create_ca("ingest-test-ca", now, ttl)
    server_key = pki.generate_key()
    server = pki.issue_server_certificate(ca_key, ca, server_key, ["127.0.0.1"], now, ttl)
    client_key = pki.generate_key()
    client = pki.issue_service_certificate(ca_key, ca, client_key.public_key(),
                                           "ingest:trainer", now, ttl)
    _, other = pki.create_ca("another-ca", now, ttl)
    out.mkdir(parents=True, exist_ok=True)
    files = {"ca.pem": pki.certificate_pem(ca), "server.pem": pki.certificate_pem(server),
             "server.key": pki.private_key_pem(server_key),
             "client.pem": pki.certificate_pem(client),
             "client.key": pki.private_key_pem(client_key),
             "other-ca.pem": pki.certificate_pem(other)}
    for name, data in files.items():
        (out / name).write_bytes(data)
        (out / name).chmod(0o600)
    return Pki(ca=out / "ca.pem", cert=out / "client.pem", key=out / "client.key",
               server_cert=out / "server.pem", server_key=out / "server.key",
               other_ca=out / "other-ca.pem")


@dataclass
class Broker:
    mosquitto: Mosquitto
    port: int  # plain, user name and password
    tls_port: int  # TLS with a client certificate, user name and password
    pki: Pki

    def url(self, topic: str, *, tls: bool = False) -> str:
        return (f"mqtts://127.0.0.1:{self.tls_port}/{topic}" if tls
                else f"mqtt://127.0.0.1:{self.port}/{topic}")

    def publish(self, topic: str, payloads: list[bytes]) -> None:
        """Publish at QoS 1 and wait for every PUBACK."""
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.username_pw_set(USER, PASSWORD)
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        try:
            for p in payloads:
                c.publish(topic, p, qos=1).wait_for_publish(WAIT)
        finally:
            c.disconnect()
            c.loop_stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One Mosquitto for the module: it stays up while consumers die and come back."""
    out = tmp_path_factory.mktemp("mosquitto")
    certs = make_pki(out / "pki")
    passwd = out / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), USER, PASSWORD], check=True,
                   capture_output=True)
    port, tls_port = free_port(), free_port()
    (out / "mosquitto.conf").write_text(
        f"user {pwd.getpwuid(os.getuid()).pw_name}\n"  # the files are this user's
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"password_file {passwd}\n"
        "persistence false\n"
        "max_queued_messages 0\n"
        "log_dest stderr\n"
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        f"listener {port} 127.0.0.1\n"
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {certs.ca}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n"
        "require_certificate true\ntls_version tlsv1.2\n")
    m = Mosquitto(MqttSettings(out=out, port=port), MOSQUITTO).start()
    yield Broker(mosquitto=m, port=port, tls_port=tls_port, pki=certs)
    m.stop()


@pytest.fixture
def password_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv(ENV, PASSWORD)
    return {"username": USER, "password_env": ENV}


def nats_run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _nats_admin(url: str, action: str, stream: str, subjects: list[str] | None = None,
                      payloads: list[bytes] | None = None, **connect: Any) -> None:
    nc = await nats.connect(url, **connect)
    try:
        js = nc.jetstream()
        if action == "add":
            await js.add_stream(name=stream, subjects=subjects)
        elif action == "delete":
            await js.delete_stream(stream)
        elif action == "publish":
            assert subjects and payloads is not None
            for p in payloads:
                await js.publish(subjects[0], p, stream=stream)
    finally:
        await nc.close()


@dataclass
class JetStream:
    stream: str
    subject: str  # the stream's subjects are SUBJECT.>; messages go to SUBJECT.rows
    url: str

    def publish(self, payloads: list[bytes], subject: str | None = None) -> None:
        nats_run(_nats_admin(NATS_URL, "publish", self.stream, [subject or self.rows], payloads))

    @property
    def rows(self) -> str:
        return f"{self.subject}.rows"


@pytest.fixture
def jetstream() -> Iterator[JetStream]:
    """A stream of this test's own on the machine's NATS (deleted afterwards)."""
    tag = uuid.uuid4().hex[:10]
    stream, subject = f"EF_TEST_{tag}", f"eftest.{tag}"
    nats_run(_nats_admin(NATS_URL, "add", stream, [f"{subject}.>"]))
    try:
        yield JetStream(stream=stream, subject=subject, url=f"{NATS_URL}/{subject}.rows")
    finally:
        nats_run(_nats_admin(NATS_URL, "delete", stream))


@dataclass
class SecureNats:
    port: int
    pki: Pki

    def url(self, subject: str) -> str:
        return f"tls://127.0.0.1:{self.port}/{subject}"

    def connect_options(self) -> dict[str, Any]:
        import ssl  # noqa: PLC0415

        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(self.pki.cert, self.pki.key)
        return {"tls": ctx, "user": USER, "password": PASSWORD}


@pytest.fixture(scope="module")
def secure_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNats]:
    """A NATS server of this module's own: JetStream, TLS with client certificates, a
    user name and a password."""
    out = tmp_path_factory.mktemp("nats")
    certs = make_pki(out / "pki")
    port = free_port()
    conf = out / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{out / "js"}" }}\n'
        f'tls {{ cert_file: "{certs.server_cert}", key_file: "{certs.server_key}", '
        f'ca_file: "{certs.ca}", verify: true }}\n'
        f'authorization {{ user: "{USER}", password: "{PASSWORD}" }}\n')
    proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ready = threading.Event()
    log: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if "Server is ready" in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert ready.wait(WAIT) and proc.poll() is None, "".join(log)
        yield SecureNats(port=port, pki=certs)
    finally:
        proc.terminate()
        proc.wait(WAIT)


# -- helpers ------------------------------------------------------------------------------------

def fetch_n(source: StreamSource, n: int) -> list[StreamMessage]:
    """Fetch until ``n`` messages came (each fetch waits for its first message)."""
    got: list[StreamMessage] = []
    for _ in range(200):
        got += source.fetch(n - len(got), 1.0)
        if len(got) >= n:
            return got
    raise AssertionError(f"only {len(got)} of {n} messages came")


def fetch_until(source: StreamSource, payload: bytes) -> list[StreamMessage]:
    """Everything fetched up to and including the message ``payload``."""
    got: list[StreamMessage] = []
    for _ in range(200):
        got += source.fetch(100, 1.0)
        if any(m.payload == payload for m in got):
            return got
    raise AssertionError(f"{payload!r} never came; got {[m.payload for m in got]}")


def rows(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"i": i, "x": i * 0.5}).encode() for i in range(start, start + n)]


def one_line_error(exc: pytest.ExceptionInfo[InvalidInputError], *must: str) -> str:
    text = str(exc.value)
    assert "\n" not in text
    assert PASSWORD not in text
    for m in must:
        assert m in text, text
    return text


def clear_session(broker: Broker, client_id: str) -> None:
    """Remove a persistent session from the broker (clean start, no expiry)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(USER, PASSWORD)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", broker.port, clean_start=True)
    c.loop_start()
    assert connected.wait(WAIT)
    c.disconnect()
    c.loop_stop()


# -- a consumer in another process, to be killed with SIGKILL ---------------------------------

def _child(url: str, name: str, settings_json: str, n: int, ack: int) -> None:
    """Fetch ``n`` messages, acknowledge the first ``ack``, report, then wait to be killed."""
    source = open_stream(url, name=name, settings=json.loads(settings_json))
    source.open()
    got = fetch_n(source, n)
    source.ack(got[:ack])
    print(json.dumps([m.payload.decode() for m in got]), flush=True)
    sys.stdin.read()  # until killed


def run_and_kill(url: str, name: str, settings: dict[str, Any], n: int, ack: int) -> list[bytes]:
    env = {**os.environ, ENV: PASSWORD}
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from tests.test_ingest_streams import _child; "
         "_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))",
         url, name, json.dumps(settings), str(n), str(ack)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        assert proc.returncode == -signal.SIGKILL
        return [p.encode() for p in json.loads(line)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- URLs and settings (pure) -------------------------------------------------------------------

@pytest.mark.parametrize(("url", "says"), [
    ("kafka://127.0.0.1:9092/rows", "not a stream URL"),
    ("mqtt://127.0.0.1:1883", "no topic"),
    ("mqtt://127.0.0.1:1883/", "no topic"),
    ("nats://127.0.0.1:4222/", "no subject"),
    ("mqtt:///rows", "no host"),
    ("mqtt://127.0.0.1:99999/rows", "port"),
    ("mqtt://127.0.0.1:0/rows", "port"),
    ("mqtt://127.0.0.1:x/rows", "port"),
    (f"mqtt://ingest:{PASSWORD}@127.0.0.1:1883/rows", "password_env"),
    (f"nats://ingest:{PASSWORD}@127.0.0.1:4222/rows", "password_env"),
    ("mqtt://127.0.0.1:1883/rows?qos=2", "no query"),
    ("mqtt://127.0.0.1:1883/sensors/#/x", "'#' must be the whole last level"),
    ("mqtt://127.0.0.1:1883/sensors/a#", "'#' must be the whole last level"),
    ("mqtt://127.0.0.1:1883/sensors/a+/x", "'+' must be a whole level"),
    ("mqtt://127.0.0.1:1883/a%00b", "not valid UTF-8"),
    ("mqtt://127.0.0.1:1883/a\nb", "control characters"),
    ("mqtt://127.0.0.1:1883/" + "t" * 70_000, "too long"),
    ("nats://127.0.0.1:4222/a..b", "not a NATS subject"),
    ("nats://127.0.0.1:4222/a.>.b", "not a NATS subject"),
    ("nats://127.0.0.1:4222/a.b*", "not a NATS subject"),
    ("nats://127.0.0.1:4222/a%20b", "not a NATS subject"),
    ("nats://127.0.0.1:4222/" + "a." * 3000 + "b", "longer than"),
])
def test_bad_urls_are_refused_in_one_line_before_any_connection(url: str, says: str) -> None:
    with pytest.raises(InvalidInputError) as exc:
        open_stream(url, name="t", settings={})
    text = one_line_error(exc, says)
    assert len(text) < 700


def test_good_urls_are_parsed_and_shown_without_userinfo() -> None:
    t = parse_stream_url("mqtts://ingest@broker.example:8883/sites/+/tills/#")
    assert (t.protocol, t.tls, t.host, t.port, t.topic, t.username) == \
        ("mqtt", True, "broker.example", 8883, "sites/+/tills/#", "ingest")
    assert t.safe_url == "mqtts://broker.example:8883/sites/+/tills/#"
    assert parse_stream_url("mqtt://h/sites/%23").topic == "sites/#"
    assert parse_stream_url("mqtt://h/rows").port == 1883
    n = parse_stream_url("tls://h/sites.*.tills.>")
    assert (n.protocol, n.tls, n.port, n.topic) == ("nats", True, 4222, "sites.*.tills.>")
    assert parse_stream_url("nats://[::1]:4222/a").safe_url == "nats://[::1]:4222/a"


def test_client_names_are_stable_and_safe() -> None:
    assert client_name("edgefleet-ingest-0123456789abcdef") == "edgefleet-ingest-0123456789abcdef"
    odd = client_name("pipelines/wine.toml#mqtt://x")
    assert odd == client_name("pipelines/wine.toml#mqtt://x")
    assert odd.startswith("ingest-") and odd.replace("-", "").isalnum()
    assert client_name("a" * 65) != "a" * 65


@pytest.mark.parametrize(("url", "settings", "says"), [
    ("mqtt://127.0.0.1:1883/rows", {"qos": 2}, "QoS 2 is not used"),
    ("mqtt://127.0.0.1:1883/rows", {"qos": "1"}, "qos must be"),
    ("mqtt://127.0.0.1:1883/rows", {"username": "u", "password_env": "EF_NOT_SET_ANYWHERE"},
     "EF_NOT_SET_ANYWHERE (data.password_env) is not set"),
    ("mqtt://127.0.0.1:1883/rows", {"password_env": ENV}, "without a user name"),
    ("mqtt://127.0.0.1:1883/rows", {"tls_ca": "/x/ca.pem"}, "use mqtts://"),
    ("nats://127.0.0.1:4222/rows", {"tls_cert": "/x/c.pem", "tls_key": "/x/c.key"},
     "use tls://"),
    ("mqtts://127.0.0.1:1883/rows", {"tls_cert": "/x/c.pem"}, "go together"),
    ("mqtts://127.0.0.1:1883/rows", {"tls_ca": "/nonexistent/ca.pem"}, "ca.pem"),
    ("nats://127.0.0.1:4222/rows", {"ack_wait_seconds": 0}, "ack_wait_seconds"),
    ("nats://127.0.0.1:4222/rows", {"stream": ""}, "data.stream"),
])
def test_bad_settings_are_refused_in_one_line(monkeypatch: pytest.MonkeyPatch, url: str,
                                              settings: dict[str, Any], says: str) -> None:
    monkeypatch.setenv(ENV, PASSWORD)
    with pytest.raises(InvalidInputError) as exc:
        open_stream(url, name="t", settings=settings)
    one_line_error(exc, says, url.split("?", maxsplit=1)[0])


# -- MQTT ---------------------------------------------------------------------------------------

def test_mqtt_in_order_and_what_was_acknowledged_never_comes_again(
        broker: Broker, password_env: dict[str, Any]) -> None:
    topic, name = f"ingest/{uuid.uuid4().hex[:8]}/rows", f"t-{uuid.uuid4().hex[:12]}"
    url = broker.url(topic)
    try:
        source = open_stream(url, name=name, settings=password_env)
        assert source.url == url
        source.open()
        broker.publish(topic, rows(20))
        got = fetch_n(source, 20)
        assert [m.payload for m in got] == rows(20)
        assert not any(m.redelivered for m in got)
        assert all(m.position is None for m in got)
        source.ack(got[:12])
        source.ack(got[:12])  # idempotent: nothing is acknowledged twice
        source.close()

        # the same name again: the session kept the 8 unacknowledged, flagged DUP, in order
        source = open_stream(url, name=name, settings=password_env)
        source.open()
        again = fetch_n(source, 8)
        assert [m.payload for m in again] == rows(8, 12)
        assert all(m.redelivered for m in again)
        source.ack(again)
        broker.publish(topic, [b'{"end": true}'])
        end = fetch_until(source, b'{"end": true}')
        assert [m.payload for m in end] == [b'{"end": true}']
        source.ack(end)
        source.close()

        # while away, the session queues what is published for it
        broker.publish(topic, rows(3, 100))
        source = open_stream(url, name=name, settings=password_env)
        source.open()
        assert [m.payload for m in fetch_n(source, 3)] == rows(3, 100)
        source.close()
    finally:
        clear_session(broker, name)


def test_mqtt_wildcard_topics(broker: Broker, password_env: dict[str, Any]) -> None:
    base, name = f"ingest/{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:12]}"
    source = open_stream(broker.url(f"{base}/+/readings"), name=name, settings=password_env)
    source.open()
    try:
        broker.publish(f"{base}/site1/readings", [b"1"])
        broker.publish(f"{base}/site1/other", [b"no"])
        broker.publish(f"{base}/site2/readings", [b"2"])
        got = fetch_n(source, 2)
        assert [m.payload for m in got] == [b"1", b"2"]
        source.ack(got)
    finally:
        source.close()
        clear_session(broker, name)


@pytest.mark.slow
def test_mqtt_sigkilled_consumer_gets_what_it_had_not_acknowledged(
        broker: Broker, password_env: dict[str, Any]) -> None:
    topic, name = f"ingest/{uuid.uuid4().hex[:8]}/rows", f"t-{uuid.uuid4().hex[:12]}"
    url = broker.url(topic)
    try:
        # the session exists before anything is published (a first open subscribes)
        first = open_stream(url, name=name, settings=password_env)
        first.open()
        first.close()
        broker.publish(topic, rows(10))
        seen = run_and_kill(url, name, password_env, 10, 4)
        assert seen == rows(10)

        source = open_stream(url, name=name, settings=password_env)
        source.open()
        try:
            again = fetch_n(source, 6)
            assert [m.payload for m in again] == rows(6, 4)
            assert all(m.redelivered for m in again)
            source.ack(again)
            broker.publish(topic, [b'{"end": true}'])
            rest = fetch_until(source, b'{"end": true}')
            assert [m.payload for m in rest] == [b'{"end": true}']  # nothing acked came again
        finally:
            source.close()
    finally:
        clear_session(broker, name)


def test_mqtt_oversized_messages_are_counted_and_dropped(
        broker: Broker, password_env: dict[str, Any]) -> None:
    topic, name = f"ingest/{uuid.uuid4().hex[:8]}/rows", f"t-{uuid.uuid4().hex[:12]}"
    url = broker.url(topic)
    limits = StreamLimits(max_message_bytes=100)
    try:
        source = open_stream(url, name=name, settings=password_env, limits=limits)
        source.open()
        broker.publish(topic, [b"a", b"x" * 101, b"b", b"y" * 5000, b"c"])
        got = fetch_until(source, b"c")
        assert [m.payload for m in got] == [b"a", b"b", b"c"]
        assert source.oversized == 2
        source.close()  # a, b, c not acknowledged; the oversized ones were
        source = open_stream(url, name=name, settings=password_env, limits=limits)
        source.open()
        got = fetch_until(source, b"c")
        assert [m.payload for m in got] == [b"a", b"b", b"c"]
        assert source.oversized == 0
        source.close()
    finally:
        clear_session(broker, name)


def test_mqtts_with_a_client_certificate(broker: Broker, password_env: dict[str, Any]) -> None:
    topic, name = f"ingest/{uuid.uuid4().hex[:8]}/rows", f"t-{uuid.uuid4().hex[:12]}"
    url = broker.url(topic, tls=True)
    tls = {"tls_ca": str(broker.pki.ca), "tls_cert": str(broker.pki.cert),
           "tls_key": str(broker.pki.key)}
    try:
        source = open_stream(url, name=name, settings={**password_env, **tls})
        source.open()
        broker.publish(topic, rows(3))
        got = fetch_n(source, 3)
        assert [m.payload for m in got] == rows(3)
        source.ack(got)
        source.close()
    finally:
        clear_session(broker, name)

    no_cert = open_stream(url, name=name, settings={**password_env, "tls_ca": str(broker.pki.ca)})
    with pytest.raises(InvalidInputError) as exc:
        no_cert.open()
    one_line_error(exc, url)

    wrong_ca = open_stream(url, name=name, settings={**password_env, **tls,
                                                      "tls_ca": str(broker.pki.other_ca)})
    with pytest.raises(InvalidInputError) as exc:
        wrong_ca.open()
    one_line_error(exc, url, "CERTIFICATE_VERIFY_FAILED")


def test_mqtt_refused_connection_and_wrong_password_in_one_line(
        broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}/rows"
    with pytest.raises(InvalidInputError) as exc:
        open_stream(url, name="t-refused", settings={}).open()
    one_line_error(exc, url, "connection refused")

    monkeypatch.setenv(ENV, "not-" + PASSWORD)
    url = broker.url("rows")
    source = open_stream(url, name="t-wrong", settings={"username": USER, "password_env": ENV})
    with pytest.raises(InvalidInputError) as exc:
        source.open()
    text = one_line_error(exc, url, "refused the connection", "password_env")
    assert "not-" + PASSWORD not in text

    anonymous = open_stream(url, name="t-anonymous", settings={})
    with pytest.raises(InvalidInputError) as exc:
        anonymous.open()
    one_line_error(exc, url, "refused the connection")


# -- NATS JetStream -----------------------------------------------------------------------------

def test_nats_in_order_with_positions_and_what_was_acknowledged_never_comes_again(
        jetstream: JetStream) -> None:
    name = f"t-{uuid.uuid4().hex[:12]}"
    settings = {"ack_wait_seconds": 1}
    jetstream.publish(rows(20))
    source = open_stream(jetstream.url, name=name, settings=settings)
    source.open()
    got = fetch_n(source, 20)
    assert [m.payload for m in got] == rows(20)
    assert [m.position for m in got] == list(range(1, 21))
    assert not any(m.redelivered for m in got)
    source.ack(got[:12])
    source.ack(got[:12])  # idempotent
    source.close()

    source = open_stream(jetstream.url, name=name, settings=settings)
    source.open()
    try:
        again = fetch_n(source, 8)  # after ack_wait
        assert [m.position for m in again] == list(range(13, 21))
        assert all(m.redelivered for m in again)
        source.ack(again)
        jetstream.publish([b'{"end": true}'])
        rest = fetch_until(source, b'{"end": true}')
        assert [(m.position, m.redelivered) for m in rest] == [(21, False)]
    finally:
        source.close()


def test_nats_finds_the_stream_by_subject_or_by_name(jetstream: JetStream) -> None:
    jetstream.publish([b"1"], subject=f"{jetstream.subject}.other")
    jetstream.publish([b"2"])
    for settings in ({}, {"stream": jetstream.stream}):
        source = open_stream(f"{NATS_URL}/{jetstream.subject}.*",
                             name=f"t-{uuid.uuid4().hex[:12]}", settings=settings)
        source.open()
        try:
            assert [m.payload for m in fetch_n(source, 2)] == [b"1", b"2"]
        finally:
            source.close()

    missing = open_stream(f"{NATS_URL}/eftest.nothing-here.rows", name="t", settings={})
    with pytest.raises(InvalidInputError) as exc:
        missing.open()
    one_line_error(exc, "no JetStream stream holds the subject", "data.stream")

    wrong = open_stream(jetstream.url, name="t", settings={"stream": "EF_NO_SUCH_STREAM"})
    with pytest.raises(InvalidInputError) as exc:
        wrong.open()
    one_line_error(exc, "no JetStream stream named 'EF_NO_SUCH_STREAM'")

    outside = open_stream(f"{NATS_URL}/eftest.outside.rows", name="t",
                          settings={"stream": jetstream.stream})
    with pytest.raises(InvalidInputError) as exc:
        outside.open()
    one_line_error(exc, "cannot create the durable consumer")


@pytest.mark.slow
def test_nats_sigkilled_consumer_gets_what_it_had_not_acknowledged(jetstream: JetStream) -> None:
    name = f"t-{uuid.uuid4().hex[:12]}"
    settings = {"ack_wait_seconds": 1}
    jetstream.publish(rows(10))
    seen = run_and_kill(jetstream.url, name, settings, 10, 4)
    assert seen == rows(10)
    source = open_stream(jetstream.url, name=name, settings=settings)
    source.open()
    try:
        again = fetch_n(source, 6)
        assert [m.position for m in again] == list(range(5, 11))
        assert [m.payload for m in again] == rows(6, 4)
        assert all(m.redelivered for m in again)
        source.ack(again)
        jetstream.publish([b'{"end": true}'])
        rest = fetch_until(source, b'{"end": true}')
        assert [m.position for m in rest] == [11]  # nothing acknowledged came again
    finally:
        source.close()


def test_nats_oversized_messages_are_counted_and_dropped(jetstream: JetStream) -> None:
    name = f"t-{uuid.uuid4().hex[:12]}"
    limits = StreamLimits(max_message_bytes=100)
    settings = {"ack_wait_seconds": 1}
    jetstream.publish([b"a", b"x" * 101, b"b", b"y" * 5000, b"c"])
    source = open_stream(jetstream.url, name=name, settings=settings, limits=limits)
    source.open()
    got = fetch_until(source, b"c")
    assert [(m.payload, m.position) for m in got] == [(b"a", 1), (b"b", 3), (b"c", 5)]
    assert source.oversized == 2
    source.ack(got)
    jetstream.publish([b"end"])
    assert [m.position for m in fetch_until(source, b"end")] == [6]  # 2 and 4 never again
    source.close()


def test_nats_over_tls_with_a_client_certificate_and_a_password(
        secure_nats: SecureNats, password_env: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    tag = uuid.uuid4().hex[:8]
    stream, subject = f"EF_TLS_{tag}", f"eftls.{tag}"
    opts = secure_nats.connect_options()
    server = f"tls://127.0.0.1:{secure_nats.port}"
    nats_run(_nats_admin(server, "add", stream, [f"{subject}.>"], **opts))
    try:
        nats_run(_nats_admin(server, "publish", stream, [f"{subject}.rows"], rows(3), **opts))
        tls = {"tls_ca": str(secure_nats.pki.ca), "tls_cert": str(secure_nats.pki.cert),
               "tls_key": str(secure_nats.pki.key)}
        url = secure_nats.url(f"{subject}.rows")
        source = open_stream(url, name=f"t-{tag}", settings={**password_env, **tls})
        source.open()
        try:
            got = fetch_n(source, 3)
            assert [m.payload for m in got] == rows(3)
            source.ack(got)
        finally:
            source.close()

        monkeypatch.setenv(ENV, "not-" + PASSWORD)
        wrong = open_stream(url, name=f"t-{tag}", settings={**password_env, **tls})
        with pytest.raises(InvalidInputError) as exc:
            wrong.open()
        text = one_line_error(exc, url, "authorization violation", "password_env")
        assert "not-" + PASSWORD not in text
        monkeypatch.setenv(ENV, PASSWORD)

        no_cert = open_stream(url, name=f"t-{tag}",
                              settings={**password_env, "tls_ca": str(secure_nats.pki.ca)})
        with pytest.raises(InvalidInputError) as exc:
            no_cert.open()
        one_line_error(exc, url, "cannot connect")
    finally:
        nats_run(_nats_admin(server, "delete", stream, **opts))


def test_nats_refused_connection_in_one_line() -> None:
    url = f"nats://127.0.0.1:{free_port()}/rows"
    with pytest.raises(InvalidInputError) as exc:
        open_stream(url, name="t", settings={}).open()
    one_line_error(exc, url, "connection refused")


def test_no_client_thread_is_left_behind(jetstream: JetStream, broker: Broker,
                                         password_env: dict[str, Any]) -> None:
    before = {t.ident for t in threading.enumerate()}
    for url, settings in ((jetstream.url, {}), (broker.url("rows"), password_env)):
        name = f"t-{uuid.uuid4().hex[:12]}"
        source = open_stream(url, name=name, settings=settings)
        source.open()
        source.close()
        if url.startswith("mqtt"):
            clear_session(broker, name)
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not left, left



# -- the publisher and the bench ------------------------------------------------------------

def test_publisher_sends_wine_rows_with_column_names(
        broker: Broker, jetstream: JetStream, password_env: dict[str, Any]) -> None:
    from examples.pipelines.publish_stream import payloads, publish, wine_rows  # noqa: PLC0415

    rows_ = wine_rows(12, offset=170)
    assert [r["id"] for r in rows_] == list(range(170, 182))  # past the 178 rows: ids go on
    assert {"customer_email", "shop", "cultivar", "alcohol", "od280_od315_of_diluted_wines"} \
        <= set(rows_[0])
    messages = list(payloads(rows_, 5, bad=1))
    assert len(messages) == 4 and b"{not json" in messages

    topic, name = f"ingest/{uuid.uuid4().hex[:8]}/rows", f"t-{uuid.uuid4().hex[:12]}"
    source = open_stream(broker.url(topic), name=name, settings=password_env)
    source.open()
    try:
        assert publish(broker.url(topic), messages, password_env) == 4
        got = fetch_n(source, 4)
        good = [json.loads(m.payload) for m in got if m.payload != b"{not json"]
        assert [r for batch in good for r in batch] == rows_
        source.ack(got)
    finally:
        source.close()
        clear_session(broker, name)

    assert publish(jetstream.url, list(payloads(rows_, 1))) == 12
    nats_source = open_stream(jetstream.url, name=f"t-{uuid.uuid4().hex[:12]}", settings={})
    nats_source.open()
    try:
        assert [json.loads(m.payload) for m in fetch_n(nats_source, 12)] == rows_
    finally:
        nats_source.close()


def test_publisher_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from examples.pipelines.publish_stream import main  # noqa: PLC0415

    assert main([f"mqtt://127.0.0.1:{free_port()}/rows", "--rows", "1"]) == 1
    assert main([f"{NATS_URL}/eftest.nothing-here.rows", "--rows", "1"]) == 1
    assert main(["mqtt://127.0.0.1:1883/rows/#", "--rows", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert "--create-stream" in err[1]


@pytest.mark.slow
def test_bench_measures_both_clients_and_their_baselines(tmp_path: Path) -> None:
    from scripts.bench_ingest_streams import bench_streams  # noqa: PLC0415

    rows_ = bench_streams(tmp_path, 300, progress=lambda m: None)
    assert [r["name"].split(" stream client")[0] for r in rows_] == ["MQTT", "NATS JetStream"]
    for r in rows_:
        assert r["figure"] > 0 and r["baseline"] > 0 and r["unit"] == "msg/s"


def test_nats_a_deleted_consumer_is_reported_in_one_line(
        jetstream: JetStream, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.ingest import streams_nats  # noqa: PLC0415

    monkeypatch.setattr(streams_nats, "CONSUMER_CHECK_S", 0.0)
    name = f"t-{uuid.uuid4().hex[:12]}"
    source = open_stream(jetstream.url, name=name, settings={})
    source.open()
    try:
        assert source.fetch(10, 0.2) == []  # idle, and the consumer is there

        async def delete() -> None:
            nc = await nats.connect(NATS_URL)
            await nc.jetstream().delete_consumer(jetstream.stream, name)
            await nc.close()

        nats_run(delete())
        with pytest.raises(TransportError) as exc:
            source.fetch(10, 0.2)
        assert "\n" not in str(exc.value) and f"durable consumer {name!r}" in str(exc.value)
    finally:
        source.close()
