"""OpenTelemetry, off by default: settings the standard way, bounded trace context from peers,
the agent importing nothing of it when off, and, against a real OTLP/gRPC receiver on
127.0.0.1, the control plane's re-exported fleet metrics (with device attributes) and one trace
from `fleet rollouts start` through the control plane to the agent's install steps."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetcore.errors import InvalidInputError
from fleetcore.otel import OtelSettings, check_carrier, new_traceparent, trace_id_of
from scripts.otlp_receiver import OtlpReceiver
from tests.support import LoopThread, start_agent, start_control_plane
from tests.test_delivery import _bundle_for, _committed, _fleet, _wait_models

REPO = Path(__file__).resolve().parent.parent


def test_settings_follow_the_standard_variables_and_the_section() -> None:
    assert not OtelSettings.load({}, {}).enabled  # off by default
    assert OtelSettings.load({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}).enabled
    assert OtelSettings.load({}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}).enabled
    on = OtelSettings.load({"enabled": True, "endpoint": "http://127.0.0.1:4317"}, {})
    assert on.enabled and on.endpoint == "http://127.0.0.1:4317" and on.protocol == "grpc"
    assert not OtelSettings.load({"enabled": True}, {"OTEL_SDK_DISABLED": "true"}).enabled
    assert OtelSettings.load({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}).protocol == (
        "http/protobuf")
    for bad in ({"enabled": "yes"}, {"endpoint": "127.0.0.1:4317"}, {"protocol": "thrift"},
                {"metric_interval_seconds": -1}, {"resource": {"a": 1}}, {"logs": 1}):
        with pytest.raises(InvalidInputError):
            OtelSettings.load(bad, {})


def test_trace_context_from_peers_is_bounded() -> None:
    good = new_traceparent()
    assert check_carrier({"traceparent": good, "tracestate": "a=b"}) == {
        "traceparent": good, "tracestate": "a=b"}
    assert len(trace_id_of(good)) == 32
    for hostile in ({"traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"},  # invalid id
                    {"traceparent": good.upper()}, {"traceparent": good + "-extra"},
                    {"traceparent": "x" * 10_000}, {"other": good}):
        assert check_carrier(hostile) == {}
    assert check_carrier({"traceparent": good, "tracestate": "x" * 513}) == {"traceparent": good}
    assert check_carrier({"traceparent": good, "tracestate": "a=\x1b[2J"}) == {
        "traceparent": good}


def test_the_agent_imports_no_opentelemetry_when_it_is_off(tmp_path: Path) -> None:
    code = ("import sys; import edge_agent.cli, edge_agent.daemon, edge_agent.tracing; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


def _otel(receiver: OtlpReceiver) -> dict[str, Any]:
    return {"enabled": True, "endpoint": receiver.endpoint, "metric_interval_seconds": 1}


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["grpc", "mqtt", "grpc beside mqtt"])
def test_one_trace_from_the_operator_through_the_control_plane_to_the_agent(
    tmp_path: Path, loop: LoopThread, trained_bundle: Path, receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], transport: str,
) -> None:
    """Over gRPC the context rides in the SyncEvent beside the signed release and in
    FetchBundle's metadata; over MQTT in the MQTT 5 user properties of the release message and
    of the agent's bundle requests (the bridge's bundle-serving span joins the trace)."""
    if transport == "grpc":
        cp = start_control_plane(tmp_path / "cp", loop, otel=_otel(receiver))
    elif transport == "grpc beside mqtt":  # the MQTT bridge must leave the gRPC push its trace
        from tests.mqtt_support import start_mqtt_control_plane  # noqa: PLC0415

        cp = start_mqtt_control_plane(tmp_path / "cp", loop, otel=_otel(receiver))
        cp.transport = transport = "grpc"  # its agent enrolls on gRPC
    else:
        from tests.mqtt_support import start_mqtt_control_plane  # noqa: PLC0415

        cp = start_mqtt_control_plane(tmp_path / "cp", loop, otel=_otel(receiver))
    try:
        cp.enroll_agent(tmp_path / "a", labels={"site": "north"})
        agent = start_agent(tmp_path / "a", loop, probation_seconds=0.0,
                            otel=_otel(receiver), transport=transport)
        device = agent.agent.config.device_id
        try:
            bundle = _bundle_for(cp, trained_bundle, tmp_path / "b1")
            assert _fleet(cp, "models", "publish", str(bundle)) == 0
            parent = new_traceparent()
            monkeypatch.setenv("TRACEPARENT", parent)  # the operator's own trace, continued
            assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
            trace = trace_id_of(parent)
            assert f"trace id: {trace}" in capsys.readouterr().err
            _wait_models(agent, _committed(1))
            assert agent.agent.tracing.otel is not None and cp.cp.otel is not None
            agent.agent.tracing.otel.flush()
            cp.cp.otel.flush()

            def traced(r: OtlpReceiver) -> set[tuple[str, str]]:
                return {(s.service, s.name) for s in r.spans if s.trace_id == trace}

            fetch = ("edgefleet-control-plane", "edgefleet.v1.AgentService/FetchBundle")
            want = {("edgefleet-control-plane", "edgefleet.v1.AdminService/StartRollout"),
                    fetch,
                    *(("edgefleet-agent", name) for name in (
                        "install digits", "download", "verify", "stage", "smoke test",
                        "activate and probation", "commit"))}
            assert receiver.wait(lambda r: want <= traced(r)), sorted(traced(receiver))
            spans = {s.name: s for s in receiver.spans if s.trace_id == trace}
            install = spans["install digits"]
            assert install.parent_id == spans[
                "edgefleet.v1.AdminService/StartRollout"].span_id
            assert spans["download"].parent_id == install.span_id
            fetched = spans["edgefleet.v1.AgentService/FetchBundle"]
            assert fetched.parent_id == spans["download"].span_id
            assert fetched.attributes["rpc.system"] == transport
            assert install.resource["service.instance.id"] == device
            assert install.resource["edgefleet.label.site"] == "north"

            # The control plane re-exports what devices report, with device attributes.
            assert receiver.wait(lambda r: any(
                p.service == "edgefleet-control-plane" and p.metric == "edgefleet_device_up"
                and p.attributes.get("device") == device for p in r.points))
            assert receiver.wait(lambda r: any(
                p.metric == "edgefleet_rollout_devices" and p.attributes.get("state") ==
                "committed" for p in r.points))
            # The agent exports its own registry too, under its device's resource.
            assert receiver.wait(lambda r: any(
                p.service == "edgefleet-agent" and p.metric == "edgefleet_model_serving_version"
                and p.resource.get("service.instance.id") == device
                and p.attributes.get("model") == "digits" and p.value == 1.0
                for p in r.points))
            # And logs go through the SDK's logging bridge (INFO and up, where the process's
            # logging lets them through).
            logging.getLogger("control_plane.server").warning("otel log bridge check")
            cp.cp.otel.flush()
            assert receiver.wait(lambda r: ("edgefleet-control-plane", "otel log bridge check")
                                 in r.logs)
        finally:
            agent.stop()
    finally:
        cp.stop()
        if cp.broker is not None:
            cp.broker.stop()


def test_the_control_plane_stops_cleanly_with_opentelemetry_on(
    tmp_path: Path, loop: LoopThread, receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture,
) -> None:
    """Shutting the SDK down collects the fleet's metrics once more: before the store closes."""
    cp = start_control_plane(tmp_path / "cp", loop, otel=_otel(receiver))
    cp.enroll_agent(tmp_path / "a")
    with caplog.at_level(logging.WARNING):
        cp.stop()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []
    assert receiver.wait(lambda r: any(p.metric == "edgefleet_devices" for p in r.points))


@pytest.mark.slow
def test_a_step_the_scheduler_starts_continues_the_rollouts_trace(
    tmp_path: Path, loop: LoopThread, trained_bundle: Path, receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cp = start_control_plane(tmp_path / "cp", loop, otel=_otel(receiver),
                             rollout_tick_seconds=0.5)
    agents = []
    try:
        for name in ("a", "b"):
            cp.enroll_agent(tmp_path / name)
            agents.append(start_agent(tmp_path / name, loop, probation_seconds=0.0,
                                      otel=_otel(receiver)))
        bundle = _bundle_for(cp, trained_bundle, tmp_path / "b1")
        assert _fleet(cp, "models", "publish", str(bundle)) == 0
        parent = new_traceparent()
        monkeypatch.setenv("TRACEPARENT", parent)
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1",
                      "--steps", "50,100") == 0  # one device now, the other by the scheduler
        for agent in agents:
            _wait_models(agent, _committed(1))
        for agent in agents:
            assert agent.agent.tracing.otel is not None
            agent.agent.tracing.otel.flush()
        trace = trace_id_of(parent)
        ids = {a.agent.config.device_id for a in agents}

        def installs(r: OtlpReceiver) -> list[Any]:
            return [s for s in r.spans if s.trace_id == trace and s.name == "install digits"]

        assert receiver.wait(lambda r: {s.resource["service.instance.id"]
                                        for s in installs(r)} == ids)
        assert cp.cp.otel is not None
        cp.cp.otel.flush()
        # Each device's bundle download, the scheduler's step too, reached the control plane.
        downloads = {s.span_id for s in receiver.spans
                     if s.trace_id == trace and s.name == "download"}
        assert receiver.wait(lambda r: {s.parent_id for s in r.spans if s.trace_id == trace
                                        and s.name.endswith("/FetchBundle")} == downloads)
        assert len(downloads) == 2
    finally:
        for agent in agents:
            agent.stop()
        cp.stop()


@pytest.mark.slow
def test_training_steps_are_spans_of_one_run(tmp_path: Path, receiver: OtlpReceiver,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.trainer_support import write_pipeline  # noqa: PLC0415
    from trainer.config import Pipeline  # noqa: PLC0415
    from trainer.pipeline import Run, Workdir  # noqa: PLC0415

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    parent = new_traceparent()
    monkeypatch.setenv("TRACEPARENT", parent)  # a retraining job's trace, continued
    pipeline = write_pipeline(tmp_path, hidden="8", epochs=1, prune=0.0)
    Run(Pipeline.load(pipeline), Workdir(tmp_path / "work"), progress=lambda m: None).run_all()
    trace = trace_id_of(parent)
    names = {"trainer run", "step ingest", "step train", "step bundle"}
    assert receiver.wait(lambda r: names <= {s.name for s in r.spans if s.trace_id == trace})
    spans = {s.name: s for s in receiver.spans if s.trace_id == trace}
    assert spans["step train"].parent_id == spans["trainer run"].span_id
    assert spans["step train"].attributes["edgefleet.outcome"] == "ran"
    assert spans["trainer run"].service == "edgefleet-trainer"


def _two_versions(trained_bundle: Path, base: Path) -> dict[int, Path]:
    import json  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    out = {}
    for version in (1, 2):
        dest = base / f"v{version}"
        shutil.copytree(trained_bundle, dest)
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest["version"] = version
        (dest / "manifest.json").write_text(json.dumps(manifest))
        out[version] = dest
    return out


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_inference_spans_only_when_sampled_on(
    tmp_path: Path, loop: LoopThread, trained_bundle: Path, receiver: OtlpReceiver,
    ratio: float,
) -> None:
    """At ratio 1 a request over HTTP or gRPC makes one server span, continuing the caller's
    sampled traceparent, with the arm that answered; a caller's unsampled traceparent is not
    traced. At ratio 0 (the default) the front ends have no span maker at all."""
    import grpc  # noqa: PLC0415
    import httpx  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from edgefleet.v1 import grpc_predict_v2_pb2 as pb  # noqa: PLC0415
    from edgefleet.v1 import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: PLC0415

    from edge_agent.serving import ServingCore, start_grpc, start_http  # noqa: PLC0415
    from edge_agent.tracing import AgentTracing  # noqa: PLC0415
    from fleetcore import otel as otel_setup  # noqa: PLC0415

    settings = otel_setup.OtelSettings.load({**_otel(receiver),
                                             "inference_sample_ratio": ratio}, {})
    tracing = AgentTracing(otel_setup.start(settings, "edgefleet-agent",
                                            {"service.instance.id": "dev-1"}))
    core = ServingCore(seed=0)
    core.set_model("digits", [(1, 0.5, False), (2, 0.5, False)],
                   _two_versions(trained_bundle, tmp_path))
    core.spans = tracing.inference_spans()
    assert (core.spans is None) == (ratio == 0)

    async def up() -> tuple[Any, int, Any, int]:
        http, http_port = await start_http(core, "127.0.0.1", 0)
        server, grpc_port = await start_grpc(core, "127.0.0.1", 0)
        return http, http_port, server, grpc_port

    http, http_port, server, grpc_port = loop.run(up())
    x = np.zeros((3, 64), dtype=np.float32)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as client, \
                grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            body = {"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                                "data": x.ravel().tolist()}]}
            http_parent, grpc_parent = new_traceparent(), new_traceparent()
            unsampled = new_traceparent()[:-2] + "00"
            answer = client.post("/v2/models/digits/infer", json=body,
                                 headers={"traceparent": http_parent})
            assert answer.status_code == 200
            http_version = int(answer.json()["model_version"])
            assert client.post("/v2/models/digits/infer", json=body,
                               headers={"traceparent": unsampled}).status_code == 200
            bad = client.post("/v2/models/digits/infer", json={"inputs": []},
                              headers={"traceparent": http_parent})
            assert bad.status_code == 400
            request = pb.ModelInferRequest(model_name="digits")
            request.inputs.add(name="input", datatype="FP32", shape=[3, 64]).contents \
                .fp32_contents.extend(x.ravel().tolist())
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=(("traceparent", grpc_parent),))
            grpc_version = int(reply.model_version)
        assert tracing.otel is not None
        tracing.otel.flush()
        spans = [s for s in receiver.spans if s.name == "infer digits"]
        if ratio == 0:
            assert spans == []
            return
        by_trace: dict[str, list[Any]] = {}
        for s in spans:
            by_trace.setdefault(s.trace_id, []).append(s)
        assert set(by_trace) == {trace_id_of(http_parent), trace_id_of(grpc_parent)}
        ok, refused = sorted(by_trace[trace_id_of(http_parent)],
                             key=lambda s: s.attributes["edgefleet.outcome"] != "ok")
        assert ok.parent_id == http_parent[36:52]
        assert ok.attributes == {"edgefleet.model": "digits", "edgefleet.protocol": "http",
                                 "edgefleet.version": http_version, "edgefleet.batch_size": 3,
                                 "edgefleet.outcome": "ok"}
        assert refused.attributes["edgefleet.outcome"] == "bad request"
        (over_grpc,) = by_trace[trace_id_of(grpc_parent)]
        assert over_grpc.parent_id == grpc_parent[36:52]
        assert over_grpc.attributes["edgefleet.protocol"] == "grpc"
        assert over_grpc.attributes["edgefleet.version"] == grpc_version
        assert over_grpc.attributes["edgefleet.batch_size"] == 3
        assert over_grpc.resource["service.instance.id"] == "dev-1"
    finally:
        loop.run(http.stop())
        loop.run(server.stop(0))
        core.close()
        tracing.shutdown()


@pytest.mark.slow
def test_a_retrained_canary_and_its_promotion_are_traces_of_their_own(
    tmp_path: Path, loop: LoopThread, trained_bundle: Path, receiver: OtlpReceiver,
) -> None:
    """What the control plane starts by itself: the retrained version's canary is a root span
    whose release push the agent's install continues; the promotion that the experiment's
    decision starts is another root, and the release it pushes carries it to the agent."""
    import shutil  # noqa: PLC0415

    from control_plane.domain.records import JobState  # noqa: PLC0415
    from control_plane.domain.retraining import DriftPolicy  # noqa: PLC0415
    from control_plane.services.retrain_runner import Outcome  # noqa: PLC0415
    from tests.test_serving_fleet import _send_arm_stats  # noqa: PLC0415

    cp = start_control_plane(tmp_path / "cp", loop, otel=_otel(receiver))
    try:
        cp.enroll_agent(tmp_path / "a")
        for other in ("b", "c", "d"):  # the decision wants feedback from three devices
            cp.enroll_agent(tmp_path / other)
        agent = start_agent(tmp_path / "a", loop, probation_seconds=0.0, otel=_otel(receiver))
        try:
            assert _fleet(cp, "models", "publish",
                          str(_bundle_for(cp, trained_bundle, tmp_path / "b1"))) == 0
            assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
            _wait_models(agent, _committed(1))
            # A retraining job that succeeded: its bundle is v2 (the trainer's run is
            # test_retrain's business); the service publishes and canaries it.
            store, retraining = cp.cp.store, cp.cp.services.retraining
            store.set_policy(DriftPolicy("digits", str(tmp_path / "PIPELINE.toml")))
            job_id = store.add_job("digits", "drift", 2, 0.0)
            store.update_job(job_id, JobState.RUNNING, 1.0)
            job = next(j for j in store.jobs("digits") if j.id == job_id)
            work = cp.home / "retrain" / f"job-{job_id}"
            work.mkdir(parents=True)
            shutil.copytree(_bundle_for(cp, trained_bundle, tmp_path / "b2", version=2),
                            work / "bundle")
            retraining._finish(job, Outcome(0, ""))
            assert store.get_experiment("digits") is not None

            def named(name: str) -> list[Any]:
                return [s for s in receiver.spans if s.name == name]

            assert cp.cp.otel is not None and agent.agent.tracing.otel is not None
            cp.cp.otel.flush()
            assert receiver.wait(lambda r: len(named("retrain canary digits v2")) == 1)
            (canary,) = named("retrain canary digits v2")
            assert canary.parent_id == "" and canary.service == "edgefleet-control-plane"
            assert receiver.wait(lambda r: any(
                s.trace_id == canary.trace_id and s.name == "commit" for s in r.spans))
            install = next(s for s in named("install digits") if s.trace_id == canary.trace_id)
            assert install.parent_id == canary.span_id
            assert install.attributes["edgefleet.version"] == 2

            # The challenger is clearly better on three devices: the control plane promotes.
            for seq, device in enumerate(("b", "c", "d")):
                _send_arm_stats(cp, tmp_path / device, 1000 + 10 * seq,
                                {1: (85, 100), 2: (97, 100)})
            assert store.list_audit(1)[0].action == "experiments.promote"
            cp.cp.otel.flush()
            assert receiver.wait(lambda r: len(named("promote digits v2")) == 1)
            (promote,) = named("promote digits v2")
            assert promote.parent_id == "" and promote.trace_id != canary.trace_id
            # The agent's release of the promotion came with the promotion's trace.
            parents = agent.agent.tracing._parents  # what the agent's installs would continue
            while trace_id_of(parents.get(("digits", 2), {}).get("traceparent", "")) != (
                    promote.trace_id):
                agent.wait_for("release")
        finally:
            agent.stop()
    finally:
        cp.stop()
