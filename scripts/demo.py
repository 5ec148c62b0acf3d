"""`make demo`: the main scenario end to end on the embedded defaults (SQLite, local processes).

So far: train, compress and sign the digits model (its publisher key made by `trainer keygen`),
create a control plane that trusts that publisher, serve it, enroll two agents with one-time
tokens, run them over mutual TLS, publish the bundle and roll it out: each agent receives its
signed release document, downloads, verifies, smoke-tests, activates and commits the model.
Then list the fleet and shut everything down cleanly. Later issues extend this story (serving,
A/B, drift, retraining).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sklearn.datasets import load_digits

from scripts.procs import Child, run


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "examples" / "pipelines" / "digits-mlp.toml"


def train(work: Path) -> Path:
    """Train the digits model (v1, and a challenger v2); return the publisher's public key."""
    step("trainer keygen (the publisher's model-signing key, kept with training)")
    print(run("trainer", "keygen", "--out", str(work / "publisher")), end="")
    step(f"trainer run {PIPELINE.relative_to(REPO)}  (ingest, train, prune, int8, sign)")
    print(run("trainer", "run", str(PIPELINE), "--workdir", str(work / "training"),
              "--publisher-key", str(work / "publisher" / "publisher.key")), end="")
    v2 = work / "digits-v2.toml"  # the challenger: less pruning, its own version number
    v2.write_text(PIPELINE.read_text().replace("version = 1", "version = 2")
                  .replace("prune = 0.5", "prune = 0.25").replace('path = "store"',
                                                                  f'path = "{work / "store"}"'))
    step("trainer run digits-v2.toml  (the challenger: 25% pruning)")
    print(run("trainer", "run", str(v2), "--workdir", str(work / "training-v2"),
              "--publisher-key", str(work / "publisher" / "publisher.key")), end="")
    run("model_signing", "verify", "key", str(work / "training" / "bundle"), "--signature",
        str(work / "training" / "bundle" / "model.sig"), "--public_key",
        str(work / "publisher" / "publisher.pub"))
    print("bundle verified with the reference tool: model_signing verify key")
    return work / "publisher" / "publisher.pub"


def start_control_plane(
    work: Path, publisher_pub: Path, children: list[Child]
) -> tuple[Path, str, str]:
    home = work / "control-plane"
    step(f"control-plane init --home {home}")
    print(run("control-plane", "init", "--home", str(home)), end="")
    config = home / "config.toml"
    text = config.read_text()
    # Trust the training environment's publisher key; heartbeat every 2 s so the demo is brisk.
    text = text.replace('publisher_keys = ["publisher/publisher.pub"]',
                        f'publisher_keys = ["publisher/publisher.pub", "{publisher_pub}"]')
    config.write_text(text.replace("heartbeat_interval_seconds = 10",
                                   "heartbeat_interval_seconds = 2"))

    step("control-plane serve (mTLS API + enrollment endpoint on free ports)")
    server = Child("control-plane", "control-plane", "serve", "--home", str(home),
                   "--api", "127.0.0.1:0", "--enroll", "127.0.0.1:0",
                   log=work / "logs" / "control-plane.log")
    children.append(server)
    api = server.expect(r"api \(mTLS\) listening on (\S+)").group(1)
    enroll = server.expect(r"enrollment .* listening on (\S+)").group(1)
    print(f"api {api}   enrollment {enroll}")
    return home, api, enroll


def enroll_and_run_agents(
    work: Path, home: Path, fleet: tuple[str, ...], enroll: str, children: list[Child]
) -> list[Path]:
    agents = []
    for name, site in (("agent-1", "paris"), ("agent-2", "lyon")):
        step(f"fleet tokens create --label site={site}; edge-agent enroll ({name})")
        token = run(*fleet, "tokens", "create", "--label", f"site={site}", "--ttl", "600")
        print(f"one-time token {token.strip()[:12]}... (stored hashed)")
        state = work / name
        print(run("edge-agent", "enroll", "--server", enroll, "--token", token.strip(),
                  "--ca", str(home / "pki/ca.pem"), "--state-dir", str(state),
                  "--label", "tier=demo"), end="")
        config = state / "agent.toml"  # short probation and drift windows for the demo
        config.write_text(config.read_text().replace("probation_seconds = 300.0",
                                                     "probation_seconds = 2.0")
                          .replace("drift_window_requests = 500", "drift_window_requests = 200"))
        agents.append(state)

    step("edge-agent run (two agents, heartbeating over mutual TLS)")
    for state in agents:
        child = Child(state.name, "edge-agent", "run", "--state-dir", str(state),
                      "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0",
                      log=work / "logs" / f"{state.name}.log")
        children.append(child)
        child.port = int(child.expect(r"inference HTTP listening on \S+:(\d+)").group(1))
        print(child.expect(r"connected to control plane .*").group(0)
              + f"; serving Open Inference Protocol on port {child.port}")
    return agents


def deliver(work: Path, fleet: tuple[str, ...], children: list[Child]) -> None:
    bundle = work / "training" / "bundle"
    step("fleet models publish (verified against the trusted publisher key, stored encrypted)")
    print(run(*fleet, "models", "publish", str(bundle)), end="")
    print(run(*fleet, "models", "list"), end="")
    step("fleet rollouts start --model digits --version 1 --selector tier=demo")
    print(run(*fleet, "rollouts", "start", "--model", "digits", "--version", "1",
              "--selector", "tier=demo"), end="")
    for child in children[1:]:  # the agents: signed release pushed, downloaded, installed
        print(f"{child.name}: " + child.expect(r"digits v1 active, on probation").group(0))
    for child in children[1:]:
        print(f"{child.name}: " + child.expect(r"digits v1 committed after probation").group(0))


def _infer(client: httpx.Client, port: int, rows: Any, request_id: str, key: str) -> int:
    body = {"id": request_id, "parameters": {"routing_key": key},
            "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.ravel().tolist()}]}
    r = client.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body)
    r.raise_for_status()
    return int(r.json()["model_version"])


def experiment_and_drift(work: Path, fleet: tuple[str, ...], children: list[Child]) -> None:
    digits = load_digits()
    X, y = digits.data.astype("float32"), digits.target
    step("fleet models publish training-v2/bundle; fleet experiments start --challenger 2 "
         "--weight 0.1")
    print(run(*fleet, "models", "publish", str(work / "training-v2" / "bundle")), end="")
    print(run(*fleet, "experiments", "start", "--model", "digits", "--challenger", "2",
              "--weight", "0.1"), end="")
    for child in children[1:]:
        print(f"{child.name}: " + child.expect(r"digits now serves v1 0.9, v2 0.1").group(0))

    step("Open Inference Protocol traffic: 600 real digits per agent, then the true labels")
    with httpx.Client(timeout=30) as client:
        for child in children[1:]:
            served = {1: 0, 2: 0}
            for i in range(600):
                version = _infer(client, child.port, X[i : i + 1], f"{child.name}-{i}",
                                 key=f"customer-{i}")
                served[version] += 1
                client.post(f"http://127.0.0.1:{child.port}/v2/models/digits/feedback",
                            json={"id": f"{child.name}-{i}", "label": int(y[i])})
            print(f"{child.name}: v1 answered {served[1]}, v2 answered {served[2]}")
        time.sleep(3)  # two heartbeats carry the arm counters to the control plane
        step("fleet experiments status --model digits")
        print(run(*fleet, "experiments", "status", "--model", "digits"), end="")

        step("the data shifts: inverted intensities (16 - x) on agent-1")
        child = children[1]
        for i in range(0, 400, 50):
            _infer(client, child.port, 16.0 - X[i : i + 50], f"shift-{i}", key=f"s-{i}")
        print(child.expect(r"drift on digits .*").group(0))
    time.sleep(3)
    step("fleet drift --model digits")
    print(run(*fleet, "drift", "--model", "digits"), end="")


def scenario(work: Path, children: list[Child]) -> int:
    """Run the story; return how many devices ended online."""
    publisher_pub = train(work)
    home, api, enroll = start_control_plane(work, publisher_pub, children)
    fleet = ("fleet", "--config", str(home / "operators/admin/fleet.toml"), "--api", api)
    agents = enroll_and_run_agents(work, home, fleet, enroll, children)
    deliver(work, fleet, children)

    step("fleet devices list")
    print(run(*fleet, "devices", "list"), end="")
    devices = json.loads(run(*fleet, "devices", "list", "--json"))
    online = [d["id"] for d in devices if d["status"] == "online"]
    if len(online) != len(agents):
        raise RuntimeError(f"expected {len(agents)} online devices, got {devices}")

    experiment_and_drift(work, fleet, children)

    step("fleet rollouts status --model digits")
    deadline = time.monotonic() + 30
    while True:  # the commit reaches the control plane with the agents' next heartbeat
        status = json.loads(run(*fleet, "rollouts", "status", "--model", "digits", "--json"))
        if all(d["state"] == "committed" for d in status["devices"]):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"rollout did not complete: {status}")
        time.sleep(0.2)
    print(run(*fleet, "rollouts", "status", "--model", "digits"), end="")

    step("fleet audit list; fleet audit verify")
    print(run(*fleet, "audit", "list"), end="")
    print(run(*fleet, "audit", "verify"), end="")
    return len(online)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    keep = args.workdir is not None
    if keep and work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    children: list[Child] = []
    online = 0
    try:
        online = scenario(work, children)
    except (RuntimeError, OSError) as exc:
        print(f"\ndemo failed: {exc}\nlogs: {work / 'logs'}", file=sys.stderr)
        keep = True  # leave the logs for a look
        return 1
    finally:
        step("shutting down")
        codes = {c.name: c.stop() for c in reversed(children)}
        print(", ".join(f"{n} exited {rc}" for n, rc in codes.items()))
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if any(codes.values()):
        print("demo failed: a process did not exit cleanly", file=sys.stderr)
        return 1
    print(f"\ndemo OK: {online} devices online")
    return 0


if __name__ == "__main__":
    sys.exit(main())
