"""Test support for MQTT: a real Mosquitto on a free port, configured by `mqtt-config`, and a
control plane whose bridge is connected to it; plus a raw paho client for attack tests.

Everything waits on events (the broker's log line, paho callbacks, the bridge's connected
event), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from control_plane.config import ControlPlaneConfig
from control_plane.ops.home import init_home
from control_plane.ops.mqtt_config import write_broker_config
from control_plane.server import ControlPlane
from control_plane.services.broker import MqttSettings
from control_plane.storage import open_store
from fleetcore import operator_config
from scripts.broker import Mosquitto, start_mosquitto
from tests.support import WAIT, LoopThread, RunningControlPlane

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    """A port that was free a moment ago (Mosquitto cannot listen on port 0 and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mqtt_control_plane(home: Path, loop: LoopThread, clock: Any = None, *,
                             bridges: int = 1, **overrides: Any) -> RunningControlPlane:
    """`control-plane init`, `mqtt-config`, Mosquitto, then `serve --mqtt` (bridge connected)."""
    port = free_port()
    cfg = ControlPlaneConfig(home=home, api_listen="127.0.0.1:0", enroll_listen="127.0.0.1:0",
                             mqtt_url=f"mqtts://127.0.0.1:{port}")
    cfg.heartbeat_interval_seconds = 1
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg = init_home(home, config=cfg)
    store = open_store(cfg.store_location)
    try:
        settings = write_broker_config(cfg, store, home.parent / f"{home.name}-broker",
                                       port=port, bind="127.0.0.1", fleet_size=10,
                                       now=time.time(), bridges=bridges)
    finally:
        store.close()
    broker = start_mosquitto(settings, MOSQUITTO)
    kwargs = {"clock": clock} if clock is not None else {}
    cp = ControlPlane(cfg, **kwargs)
    loop.run(cp.start())
    running = RunningControlPlane(home=home, cp=cp, loop=loop, clock=clock,
                                  admin=operator_config.load(home / "operators/admin/fleet.toml"))
    running.transport = "mqtt"
    running.broker = broker
    wait_bridge(running)
    return running


def wait_bridge(cp: RunningControlPlane) -> None:
    bridge = cp.cp.bridge
    assert bridge is not None
    cp.loop.run(asyncio.wait_for(bridge.connected.wait(), WAIT))


@dataclass
class Client:
    """A raw paho MQTT 5 client whose callbacks land in queues (for attack tests)."""

    client: mqtt.Client
    connects: queue.Queue[ReasonCode | str] = field(default_factory=queue.Queue)
    messages: queue.Queue[mqtt.MQTTMessage] = field(default_factory=queue.Queue)
    subacks: queue.Queue[list[ReasonCode]] = field(default_factory=queue.Queue)
    pubacks: queue.Queue[tuple[int, ReasonCode]] = field(default_factory=queue.Queue)

    def subscribe(self, topic: str) -> ReasonCode:
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=WAIT)[0]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                correlation: bytes = b"") -> ReasonCode:
        props = Properties(PacketTypes.PUBLISH)
        if correlation:
            props.CorrelationData = correlation
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        while True:
            mid, reason = self.pubacks.get(timeout=WAIT)
            if mid == info.mid:
                return reason

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(settings: MqttSettings, cert: Path | None, key: Path | None, *,
            ca: Path | None = None, client_id: str = "",
            will: tuple[str, bytes] | None = None) -> tuple[Client, ReasonCode | str]:
    """Connect over TLS; return the client and the CONNACK reason (or why it never came)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca or settings.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5, reconnect_on_failure=False)
    c.tls_set_context(ctx)
    if will is not None:
        c.will_set(will[0], will[1], qos=1, retain=True)
    out = Client(c)
    c.on_connect = lambda cl, u, f, reason, p: out.connects.put(reason)
    c.on_disconnect = lambda cl, u, f, reason, p: out.connects.put(f"disconnected: {reason}")
    c.on_connect_fail = lambda cl, u: out.connects.put("connect failed")
    c.on_message = lambda cl, u, msg: out.messages.put(msg)
    c.on_subscribe = lambda cl, u, mid, reasons, p: out.subacks.put(list(reasons))
    c.on_publish = lambda cl, u, mid, reason, p: out.pubacks.put((mid, reason))
    try:
        c.connect("127.0.0.1", settings.port)
    except (OSError, ssl.SSLError) as exc:
        return out, f"{type(exc).__name__}: {exc}"
    c.loop_start()
    return out, out.connects.get(timeout=WAIT)


def connected(result: ReasonCode | str) -> bool:
    return isinstance(result, ReasonCode) and not result.is_failure


def threads_of(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


__all__ = ["MOSQUITTO", "Client", "Mosquitto", "connect", "connected", "free_port",
           "start_mqtt_control_plane", "wait_bridge"]
