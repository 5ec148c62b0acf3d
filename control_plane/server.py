"""The control-plane process: wires storage, services and the API edge together. The mTLS API
port and the enrollment port run on one event loop, with the MQTT bridge when the fleet has a
broker (`serve --mqtt URL`), and a scheduler that advances rollouts and retraining jobs and
expires old telemetry."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import grpc
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from edgefleet.v1 import admin_pb2_grpc, agent_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from control_plane.api.grpc_admin import AdminServicer
from control_plane.api.grpc_agent import AgentServicer
from control_plane.api.mqtt_bridge import MqttBridge
from control_plane.api.notify import DeviceNotifier
from control_plane.api.tracing import Tracing, TracingInterceptor
from control_plane.config import ControlPlaneConfig, parse_hostport
from control_plane.observability import (
    MetricsServer,
    Readiness,
    RpcMetricsInterceptor,
    ServerMetrics,
    export_fleet_metrics,
)
from control_plane.ops.serve_lock import HomeLock, hold_serving
from control_plane.services import Services
from control_plane.services.authority import Authority
from control_plane.services.broker import MqttSettings, refresh_crl, sync_broker_keys
from control_plane.services.fleet_metrics import FleetMetrics
from control_plane.services.keywatch import KeyWatch
from control_plane.storage import Store, open_store
from fleetcore import otel as otel_setup
from fleetcore.errors import InvalidInputError

__all__ = ["ControlPlane"]

log = logging.getLogger(__name__)

API_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
ENROLL_MAX_MESSAGE_BYTES = 64 * 1024
# The broker's CRL is valid for 30 days; it is rewritten on every revocation and this often.
CRL_REFRESH_HOURS = 12
# The gRPC health service's status is refreshed from the readiness checks this often.
HEALTH_REFRESH_SECONDS = 5.0
# The services the health service answers for, besides "" (the whole server).
HEALTH_SERVICES = ("edgefleet.v1.AgentService", "edgefleet.v1.AdminService")
# How often the home's key files are checked for a rotation (control_plane/services/keywatch.py).
KEY_RELOAD_SECONDS = 1.0
# The leadership whose holder runs the scheduled jobs (one replica among those on a database).
SCHEDULER_LEAD = "scheduler"
# What a replica announces when it saw a new root (the others look at once).
ROOTS_CHANGED = "roots"


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        # Never share a port with another process: a second control plane must fail to bind.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class ControlPlane:
    """Build with a config, ``await start()``, read the bound ports, ``await stop()``."""

    def __init__(
        self,
        config: ControlPlaneConfig,
        *,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        # A SQLite home is held while it serves: `control-plane migrate` refuses it meanwhile.
        self._home_lock: HomeLock | None = (
            None if config.database_url else hold_serving(config.home))
        self.store = store or open_store(config.store_location)
        self.authority = Authority.load(config)
        self.services = Services.build(config, self.store, self.authority, clock=clock)
        self.notifier = DeviceNotifier()
        self.keywatch = KeyWatch(config)
        self._root_version = -1  # the root version devices were last told about
        self.on_root_changed: list[Callable[[], None]] = []
        # Called with the new Authority after a rotation was loaded (e.g. the broker's files).
        self.on_keys_changed: list[Callable[[Authority], None]] = [self._sync_broker]
        self.services.ctx.on_device_change = self._device_changed
        self.bridge: MqttBridge | None = None
        self.mqtt = MqttSettings.load(config.home) if config.mqtt_url else None
        if config.mqtt_url and self.mqtt is None:
            raise InvalidInputError(
                f"--mqtt needs the broker's files: run `control-plane mqtt-config --home "
                f"{config.home} --out DIR` first"
            )
        self.api_port = 0
        self.enroll_port = 0
        self._servers: list[grpc.aio.Server] = []
        self.scheduler: AsyncIOScheduler | None = None
        # Replicas on one database: scheduler ticks this replica ran as the leader, and the
        # function that stops listening for the other replicas' changes.
        self.leader_ticks = 0
        self._stop_listening: Callable[[], None] = lambda: None
        # Observability: fleet metrics read at scrape time, the process's counters, readiness.
        self.fleet_metrics = FleetMetrics(self.services.ctx)
        self.readiness = Readiness(self.store, config.rollout_tick_seconds)
        self.metrics = ServerMetrics(self.fleet_metrics, self.readiness)
        self.metrics_server: MetricsServer | None = None
        self._health: list[health_aio.HealthServicer] = []
        # OpenTelemetry, when on ([otel] or the OTEL_* variables): the fleet's metrics
        # re-exported with device and model attributes, traces continued from callers.
        self.otel = otel_setup.start(otel_setup.OtelSettings.load(config.otel, os.environ),
                                     "edgefleet-control-plane")
        self.tracing = Tracing(self.otel, lambda device_id: {
            arm.model for arm in self.store.device_arms(device_id)})
        if self.otel is not None:
            export_fleet_metrics(self.otel, self.fleet_metrics)
            self.services.ctx.traced = self.tracing.root

    @property
    def api_address(self) -> str:
        return f"{parse_hostport(self.config.api_listen)[0]}:{self.api_port}"

    @property
    def enroll_address(self) -> str:
        return f"{parse_hostport(self.config.enroll_listen)[0]}:{self.enroll_port}"

    async def start(self) -> None:
        if self.config.metrics_listen:  # bound first: a taken address fails before the rest
            self.metrics_server = MetricsServer(self.config.metrics_listen, self.metrics,
                                                self.readiness)

        interceptors: list[grpc.aio.ServerInterceptor] = [RpcMetricsInterceptor(self.metrics)]
        if self.otel is not None:
            interceptors.append(TracingInterceptor(self.otel, self.tracing))
        api = grpc.aio.server(options=_options(API_MAX_MESSAGE_BYTES),
                              interceptors=interceptors)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(self.services, self.notifier, self.tracing), api
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.services), api)
        self.api_port = _bind(api, self.config.api_listen, self._credentials(client_auth=True))

        enroll = grpc.aio.server(options=_options(ENROLL_MAX_MESSAGE_BYTES),
                                 interceptors=interceptors)
        # The same AgentService: without a client certificate only Enroll can succeed here.
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(self.services, self.notifier), enroll
        )
        self.enroll_port = _bind(enroll, self.config.enroll_listen,
                                 self._credentials(client_auth=False))

        self.services.ctx.api_address = self.config.api_advertise or self.api_address
        for server in (api, enroll):
            # grpc.health.v1 on both ports (the API port's needs a client certificate too).
            health = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            self._health.append(health)
        for server in (api, enroll):
            await server.start()
            self._servers.append(server)
        if self.mqtt is not None:
            # Agents on MQTT: the bridge, and a CRL for the broker that is current and fresh.
            refresh_crl(self.mqtt, self.authority, self.store, time.time())
            self.bridge = MqttBridge(self.services, self.config.mqtt_url, self.config.home,
                                     self.mqtt, tracing=self.tracing,
                                     index=self.config.mqtt_bridge)
            self.bridge.grpc_streams = self.notifier.subscribers
            self.on_root_changed.append(self.bridge.roots_changed)
            await self.bridge.start()
        # Other replicas on the same database announce the releases they changed.
        loop = asyncio.get_running_loop()

        def changed(what: str) -> None:  # on the listener's thread
            loop.call_soon_threadsafe(self._remote_change, what)

        self._stop_listening = self.store.listen_changes(changed)
        # Staged rollouts advance on a schedule; their state lives in storage, so a restarted
        # control plane resumes them where they were.
        self.scheduler = AsyncIOScheduler()
        self.scheduler.add_job(self._tick_rollouts, "interval",
                               seconds=self.config.rollout_tick_seconds, max_instances=1,
                               coalesce=True)
        # Raw telemetry past its retention is rolled up and deleted, as often as configured.
        self.scheduler.add_job(self._expire_telemetry, "interval",
                               seconds=self.config.telemetry_expire_every_seconds,
                               max_instances=1, coalesce=True)
        if self.mqtt is not None:
            self.scheduler.add_job(self._refresh_crl, "interval", hours=CRL_REFRESH_HOURS)
        health_every = min(HEALTH_REFRESH_SECONDS, self.config.rollout_tick_seconds)
        self.scheduler.add_job(self._refresh_health, "interval", seconds=health_every,
                               max_instances=1, coalesce=True)
        self.scheduler.add_job(self._reload_keys, "interval", seconds=KEY_RELOAD_SECONDS,
                               max_instances=1, coalesce=True)
        self.scheduler.start()
        self.readiness.scheduler_started()
        await self._refresh_health()
        if self.metrics_server is not None:
            self.metrics_server.start()
        log.info("api (mTLS) listening on %s", self.api_address)
        log.info("enrollment (TLS + token) listening on %s", self.enroll_address)

    def _credentials(self, *, client_auth: bool) -> grpc.ServerCredentials:
        """TLS credentials that follow ``self.authority``: a new handshake after a rotation
        (KeyWatch) gets the new server certificate and client CAs, without a restart; open
        connections keep theirs."""
        served: list[tuple[bytes, bytes, bytes] | None] = [None]

        def current() -> grpc.ServerCertificateConfiguration | None:
            a = self.authority
            now = (a.server_key_pem, a.server_cert_pem, a.ca_pem)
            if now == served[0]:
                return None  # grpc keeps what it has
            served[0] = now
            return grpc.ssl_server_certificate_configuration(
                [(a.server_key_pem, a.server_cert_pem)],
                root_certificates=a.ca_pem if client_auth else None)

        initial = current()
        assert initial is not None
        return grpc.dynamic_ssl_server_credentials(
            initial, current, require_client_authentication=client_auth)

    async def _tick_rollouts(self) -> None:
        if not self.store.try_lead(SCHEDULER_LEAD):  # another replica runs the schedule
            self.readiness.ticked()
            return
        self.leader_ticks += 1
        self.metrics.job_runs.labels("rollouts").inc()
        try:
            self.services.rollouts.tick()
            await self.services.retraining.tick()
        except Exception:
            self.metrics.job_failures.labels("rollouts").inc()
            raise
        self.readiness.ticked()

    async def _expire_telemetry(self) -> None:
        if not self.store.try_lead(SCHEDULER_LEAD):
            return
        self.metrics.job_runs.labels("telemetry-retention").inc()
        try:
            self.services.telemetry.expire()
        except Exception:
            self.metrics.job_failures.labels("telemetry-retention").inc()
            raise

    async def _reload_keys(self) -> None:
        """A rotation command changed the home's keys: use them from now on. A new root
        (published by a command beside this process) goes to every device first: a release
        signed by a new key must never reach an agent before the root that lists the key."""
        self._check_roots()
        loaded = self.keywatch.poll()
        if loaded is None:
            return
        self.authority = loaded
        self.services.ctx.set_keys(loaded)
        for hook in self.on_keys_changed:
            hook(loaded)

    def _check_roots(self) -> None:
        version = self.services.ctx.roots.version()
        if version != self._root_version:
            first = self._root_version < 0
            self._root_version = version
            for notify in self.on_root_changed:
                notify()
            for device in self.store.list_devices():
                self._wake(device.id)
            if not first:  # the other replicas look now rather than at their next poll
                self.store.publish_change(ROOTS_CHANGED)

    def _remote_change(self, what: str) -> None:
        """Another replica changed ``what`` (a device's release, the roots; ``*``: anything)."""
        if what == ROOTS_CHANGED:
            self._check_roots()
        elif what == "*":
            self._check_roots()
            for device in self.store.list_devices():
                self._wake(device.id, bridge=False)
        else:
            self._wake(what, bridge=False)

    def _sync_broker(self, keys: Authority) -> None:
        """The broker serves the rotated server certificate and trusts the current CAs."""
        if self.mqtt is not None:
            sync_broker_keys(self.mqtt, keys, self.store, time.time())
        if self.bridge is not None:
            self.bridge.reload_tls()

    async def _refresh_health(self) -> None:
        """The gRPC health service says what the readiness checks say."""
        status = (health_pb2.HealthCheckResponse.SERVING if self.readiness.ready()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for health in self._health:
            for service in ("", *HEALTH_SERVICES):
                await health.set(service, status)

    def _device_changed(self, device_id: str) -> None:
        """A device's release changed or it was revoked: wake its Sync streams and the bridge,
        here and on the other replicas (the database carries the news)."""
        self.tracing.capture(device_id)  # inside a traced call: the push continues its trace
        self._wake(device_id)
        try:
            self.store.publish_change(device_id)
        except Exception:  # the change is committed; the others' agents get it at renewal
            log.warning("could not tell the other replicas that %s changed", device_id,
                        exc_info=True)

    def _wake(self, device_id: str, *, bridge: bool = True) -> None:
        """``bridge``: republish the retained release too (one replica's bridge does it: the
        one where the change happened; the broker serves every replica's devices)."""
        self.notifier.notify(device_id)
        if bridge and self.bridge is not None:
            self.bridge.device_changed(device_id)
        device = self.store.get_device(device_id)
        if self.mqtt is not None and device is not None and device.revoked_at is not None:
            refresh_crl(self.mqtt, self.authority, self.store, time.time())

    async def _refresh_crl(self) -> None:
        if self.mqtt is not None:
            refresh_crl(self.mqtt, self.authority, self.store, time.time())

    async def stop(self, grace_seconds: float = 2.0) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        self.readiness.scheduler_stopped()
        for health in self._health:
            await health.enter_graceful_shutdown()
        self._health = []
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self.bridge is not None:
            await self.bridge.stop()
            self.bridge = None
        self._stop_listening()
        await self.services.retraining.runner.stop()
        servers, self._servers = self._servers, []
        for server in servers:
            await server.stop(grace_seconds)
        if self.otel is not None:
            # Before the store closes: shutting down collects the fleet's metrics once more.
            self.otel.shutdown()  # flushes what is queued
            self.otel = None
        self.store.close()
        if self._home_lock is not None:
            self._home_lock.release()
            self._home_lock = None
        log.info("control plane stopped")

    async def wait_for_termination(self) -> None:
        for server in list(self._servers):
            await server.wait_for_termination()


def _bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials) -> int:
    host, port = parse_hostport(address)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(target, creds)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address} (in use or not a local address)")
    return int(bound)
