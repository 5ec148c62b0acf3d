"""Retraining on a cluster: ``[retrain] runner = "kubernetes" | "argo"``.

No API server runs here, so the runner talks to ``tests/kube_fake.py``: the Kubernetes JSON
API for exactly the endpoints it uses, over real HTTP, with the real ``kubernetes`` client
and a kubeconfig. Every object the runner submits is validated by the fake against the
Kubernetes 1.32 schemas (strict) or the Argo Workflow schema, as an API server would.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.config import ControlPlaneConfig, RetrainCluster
from control_plane.domain.records import JobState
from control_plane.domain.retraining import DriftPolicy
from control_plane.services.cluster_runner import (
    JOB_LABEL,
    ClusterRunner,
    job_manifest,
    job_outcome,
    workflow_manifest,
    workflow_outcome,
)
from control_plane.services.retrain_runner import LocalRunner, Outcome
from fleetcore import tomlfile
from fleetcore.errors import InvalidInputError
from tests.kube_fake import FakeKube, run_like_kubelet, validate
from tests.support import LoopThread, start_control_plane
from tests.trainer_support import write_pipeline

WORK = Path("/var/lib/edgefleet/home/retrain")


@pytest.fixture
def fake() -> Any:
    server = FakeKube()
    yield server
    server.close()


def _settings(fake: FakeKube, tmp_path: Path, **kw: Any) -> RetrainCluster:
    return RetrainCluster(kubeconfig=str(fake.kubeconfig(tmp_path / "kubeconfig")), **kw)


def _runner(fake: FakeKube, tmp_path: Path, kind: str = "kubernetes") -> ClusterRunner:
    # A clock that jumps 100 s per reading: the backoff between checks never holds a test up.
    clock = itertools.count(0, 100).__next__
    return ClusterRunner(_settings(fake, tmp_path), kind, tmp_path / "retrain",
                         clock=lambda: float(clock()))


def _start(loop: LoopThread, runner: ClusterRunner, tmp_path: Path, job_id: int = 1) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text("[data]\n")
    loop.run(runner.start(job_id, pipeline, tmp_path / "retrain" / f"job-{job_id}", 2,
                          tmp_path / "unused.key", ["--margin", "0.0"], model="digits"))


# ---------------------------------------------------------------------- what is submitted

def test_submitted_objects_validate_against_the_kubernetes_and_argo_schemas() -> None:
    s = RetrainCluster(gpus=1)
    extra = ["--margin", "0.02", "--samples", str(WORK / "job-7" / "samples.json")]
    job = job_manifest(s, job_id=7, model="Digits_v2", version=3, work_root=WORK, extra=extra)
    wf = workflow_manifest(s, job_id=7, model="Digits_v2", version=3, work_root=WORK,
                           extra=extra)
    assert validate(job) == [] and validate(wf) == []
    assert job["metadata"]["name"] == wf["metadata"]["name"] == "edgefleet-retrain-digits-v2-7"
    [c] = job["spec"]["template"]["spec"]["containers"]
    # The trainer's command line is the local runner's, in the job's own work directory,
    # which the pod mounts from the shared claim at the same path the control plane sees.
    assert c["args"][:8] == ["run", str(WORK / "job-7" / "pipeline.toml"), "--workdir",
                             str(WORK / "job-7"), "--publisher-key", "/keys/publisher.key",
                             "--bundle-version", "3"] and c["args"][8:] == extra
    [work] = [m for m in c["volumeMounts"] if m["name"] == "work"]
    assert work == {"name": "work", "mountPath": str(WORK / "job-7"), "subPath": "retrain/job-7"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["spec"]["activeDeadlineSeconds"] == s.deadline_seconds
    assert job["spec"]["template"]["metadata"]["labels"][JOB_LABEL] == "7"
    assert wf["spec"]["templates"][0]["container"]["args"] == c["args"]
    # A mistake is caught by the same validation.
    broken = job_manifest(s, job_id=7, model="digits", version=3, work_root=WORK)
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert validate(broken)
    broken_wf = workflow_manifest(s, job_id=7, model="digits", version=3, work_root=WORK)
    broken_wf["spec"]["entrypoints"] = "x"
    assert validate(broken_wf)


def test_long_or_odd_model_names_still_give_valid_names() -> None:
    model = "a" * 63
    job = job_manifest(RetrainCluster(), job_id=123456, model=model, version=1, work_root=WORK)
    assert len(job["metadata"]["name"]) <= 63 and job["metadata"]["name"].endswith("-123456")
    assert validate(job) == []


def test_config_reads_the_runner_and_refuses_bad_values(tmp_path: Path) -> None:
    cfg = ControlPlaneConfig(home=tmp_path)
    cfg.retrain_runner = "argo"
    cfg.retrain_cluster = RetrainCluster(namespace="ml", image="r.example/trainer:1", gpus=2)
    cfg.save()
    loaded = ControlPlaneConfig.load(tmp_path)
    assert loaded.retrain_runner == "argo" and loaded.retrain_cluster == cfg.retrain_cluster
    assert ControlPlaneConfig(home=tmp_path).retrain_runner == "local"
    for bad in ({"runner": "slurm"}, {"namespace": "Not_A_Name"}, {"memory": "lots"},
                {"gpus": -1}, {"work_subpath": "../etc"}, {"deadline_seconds": 0}):
        doc = cfg.to_toml()
        doc["retrain"].update(bad)
        tomlfile.write(tmp_path / "config.toml", doc)
        with pytest.raises(InvalidInputError):
            ControlPlaneConfig.load(tmp_path)


# ---------------------------------------------------------------------- what the API says

def _pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": status}


@pytest.mark.parametrize(("job_status", "pods", "expect"), [
    ({}, [], None),
    ({"conditions": [{"type": "Complete", "status": "True"}]}, [], (0, "")),
    ({"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                      "message": "Job was active longer than specified deadline"}]}, [],
     (1, "DeadlineExceeded")),
    ({"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]},
     [_pod(containerStatuses=[{"state": {"terminated": {"exitCode": 137,
                                                         "reason": "OOMKilled"}}}])],
     (137, "OOMKilled (exit code 137)")),
    ({}, [_pod(containerStatuses=[{"state": {"waiting": {"reason": "ImagePullBackOff",
                                                         "message": "back-off pulling"}}}])],
     (1, "ImagePullBackOff: back-off pulling")),
    ({"conditions": [{"type": "Failed", "status": "False"}]}, [], None),
])
def test_job_outcome(job_status: dict[str, Any], pods: list[dict[str, Any]],
                     expect: tuple[int, str] | None) -> None:
    out = job_outcome({"status": job_status}, pods)
    if expect is None:
        assert out is None
    else:
        assert out is not None and out.code == expect[0] and expect[1] in out.detail


def test_workflow_outcome() -> None:
    assert workflow_outcome({"status": {"phase": "Running"}}, []) is None
    assert workflow_outcome({"status": {"phase": "Succeeded"}}, []) == Outcome(0, "")
    out = workflow_outcome({"status": {"phase": "Failed", "message": "child failed",
                                       "nodes": {"n": {"message": "OOMKilled (exit code 137)"}}}},
                           [])
    assert out is not None and out.code != 0 and "OOMKilled" in out.detail
    hostile = {"status": {"phase": "Error", "nodes": [1, 2], "message": "x" * 10_000}}
    out = workflow_outcome(hostile, [{"status": "nonsense"}])
    assert out is not None and len(out.detail) <= 500


# ---------------------------------------------------------------------- the runner, over HTTP

def test_a_job_that_cannot_pull_its_image_fails_with_the_reason_and_is_deleted(
        fake: FakeKube, tmp_path: Path, loop: LoopThread) -> None:
    runner = _runner(fake, tmp_path)
    _start(loop, runner, tmp_path)
    [job] = fake.objects["jobs"].values()
    assert (tmp_path / "retrain" / "job-1" / "pipeline.toml").read_text() == "[data]\n"
    assert loop.run(runner.check(1)) is None  # submitted, no pod yet
    fake.set_pod(job, "p1", {"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "state": {"waiting": {
            "reason": "ErrImagePull", "message": "registry.example.com/trainer: not found"}}}]})
    out = loop.run(runner.check(1))
    assert out is not None and out.code != 0
    assert "ErrImagePull: registry.example.com/trainer: not found" in out.detail
    assert fake.deleted == [job["metadata"]["name"]] and not fake.pods


def test_an_oom_killed_job_fails_with_the_reason_and_keeps_the_log(
        fake: FakeKube, tmp_path: Path, loop: LoopThread) -> None:
    runner = _runner(fake, tmp_path)
    _start(loop, runner, tmp_path)
    [job] = fake.objects["jobs"].values()
    name = job["metadata"]["name"]
    fake.set_pod(job, "p1", {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]},
        log=b"epoch 1/10\n")
    fake.set_status("jobs", name, {"conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
         "message": "Container trainer for pod p1 failed with exit code 137"}]})
    out = loop.run(runner.check(1))
    assert out is not None and out.code == 137 and "OOMKilled (exit code 137)" in out.detail
    assert "PodFailurePolicy" in out.detail
    assert (tmp_path / "retrain" / "job-1" / "trainer.log").read_bytes() == b"epoch 1/10\n"


def test_a_restarted_control_plane_finds_its_job_by_label_and_a_deleted_one_is_lost(
        fake: FakeKube, tmp_path: Path, loop: LoopThread) -> None:
    _start(loop, _runner(fake, tmp_path), tmp_path)
    [job] = fake.objects["jobs"].values()
    again = _runner(fake, tmp_path)  # no memory of the job
    _start(loop, again, tmp_path)  # submitted again (the start was never recorded): followed
    assert len(fake.objects["jobs"]) == 1
    again = _runner(fake, tmp_path)
    assert loop.run(again.check(1)) is None
    fake.set_status("jobs", job["metadata"]["name"], {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
         "message": "Job was active longer than specified deadline"}]})
    out = loop.run(again.check(1))
    assert out is not None and "DeadlineExceeded" in out.detail
    out = loop.run(_runner(fake, tmp_path).check(1))  # deleted with the failure
    assert out is not None and out.code == -1 and "lost" in out.detail


def test_backoff_between_checks_and_an_unreachable_api_is_retried(
        fake: FakeKube, tmp_path: Path, loop: LoopThread) -> None:
    now = [0.0]
    runner = ClusterRunner(_settings(fake, tmp_path), "kubernetes", tmp_path / "retrain",
                           clock=lambda: now[0])
    _start(loop, runner, tmp_path)
    gets = lambda: sum(1 for m, p in fake.calls if m == "GET")  # noqa: E731
    assert loop.run(runner.check(1)) is None and gets() == 0  # too soon after the start
    now[0] = 2.0
    assert loop.run(runner.check(1)) is None and gets() == 2  # the job and its pods
    now[0] = 3.0
    assert loop.run(runner.check(1)) is None and gets() == 2  # next one 4 s later
    now[0] = 6.0
    assert loop.run(runner.check(1)) is None and gets() == 4
    fake.close()  # the API goes away: the job is not failed for that
    now[0] = 100.0
    assert loop.run(runner.check(1)) is None
    now[0] = 10.0 ** 6  # ... until long past its own deadline
    out = loop.run(runner.check(1))
    assert out is not None and out.code == -1 and "did not answer" in out.detail


def test_argo_runner_submits_a_valid_workflow_and_reads_its_phase(
        fake: FakeKube, tmp_path: Path, loop: LoopThread) -> None:
    runner = _runner(fake, tmp_path, "argo")
    _start(loop, runner, tmp_path)
    [wf] = fake.objects["workflows"].values()
    assert not fake.objects["jobs"] and not fake.refused
    assert loop.run(runner.check(1)) is None
    fake.set_pod(wf, "wf-main", {"phase": "Succeeded", "containerStatuses": [
        {"name": "main", "state": {"terminated": {"exitCode": 0}}}]}, log=b"done\n")
    fake.set_status("workflows", wf["metadata"]["name"], {"phase": "Succeeded"})
    out = loop.run(runner.check(1))
    assert out is not None and out.code == 0 and not fake.deleted
    assert (tmp_path / "retrain" / "job-1" / "trainer.log").read_bytes() == b"done\n"
    _start(loop, runner, tmp_path, job_id=2)
    wf2 = fake.objects["workflows"][wf["metadata"]["name"][:-2] + "-2"]
    fake.set_status("workflows", wf2["metadata"]["name"], {
        "phase": "Failed", "message": "child 'x' failed",
        "nodes": {"x": {"message": "OOMKilled (exit code 137)"}}})
    out = loop.run(runner.check(2))
    assert out is not None and out.code != 0 and "OOMKilled" in out.detail
    assert fake.deleted == [wf2["metadata"]["name"]]


def test_a_forbidden_submission_fails_the_job_with_the_api_s_reason(
        fake: FakeKube, tmp_path: Path, loop: LoopThread) -> None:
    """The cluster refuses the job (RBAC: no Role in that namespace): the job ends failed with
    the API's message in one line, without running, and its samples go back to the pool."""
    cp = start_control_plane(tmp_path / "cp", loop, rollout_tick_seconds=3600,
                             retrain_runner="kubernetes",
                             retrain_cluster=_settings(fake, tmp_path, namespace="other"))
    try:
        pipeline = write_pipeline(tmp_path / "pipe", store=str(tmp_path / "store"))
        cp.cp.store.set_policy(DriftPolicy("digits", str(pipeline), auto_canary=False))
        cp.cp.store.add_job("digits", "test", 1, 0.0)
        loop.run(cp.cp.services.retraining.tick())
        [job] = cp.cp.store.jobs("digits")
        assert job.state is JobState.FAILED and "\n" not in job.detail
        assert job.detail.startswith("could not start: the cluster refused Job "
                                     "edgefleet-retrain-digits-1: 403 Forbidden: jobs is "
                                     "forbidden: User"), job.detail
        assert not fake.objects["jobs"]
    finally:
        cp.stop()


def test_a_refused_submission_fails_the_job_without_starting_it(
        fake: FakeKube, tmp_path: Path, loop: LoopThread) -> None:
    """The job cannot be submitted (here: the API does not answer): it ends failed with the
    reason, without running."""
    home = tmp_path / "cp"
    cp = start_control_plane(home, loop, rollout_tick_seconds=3600,
                             retrain_runner="kubernetes",
                             retrain_cluster=_settings(fake, tmp_path))
    try:
        pipeline = write_pipeline(tmp_path / "pipe", store=str(tmp_path / "store"))
        cp.cp.store.set_policy(DriftPolicy("digits", str(pipeline), auto_canary=False))
        job_id = cp.cp.store.add_job("digits", "test", 1, 0.0)
        fake.close()  # nothing answers: the submission fails
        loop.run(cp.cp.services.retraining.tick())
        [job] = cp.cp.store.jobs("digits")
        assert job.id == job_id and job.state is JobState.FAILED
        assert job.detail.startswith("could not start:")
    finally:
        cp.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kubernetes", "argo"])
def test_a_cluster_job_trains_and_its_bundle_is_published_through_verification(
        fake: FakeKube, tmp_path: Path, loop: LoopThread, kind: str) -> None:
    """End to end: the control plane submits the job through the API; a kubelet stand-in
    runs the pod's real ``trainer run`` command with the job's volumes (the shared claim at
    the same path, the publisher Secret at /keys); the control plane follows the job to
    completion, keeps the pod's log, and publishes the bundle through normal verification."""
    home = tmp_path / "cp"
    cp = start_control_plane(home, loop, rollout_tick_seconds=3600, retrain_runner=kind,
                             retrain_cluster=_settings(fake, tmp_path))
    done = threading.Event()
    trainer = Path(__import__("sys").executable).parent / "trainer"

    def kubelet(kind_: str, obj: dict[str, Any]) -> None:
        mounts = {"/keys": home / "publisher"}
        threading.Thread(target=run_like_kubelet,
                         args=(fake, kind_, obj, trainer, mounts, done), daemon=True).start()

    fake.on_create = kubelet
    try:
        retrain = cp.cp.services.retraining
        runner = retrain.runner
        assert isinstance(runner, ClusterRunner) and runner.kind == kind
        runner.clock = lambda: float(10 ** 9) if done.is_set() else 0.0
        pipeline = write_pipeline(tmp_path / "pipe", epochs=2, store=str(tmp_path / "store"))
        cp.cp.store.set_policy(DriftPolicy("digits", str(pipeline), auto_canary=False))
        job_id = cp.cp.store.add_job("digits", "test", 1, 0.0)
        loop.run(retrain.tick())
        assert cp.cp.store.jobs("digits")[0].state is JobState.RUNNING
        assert not fake.refused and len(fake.objects["jobs" if kind == "kubernetes"
                                                     else "workflows"]) == 1
        assert done.wait(600), "the trainer did not finish"
        loop.run(retrain.tick())
        [job] = cp.cp.store.jobs("digits")
        assert job.id == job_id and job.state is JobState.AWAITING_APPROVAL, job.detail
        assert job.detail.startswith("v1 published")
        [mv] = cp.cp.store.list_model_versions("digits")
        assert mv.version == 1 and mv.published_by == "control-plane"
        log = (home / "retrain" / f"job-{job_id}" / "trainer.log").read_text()
        assert log, "the pod's log is kept as trainer.log"
        assert not fake.deleted  # a finished job is left to its TTL
    finally:
        fake.on_create = lambda kind_, obj: None
        cp.stop()


def test_the_runner_is_chosen_by_config(tmp_path: Path, loop: LoopThread) -> None:
    cp = start_control_plane(tmp_path / "cp", loop, rollout_tick_seconds=3600)
    try:
        assert isinstance(cp.cp.services.retraining.runner, LocalRunner)
    finally:
        cp.stop()
    assert asyncio.iscoroutinefunction(LocalRunner.check)


def _rbac_request(method: str, path: str) -> tuple[str, str, str]:
    """(API group, resource, verb) of a request, as RBAC sees it."""
    parts = path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[parts.index("namespaces") + 2:]
    resource = "/".join([rest[0], *rest[2:]])
    named = len(rest) > 1
    verb = {"POST": "create", "DELETE": "delete"}.get(method, "get" if named else "list")
    return group, resource, verb


def test_the_control_plane_role_allows_exactly_what_the_runners_call(
        fake: FakeKube, tmp_path: Path, loop: LoopThread) -> None:
    """Every request both runners make through a job's life (submit, follow, read the log,
    delete a failure, find a job again after a restart) is allowed by the control plane's
    Role in packaging/, and the Role allows nothing they do not use."""
    for kind, collection in (("kubernetes", "jobs"), ("argo", "workflows")):
        runner = _runner(fake, tmp_path, kind)
        _start(loop, runner, tmp_path, job_id=1 if kind == "argo" else 9)
        job_id = 1 if kind == "argo" else 9
        [obj] = [o for o in fake.objects[collection].values()
                 if o["metadata"]["labels"][JOB_LABEL] == str(job_id)]
        assert loop.run(_runner(fake, tmp_path, kind).check(job_id)) is None  # by label
        fake.set_pod(obj, f"{collection}-pod", {"containerStatuses": [{"state": {
            "terminated": {"exitCode": 1, "reason": "Error"}}}]}, log=b"x")
        status = ({"phase": "Failed"} if kind == "argo" else
                  {"conditions": [{"type": "Failed", "status": "True"}]})
        fake.set_status(collection, obj["metadata"]["name"], status)
        assert loop.run(runner.check(job_id)) is not None
    used = {_rbac_request(m, p) for m, p in fake.calls}
    rbac = Path(__file__).resolve().parent.parent / "packaging" / "kubernetes" / "base" / \
        "control-plane" / "rbac.yaml"
    [role] = [d for d in yaml.safe_load_all(rbac.read_text()) if d["kind"] == "Role"]
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert used == allowed
