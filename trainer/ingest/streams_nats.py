"""A NATS JetStream stream source (nats-py): a durable pull consumer with explicit acks.

nats-py is asyncio; this client runs a private event loop in a daemon thread and offers the
synchronous interface of ``trainer.ingest.streams``. The consumer is durable (named from the
ingest's name) on the stream named by ``stream`` or, without it, on the stream whose subjects
hold the URL's subject; it starts at the beginning of the stream (deliver policy "all") and a
message fetched and not acknowledged within ``ack_wait_seconds`` (default 30) is delivered
again (``num_delivered`` > 1: ``redelivered``), so a consumer killed with SIGKILL and restarted
gets what it had not acknowledged once that time has passed. ``ack`` returns once the server
has the acks (a flush: PING/PONG after them).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from fleetcore.errors import InvalidInputError, TransportError
from trainer.ingest.streams_base import Credentials, StreamLimits, StreamMessage, StreamTarget

__all__ = ["NatsSource"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10
ACK_WAIT_S = 30.0
MAX_ACK_PENDING = 20_000  # fetched and unacknowledged messages the server allows us
FLUSH_TIMEOUT_S = 10.0
CALL_GRACE_S = 15.0  # beyond a call's own timeout, before the loop thread counts as stuck
RECONNECT_WAIT_S = 2
CONSUMER_CHECK_S = 30.0  # idle this long, ask whether the consumer still exists


class NatsSource:
    """nats:// and tls:// (see the module docstring)."""

    def __init__(self, target: StreamTarget, durable: str, creds: Credentials,
                 ctx: ssl.SSLContext | None, settings: Mapping[str, Any],
                 limits: StreamLimits) -> None:
        where = f"data source {target.safe_url}"
        ack_wait = settings.get("ack_wait_seconds")
        ack_wait = ACK_WAIT_S if ack_wait is None else ack_wait
        if isinstance(ack_wait, bool) or not isinstance(ack_wait, int | float) \
                or not 1 <= ack_wait <= 3600:
            raise InvalidInputError(f"{where}: ack_wait_seconds must be 1..3600")
        stream = settings.get("stream")
        if stream is not None and not (isinstance(stream, str) and stream.strip()):
            raise InvalidInputError(f"{where}: data.stream must name a JetStream stream")
        self.url = target.safe_url
        self.oversized = 0
        self.stream: str | None = stream
        self._where = where
        self._target, self._durable, self._creds, self._ctx = target, durable, creds, ctx
        self._limits, self._ack_wait = limits, float(ack_wait)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Nats | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._js: JetStreamContext | None = None
        self._checked = time.monotonic()

    # -- the interface ----------------------------------------------------------------------

    def open(self) -> None:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="ingest-nats", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._call(self._open(), CONNECT_TIMEOUT_S * 3)
        except BaseException:
            self.close()
            raise

    def fetch(self, max_messages: int, timeout_s: float) -> list[StreamMessage]:
        return self._call(self._fetch(max(1, max_messages), max(0.05, timeout_s)),
                          timeout_s + CALL_GRACE_S)

    def ack(self, messages: Sequence[StreamMessage]) -> None:
        msgs = [m.token for m in messages if isinstance(m.token, Msg) and not m.token.is_acked]
        if msgs:
            self._call(self._ack(msgs), FLUSH_TIMEOUT_S + CALL_GRACE_S)

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        if self._nc is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(CALL_GRACE_S)
            except Exception as exc:
                log.debug("%s: close: %s", self.url, exc)
        try:
            asyncio.run_coroutine_threadsafe(_cancel_others(), loop).result(CALL_GRACE_S)
        except Exception as exc:
            log.debug("%s: close: %s", self.url, exc)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(CALL_GRACE_S)
        if not loop.is_running():
            loop.close()

    # -- on the loop thread -------------------------------------------------------------------

    async def _open(self) -> None:
        scheme = "tls" if self._target.tls else "nats"
        host = f"[{self._target.host}]" if ":" in self._target.host else self._target.host
        try:
            # The first connection gets two tries (a wrong address or password is an error
            # now, not an endless retry); once it is up, reconnecting never stops (below).
            nc = await nats.connect(
                servers=[f"{scheme}://{host}:{self._target.port}"],
                user=self._creds.username, password=self._creds.password, tls=self._ctx,
                tls_hostname=self._target.host if self._ctx is not None else None,
                name=self._durable, connect_timeout=CONNECT_TIMEOUT_S, allow_reconnect=False,
                max_reconnect_attempts=1, reconnect_time_wait=RECONNECT_WAIT_S,
                error_cb=self._on_error)
        except (TimeoutError, OSError, ssl.SSLError, nats.errors.Error) as exc:
            raise InvalidInputError(f"{self._where}: cannot connect: {self._describe(exc)}"
                                    ) from None
        self._nc = nc
        # read by nats-py when a connection drops: from now on, ride out any outage
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        js = self._js = nc.jetstream()
        subject = self._target.topic
        try:
            if self.stream is None:
                self.stream = await js.find_stream_name_by_subject(subject)
            else:
                await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            what = (f"no JetStream stream named {self.stream!r}" if self.stream else
                    f"no JetStream stream holds the subject {subject!r}")
            raise InvalidInputError(f"{self._where}: {what}; create one (nats stream add) or "
                                    "name it with data.stream") from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise InvalidInputError(f"{self._where}: JetStream did not answer: "
                                    f"{self._describe(exc)} (is JetStream enabled?)") from None
        config = ConsumerConfig(durable_name=self._durable, ack_policy=AckPolicy.EXPLICIT,
                                deliver_policy=DeliverPolicy.ALL, ack_wait=self._ack_wait,
                                max_ack_pending=MAX_ACK_PENDING, filter_subject=subject)
        try:
            self._sub = await js.pull_subscribe(subject, durable=self._durable,
                                                stream=self.stream, config=config)
        except (TimeoutError, nats.errors.Error) as exc:
            raise InvalidInputError(f"{self._where}: cannot create the durable consumer "
                                    f"{self._durable!r} on stream {self.stream!r}: "
                                    f"{self._describe(exc)}") from None

    async def _fetch(self, batch: int, timeout_s: float) -> list[StreamMessage]:
        nc, sub = self._nc, self._sub
        if nc is None or sub is None:
            raise TransportError(f"{self._where}: not open")
        if nc.is_closed:
            raise TransportError(f"{self._where}: the connection is closed")
        try:
            msgs = await sub.fetch(batch=batch, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError):
            await self._check_consumer()
            return []
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                nats.errors.StaleConnectionError) as exc:
            log.warning("%s: fetch: %s (reconnecting)", self.url, self._describe(exc))
            await asyncio.sleep(min(timeout_s, RECONNECT_WAIT_S))
            return []
        except nats.errors.Error as exc:  # e.g. the consumer or the stream was deleted
            raise TransportError(f"{self._where}: fetch from the consumer {self._durable!r} "
                                 f"failed: {self._describe(exc)}") from None
        out = []
        for msg in msgs:
            if len(msg.data) > self._limits.max_message_bytes:
                self.oversized += 1
                log.warning("%s: dropped a message of %d bytes (the limit is %d)", self.url,
                            len(msg.data), self._limits.max_message_bytes)
                await msg.ack()
                continue
            meta = msg.metadata
            out.append(StreamMessage(payload=msg.data, position=int(meta.sequence.stream),
                                     redelivered=int(meta.num_delivered) > 1, token=msg))
        return out

    async def _check_consumer(self) -> None:
        """An idle fetch looks the same whether nothing was published or the consumer (or its
        stream) was deleted: every CONSUMER_CHECK_S of idling, ask."""
        now = time.monotonic()
        if now - self._checked < CONSUMER_CHECK_S or self._js is None or self.stream is None:
            return
        self._checked = now
        try:
            await self._js.consumer_info(self.stream, self._durable)
        except nats.js.errors.NotFoundError:
            raise TransportError(f"{self._where}: the durable consumer {self._durable!r} on "
                                 f"stream {self.stream!r} is gone (deleted?); start again to "
                                 "create it (it reads the stream from its start)") from None
        except (TimeoutError, nats.errors.Error) as exc:
            log.debug("%s: consumer check: %s", self.url, self._describe(exc))

    async def _ack(self, msgs: list[Msg]) -> None:
        try:
            for msg in msgs:
                if not msg.is_acked:
                    await msg.ack()
            assert self._nc is not None
            await self._nc.flush(timeout=int(FLUSH_TIMEOUT_S))
        except (TimeoutError, nats.errors.Error) as exc:
            # not acknowledged: JetStream delivers them again after ack_wait, and the caller
            # recognises them by their stream position
            log.warning("%s: ack: %s", self.url, self._describe(exc))

    async def _close(self) -> None:
        nc, self._nc, self._sub = self._nc, None, None
        if nc is not None and not nc.is_closed:
            await nc.close()  # the durable consumer stays on the server

    async def _on_error(self, exc: Exception) -> None:
        log.debug("%s: %s", self.url, self._describe(exc))

    # -- helpers ------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise TransportError(f"{self._where}: not open")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TransportError(f"{self._where}: no answer within {timeout:g} s") from None

    def _describe(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        if self._creds.password:
            text = text.replace(self._creds.password, "REDACTED")
        if isinstance(exc, ConnectionRefusedError | nats.errors.NoServersError):
            return "connection refused (is the server running and is the port right?)"
        if "authorization violation" in text.lower():
            return ("authorization violation (check data.username and the variable named by "
                    "data.password_env)")
        return f"{type(exc).__name__}: {text}"


async def _cancel_others() -> None:
    """Cancel what is left on the private loop (a timed-out call) before it stops."""
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
