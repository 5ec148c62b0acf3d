"""The agent's transport under connection loss: a call whose channel closes under it ends with
a TransportError the agent's loops handle, never a bare cancellation that ends them for good."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edge_agent.identity import load_credentials
from edge_agent.state import StateDir
from edge_agent.transport.grpc import GrpcTransport
from fleetcore.errors import TransportError
from tests.support import WAIT, RunningControlPlane, start_agent, wait_until_async
from tests.test_delivery import _bundle_for, _fleet


def test_release_stream_closed_under_the_call_is_a_transport_error(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    creds = load_credentials(StateDir(tmp_path / "a"))
    transport = GrpcTransport(cp.api, lambda: creds)

    async def run() -> None:
        releases = transport.releases(0)
        waiting = asyncio.ensure_future(anext(releases))  # no release yet: the stream waits
        await wait_until_async(lambda: cp.cp.notifier.subscribers(cfg.device_id) > 0,
                               what="the server to hold the stream")
        await transport.reset()  # what the heartbeat loop does after a failed call
        with pytest.raises(TransportError, match="closed under the call"):
            await waiting
        await releases.aclose()
        await transport.close()

    asyncio.run(asyncio.wait_for(run(), WAIT))


def test_agent_whose_release_stream_missed_a_change_catches_up_on_its_heartbeat(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    """A stream can be lost without either end noticing (a NAT that drops an idle connection):
    the heartbeat reply names the newest serial, and an agent behind it reopens its stream."""
    cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0)
    try:
        agent.wait_for("heartbeat")
        cp.cp.services.ctx.on_device_change = lambda device_id: None  # the wake-up is lost
        bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1", version=1)
        assert _fleet(cp, "models", "publish", str(bundle)) == 0
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        # The server's stream rechecks only every SYNC_RECHECK_SECONDS (30 s); within half of
        # that the release arrives, because a heartbeat reply asks the agent to resync.
        deadline = time.monotonic() + 15
        while (kind := agent.events.get(timeout=max(0.0, deadline - time.monotonic()))[0]) != (
                "release"):
            assert kind != "release-refused"
    finally:
        agent.stop()
