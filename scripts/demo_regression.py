"""`make demo-regression`: a model that predicts a number, through rollout and an experiment.

scikit-learn's bundled diabetes data (disease progression a year on) stands in for a business
that predicts a quantity. Two versions are trained and signed from the same feature store:

* v1, the model the business starts with: a one-split decision tree
  (``sklearn.tree.DecisionTreeRegressor``, ``max_depth = 1``);
* v2, a candidate: the user's own PyTorch module (``examples/models/diabetes_net.py``).

Half the rows are held out from training (``test_fraction = 0.5``): they are the traffic. The
control plane rolls v1 out to two agents (one over gRPC, one over MQTT), then runs v2 as a
challenger on half of each agent's traffic. Every request gets its true value as feedback;
each agent sums absolute and squared errors per arm, and the control plane decides once both
arms have 100 labelled requests from at least two devices, by a one-sided Welch's t-test on
absolute errors (the per-device weight cap applies as for accuracy). The decision is shown
with each arm's MAE and its 95% interval; a promoted challenger is rolled out to the fleet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split

from fleetcore import tomlfile
from scripts import demo
from scripts.broker import Mosquitto
from scripts.demo import REPO, step
from scripts.procs import Child, run

MODEL = "diabetes"
BASE = REPO / "examples" / "pipelines" / "diabetes-torch.toml"
TEST_FRACTION = 0.5
SEED = 0


def _pipelines(work: Path) -> tuple[Path, Path]:
    """v1 (a stump) and v2 (the user's torch module), both on one feature store."""
    doc = tomlfile.load(BASE)
    doc["data"]["test_fraction"] = TEST_FRACTION
    doc["store"]["path"] = str(work / "store")
    module = doc["model"]["module"]
    if ":" in module and module.split(":")[0].endswith(".py"):
        path, func = module.rsplit(":", 1)
        doc["model"]["module"] = f"{(BASE.parent / path).resolve()}:{func}"
    doc["bundle"].update(name=MODEL, version=2)
    v2 = work / "v2.toml"
    tomlfile.write(v2, doc)
    doc["model"] = {"kind": "sklearn", "estimator": "sklearn.tree.DecisionTreeRegressor",
                    "params": {"max_depth": 1}}
    doc.pop("train", None)
    doc.pop("compress", None)
    doc["export"] = {"formats": ["onnx"]}
    doc["bundle"].update(name=MODEL, version=1)
    v1 = work / "v1.toml"
    tomlfile.write(v1, doc)
    return v1, v2


def train(work: Path) -> tuple[Path, Path, Path]:
    """Both versions trained and signed; (publisher public key, v1 bundle, v2 bundle)."""
    step("trainer keygen (the publisher's model-signing key, kept with training)")
    print(run("trainer", "keygen", "--out", str(work / "publisher")), end="")
    key = work / "publisher" / "publisher.key"
    v1, v2 = _pipelines(work)
    bundles = []
    for pipeline, what in ((v1, "v1: DecisionTreeRegressor(max_depth=1), scikit-learn"),
                           (v2, "v2: the user's torch module examples/models/diabetes_net.py")):
        step(f"trainer run {pipeline.name}  ({what})")
        out = run("trainer", "run", str(pipeline), "--workdir", str(work / pipeline.stem),
                  "--publisher-key", str(key), timeout=300)
        print(out, end="")
        bundle = work / pipeline.stem / "bundle"
        run("model_signing", "verify", "key", str(bundle), "--signature",
            str(bundle / "model.sig"), "--public_key", str(work / "publisher" / "publisher.pub"))
        report = json.loads((work / pipeline.stem / "report.json").read_text())
        print(f"bundle verified with model_signing; held-out MAE "
              f"{report['metrics']['compressed']['mae']:.1f}")
        bundles.append(bundle)
    return work / "publisher" / "publisher.pub", bundles[0], bundles[1]


def _held_out() -> tuple[np.ndarray, np.ndarray]:
    """The rows neither version trained on (the trainer's split: seed 0, half held out)."""
    X, y = load_diabetes(return_X_y=True)
    _, X_test, _, y_test = train_test_split(X, y, test_size=TEST_FRACTION, random_state=SEED)
    return X_test.astype(np.float32), y_test.astype(np.float64)


def traffic(client: httpx.Client, children: list[Child], X: np.ndarray, y: np.ndarray,
            prefix: str) -> None:
    """Every held-out row once per agent, each followed by its true value as feedback."""
    for child in children[1:]:
        served: dict[int, list[float]] = {}
        for i in range(len(X)):
            rid = f"{prefix}-{child.name}-{i}"
            body = {"id": rid, "parameters": {"routing_key": f"{child.name}-customer-{i}"},
                    "inputs": [{"name": "input", "shape": [1, X.shape[1]], "datatype": "FP32",
                                "data": X[i].tolist()}]}
            r = client.post(f"http://127.0.0.1:{child.port}/v2/models/{MODEL}/infer", json=body)
            r.raise_for_status()
            answer = r.json()
            predicted = float(answer["outputs"][0]["data"][0])
            served.setdefault(int(answer["model_version"]), []).append(abs(predicted - y[i]))
            client.post(f"http://127.0.0.1:{child.port}/v2/models/{MODEL}/feedback",
                        json={"id": rid, "label": float(y[i])}).raise_for_status()
        print(f"{child.name}: " + ", ".join(
            f"v{v} answered {len(e)} (MAE {np.mean(e):.1f})" for v, e in sorted(served.items())))


def scenario(work: Path, children: list[Child], brokers: list[Mosquitto]) -> int:
    publisher_pub, v1, v2 = train(work)
    # The demo's control plane decides experiments on 100 labelled requests per arm.
    home, api, enroll = demo.start_control_plane(work, publisher_pub, children, brokers)
    fleet = ("fleet", "--config", str(home / "operators/admin/fleet.toml"), "--api", api)
    agents = demo.enroll_and_run_agents(work, home, fleet, enroll, children)
    demo.deliver(work, fleet, children, bundle=v1, model=MODEL)

    step("fleet models publish v2; fleet models list  (TASK regression, held-out MAE)")
    print(run(*fleet, "models", "publish", str(v2)), end="")
    print(run(*fleet, "models", "list"), end="")
    step(f"fleet experiments start --model {MODEL} --challenger 2 --weight 0.5  (v2 answers "
         "half of each agent's traffic)")
    print(run(*fleet, "experiments", "start", "--model", MODEL, "--challenger", "2",
              "--weight", "0.5"), end="")
    for child in children[1:]:
        print(f"{child.name}: "
              + child.expect(rf"{MODEL} now serves v1 0.5, v2 0.5").group(0))

    X, y = _held_out()
    with httpx.Client(timeout=30) as client:
        step(f"Open Inference Protocol traffic: the {len(X)} held-out patients on each agent, "
             "each answer followed by the true value (POST .../feedback {\"label\": 151.0})")
        traffic(client, children, X, y, "exp")

    step("the experiment decides by a one-sided Welch's t-test on absolute errors")
    demo.wait_promoted(fleet, MODEL)
    step("the fleet at the end")
    demo.summary(fleet, MODEL)
    devices = json.loads(run(*fleet, "devices", "list", "--json"))
    online = [d for d in devices if d["status"] == "online"]
    if len(online) != len(agents):
        raise RuntimeError(f"expected {len(agents)} online devices, got {devices}")
    return len(online)


def main(argv: list[str] | None = None) -> int:
    return demo.main(argv, story=scenario, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
