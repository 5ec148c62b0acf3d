"""`fleet console` as a person uses it: headless Chromium (Debian's package, driven by
Playwright) against a real control plane with real agents. The fleet page lists them, a
rollout's progress moves live, a drift plot appears after shifted traffic, a viewer sees no
action buttons, an operator pauses a rollout; and the server refuses requests without the
session, from another Host, and actions without the console's header. Screenshots of each page
are written to docs/console/ (docs/console.md shows them)."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from edgefleet.v1 import admin_pb2, agent_pb2
from sklearn.datasets import load_digits

from fleet.console.api import ConsoleApi
from fleet.console.server import ACTION_HEADER, ConsoleServer
from tests.support import (
    WAIT,
    LoopThread,
    RunningAgent,
    send_telemetry,
    start_agent,
    start_control_plane,
)
from tests.test_delivery import _bundle_for, _committed, _fleet, _wait_models
from tests.test_roles import _operator

CHROMIUM = "/usr/bin/chromium"
# Screenshots go to a temporary folder, or where $EDGEFLEET_SCREENSHOTS says (docs/console.md:
# `EDGEFLEET_SCREENSHOTS=docs/console pytest tests/test_console.py` refreshes the docs' images).
SHOTS_DIR = os.environ.get("EDGEFLEET_SCREENSHOTS", "")
pytestmark = pytest.mark.slow


def _start_console(cp: Any, config: Any, role: str, name: str) -> ConsoleServer:
    server = ConsoleServer(ConsoleApi(cp.admin_stub(config)), operator=name, role=role, port=0)
    server.start()
    return server


def _infer(port: int, rows: np.ndarray) -> None:
    body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.ravel().tolist()}]}
    r = httpx.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body, timeout=WAIT)
    r.raise_for_status()


@pytest.fixture
def fleet_of_two(tmp_path: Path, loop: LoopThread,
                 trained_bundle: Path) -> Iterator[tuple[Any, list[RunningAgent]]]:
    cp = start_control_plane(tmp_path / "cp", loop)
    agents: list[RunningAgent] = []
    try:
        for name, site in (("a", "north"), ("b", "south")):
            cp.enroll_agent(tmp_path / name, labels={"site": site})
            agents.append(start_agent(tmp_path / name, loop, probation_seconds=0.0,
                                      drift_window_requests=60, heartbeat_interval_seconds=0.5))
        bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1")
        assert _fleet(cp, "models", "publish", str(bundle)) == 0
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        for agent in agents:
            _wait_models(agent, _committed(1))
        yield cp, agents
    finally:
        for agent in agents:
            agent.stop()
        cp.stop()


def test_the_console_as_an_operator_and_as_a_viewer(
    fleet_of_two: tuple[Any, list[RunningAgent]], tmp_path: Path, trained_bundle: Path,
) -> None:
    from playwright.sync_api import expect, sync_playwright  # noqa: PLC0415

    cp, agents = fleet_of_two
    ids = [a.agent.config.device_id for a in agents]
    operator = _start_console(cp, cp.admin, "admin", "admin")
    viewer_cfg = _operator(cp, tmp_path, "vera", "viewer")
    viewer = _start_console(cp, viewer_cfg, "viewer", "vera")
    shots = Path(SHOTS_DIR) if SHOTS_DIR else tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda dialog: dialog.accept())  # the confirmation

            # One device sent a report of a kind no agent sends: refused, and counted.
            send_telemetry(cp.api, tmp_path / "a", [agent_pb2.TelemetryRecord(
                seq=10**9, kind="nonsense", created_at=1.0, payload=b"{}")])

            # The printed URL opens a session; the fleet page lists both agents.
            page.goto(operator.url)
            assert "token=" not in page.url  # the token left the address bar
            for device_id in ids:
                expect(page.get_by_role("link", name=device_id)).to_be_visible()
            expect(page.locator("#who")).to_have_text("admin (admin)")
            row = page.locator("main tr", has=page.get_by_role("link", name=ids[0]))
            expect(row.locator("td").last).to_have_text("1")  # its refused reports
            page.screenshot(path=str(shots / "fleet.png"), full_page=True)

            page.goto(f"{operator.base}/#/device/{ids[0]}")
            expect(page.locator("h1")).to_have_text(f"Device {ids[0]}")
            expect(page.get_by_text("site=north")).to_be_visible()
            page.screenshot(path=str(shots / "device.png"), full_page=True)

            page.goto(f"{operator.base}/#/models")
            expect(page.locator("main td").first).to_have_text("digits")

            # A staged rollout of v2: the page shows its progress move without a reload.
            bundle = _bundle_for(cp, trained_bundle, tmp_path / "v2", version=2)
            assert _fleet(cp, "models", "publish", str(bundle)) == 0
            page.reload()  # (the same address: only a reload asks again)
            expect(page.locator("main tr")).to_have_count(3)
            page.screenshot(path=str(shots / "models.png"), full_page=True)

            # v2 as a challenger beside v1: the experiment's arms, then the operator stops it.
            assert _fleet(cp, "experiments", "start", "--model", "digits", "--challenger", "2",
                          "--weight", "0.5") == 0
            page.goto(f"{operator.base}/#/experiments")
            experiment = page.locator(".experiment[data-model=digits]")
            expect(experiment.locator("table tr")).to_have_count(3)  # header, two arms
            page.screenshot(path=str(shots / "experiments.png"), full_page=True)
            experiment.locator("button[data-action='experiments.stop']").click()
            expect(experiment.locator("h2 .pill")).to_have_text("stopped", timeout=WAIT * 1000)
            page.goto(f"{operator.base}/#/rollouts")
            assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2",
                          "--steps", "50,100", "--bake", "3600") == 0
            card = page.locator(".rollout[data-model=digits]")
            expect(card.locator("h2")).to_contain_text("v2", timeout=WAIT * 1000)
            expect(card.locator(".progress")).to_have_text(" 1 of 2 devices committed",
                                                           timeout=WAIT * 1000)
            page.screenshot(path=str(shots / "rollouts.png"), full_page=True)

            # A viewer sees the same rollout without any action button.
            vpage = browser.new_page(viewport={"width": 1280, "height": 900})
            vpage.goto(viewer.url)
            vpage.goto(f"{viewer.base}/#/rollouts")
            expect(vpage.locator(".rollout[data-model=digits] h2")).to_contain_text("v2")
            expect(vpage.locator("button[data-action]")).to_have_count(0)
            expect(vpage.locator("#who")).to_have_text("vera (viewer)")

            # The operator pauses it (after the confirmation).
            card.locator("button[data-action='rollouts.pause']").click()
            expect(card.locator("h2 .pill")).to_have_text("paused", timeout=WAIT * 1000)
            assert cp.admin_stub().GetRollout(admin_pb2.GetRolloutRequest(model="digits"),
                                              timeout=WAIT).state == "paused"

            # Shifted traffic (inverted intensities) on both agents: a drift plot appears.
            page.goto(f"{operator.base}/#/drift")
            X = load_digits().data.astype(np.float32)
            shifted = 16.0 - X[:120]
            for agent in agents:
                for i in range(0, 120, 10):
                    _infer(agent.agent.http_port, shifted[i:i + 10])
            plot = page.locator(".drift[data-model=digits] svg.plot").first
            expect(plot).to_be_visible(timeout=WAIT * 1000)
            series = page.locator(".drift[data-model=digits] svg.plot g.series")
            expect(series.first).to_be_attached()
            page.screenshot(path=str(shots / "drift.png"), full_page=True)

            for name in ("jobs", "audit"):
                page.goto(f"{operator.base}/#/{name}")
                expect(page.locator("main")).to_have_attribute("data-page", name)
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            expect(page.locator(".verify .pill")).to_have_text("ok")
            browser.close()
    finally:
        operator.stop()
        viewer.stop()


def test_the_console_refuses_requests_without_its_session(
    tmp_path: Path, loop: LoopThread,
) -> None:
    cp = start_control_plane(tmp_path / "cp", loop)
    console = _start_console(cp, cp.admin, "admin", "admin")
    try:
        def ask(method: str, path: str, headers: dict[str, str]) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=WAIT)
            try:
                conn.request(method, path, headers=headers)
                return conn.getresponse().status
            finally:
                conn.close()

        host = {"Host": f"127.0.0.1:{console.port}"}
        cookie = {**host, "Cookie": f"edgefleet_console={console.token}"}
        assert ask("GET", "/api/fleet", host) == 403  # no session
        assert ask("GET", "/?token=wrong", host) == 403
        assert ask("GET", f"/?token={console.token}", host) == 303
        assert ask("GET", "/api/fleet", cookie) == 200
        assert ask("GET", "/app.js", cookie) == 200  # assets from the package
        assert ask("GET", "/api/fleet", {**cookie, "Host": "evil.example:80"}) == 421
        assert ask("GET", "/api/fleet",
                   {**host, "Cookie": "edgefleet_console=" + "x" * len(console.token)}) == 403
        # Actions: POST with the console's header, no body, a known action.
        assert ask("POST", "/api/act/rollouts.pause/digits", cookie) == 400
        assert ask("POST", "/api/act/rollouts.pause/digits",
                   {**cookie, ACTION_HEADER: "confirmed"}) == 404  # no rollout: said, not done
        assert ask("POST", "/api/act/devices.revoke/x", {**cookie, ACTION_HEADER: "confirmed"}
                   ) == 404
        assert ask("GET", "/api/device/..%2F..%2Fetc", cookie) == 400
        assert ask("GET", "/api/drift?hours=1e9", cookie) == 400
    finally:
        console.stop()
        cp.stop()


def test_fleet_console_prints_a_url_with_a_token(tmp_path: Path, loop: LoopThread,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import argparse  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from fleet.console import run_console  # noqa: PLC0415
    from fleetcore import operator_config  # noqa: PLC0415

    cp = start_control_plane(tmp_path / "cp", loop)
    stop = threading.Event()
    cfg = operator_config.load(cp.home / "operators/admin/fleet.toml")
    thread = threading.Thread(target=run_console, args=(
        cp.admin_stub(), argparse.Namespace(listen="127.0.0.1:0"), cfg, stop))
    thread.start()
    try:
        while "token=" not in (out := capsys.readouterr().out):
            thread.join(0.05)
        assert "console for admin (admin)" in out and "http://127.0.0.1:" in out
    finally:
        stop.set()
        thread.join(WAIT)
        cp.stop()
