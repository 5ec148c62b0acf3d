"""`edge-agent run`: stay in touch with the control plane, through its outages.

One loop: (re)connect, renew the certificate when due, heartbeat, wait. Any failure resets the
transport and waits an exponential, jittered delay before the next try, so a fleet that lost its
control plane does not come back as a thundering herd, and a restarted control plane is found
again without operator action. A second loop takes the signed release documents as they come
and installs what they name. Both talk through ``edge_agent.transport`` (gRPC with mTLS, or
MQTT with TLS): nothing here knows which.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.v1 import agent_pb2, common_pb2

from edge_agent._version import __version__
from edge_agent.backoff import Backoff
from edge_agent.credentials import Credentials, renewal_due
from edge_agent.hostinfo import host_facts
from edge_agent.install.download import RetrievalPolicy, SlowRetrievalError
from edge_agent.install.model_store import ModelStore
from edge_agent.install.probation import ProbationPolicy
from edge_agent.install.smoke import SmokeLimits, run_smoke_isolated
from edge_agent.install.trust_keeper import TrustKeeper
from edge_agent.install.updater import Updater
from edge_agent.reporting.drift import DriftConfig
from edge_agent.reporting.outbox import Outbox
from edge_agent.reporting.telemetry import TelemetrySender, encode
from edge_agent.serving.batching import policy as batch_policy
from edge_agent.state import AgentConfig, StateDir
from edge_agent.supervisor import ServingSupervisor
from edge_agent.tracing import AgentTracing
from edge_agent.transport import RefusedError, Transport, make_transport
from edge_agent.transport.base import ClosedHereError
from fleetcore.addresses import parse_hostport
from fleetcore.errors import EdgefleetError, ExpiredError, TransportError, UntrustedInputError
from fleetcore.release_doc import ReleaseDocument, SignedRelease

if TYPE_CHECKING:
    from edge_agent.serving.metrics import ServingMetrics

__all__ = ["Agent", "AgentEvent"]

log = logging.getLogger(__name__)

AgentEvent = Callable[[str, dict[str, Any]], None]


class Agent:
    def __init__(
        self,
        state_dir: Path,
        *,
        on_event: AgentEvent | None = None,
        clock: Callable[[], float] = time.time,
        config: AgentConfig | None = None,
        listen: str | None = "127.0.0.1:8080",
        grpc_listen: str | None = "127.0.0.1:8081",
        http_parser: str = "auto",
    ) -> None:
        self.state = StateDir(Path(state_dir))
        self.listen, self.grpc_listen = listen, grpc_listen
        self.http_parser = http_parser  # serving/http.py: auto, httptools or h11
        self.http_port = 0
        self.grpc_port = 0
        self.config = config or AgentConfig.load(self.state)
        self.clock = clock
        self.on_event = on_event
        # OpenTelemetry hooks: no-ops (and nothing imported) unless [otel] or OTEL_* is set.
        self.tracing = AgentTracing.start(self.config.otel, self.config.device_id,
                                          self.config.labels)
        self.backoff = Backoff(self.config.backoff_initial_seconds, self.config.backoff_max_seconds)
        # The certificate, the root of trust (it names the release and publisher keys; an
        # agent enrolled before roots uses the keys pinned at enrollment until its first root
        # arrives) and the accepted release: checked in the trust child, held here as data
        # (install/trust_keeper.py: this process never loads cryptography).
        self.keeper = TrustKeeper(self.state, self.config.device_id)
        self.trust = self.keeper.trust
        limits = SmokeLimits(call_timeout_s=self.config.smoke_timeout_seconds,
                             load_timeout_s=self.config.smoke_load_timeout_seconds,
                             latency_budget_s=self.config.smoke_latency_budget_ms / 1e3,
                             memory_bytes=int(self.config.smoke_memory_mb * 1024**2))
        self.models = ModelStore(self.state.models,
                                 verify=self._verify_bundle,
                                 smoke=functools.partial(run_smoke_isolated, limits=limits),
                                 on_transition=self._on_transition)
        self.models.recover()
        self.outbox = Outbox(self.state.outbox)
        before = self._install_states()
        # Counts this start against a version on probation (and rolls back a crash loop)
        # before anything is served.
        self.updater = Updater(
            self.models, self.state.downloads,
            policy=ProbationPolicy(max_seconds=self.config.probation_seconds,
                                   max_restarts=max(1, int(self.config.probation_max_restarts))),
            chunk_timeout=self.config.download_chunk_timeout_seconds, clock=clock,
            retrieval=RetrievalPolicy(self.config.download_min_bytes_per_second,
                                      self.config.download_rate_window_seconds,
                                      self.config.download_deadline_seconds),
        )
        self._record_installs(before)
        self.updater.tracing = self.tracing
        self._report_now: asyncio.Event | None = None
        # Set by a heartbeat whose reply names a newer release than the stream delivered: the
        # stream was lost without the transport noticing (seen after a control-plane restart).
        self._resync: asyncio.Event | None = None
        self._resync_for = 0  # the serial the last resync was for: one resync per serial
        self._decided = False
        self.sender = TelemetrySender(self.outbox)
        self.supervisor = ServingSupervisor(
            self.models, self.updater, self.outbox, clock=clock,
            sample_key=self.state.sample_key,
            drift=DriftConfig(window_requests=int(self.config.drift_window_requests),
                              window_seconds=self.config.drift_window_seconds),
        )
        self.supervisor.core.spans = self.tracing.inference_spans()
        for name, rule in self.config.batching.items():  # checked here: a bad one stops start
            self.supervisor.core.set_batching(name, batch_policy(
                rule.get("max_batch_size"), rule.get("max_queue_delay_us", 0)))
        self.host = host_facts()
        self.started_at = clock()
        self.heartbeats = 0
        self.transport: Transport = make_transport(self.config, self.state, lambda: self.creds)
        # This process's session (memory only): a second process with a copy of this state
        # directory has another one, which is how the control plane tells a clone.
        self.session_id = secrets.token_hex(16)
        self.transport.session_id = self.session_id
        # Delivery problems reported with every heartbeat: kind -> (detail, since).
        self.problems: dict[str, tuple[str, float]] = {}
        self.transport.on_roots = self._adopt_roots
        self.transport.have_root_version = self.root_version
        if self.tracing.enabled:
            self.transport.trace_metadata = self.tracing.metadata
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._status_unwritable = False
        self._status: dict[str, Any] = {
            "device_id": self.config.device_id,
            # The replica in use now (it changes on failover), and every one enrolled.
            "api_address": self.transport.address or self.config.api_address,
            "api_addresses": self.config.failover_addresses(),
            "transport": self.config.transport,
            "state": "starting",
            "last_heartbeat": None,
            "last_error": None,
            "consecutive_failures": 0,
            "root_version": self.root_version,
            # TUF 5.3.10: past this, no new release is accepted (the agent keeps serving).
            "root_expires_at": (self.keeper.root.expires_at
                                if self.keeper.root is not None else None),
        }

    # ------------------------------------------------------------------ control
    def request_stop(self) -> None:
        """Ask ``run`` to return; safe to call from any thread, also before ``run`` began
        (the flag first, then the loop: ``run`` sets them in the other order)."""
        self._stop_requested = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def run(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stop_requested:
            self._stop.set()
        log.info("agent %s starting; control plane %s over %s", self.config.device_id,
                 self.config.mqtt_url if self.config.transport == "mqtt"
                 else self.config.api_address, self.config.transport)
        self._report_now = asyncio.Event()
        self._resync = asyncio.Event()
        # Serve what is installed first: serving never waits for the control plane.
        await asyncio.to_thread(self.supervisor.configure, self.trust.current)
        servers = await self._start_serving()
        sync = asyncio.create_task(self._sync_loop())
        try:
            while not self._stop.is_set():
                delay = await self._cycle()
                self._report_now.clear()
                await self._sleep(delay, wake=self._report_now)
        finally:
            sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sync
            for stop in servers:
                await stop()
            await self.transport.close()
            self.supervisor.core.flush(5.0)
            self.supervisor.snapshot()  # the last counters wait in the outbox for next time
            self.updater.save()  # probation counters and the latency baseline survive
            self.supervisor.close()
            self.outbox.close()
            self.tracing.shutdown()
            self._set_status(state="stopped")
            log.info("agent %s stopped", self.config.device_id)

    def _metrics(self) -> ServingMetrics:
        """The Prometheus collector behind the HTTP listener's /metrics."""
        from edge_agent.serving.metrics import ServingMetrics  # noqa: PLC0415

        metrics = ServingMetrics(self.supervisor.core)
        metrics.add_gauge("edgefleet_outbox_depth", "Telemetry records waiting to be sent",
                          lambda: float(self.outbox.stats().depth))
        metrics.add_gauge("edgefleet_outbox_dropped_total",
                          "Telemetry records dropped because the outbox was full",
                          lambda: float(self.outbox.stats().dropped))
        metrics.add_gauge("edgefleet_drift_score", "Score of the latest drift window",
                          lambda: {(m,): float(d.get("score", 0.0))
                                   for m, d in self.supervisor.last_drift.items()},
                          labelnames=("model",))
        metrics.add_gauge("edgefleet_model_serving_version", "The version each model serves",
                          lambda: {(m["name"], str(m["state"])): float(m["version"])
                                   for m in self.models.status() if m["serving"]},
                          labelnames=("model", "state"))
        if self.tracing.enabled:  # OpenTelemetry reads the registry (so it is created now)
            self.tracing.export_metrics(metrics.registry)
        return metrics

    async def _start_serving(self) -> list[Callable[[], Awaitable[None]]]:
        stops: list[Callable[[], Awaitable[None]]] = []
        # Each front end is imported only when its listener is configured (docs/serving.md,
        # "Agent footprint"): uvicorn and prometheus_client for HTTP; grpc and the v2 protobuf
        # for gRPC.
        if self.listen:
            from edge_agent.serving.http import start_http  # noqa: PLC0415

            host, port = parse_hostport(self.listen)
            http, self.http_port = await start_http(self.supervisor.core, host, port,
                                                    metrics=self._metrics(),
                                                    parser=self.http_parser)
            stops.append(http.stop)
        if self.grpc_listen:
            from edge_agent.serving.grpc_server import start_grpc  # noqa: PLC0415

            host, port = parse_hostport(self.grpc_listen)
            grpc_server, self.grpc_port = await start_grpc(self.supervisor.core, host, port)
            stops.append(lambda: grpc_server.stop(1.0))
        self._emit("serving", {"http_port": self.http_port, "grpc_port": self.grpc_port})
        return stops

    # ------------------------------------------------------------------ one cycle
    async def _cycle(self) -> float:
        """One attempt to stay in touch; returns how long to wait before the next one."""
        address = self.transport.address  # the replica this attempt talks to
        try:
            if renewal_due(self.creds, self.clock(), self.config.renew_at_fraction):
                await self._renew()
            request = self._heartbeat_request()
            await self._settle_decisions()
            self.supervisor.snapshot()
            reply = await self.transport.heartbeat(request)
            sent = await self.sender.send(self.transport)
        except EdgefleetError as exc:
            return await self._failed(isinstance(exc, RefusedError), str(exc), address)
        except (OSError, ValueError) as exc:
            return await self._failed(False, f"ERROR: {exc}", address)
        self.heartbeats += 1
        self.backoff.reset()
        if self._status["state"] != "connected" or address != self._status["api_address"]:
            where = (f"via MQTT broker {self.config.mqtt_url}" if self.config.transport == "mqtt"
                     else address)
            log.info("connected to control plane %s as %s", where, self.config.device_id)
        self._check_stream(reply.release_serial)
        if reply.heartbeat_interval_seconds:
            self.config.heartbeat_interval_seconds = float(reply.heartbeat_interval_seconds)
        self._set_status(state="connected", last_heartbeat=self.clock(), last_error=None,
                         consecutive_failures=0, api_address=address or self.config.api_address)
        self._emit("heartbeat", {"count": self.heartbeats, "server_time": reply.server_time,
                                 "telemetry_sent": sent, "address": address})
        # The reply is the control plane's (over MQTT: the broker's) receipt of the report:
        # versions it listed as serving on probation may now commit (reported at once).
        if self.updater.acknowledge([(m.name, m.version) for m in request.models
                                     if m.serving and m.state == "active"]):
            self._tick()
            await self._settle_decisions()
        return self.config.heartbeat_interval_seconds

    def _tick(self) -> None:
        if not self.updater.probation:  # nothing to decide: no state can change here
            self._decided = self.updater.tick() or self._decided
            return
        before = self._install_states()
        self._decided = self.updater.tick() or self._decided
        self._record_installs(before)

    async def _settle_decisions(self) -> None:
        """After probation decided (commit or rollback): serve accordingly, record the state
        changes, tell listeners, and report at once."""
        if not self._decided:
            return
        self._decided = False
        await asyncio.to_thread(self.supervisor.configure, self.trust.current)
        doc = self.trust.current
        self._emit("models", {"models": self.updater.report(),
                              "serial": doc.serial if doc is not None else 0})
        if self._report_now is not None:
            self._report_now.set()

    def _on_transition(self, name: str, version: int, state: str, reason: str) -> None:
        """Every install state change (from whichever thread made it) is an event."""
        self.tracing.transition(name, version, state, reason)
        self._emit("install", {"name": name, "version": version, "state": state,
                               "reason": reason})

    def _check_stream(self, newest: int) -> None:
        """The control plane holds a newer release than the one accepted: reopen the release
        stream, once per serial (a document this agent refuses is not fetched every beat)."""
        have = self.trust.mark.serial if self.trust.mark is not None else 0
        if newest > have and newest != self._resync_for and self._resync is not None:
            self._resync_for = newest
            self._resync.set()

    async def _failed(self, refused: bool, message: str, address: str) -> float:
        # A replica that stopped answering: the next attempt goes to the next one (after the
        # jittered delay below). A refusal is the fleet's answer, the same on every replica.
        if refused or not await self._fail_over(address):
            await self.transport.reset()
        state = "refused" if refused else "disconnected"
        failures = self._status["consecutive_failures"] + 1
        delay = self.backoff.next_delay()
        log.warning("control plane %s (%s); retrying in %.1fs", state, message, delay)
        self._set_status(state=state, last_error=message, consecutive_failures=failures)
        self._emit("error", {"state": state, "error": message, "retry_in": delay})
        return delay

    async def _fail_over(self, address: str) -> bool:
        """Move to the next replica when ``address`` is still the one in use."""
        if not await self.transport.fail_over(address):
            return False
        log.warning("control plane replica %s stopped answering; trying %s next", address,
                    self.transport.address)
        self._emit("failover", {"from": address, "to": self.transport.address})
        return True

    def _heartbeat_request(self) -> agent_pb2.HeartbeatRequest:
        self._tick()  # probation decisions ride on the heartbeat's rhythm
        return agent_pb2.HeartbeatRequest(
            agent_version=__version__,
            host=common_pb2.HostFacts(**self.host),
            models=[
                common_pb2.InstalledModel(
                    name=m["name"], version=m["version"], state=str(m["state"]),
                    bundle_digest=m.get("bundle_digest", ""), reason=m.get("reason", "")[:256],
                    serving=bool(m["serving"]),
                )
                for m in self.updater.report()
            ],
            uptime_seconds=int(max(0.0, self.clock() - self.started_at)),
            release_serial=self.trust.mark.serial if self.trust.mark is not None else 0,
            release_digest=self.trust.mark.digest if self.trust.mark is not None else "",
            session_id=self.session_id,
            delivery_problems=[
                agent_pb2.DeliveryProblem(kind=kind, detail=detail[:500], since=since)
                for kind, (detail, since) in sorted(self._delivery_problems().items())
            ],
            root_version=self.root_version,
        )

    def _delivery_problems(self) -> dict[str, tuple[str, float]]:
        """What keeps releases from reaching this device now: a slow retrieval aborted, and a
        freeze (the newest release document held has expired; it is still served)."""
        problems = dict(self.problems)
        doc = self.trust.current
        if doc is not None and doc.expires_at <= self.clock():
            problems["freeze"] = (f"release serial {doc.serial} expired at "
                                  f"{doc.expires_at:.0f}; no newer one has arrived",
                                  doc.expires_at)
        self._status["delivery_problems"] = {k: v[0] for k, v in problems.items()}
        return problems

    # ------------------------------------------------------------------ roots of trust
    def _publisher_pems(self) -> list[bytes]:
        root = self.keeper.root
        return list(root.publisher_pems) if root is not None else self.state.publisher_keys()

    def _verify_bundle(self, path: Path) -> dict[str, Any]:
        """Bundles verify with the current root's publisher keys and threshold (read per
        bundle: a revoked publisher's key is gone from the next bundle check on)."""
        root = self.keeper.root
        threshold = root.publisher_threshold if root is not None else 1
        return Updater.verifier(self._publisher_pems(), threshold)(path)

    @property
    def creds(self) -> Credentials:
        return self.keeper.creds

    @property
    def root_version(self) -> int:
        return self.keeper.root.version if self.keeper.root is not None else 0

    def _check_root_current(self) -> None:
        """``ExpiredError`` when the newest trusted root has expired (no new releases)."""
        root, now = self.keeper.root, self.clock()
        if root is not None and root.expires_at <= now:
            raise ExpiredError(f"root version {root.version} expired at {root.expires_at}; "
                               f"the time now is {now}")

    def _adopt_roots(self, envelopes: list[bytes]) -> None:
        """Verify and persist delivered roots; move the release trust to the new release keys
        (forgetting the serial when they changed). A refused root leaves everything as it was
        and is reported; the stream goes on."""
        error = self.keeper.adopt_roots(envelopes, self.clock())
        self.transport.have_root_version = self.root_version
        self._set_status(root_version=self.root_version,
                         root_expires_at=(self.keeper.root.expires_at
                                          if self.keeper.root is not None else None))
        if error is not None:
            log.error("root refused: %s", error)
            self._record_error("root", str(error))
            self._emit("root-refused", {"error": str(error)})
        else:
            self._emit("root", {"version": self.root_version})

    # ------------------------------------------------------------------ releases
    async def _sync_loop(self) -> None:
        """Follow the release documents; verify and apply each one that arrives."""
        backoff = Backoff(self.config.backoff_initial_seconds, self.config.backoff_max_seconds)
        assert self._stop is not None
        while not self._stop.is_set():
            address = self.transport.address
            try:
                if self.trust.current is not None:  # finish what a restart interrupted
                    await self._apply(self.trust.current)
                have = self.trust.mark.serial if self.trust.mark else 0
                assert self._resync is not None
                self._resync.clear()  # this new stream answers any resync asked so far
                releases = self.transport.releases(have)
                async with contextlib.aclosing(releases):
                    while (signed := await self._next_release(releases)) is not None:
                        self._check_root_current()  # TUF 5.3.10: expired, frozen
                        doc, changed = await asyncio.to_thread(self.trust.accept, signed,
                                                               self.clock())
                        self.tracing.release(doc, dict(signed.trace_context))
                        log.info("release serial %d accepted%s", doc.serial,
                                 "" if changed else " (unchanged)")
                        self._emit("release", {"serial": doc.serial})
                        await self._apply(doc)
                        backoff.reset()
            except (RefusedError, ClosedHereError) as exc:
                log.info("release stream ended: %s", exc)
            except TransportError as exc:
                log.info("release stream ended: %s", exc)
                # Its replica died mid-stream: move on now; the heartbeat loop finds the same
                # address moved already (one move per failure).
                await self._fail_over(address)
            except UntrustedInputError as exc:
                log.error("release refused: %s", exc)
                self._record_error("release", str(exc))
                self._emit("release-refused", {"error": str(exc)})
            except (EdgefleetError, OSError) as exc:
                log.warning("sync: %s", str(exc) or type(exc).__name__)
                self._record_error("sync", str(exc))
            except Exception as exc:
                log.exception("sync failed unexpectedly; retrying")
                self._record_error("sync", f"{type(exc).__name__}: {exc}")
            await self._sleep(backoff.next_delay())

    async def _next_release(
        self, releases: AsyncGenerator[SignedRelease, None]
    ) -> SignedRelease | None:
        """The stream's next document; None when it ends or when a heartbeat asks for a
        resync (then the loop opens a new stream at once)."""
        assert self._resync is not None
        nxt = asyncio.ensure_future(anext(releases))
        kick = asyncio.ensure_future(self._resync.wait())
        try:
            await asyncio.wait({nxt, kick}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this task is cancelled: the generator must be idle to close
            kick.cancel()
            resync = not nxt.done()
            if resync:
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await nxt
        if resync:
            log.info("release stream reopened: the control plane holds serial %d",
                     self._resync_for)
            return None
        try:
            return nxt.result()
        except StopAsyncIteration:
            return None

    async def _apply(self, doc: ReleaseDocument) -> None:
        before = self._install_states()
        try:
            await self.updater.apply(doc, self.transport)
        except SlowRetrievalError as exc:
            log.warning("%s", exc)
            since = self.problems.get("slow-retrieval", ("", self.clock()))[1]
            self.problems["slow-retrieval"] = (str(exc), since)
            self._record_error("download", str(exc))
            self._emit("slow-retrieval", {"error": str(exc)})
            raise
        else:
            self.problems.pop("slow-retrieval", None)
        finally:
            self.updater.tick()
            self._record_installs(before)
            await asyncio.to_thread(self.supervisor.configure, doc)
            self._emit("models", {"models": self.updater.report(), "serial": doc.serial})
            if self._report_now is not None:
                self._report_now.set()  # tell the control plane without waiting a full beat

    async def _renew(self) -> None:
        key_pem, csr_pem = await asyncio.to_thread(self.keeper.new_key_and_csr)
        certificate_pem, ca_pem = await self.transport.renew_certificate(csr_pem)
        old = self.creds.serial
        await asyncio.to_thread(self.keeper.install_renewed, key_pem, certificate_pem, ca_pem,
                                self.clock())
        await self.transport.reset()  # reconnect with the new certificate
        log.info("certificate renewed: %s -> %s", old, self.creds.serial)
        self._emit("renewed", {"old_serial": old, "serial": self.creds.serial})

    def _install_states(self) -> dict[tuple[str, int], tuple[str, str]]:
        return {(m["name"], int(m["version"])): (str(m["state"]), str(m.get("reason", "")))
                for m in self.models.status()}

    def _record_installs(self, before: dict[tuple[str, int], tuple[str, str]]) -> None:
        """Each install state change becomes an ``install`` telemetry record."""
        now = self.clock()
        for (name, version), (state, reason) in self._install_states().items():
            if before.get((name, version), ("", ""))[0] != state:
                self.outbox.append("install", encode({"model": name, "version": version,
                                                      "state": state, "reason": reason}), now)

    def _record_error(self, where: str, error: str) -> None:
        self.outbox.append("error", encode({"where": where, "error": error[:1000]}), self.clock())

    # ------------------------------------------------------------------ plumbing
    async def _sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """Wait ``seconds``, or less when asked to stop (or ``wake`` is set)."""
        assert self._stop is not None
        waits = [asyncio.ensure_future(self._stop.wait())]
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _set_status(self, **changes: Any) -> None:
        self._status.update(changes)
        self._status.update(
            pid=os.getpid(),
            runtimes=self.supervisor.core.runtimes(),  # variant, threads, ... per version
            updated_at=self.clock(),
            certificate_serial=self.creds.serial,
            certificate_expires_at=self.creds.not_after,
        )
        try:
            self.state.write_status(self._status)
        except OSError as exc:  # a full disk must not stop the agent from serving
            if not self._status_unwritable:  # once a spell, not every heartbeat
                log.error("cannot write %s: %s", self.state.status, exc)
            self._status_unwritable = True
        else:
            self._status_unwritable = False

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(kind, data)
