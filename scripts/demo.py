"""`make demo`: the main scenario end to end on the embedded defaults (SQLite, local processes).

The whole loop: train, compress and sign the digits model (its publisher key made by `trainer
keygen`); create a control plane that trusts that publisher; enroll two agents with one-time
tokens and run them over mutual TLS; roll v1 out in stages (each agent downloads, verifies,
smoke-tests, activates and commits it); send real Open Inference Protocol traffic with feedback;
shift the data (inverted intensities); the agents detect drift and contribute labelled samples;
the drift policy fires and the control plane retrains v2 from the base data plus those samples,
accepts it only because it beats v1 on the drifted data, canaries it in an experiment, and the
experiment's statistical test promotes it through a rollout. Every step is shown with the
`fleet` CLI, and everything started is shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sklearn.datasets import load_digits

from fleetcore import tomlfile
from fleetcore.otel import new_traceparent, trace_id_of
from scripts.broker import Mosquitto, start_fleet_broker
from scripts.procs import Child, run


class _Otel:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, the demo starts an OTLP receiver of its own and
    points every process it starts at it (docs/observability.md)."""

    receiver: Any = None
    traceparent = ""

    def start(self) -> None:
        if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            return
        from scripts.otlp_receiver import OtlpReceiver  # noqa: PLC0415 (only when asked)

        self.receiver = OtlpReceiver().start()
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.receiver.endpoint
        os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
        os.environ.setdefault("OTEL_METRIC_EXPORT_INTERVAL", "2000")
        step(f"OpenTelemetry on: an OTLP/gRPC receiver at {self.receiver.endpoint} for every "
             "process")

    def report(self) -> None:
        r = self.receiver
        if r is None:
            return
        step("what the OTLP receiver got")
        services = sorted({s.service for s in r.spans})
        print(f"{len(r.spans)} spans from {', '.join(services) or 'nobody'}; "
              f"{len(r.points)} metric points; {len(r.logs)} log records")
        names: dict[str, int] = {}
        for span in r.spans:
            names[f"{span.service}: {span.name}"] = names.get(f"{span.service}: {span.name}", 0) + 1
        print("spans by name: " + ", ".join(f"{n} x{c}" for n, c in sorted(names.items())))
        trace = trace_id_of(self.traceparent)
        mine = [s for s in r.spans if s.trace_id == trace]
        print(f"rollout trace {trace}: {len(mine)} spans "
              f"({', '.join(sorted({s.service for s in mine})) or '-'}): "
              + ", ".join(sorted({s.name for s in mine})))
        # Every trace that reached an agent, with each span's device (the control plane's
        # rollouts, canaries and promotions): where each agent's install and download went.
        roots = {s.trace_id: s.name for s in r.spans if not s.parent_id}
        roots.setdefault(trace, "the rollout")
        for tid in sorted({s.trace_id for s in r.spans if s.service == "edgefleet-agent"}):
            spans = [s for s in r.spans if s.trace_id == tid]
            per: dict[str, int] = {}
            for s in spans:
                who = ("control plane" if s.service == "edgefleet-control-plane"
                       else str(s.resource.get("service.instance.id", s.service)))
                key = f"{who}: {s.name}" + (f" ({s.attributes['rpc.system']})"
                                            if "rpc.system" in s.attributes else "")
                per[key] = per.get(key, 0) + 1
            print(f"trace {tid} ({roots.get(tid, 'root not received')}): "
                  + ", ".join(f"{k}" + (f" x{c}" if c > 1 else "") for k, c in sorted(per.items())))
        r.stop()


OTEL = _Otel()


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "examples" / "pipelines" / "digits-mlp.toml"


def train(work: Path) -> Path:
    """Train the digits model v1; return the publisher's public key."""
    step("trainer keygen (the publisher's model-signing key, kept with training)")
    print(run("trainer", "keygen", "--out", str(work / "publisher")), end="")
    step(f"trainer run {PIPELINE.relative_to(REPO)}  (ingest, train, prune, int8, sign)")
    print(run("trainer", "run", str(PIPELINE), "--workdir", str(work / "training"),
              "--publisher-key", str(work / "publisher" / "publisher.key"), timeout=300), end="")
    run("model_signing", "verify", "key", str(work / "training" / "bundle"), "--signature",
        str(work / "training" / "bundle" / "model.sig"), "--public_key",
        str(work / "publisher" / "publisher.pub"))
    print("bundle verified with the reference tool: model_signing verify key")
    return work / "publisher" / "publisher.pub"


def start_control_plane(
    work: Path, publisher_pub: Path, children: list[Child], brokers: list[Mosquitto]
) -> tuple[Path, str, str]:
    home = work / "control-plane"
    step(f"control-plane init --home {home}")
    print(run("control-plane", "init", "--home", str(home)), end="")
    config = home / "config.toml"
    doc = tomlfile.load(config)
    # Brisk for a demo: 2 s heartbeats, 0.5 s scheduler ticks, experiments decided on 100
    # labelled requests per arm from both agents (the default asks for three devices).
    doc["agents"]["heartbeat_interval_seconds"] = 2
    doc["experiments"].update(min_samples=100, min_devices=2)
    doc["rollouts"]["tick_seconds"] = 0.5
    tomlfile.write(config, doc)

    step("control-plane mqtt-config; mosquitto (TLS, client certificates from the fleet CA, "
         "per-device ACL, CRL)")
    broker = start_fleet_broker(home, work / "mosquitto", free_port(), fleet_size=10)
    brokers.append(broker)
    print(f"mosquitto listening on {broker.url}; config in {work / 'mosquitto'}")

    step("control-plane serve --mqtt (mTLS API + enrollment endpoint on free ports, "
         "MQTT bridge)")
    server = Child("control-plane", "control-plane", "serve", "--home", str(home),
                   "--api", "127.0.0.1:0", "--enroll", "127.0.0.1:0", "--mqtt", broker.url,
                   log=work / "logs" / "control-plane.log")
    children.append(server)
    api = server.expect(r"api \(mTLS\) listening on (\S+)").group(1)
    enroll = server.expect(r"enrollment .* listening on (\S+)").group(1)
    print(f"api {api}   enrollment {enroll}")
    step("fleet publishers add (trust the training environment's publisher key: a new root of "
         "trust, signed with the root keys, that every agent follows)")
    print(run("fleet", "--config", str(home / "operators/admin/fleet.toml"), "--api", api,
              "publishers", "add", str(publisher_pub)), end="")
    return home, api, enroll


def enroll_and_run_agents(
    work: Path, home: Path, fleet: tuple[str, ...], enroll: str, children: list[Child]
) -> list[Path]:
    agents = []
    for name, site, transport in (("agent-1", "paris", "grpc"), ("agent-2", "lyon", "mqtt")):
        step(f"fleet tokens create --label site={site} --label region=eu-west; "
             f"edge-agent enroll --transport {transport} ({name})")
        token = run(*fleet, "tokens", "create", "--label", f"site={site}", "--label",
                    "region=eu-west", "--ttl", "600")
        print(f"one-time token {token.strip()[:12]}... (stored hashed)")
        state = work / name
        print(run("edge-agent", "enroll", "--server", enroll, "--token", token.strip(),
                  "--ca", str(home / "pki/ca.pem"), "--state-dir", str(state),
                  "--label", "tier=demo", "--transport", transport), end="")
        config = state / "agent.toml"  # short probation and drift windows for the demo
        config.write_text(config.read_text().replace("probation_seconds = 300.0",
                                                     "probation_seconds = 2.0")
                          .replace("drift_window_requests = 500", "drift_window_requests = 200"))
        agents.append(state)

    step("edge-agent run (agent-1 over gRPC, agent-2 over MQTT; both mutual TLS)")
    for state in agents:
        child = Child(state.name, "edge-agent", "run", "--state-dir", str(state),
                      "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0",
                      log=work / "logs" / f"{state.name}.log")
        children.append(child)
        child.port = int(child.expect(r"inference HTTP listening on \S+:(\d+)").group(1))
        print(child.expect(r"connected to control plane .*").group(0)
              + f"; serving Open Inference Protocol on port {child.port}")
    return agents


def deliver(work: Path, fleet: tuple[str, ...], children: list[Child],
            bundle: Path | None = None, model: str = "digits") -> None:
    bundle = bundle or work / "training" / "bundle"
    step("fleet models publish (verified against the trusted publisher key, stored encrypted)")
    print(run(*fleet, "models", "publish", str(bundle)), end="")
    print(run(*fleet, "models", "list"), end="")
    step(f"fleet rollouts start --model {model} --version 1 --selector tier=demo --steps 50,100 "
         "--bake 2  (half the fleet first; the rest after a 2 s bake with no failures)")
    traced = OTEL.receiver is not None and model == "digits"
    if traced:  # the operator's command starts the rollout's trace
        os.environ["TRACEPARENT"] = OTEL.traceparent = new_traceparent()
    try:
        print(run(*fleet, "rollouts", "start", "--model", model, "--version", "1",
                  "--selector", "tier=demo", "--steps", "50,100", "--bake", "2"), end="")
    finally:
        os.environ.pop("TRACEPARENT", None)
    if traced:
        print(f"rollout trace id: {trace_id_of(OTEL.traceparent)}")
    for child in children[1:]:  # the agents: signed release pushed, downloaded, installed
        print(f"{child.name}: "
              + child.expect(rf"{model} v1 committed after probation").group(0))
    wait_rollout(fleet, 1, model)
    print(run(*fleet, "rollouts", "status", "--model", model), end="")


def wait_for(what: str, check: Any, timeout: float = 120.0) -> Any:
    """Poll ``check()`` until it returns something truthy (the demo's only waiting loop)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)


def wait_rollout(fleet: tuple[str, ...], version: int, model: str = "digits") -> None:
    def done() -> bool:
        status = json.loads(run(*fleet, "rollouts", "status", "--model", model, "--json"))
        return bool(status["version"] == version and status["state"] == "completed"
                    and all(d["state"] == "committed" and d["serving_version"] == version
                            for d in status["devices"]))  # serving: reported by a heartbeat
    wait_for(f"the rollout of v{version} to complete", done)


def infer(client: httpx.Client, port: int, rows: Any, request_id: str, key: str,
          model: str = "digits") -> int:
    body = {"id": request_id, "parameters": {"routing_key": key},
            "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.ravel().tolist()}]}
    r = client.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json=body)
    r.raise_for_status()
    return int(r.json()["model_version"])


def traffic(client: httpx.Client, children: list[Child], X: Any, y: Any, prefix: str,
            count: int) -> None:
    """``count`` labelled requests per agent (one row each, then its true label)."""
    for child in children[1:]:
        served: dict[int, int] = {}
        for i in range(count):
            rid = f"{prefix}-{child.name}-{i}"
            k = i % len(X)
            version = infer(client, child.port, X[k : k + 1], rid, key=f"customer-{i}")
            served[version] = served.get(version, 0) + 1
            client.post(f"http://127.0.0.1:{child.port}/v2/models/digits/feedback",
                        json={"id": rid, "label": int(y[k])}).raise_for_status()
        print(f"{child.name}: " + ", ".join(f"v{v} answered {n}"
                                            for v, n in sorted(served.items())))


def drift_and_retrain(work: Path, fleet: tuple[str, ...], children: list[Child]) -> None:
    digits = load_digits()
    X, y = digits.data.astype("float32"), digits.target
    retrain = work / "retrain-digits.toml"  # the same pipeline, on the same feature store
    retrain.write_text(PIPELINE.read_text().replace(
        'path = "store"', f'path = "{work / "training" / "store"}"'))
    step("fleet retrain policy --model digits --sample-rate 1.0 --margin 0.2  (drift score > "
         "0.2 in 2 consecutive windows on half the devices retrains; devices contribute "
         "their labelled requests, PII pseudonymized on the device)")
    print(run(*fleet, "retrain", "policy", "--model", "digits", "--pipeline", str(retrain),
              "--threshold", "0.2", "--windows", "2", "--fraction", "0.5",
              "--sample-rate", "1.0", "--margin", "0.2"), end="")
    for child in children[1:]:  # the release that turns sampling on
        print(f"{child.name}: " + child.expect(r"digits: contributing .*").group(0))

    with httpx.Client(timeout=30) as client:
        step("Open Inference Protocol traffic: 200 real digits per agent, with true labels")
        traffic(client, children, X[:200], y[:200], "base", 200)
        step("the data shifts: inverted intensities (16 - x) on both agents, still labelled")
        shifted = 16.0 - X
        traffic(client, children, shifted[:450], y[:450], "shift", 450)
        for child in children[1:]:
            print(f"{child.name}: " + child.expect(r"drift on digits .*").group(0))
        step("fleet drift --model digits")
        wait_for("drift reports", lambda: json.loads(run(
            *fleet, "drift", "--model", "digits", "--json"))["fleet"][0]["drifted_devices"])
        print(run(*fleet, "drift", "--model", "digits"), end="")

        step("the drift policy fires: the control plane retrains v2 from base data + samples")
        def job() -> Any:
            jobs = json.loads(run(*fleet, "retrain", "jobs", "--model", "digits",
                                  "--json"))["jobs"]
            return jobs and jobs[0]["state"] not in ("queued", "running") and jobs[0]
        finished = wait_for("the retraining job", job, timeout=300)
        print(run(*fleet, "retrain", "jobs", "--model", "digits"), end="")
        if finished["state"] != "succeeded":
            raise RuntimeError(f"retraining ended {finished['state']}: {finished['detail']}")

        step("v2 goes out as a canary experiment (10% of each agent's traffic)")
        for child in children[1:]:
            print(f"{child.name}: " + child.expect(r"digits now serves v1 0.9, v2 0.1").group(0))
        step("more shifted traffic with labels; the experiment decides by a one-sided z-test")
        traffic(client, children, shifted[450:], y[450:], "exp", 700)

        wait_promoted(fleet)


def wait_promoted(fleet: tuple[str, ...], model: str = "digits") -> None:
    """Wait for the experiment's decision, show it, and the promotion's rollout of v2."""
    def decided() -> Any:
        status = json.loads(run(*fleet, "experiments", "status", "--model", model, "--json"))
        return status["state"] != "running" and status
    result = wait_for("the experiment's decision", decided)
    print(run(*fleet, "experiments", "status", "--model", model), end="")
    if result["state"] != "promoted":
        raise RuntimeError(f"the experiment ended {result['state']}, not promoted")
    step("the experiment promoted v2 through a rollout")
    wait_rollout(fleet, 2, model)
    print(run(*fleet, "rollouts", "status", "--model", model), end="")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summary(fleet: tuple[str, ...], model: str = "digits") -> None:
    """The fleet at the end: one row per device."""
    devices = json.loads(run(*fleet, "devices", "list", "--json"))
    rows = [("DEVICE", "SITE", "TRANSPORT", "STATUS", "SERVING", "INSTALLED")]
    for d in devices:
        models = [m for m in d["models"] if m.get("name") == model]
        serving = ", ".join(f"{model} v{m['version']}" for m in models if m.get("serving"))
        installed = ", ".join(f"v{m['version']} {m.get('state', '-')}" for m in models)
        site = d["labels"].get("site", "-")
        rows.append((d["id"], site, d["transport"] or "-", d["status"], serving or "-",
                     installed or "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def scenario(work: Path, children: list[Child], brokers: list[Mosquitto]) -> int:
    """Run the story; return how many devices ended online."""
    publisher_pub = train(work)
    home, api, enroll = start_control_plane(work, publisher_pub, children, brokers)
    fleet = ("fleet", "--config", str(home / "operators/admin/fleet.toml"), "--api", api)
    agents = enroll_and_run_agents(work, home, fleet, enroll, children)
    deliver(work, fleet, children)

    step("fleet devices list")
    print(run(*fleet, "devices", "list"), end="")
    devices = json.loads(run(*fleet, "devices", "list", "--json"))
    online = [d["id"] for d in devices if d["status"] == "online"]
    if len(online) != len(agents):
        raise RuntimeError(f"expected {len(agents)} online devices, got {devices}")

    drift_and_retrain(work, fleet, children)

    step("fleet models list  (the registry at the end)")
    print(run(*fleet, "models", "list"), end="")

    step("fleet audit list; fleet audit verify")
    print(run(*fleet, "audit", "list"), end="")
    print(run(*fleet, "audit", "verify"), end="")
    step("the fleet at the end (fleet devices list --json)")
    summary(fleet)
    return len(online)


Scenario = Callable[[Path, list[Child], list[Mosquitto]], int]


def main(argv: list[str] | None = None, story: Scenario | None = None,
         description: str | None = __doc__) -> int:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    keep = args.workdir is not None
    if keep and work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    children: list[Child] = []
    brokers: list[Mosquitto] = []
    online = 0
    try:
        OTEL.start()
        online = (story or scenario)(work, children, brokers)
    except (RuntimeError, OSError) as exc:
        print(f"\ndemo failed: {exc}\nlogs: {work / 'logs'}", file=sys.stderr)
        keep = True  # leave the logs for a look
        return 1
    finally:
        step("shutting down")
        codes = {c.name: c.stop() for c in reversed(children)}
        for broker in brokers:
            broker.stop()
        print(", ".join(f"{n} exited {rc}" for n, rc in codes.items())
              + (", mosquitto stopped" if brokers else ""))
        OTEL.report()  # after the processes stopped: each flushed what it had
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if any(codes.values()):
        print("demo failed: a process did not exit cleanly", file=sys.stderr)
        return 1
    print(f"\ndemo OK: {online} devices online")
    return 0


if __name__ == "__main__":
    sys.exit(main())
