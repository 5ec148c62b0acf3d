"""Packaging: container images, the SMB-host install and the Kubernetes manifests, checked
offline. Images are checked statically (nothing is built or pulled); the systemd unit with
`systemd-analyze`; every object that `kubectl kustomize` renders against the Kubernetes JSON
schemas that `kubernetes-validate` ships (custom resources against packaging/kubernetes/schemas/,
their pod templates against the Kubernetes schema again). Commands in the manifests, images
and unit are parsed by the real CLIs' argument parsers, so a renamed flag fails here.
"""

from __future__ import annotations

import base64
import configparser
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml

from control_plane import cli as control_plane_cli
from control_plane.config import ControlPlaneConfig, RetrainCluster
from control_plane.ops.home import init_home
from control_plane.services.cluster_runner import job_manifest
from edge_agent import cli as edge_agent_cli
from fleet import cli as fleet_cli
from fleetcore import pki
from tests.support import LoopThread, start_control_plane
from trainer import cli as trainer_cli
from trainer.pipeline import STEPS, Workdir

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
K8S = PACKAGING / "kubernetes"
DOCKERFILE = PACKAGING / "docker" / "Dockerfile"
UNIT = PACKAGING / "systemd" / "edge-agent.service"
INSTALL = PACKAGING / "install-agent.sh"
K8S_VERSION = "1.32.0"  # kubectl's own version here; the schemas ship in kubernetes-validate
KUSTOMIZATIONS = ["base", "overlays/production", "training"]
CRD_SCHEMAS = {
    ("kubeflow.org/v1", "PyTorchJob"): "pytorchjob-kubeflow-v1.json",
    ("argoproj.io/v1alpha1", "WorkflowTemplate"): "workflowtemplate-argoproj-v1alpha1.json",
    ("argoproj.io/v1alpha1", "Workflow"): "workflow-argoproj-v1alpha1.json",
    ("postgresql.cnpg.io/v1", "Cluster"): "cluster-postgresql-cnpg-v1.json",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
SECRET_PATTERN = re.compile(r"\.(key|pem|p12|pfx|db)$|secret|token|password|operators/|home/",
                            re.IGNORECASE)


# ---------------------------------------------------------------------- helpers

def _parse(parser: Any, argv: list[str]) -> Any:
    """Parse ``argv`` with a CLI's real parser; a wrong flag fails the test, not exits."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports on stderr and exits 2
        pytest.fail(f"not a valid command line for {parser.prog}: {argv} ({exc})")


def _tool(name: str) -> str:
    """A command these tests need: the venv's own first (the `dev` extra installs shellcheck
    there), then PATH (`.ci/run` installs the ones apt has). Missing fails, never skips."""
    venv_bin = Path(sys.executable).parent
    path = shutil.which(name, path=str(venv_bin)) or shutil.which(name)
    assert path is not None, (
        f"{name} is not installed: neither in {venv_bin} (`make setup` installs the dev extra) "
        "nor on PATH"
    )
    return path


@functools.cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run([_tool("kubectl"), "kustomize", str(K8S / name)], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "KUBECONFIG": os.devnull})
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def _all_rendered() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in KUSTOMIZATIONS:
        for obj in _render(name):
            yield name, obj


def _workflow() -> dict[str, Any]:
    [wf] = [o for o in _render("base") if o["kind"] == "WorkflowTemplate"]
    return wf


def _substitute(text: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        key = match.group(1).strip()
        assert key in values, f"{{{{{key}}}}} is not a declared parameter"
        return values[key]

    return re.sub(r"\{\{([^}]+)\}\}", one, text)


def _workflow_values(wf: dict[str, Any], **extra: str) -> dict[str, str]:
    values = {f"workflow.parameters.{p['name']}": p.get("value", "")
              for p in wf["spec"]["arguments"]["parameters"]}
    values["workflow.parameters.bundle-version"] = "2"
    values.update(extra)
    return values


def _embedded_pytorchjob(wf: dict[str, Any]) -> dict[str, Any]:
    [train] = [t for t in wf["spec"]["templates"] if t["name"] == "train"]
    doc = yaml.safe_load(_substitute(train["resource"]["manifest"], _workflow_values(wf)))
    assert isinstance(doc, dict)
    return doc


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec the manifests define, with a label saying where it comes from."""
    for name, obj in _all_rendered():
        where = f"{name}:{obj['kind']}/{obj['metadata'].get('name')}"
        if obj["kind"] in WORKLOAD_KINDS:
            yield where, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "PyTorchJob":
            for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
                yield f"{where}/{role}", replica["template"]["spec"]
    wf = _workflow()
    yield "WorkflowTemplate/train", _embedded_pytorchjob(wf)["spec"]["pytorchReplicaSpecs"][
        "Worker"]["template"]["spec"]
    for template in wf["spec"]["templates"]:
        if "container" in template:
            yield f"WorkflowTemplate/{template['name']}", {
                "securityContext": wf["spec"]["securityContext"],
                "containers": [template["container"]],
                "volumes": wf["spec"]["volumes"],
            }
    yield "cluster_runner Job", _retrain_job()["spec"]["template"]["spec"]


def _retrain_job() -> dict[str, Any]:
    """The Job the control plane submits with ``[retrain] runner = "kubernetes"`` (built in
    control_plane/services/cluster_runner.py; tests/test_retrain_cluster.py submits it)."""
    return job_manifest(RetrainCluster(), job_id=3, model="digits", version=4,
                        work_root=Path("/var/lib/edgefleet/home/retrain"))


def _validate_k8s(obj: dict[str, Any]) -> None:
    kv = kubernetes_validate
    try:
        kv.validate(obj, K8S_VERSION, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        where = f"{obj['kind']}/{obj['metadata'].get('name')}"
        pytest.fail(f"{where}: {path}: {exc.message[:300]}")


def _validate_pod_template(template: dict[str, Any], where: str) -> None:
    _validate_k8s({"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": re.sub(r"[^a-z0-9-]", "-", where.lower())[:60]},
                   "template": template})


def _validate_crd(obj: dict[str, Any]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[key]).read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=str)
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    if obj["kind"] == "PyTorchJob":
        for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
            _validate_pod_template(replica["template"], f"{obj['kind']}-{role}")
    if obj["kind"] == "WorkflowTemplate":
        for template in obj["spec"]["templates"]:
            if "container" in template:
                _validate_k8s({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": template["name"]},
                               "spec": {"securityContext": obj["spec"]["securityContext"],
                                        "containers": [template["container"]],
                                        "volumes": obj["spec"]["volumes"]}})


# ---------------------------------------------------------------------- container images

def _stages() -> dict[str, dict[str, Any]]:
    """Dockerfile stages: base, the RUN/COPY/USER/CMD instructions (continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.IGNORECASE)
            assert m, f"every stage is named: {line}"
            current = {"base": m.group(1), "lines": []}
            stages[m.group(2)] = current
        elif current is not None:
            current["lines"].append((op, rest.strip()))
    return stages


def _chain(stages: dict[str, dict[str, Any]], target: str) -> list[str]:
    """The stages a target is built from (its FROM ancestry and COPY --from sources)."""
    seen: list[str] = []
    todo = [target]
    while todo:
        name = todo.pop()
        if name in seen or name not in stages:
            continue
        seen.append(name)
        todo.append(stages[name]["base"])
        for op, rest in stages[name]["lines"]:
            m = re.match(r"--from=(\S+)", rest) if op == "COPY" else None
            if m:
                todo.append(m.group(1))
    return seen


def _pip_installs(stages: dict[str, dict[str, Any]], target: str) -> list[str]:
    return [rest for name in _chain(stages, target) for op, rest in stages[name]["lines"]
            if op == "RUN" and "pip install" in rest]


def _json_instruction(stages: dict[str, dict[str, Any]], target: str, op: str) -> list[str]:
    [value] = [rest for o, rest in stages[target]["lines"] if o == op]
    parsed = json.loads(value)
    assert isinstance(parsed, list)
    return [str(v) for v in parsed]


def test_image_bases_are_pinned_to_exact_versions() -> None:
    stages = _stages()
    for name, stage in stages.items():
        base = stage["base"]
        if base in stages:
            continue
        assert "@sha256:" in base or re.search(r":\d+\.\d+\.\d+", base), (
            f"stage {name}: base {base} is not pinned to an exact version or digest")
        assert not base.endswith(":latest")


@pytest.mark.parametrize(("target", "extra", "entrypoint"), [
    ("agent", "agent", "edge-agent"),
    ("control-plane", "control-plane", "control-plane"),
    ("trainer", "trainer", "trainer"),
])
def test_each_image_is_multi_stage_non_root_and_installs_only_its_extra(
        target: str, extra: str, entrypoint: str) -> None:
    stages = _stages()
    assert target in stages
    chain = _chain(stages, target)
    assert len(chain) >= 3, "built in a separate stage, copied into a clean runtime"
    lines = stages[target]["lines"]
    assert not any(op == "RUN" and "pip install" in rest for op, rest in lines), (
        "the runtime stage installs nothing itself")
    users = [rest for op, rest in lines if op == "USER"]
    assert users, f"{target} sets USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root") and (not uid.isdigit() or int(uid) >= 1000)
    installs = " ".join(_pip_installs(stages, target))
    extras = set(re.findall(r"\.\[([^\]]+)\]", installs))
    assert extras == {extra}, f"{target} installs extras {extras}"
    if target != "trainer":
        assert "torch" not in installs
    assert _json_instruction(stages, target, "ENTRYPOINT") == [entrypoint]


def test_image_commands_are_valid_for_the_real_clis() -> None:
    stages = _stages()
    agent = _parse(edge_agent_cli._parser(), _json_instruction(stages, "agent", "CMD"))
    volumes = [json.loads(rest) for op, rest in stages["agent"]["lines"] if op == "VOLUME"]
    assert [str(agent.state_dir)] in volumes, "the agent's state is a volume"
    cp = _parse(control_plane_cli._parser(), _json_instruction(stages, "control-plane", "CMD"))
    assert cp.command == "serve" and cp.api.startswith("0.0.0.0:")
    cp_volumes = [v for op, rest in stages["control-plane"]["lines"] if op == "VOLUME"
                  for v in json.loads(rest)]
    assert any(str(cp.home).startswith(v + "/") for v in cp_volumes), "the home is a volume"


def test_images_carry_no_secrets_and_the_context_is_an_allowlist() -> None:
    stages = _stages()
    for name, stage in stages.items():
        for op, rest in stage["lines"]:
            if op in ("COPY", "ADD"):
                assert op == "COPY", "ADD can fetch URLs and unpack archives; COPY only"
                sources = [s for s in rest.split() if not s.startswith("--")][:-1]
                for source in sources:
                    assert not SECRET_PATTERN.search(source), f"{name} copies {source}"
                    if "--from=" not in rest:
                        assert (ROOT / source).exists(), f"{name} copies missing {source}"
            if op in ("ENV", "ARG"):
                names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
                for var in names:
                    assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", var), f"{name}: {var}"
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [r.strip() for r in ignore if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", "everything is excluded unless listed"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert not any(SECRET_PATTERN.search(a) for a in allowed)
    copied = {s.rstrip("/") for stage in stages.values() for op, rest in stage["lines"]
              if op == "COPY" and "--from=" not in rest
              for s in rest.split()[:-1]}
    assert copied <= allowed, f"COPY sources the context would not contain: {copied - allowed}"
    for pattern in ("**/*.key", "**/*.pem"):
        assert pattern in rules


# ---------------------------------------------------------------------- SMB host: systemd

def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_is_hardened() -> None:
    unit = _unit()
    service = unit["Service"]
    expected = {
        "User": "edge-agent", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        "StateDirectory": "edge-agent", "StateDirectoryMode": "0700", "Restart": "on-failure",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "", "RestrictSUIDSGID": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes", "LockPersonality": "yes",
    }
    for key, value in expected.items():
        assert service.get(key) == value, f"[Service] {key}={service.get(key)!r}"
    assert "RestartSec" in service
    assert set(service["RestrictAddressFamilies"].split()) <= {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "ReadWritePaths" not in service, "only the state directory is writable"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_runs_a_real_agent_command_in_its_state_directory() -> None:
    argv = shlex.split(_unit()["Service"]["ExecStart"])
    assert argv[0] == "/opt/edgefleet/venv/bin/edge-agent"
    args = _parse(edge_agent_cli._parser(), argv[1:])
    assert args.command == "run"
    assert str(args.state_dir) == "/var/lib/" + _unit()["Service"]["StateDirectory"]
    assert args.listen.startswith("127.0.0.1:"), "inference on loopback unless an admin opens it"
    condition = _unit()["Unit"]["ConditionPathExists"]
    assert condition == f"{args.state_dir}/agent.toml", "starts only once enrolled"


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here."""
    exe = tmp_path / "bin" / "edge-agent"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/edgefleet/venv/bin/edge-agent", str(exe)))
    return unit


def _systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("systemd-analyze"), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, check=False)


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _unit_copy(tmp_path)
    proc = _systemd_analyze("verify", unit.name, cwd=tmp_path)
    ours = [line for line in proc.stderr.splitlines() if unit.name in line]
    assert proc.returncode == 0 and not ours, proc.stderr
    # The check is real: an unknown directive is reported.
    bad = tmp_path / "bad.service"
    bad.write_text(unit.read_text().replace("RestartSec=", "RestartSecs="))
    assert "RestartSecs" in _systemd_analyze("verify", bad.name, cwd=tmp_path).stderr


def test_systemd_unit_exposure_score_is_low(tmp_path: Path) -> None:
    unit = _unit_copy(tmp_path)
    proc = _systemd_analyze("security", "--offline=yes", "--no-pager", unit.name, cwd=tmp_path)
    m = re.search(r"Overall exposure level for [^:]+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert m is not None, proc.stdout + proc.stderr
    # 0 = fully locked down, 10 = unprotected; systemd calls anything under 2 "OK".
    assert float(m.group(1)) <= 2.0, proc.stdout


# ---------------------------------------------------------------------- SMB host: install

def test_install_script_is_strict_idempotent_and_installs_only_the_agent_extra() -> None:
    text = INSTALL.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(INSTALL, os.X_OK)
    assert '"${SOURCE}[agent]"' in text and "[control-plane]" not in text
    # Idempotence: each creation step is guarded, and the enrollment is kept.
    assert 'if ! id -u "${AGENT_USER}"' in text and 'if ! getent group "${AGENT_USER}"' in text
    assert 'if [ -f "${STATE_DIR}/agent.toml" ]' in text
    assert "systemctl enable edge-agent.service" in text
    assert subprocess.run(["bash", "-n", str(INSTALL)], check=False).returncode == 0


def test_install_script_help_and_argument_errors() -> None:
    ok = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True,
                        timeout=30, check=False)
    assert ok.returncode == 0 and "--enroll-server" in ok.stdout
    bad = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True,
                         text=True, timeout=30, check=False)
    assert bad.returncode != 0 and "unknown argument: --frobnicate" in bad.stderr


@pytest.mark.parametrize("script", [INSTALL, K8S / "base" / "control-plane" / "init-home.sh"])
def test_shell_scripts_are_shellcheck_clean(script: Path) -> None:
    proc = subprocess.run([_tool("shellcheck"), str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------------- Kubernetes: schemas

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders_and_every_object_validates_offline(name: str) -> None:
    objects = _render(name)
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
            _validate_crd(obj)
        else:
            _validate_k8s(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "edgefleet", obj["metadata"]


def test_schema_validation_catches_mistakes() -> None:
    [sts] = [o for o in _render("base") if o["kind"] == "StatefulSet"]
    broken = json.loads(json.dumps(sts))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    kv = kubernetes_validate
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)
    [job] = [o for o in _render("training") if o["kind"] == "PyTorchJob"]
    job = json.loads(json.dumps(job))
    job["spec"]["elasticPolicy"]["minReplica"] = 1
    with pytest.raises(AssertionError):
        _validate_crd(job)


def test_the_workflows_pytorchjob_validates_and_matches_the_standalone_one() -> None:
    wf = _workflow()
    embedded = _embedded_pytorchjob(wf)
    _validate_crd(embedded)
    [standalone] = [o for o in _render("training") if o["kind"] == "PyTorchJob"]
    # Same job; the workflow fills names and sizes from its parameters (defaults here).
    assert embedded["spec"] == standalone["spec"]


def test_retrain_job_template_renders_to_a_valid_job() -> None:
    _validate_k8s(_retrain_job())


# ---------------------------------------------------------------------- Kubernetes: security

def test_every_pod_is_restricted_and_bounded() -> None:
    seen = 0
    for where, pod in _pod_specs():
        seen += 1
        pod_sc = pod.get("securityContext", {})
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = {**pod_sc, **c.get("securityContext", {})}
            label = f"{where}/{c['name']}"
            assert sc.get("runAsNonRoot") is True, label
            assert sc.get("runAsUser", 1) != 0, label
            assert sc.get("allowPrivilegeEscalation") is False, label
            assert sc.get("readOnlyRootFilesystem") is True, label
            assert not sc.get("privileged"), label
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], label
            assert not sc.get("capabilities", {}).get("add"), label
            limits = c.get("resources", {}).get("limits", {})
            assert {"cpu", "memory"} <= set(limits), f"{label}: limits {limits}"
    assert seen >= 8


def test_network_policies_deny_by_default_and_cover_every_workload() -> None:
    for name in ("base", "overlays/production"):
        objects = _render(name)
        policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
        deny = [p for p in policies if p["spec"]["podSelector"] == {}
                and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
                and not p["spec"].get("ingress") and not p["spec"].get("egress")]
        assert deny, f"{name}: no default-deny policy"
        selectors = [p["spec"]["podSelector"].get("matchLabels", {}) for p in policies
                     if p not in deny]
        pod_labels = [o["spec"]["template"]["metadata"]["labels"] for o in objects
                      if o["kind"] in WORKLOAD_KINDS]
        pod_labels.append(_workflow()["spec"]["podMetadata"]["labels"])
        for labels in pod_labels:
            assert any(sel and sel.items() <= labels.items() for sel in selectors), (
                f"{name}: no policy allows traffic for pods labelled {labels}")


def test_no_secret_material_is_committed() -> None:
    for path in PACKAGING.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text), path
            assert not re.search(r"\beft_[A-Za-z0-9_-]{20,}", text), f"a token in {path}"
    secrets = [o for _, o in _all_rendered() if o["kind"] == "Secret"]
    assert secrets, "the broker configuration is generated into a Secret"
    for secret in secrets:
        assert "stringData" not in secret
        for key, value in secret.get("data", {}).items():
            assert "PLACEHOLDER" in base64.b64decode(value).decode(), (
                f"Secret {secret['metadata']['name']}/{key} holds more than a placeholder")


def test_secrets_are_mounted_never_baked_in() -> None:
    wf = _workflow()
    mounts = {t["name"]: {m["name"] for m in t["container"].get("volumeMounts", [])}
              for t in wf["spec"]["templates"] if "container" in t}
    secret_volumes = {v["name"] for v in wf["spec"]["volumes"] if "secret" in v}
    assert secret_volumes == {"publisher", "operator"}
    for template, names in mounts.items():
        assert names & secret_volumes == {"bundle": {"publisher"}, "publish": {"operator"}}.get(
            template, set()), f"{template} mounts {names & secret_volumes}"
    for _, obj in _all_rendered():
        for env in _container_env(obj):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", env["name"]) or (
                "valueFrom" in env), env


def _container_env(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if obj["kind"] in WORKLOAD_KINDS:
        pod = obj["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield from c.get("env", [])


# ---------------------------------------------------------------------- Kubernetes: behaviour

def _home_on_a_claim(pod: dict[str, Any], claims: set[str]) -> tuple[Any, dict[str, Any]]:
    """The control plane's parsed args and container; asserts its home is on a claim."""
    [container] = pod["containers"]
    args = _parse(control_plane_cli._parser(), container["args"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    home_mount = [p for p in mounts if str(args.home).startswith(p + "/")]
    assert home_mount and mounts[home_mount[0]] in claims, "the home is on a persistent volume"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.api.endswith(f":{ports['api']}") and args.enroll.endswith(f":{ports['enroll']}")
    [init] = pod["initContainers"]
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["EDGEFLEET_HOME"] == str(args.home)
    return args, container


def test_base_control_plane_keeps_its_home_on_a_volume_and_is_probed_on_its_api_port() -> None:
    [sts] = [o for o in _render("base") if o["kind"] == "StatefulSet"]
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    _, container = _home_on_a_claim(sts["spec"]["template"]["spec"], claims)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["tcpSocket"]["port"] == "api", probe
    assert sts["spec"]["replicas"] == 1  # SQLite


def test_production_control_plane_is_a_deployment_with_a_pdb_and_health_readiness() -> None:
    objects = _render("overlays/production")
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    [deploy] = [o for o in objects if o["kind"] == "Deployment"
                and o["metadata"]["name"] == "edgefleet-control-plane"]
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    pvcs = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {n for n, v in volumes.items()
              if v.get("persistentVolumeClaim", {}).get("claimName") in pvcs}
    args, container = _home_on_a_claim(pod, claims)
    # One replica until the PostgreSQL store lands: the SQLite home must never have two
    # writers, so no rolling update either. The budget and the spread are ready for more.
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    [pdb] = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        spec["template"]["metadata"]["labels"].items())
    assert pdb["spec"]["maxUnavailable"] == 1  # never blocks a drain, keeps n-1 of n
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    # Readiness: the gRPC health service through the probe script, on the enrollment port,
    # with the home's CA; startup and liveness stay TCP checks of the API port.
    probe = container["readinessProbe"]["exec"]["command"]
    script_mount = next(m for m in container["volumeMounts"] if m["name"] == "probe")
    assert probe[:2] == ["python", script_mount["mountPath"] + "/health-probe.py"]
    assert probe[2] == str(args.home) and probe[3].endswith(args.enroll.rsplit(":", 1)[1])
    [init] = pod["initContainers"]
    env = {e["name"]: e["value"] for e in init["env"]}
    assert probe[4] in env["EDGEFLEET_SANS"].split()
    for name in ("livenessProbe", "startupProbe"):
        assert container[name]["tcpSocket"]["port"] == "api", name
    assert env["EDGEFLEET_API_ADVERTISE"].endswith(":7443")
    assert env["EDGEFLEET_API_ADVERTISE"].split(":")[0] in env["EDGEFLEET_SANS"].split()
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    assert services["edgefleet-control-plane"]["spec"]["type"] == "LoadBalancer"
    # Retraining on the cluster: the runner, the work claim at HOME/retrain from the sub-path
    # the runner mounts in its Jobs, and the service-account token (bound to the Role).
    settings = RetrainCluster()
    assert env["EDGEFLEET_RETRAIN_RUNNER"] == "kubernetes"
    assert env["EDGEFLEET_TRAINER_IMAGE"].startswith("registry.example.com/")
    [work] = [m for m in container["volumeMounts"] if m["name"] == "training"]
    assert work["mountPath"] == f"{args.home}/retrain" and work["subPath"] == (
        settings.work_subpath)
    assert volumes["training"]["persistentVolumeClaim"]["claimName"] == settings.work_claim
    assert pod["automountServiceAccountToken"] is True
    [binding] = [o for o in objects if o["kind"] == "RoleBinding"
                 and o["metadata"]["name"] == "edgefleet-control-plane"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    # The database: CloudNativePG, three instances, reachable from the control plane only.
    [db] = [o for o in objects if o["kind"] == "Cluster"]
    assert db["spec"]["instances"] == 3 and db["spec"]["enableSuperuserAccess"] is False
    [cp_policy] = [o for o in objects if o["kind"] == "NetworkPolicy"
                   and o["metadata"]["name"] == "edgefleet-control-plane"]
    assert any(r.get("to", [{}])[0].get("podSelector", {}).get("matchLabels") == {
        "cnpg.io/cluster": db["metadata"]["name"]} for r in cp_policy["spec"]["egress"])


def test_the_readiness_probe_passes_against_a_real_control_plane(
        tmp_path: Path, loop: LoopThread) -> None:
    """health-probe.py, as the kubelet runs it, against a real control plane's enrollment
    port: its grpc.health.v1 service answers SERVING for "" once it is up."""
    cp = start_control_plane(tmp_path / "cp", loop)
    script = K8S / "overlays" / "production" / "health-probe.py"
    try:
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "cp"),
                              cp.cp.enroll_address, "localhost"], capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
    finally:
        cp.stop()


def test_the_readiness_probe_script_checks_grpc_health_over_tls(tmp_path: Path) -> None:
    """health-probe.py against a real TLS gRPC server with the home's server certificate:
    exit 0 on SERVING only; NOT_SERVING, no health service or no server: non-zero."""
    home = tmp_path / "home"
    init_home(home)
    script = K8S / "overlays" / "production" / "health-probe.py"
    status = [b"\x08\x01"]

    def check(request: bytes, context: Any) -> bytes:
        assert request == b""  # service "": the whole server
        return status[0]

    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)})])
    creds = grpc.ssl_server_credentials([((home / "pki" / "server.key").read_bytes(),
                                          (home / "pki" / "server.pem").read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), str(home), f"127.0.0.1:{port}",
                               "localhost"], capture_output=True, text=True, timeout=60,
                              check=False)

    try:
        assert probe().returncode == 0
        status[0] = b"\x08\x02"  # NOT_SERVING
        out = probe()
        assert out.returncode == 1 and "not ready" in out.stderr
    finally:
        server.stop(None)
    out = probe()
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr


def test_init_home_script_creates_the_home_once_and_sets_the_advertised_address(
        tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "control-plane").exists()  # `make setup` installs the project
    script = K8S / "base" / "control-plane" / "init-home.sh"
    home = tmp_path / "home"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "EDGEFLEET_HOME": str(home), "EDGEFLEET_SANS": "fleet.example.com cp.internal",
           "EDGEFLEET_API_ADVERTISE": "fleet.example.com:7443"}
    first = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, text=True,
                           timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    assert ControlPlaneConfig.load(home).api_advertise == "fleet.example.com:7443"
    names = pki.load_certificate((home / "pki" / "server.pem").read_bytes())
    ca_before = (home / "pki" / "ca.pem").read_bytes()
    assert "fleet.example.com" in str(names.extensions)
    second = subprocess.run(["/bin/sh", str(script)],
                            env={**env, "EDGEFLEET_API_ADVERTISE": "other.example.com:7443"},
                            capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 0, second.stderr
    assert (home / "pki" / "ca.pem").read_bytes() == ca_before, "the home is never re-created"
    assert ControlPlaneConfig.load(home).api_advertise == "other.example.com:7443"
    assert ControlPlaneConfig.load(home).retrain_runner == "local"
    third = subprocess.run(["/bin/sh", str(script)],
                           env={**env, "EDGEFLEET_RETRAIN_RUNNER": "kubernetes",
                                "EDGEFLEET_TRAINER_IMAGE": "registry.example.com/t:1"},
                           capture_output=True, text=True, timeout=120, check=False)
    assert third.returncode == 0, third.stderr
    cfg = ControlPlaneConfig.load(home)
    assert cfg.retrain_runner == "kubernetes"
    assert cfg.retrain_cluster.image == "registry.example.com/t:1"
    bad = subprocess.run(["/bin/sh", str(script)], env={**env, "EDGEFLEET_RETRAIN_RUNNER": "x"},
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode != 0 and "EDGEFLEET_RETRAIN_RUNNER" in bad.stderr
    assert ControlPlaneConfig.load(home).retrain_runner == "kubernetes"


def test_mosquitto_runs_the_generated_config_from_a_secret() -> None:
    objects = _render("overlays/production")
    [deploy] = [o for o in objects if o["kind"] == "Deployment"
                and o["metadata"]["name"] == "edgefleet-mosquitto"]
    pod = deploy["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert config_mount["readOnly"] is True
    assert container["command"][-1] == config_mount["mountPath"] + "/mosquitto.conf"
    secret_name = volumes["config"]["secret"]["secretName"]
    [secret] = [o for o in objects if o["kind"] == "Secret"]
    assert secret["metadata"]["name"] == secret_name  # the generator's hashed name
    assert "mosquitto.conf" in secret["data"]
    data = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert "persistentVolumeClaim" in volumes[data["name"]]
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    assert re.search(r":\d+\.\d+\.\d+$", container["image"])


def test_pytorchjob_is_elastic_torchrun_resuming_from_checkpoints_on_shared_storage() -> None:
    objects = _render("training")
    [job] = [o for o in objects if o["kind"] == "PyTorchJob"]
    elastic = job["spec"]["elasticPolicy"]
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert 1 <= elastic["minReplicas"] <= worker["replicas"] <= elastic["maxReplicas"]
    assert elastic["minReplicas"] < elastic["maxReplicas"]
    assert elastic["rdzvBackend"] == "c10d"
    pod = worker["template"]["spec"]
    [container] = pod["containers"]
    assert container["name"] == "pytorch"  # the operator's convention
    assert container["command"] == ["torchrun"]
    assert container["args"][:2] == ["--no-python", "trainer"]
    args = _parse(trainer_cli._parser(), container["args"][2:])
    assert args.command == "train"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    checkpoint = Workdir(args.workdir).checkpoint
    work_mount = next(m for m in container["volumeMounts"]
                      if checkpoint.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == work_mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    [pvc] = [o for o in _render("base") if o["kind"] == "PersistentVolumeClaim"
             and o["metadata"]["name"] == claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every worker sees rank 0's file"
    pipeline = next(v for v in pod["volumes"] if v["name"] == "pipeline")["configMap"]["name"]
    assert pipeline in {o["metadata"]["name"] for o in _render("base") if o["kind"] == "ConfigMap"}


def test_workflow_runs_ingest_train_compress_bundle_publish_with_real_commands() -> None:
    wf = _workflow()
    templates = {t["name"]: t for t in wf["spec"]["templates"]}
    entry = templates[wf["spec"]["entrypoint"]]
    order = [step["name"] for group in entry["steps"] for step in group]
    assert order == ["ingest", "train", *[s for s in STEPS if s not in ("ingest", "train")],
                     "publish"]
    assert templates["train"]["resource"]["action"] == "create"
    declared = {p["name"] for p in wf["spec"]["arguments"]["parameters"]}
    assert "value" not in next(p for p in wf["spec"]["arguments"]["parameters"]
                               if p["name"] == "bundle-version"), "each run names its version"
    for group in entry["steps"]:
        for step in group:
            template = templates[step["template"]]
            given = {p["name"]: p["value"] for p in step.get("arguments", {}).get(
                "parameters", [])}
            wanted = {p["name"] for p in template.get("inputs", {}).get("parameters", [])}
            assert set(given) == wanted, step
            if "container" not in template:
                continue
            values = _workflow_values(wf, **{f"inputs.parameters.{k}": v
                                             for k, v in given.items()})
            container = template["container"]
            argv = [_substitute(a, values) for a in container["args"]]
            assert re.fullmatch(r"[^{}]+:\d+\.\d+\.\d+", _substitute(container["image"], values))
            if container.get("command") == ["fleet"]:
                args = _parse(fleet_cli._parser(), argv)
                assert (args.group, args.command) == ("models", "publish")
                assert str(args.bundle) == "/work/digits/bundle"
            else:
                args = _parse(trainer_cli._parser(), argv)
                assert args.command == step["name"]
                assert str(args.workdir) == "/work/digits"
                if step["name"] == "bundle":
                    assert args.bundle_version == 2 and args.publisher_key is not None
                else:
                    assert args.publisher_key is None
    for text in json.dumps(wf["spec"]).split("{{")[1:]:
        ref = text.split("}}")[0]
        if ref.startswith("workflow.parameters."):
            assert ref.removeprefix("workflow.parameters.") in declared, ref
