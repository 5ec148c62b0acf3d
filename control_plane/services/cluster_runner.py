"""Retraining jobs on a cluster: a batch/v1 Job, or an Argo Workflow, submitted through the
Kubernetes API with the official ``kubernetes`` client.

The job's work directory is the same path on both sides (``HOME/retrain/job-N`` on a
ReadWriteMany claim that the control plane mounts at ``HOME/retrain``): the control plane
writes the samples, the baseline and a copy of the pipeline there, the trainer pod leaves its
bundle and ``acceptance.json`` there, and the control plane publishes the bundle through the
same verification as the local runner's. The publisher key comes from a Secret mounted into
the pod only, never through the control plane.

``job_manifest``/``workflow_manifest`` build what is submitted and ``job_outcome``/
``workflow_outcome`` read what the API answers (pure, tested offline against the schemas);
``ClusterRunner`` does the I/O: create, follow with backoff, collect the pod's log into
``trainer.log``, delete what failed so that no pod keeps pulling or running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubernetes import client, config

from control_plane.config import RetrainCluster
from control_plane.services.retrain_runner import Outcome
from fleetcore import strict_json

__all__ = ["ClusterRunner", "job_manifest", "job_outcome", "workflow_manifest",
           "workflow_outcome"]

log = logging.getLogger(__name__)

KEY_DIR = "/keys"  # the publisher Secret's mount in the pod
POD_TMP = "/tmp"  # noqa: S108 (the pod's own emptyDir, not this host's /tmp)
JOB_LABEL = "edgefleet.io/retrain-job"
CONTAINER = "trainer"
ARGO_CONTAINER = "main"  # Argo names a container template's container "main"
# Waiting reasons that never resolve by themselves: the job is failed at once (and deleted),
# not left to pull until its deadline.
STUCK = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
         "CreateContainerError"}
MAX_API_BYTES = 8 * 1024 * 1024  # one API answer (a job, a workflow, a page of pods)
MAX_LOG_BYTES = 4 * 1024 * 1024  # the tail of the trainer's log that is kept
MAX_DETAIL = 500
FIRST_POLL_S = 2.0
MAX_POLL_S = 60.0
GRACE_S = 600.0  # past the job's own deadline, a job the API cannot tell about is lost


# ---------------------------------------------------------------------- what is submitted

def _name(job_id: int, model: str) -> str:
    """A DNS-1123 name: ``edgefleet-retrain-MODEL-N`` (model lower-cased, other characters
    as '-', shortened so that the whole fits 63)."""
    suffix = f"-{job_id}"
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")
    return f"edgefleet-retrain-{slug}"[:63 - len(suffix)].rstrip("-") + suffix


def _labels(job_id: int, model: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "edgefleet-trainer",
            "app.kubernetes.io/part-of": "edgefleet",
            "edgefleet.io/model": model, JOB_LABEL: str(job_id),
            # The training NetworkPolicy: DNS, the control plane, and (Argo's executor) the API.
            "edgefleet.io/role": "training"}


def _pod_parts(s: RetrainCluster, *, job_id: int, work_root: Path, version: int,
               extra: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """(pod security context, the trainer container, volumes), the same for both kinds."""
    workdir = work_root / f"job-{job_id}"
    limits: dict[str, str] = {"cpu": s.cpu, "memory": s.memory}
    if s.gpus:
        limits["nvidia.com/gpu"] = str(s.gpus)
    container = {
        "name": CONTAINER,
        "image": s.image,
        "args": ["run", str(workdir / "pipeline.toml"), "--workdir", str(workdir),
                 "--publisher-key", f"{KEY_DIR}/publisher.key",
                 "--bundle-version", str(version), *extra],
        "env": [{"name": "HOME", "value": POD_TMP}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "privileged": False, "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": {"cpu": s.cpu, "memory": s.memory}, "limits": limits},
        "volumeMounts": [
            {"name": "work", "mountPath": str(workdir),
             "subPath": f"{s.work_subpath.strip('/')}/job-{job_id}"},
            {"name": "publisher", "mountPath": KEY_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": POD_TMP},
        ],
    }
    security = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
    volumes = [
        {"name": "work", "persistentVolumeClaim": {"claimName": s.work_claim}},
        {"name": "publisher", "secret": {"secretName": s.publisher_secret,
                                         "defaultMode": 0o400}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
    ]
    return security, container, volumes


def job_manifest(s: RetrainCluster, *, job_id: int, model: str, version: int, work_root: Path,
                 extra: Sequence[str] = ()) -> dict[str, Any]:
    """The batch/v1 Job for one retraining job. One try: a failed trainer is not rerun (its
    exit code decides, as with the local runner), but a pod lost to a node drain or
    preemption is replaced without counting."""
    security, container, volumes = _pod_parts(s, job_id=job_id, work_root=work_root,
                                              version=version, extra=extra)
    labels = _labels(job_id, model)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": _name(job_id, model), "namespace": s.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": s.deadline_seconds,
            "ttlSecondsAfterFinished": 86400,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                         "status": "True"}]},
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER,
                                                      "operator": "NotIn", "values": [0]}},
            ]},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                         "enableServiceLinks": False, "securityContext": security,
                         "containers": [container], "volumes": volumes},
            },
        },
    }


def workflow_manifest(s: RetrainCluster, *, job_id: int, model: str, version: int,
                      work_root: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """The same trainer pod as a one-step Argo Workflow (for clusters that run their
    training through Argo: its UI, archive and artifact logs)."""
    security, container, volumes = _pod_parts(s, job_id=job_id, work_root=work_root,
                                              version=version, extra=extra)
    del container["name"]  # Argo names it "main"
    labels = _labels(job_id, model)
    return {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
        "metadata": {"name": _name(job_id, model), "namespace": s.namespace, "labels": labels},
        "spec": {
            "entrypoint": "trainer",
            "serviceAccountName": s.service_account,
            "activeDeadlineSeconds": s.deadline_seconds,
            "ttlStrategy": {"secondsAfterCompletion": 86400},
            "podMetadata": {"labels": labels},
            "securityContext": security,
            "volumes": volumes,
            "templates": [{"name": "trainer", "container": container}],
        },
    }


# ---------------------------------------------------------------------- what the API says

def _get(doc: Any, *path: str) -> Any:
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def pod_problems(pods: list[dict[str, Any]]) -> tuple[list[str], int | None, bool]:
    """(what went wrong in the job's pods, the trainer's exit code if it exited, stuck?)."""
    notes: list[str] = []
    code: int | None = None
    stuck = False
    for pod in pods:
        name = _get(pod, "metadata", "name") or "?"
        if _get(pod, "status", "reason"):  # Evicted, DeadlineExceeded, ...
            notes.append(f"pod {name}: {_get(pod, 'status', 'reason')}: "
                         f"{_get(pod, 'status', 'message') or ''}".rstrip(": "))
        for status in _get(pod, "status", "containerStatuses") or []:
            if not isinstance(status, dict):
                continue
            waiting = _get(status, "state", "waiting")
            done = _get(status, "state", "terminated")
            if isinstance(waiting, dict) and waiting.get("reason") in STUCK:
                stuck = True
                notes.append(f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}"
                             .rstrip(": "))
            if isinstance(done, dict) and isinstance(done.get("exitCode"), int):
                code = done["exitCode"]
                if code != 0:
                    notes.append(f"pod {name}: {done.get('reason') or 'Error'} "
                                 f"(exit code {code})")
    return notes, code, stuck


def _failed(kind: str, reason: str, notes: list[str], code: int | None) -> Outcome:
    text = "; ".join([f"{kind} failed: {reason}".rstrip(": "), *notes])
    return Outcome(code if code not in (None, 0) else 1, text[:MAX_DETAIL])


def job_outcome(job: dict[str, Any], pods: list[dict[str, Any]]) -> Outcome | None:
    """How a batch/v1 Job ended (None: not yet). A pod that cannot start (image pull,
    missing Secret) fails it too: Kubernetes would leave it pending until the deadline."""
    notes, code, stuck = pod_problems(pods)
    for cond in _get(job, "status", "conditions") or []:
        if not isinstance(cond, dict) or cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return Outcome(0, "")
        if cond.get("type") == "Failed":
            why = f"{cond.get('reason') or ''}: {cond.get('message') or ''}".strip(": ")
            return _failed("job", why, notes, code)
    if stuck:
        return _failed("job", "its pod cannot start", notes, code)
    return None


def workflow_outcome(wf: dict[str, Any], pods: list[dict[str, Any]]) -> Outcome | None:
    """How an Argo Workflow ended (None: not yet)."""
    notes, code, stuck = pod_problems(pods)
    phase = _get(wf, "status", "phase")
    if phase == "Succeeded":
        return Outcome(0, "")
    if phase in ("Failed", "Error"):
        nodes = _get(wf, "status", "nodes") or {}
        messages = sorted({n["message"] for n in nodes.values() if isinstance(n, dict)
                           and isinstance(n.get("message"), str) and n["message"]}
                          ) if isinstance(nodes, dict) else []
        why = f"{phase}: {_get(wf, 'status', 'message') or ''}".rstrip(": ")
        return _failed("workflow", why, [*messages, *notes], code)
    if stuck:
        return _failed("workflow", "its pod cannot start", notes, code)
    return None


# ---------------------------------------------------------------------- the I/O

def _api_error(exc: Any) -> str:
    """An API error in one line: its status and the Status object's message, not the
    client's dump of headers and body."""
    message = ""
    try:
        body = strict_json.loads(exc.body or b"{}", what="API error", max_bytes=64 * 1024)
        message = str(body.get("message", "")) if isinstance(body, dict) else ""
    except Exception:  # not JSON: the reason alone
        message = ""
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


class _Followed:
    def __init__(self, name: str, started: float) -> None:
        self.name = name
        self.started = started
        self.next_check = started + FIRST_POLL_S
        self.interval = 2 * FIRST_POLL_S


class ClusterRunner:
    """Submits each retraining job to the cluster and follows it until it ends."""

    def __init__(self, settings: RetrainCluster, kind: str, work_root: Path, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if kind not in ("kubernetes", "argo"):
            raise ValueError(kind)
        self.settings = settings
        self.kind = kind
        self.work_root = work_root
        self.clock = clock
        self.jobs: dict[int, _Followed] = {}
        self._api: Any = None

    # -- the client (built on first use: a control plane with no cluster jobs needs none)
    def _client(self) -> Any:
        if self._api is None:
            if self.settings.kubeconfig:
                self._api = config.new_client_from_config(config_file=self.settings.kubeconfig)
            else:
                conf = client.Configuration()
                config.load_incluster_config(client_configuration=conf)
                self._api = client.ApiClient(conf)
        return self._api

    def _call(self, method: str, path: str, body: Any = None,
              query: Sequence[tuple[str, str]] = ()) -> Any:
        """One API call; the answer as JSON (strict, bounded), or the raw text of a log."""
        resp = self._client().call_api(
            path, method, query_params=list(query), body=body,
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
            _request_timeout=(5, 30))
        try:
            is_log = path.endswith("/log")
            data: bytes = resp.read((MAX_LOG_BYTES if is_log else MAX_API_BYTES) + 1)
        finally:
            resp.release_conn()
        if is_log:
            return data[-MAX_LOG_BYTES:]
        return strict_json.loads(data, what=f"{method} {path}", max_bytes=MAX_API_BYTES)

    def _collection(self) -> str:
        ns = self.settings.namespace
        if self.kind == "argo":
            return f"/apis/argoproj.io/v1alpha1/namespaces/{ns}/workflows"
        return f"/apis/batch/v1/namespaces/{ns}/jobs"

    # -- the runner protocol
    async def start(self, job_id: int, pipeline: Path, workdir: Path, version: int,
                    publisher_key: Path, extra: Sequence[str] = (), *, model: str = "") -> None:
        """Submit the job. ``publisher_key`` is not used: the pod mounts the Secret."""
        del publisher_key
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pipeline, workdir / "pipeline.toml")  # the pod sees this volume only
        build = workflow_manifest if self.kind == "argo" else job_manifest
        manifest = build(self.settings, job_id=job_id, model=model or "model", version=version,
                         work_root=self.work_root, extra=extra)
        name = manifest["metadata"]["name"]
        try:
            await asyncio.to_thread(self._call, "POST", self._collection(), manifest)
        except client.ApiException as exc:
            if exc.status != 409:  # AlreadyExists
                raise RuntimeError(f"the cluster refused {manifest['kind']} {name}: "
                                   f"{_api_error(exc)}") from None
            # Submitted before the control plane stopped, before it could record the start:
            # follow that one rather than fail the job.
            log.warning("retraining job %d: %s exists already; following it", job_id, name)
        self.jobs[job_id] = _Followed(name, self.clock())
        log.info("retraining job %d submitted as %s %s/%s", job_id, manifest["kind"],
                 self.settings.namespace, name)

    async def check(self, job_id: int) -> Outcome | None:
        followed = self.jobs.get(job_id)
        now = self.clock()
        if followed is not None and now < followed.next_check:
            return None
        try:
            outcome, name = await asyncio.to_thread(self._observe, job_id, followed)
        except Exception as exc:  # the API is unreachable or answers nonsense: back off
            if followed is None:
                followed = self.jobs[job_id] = _Followed("?", now)
            log.warning("retraining job %d: cannot ask the cluster (%s)", job_id, exc)
            outcome, name = None, followed.name
            if now - followed.started > self.settings.deadline_seconds + GRACE_S:
                outcome = Outcome(-1, f"lost: the cluster did not answer past the job's "
                                      f"deadline ({exc})"[:MAX_DETAIL])
        if outcome is not None:
            self.jobs.pop(job_id, None)
            return outcome
        if followed is None:
            followed = self.jobs[job_id] = _Followed(name, now)
        followed.next_check = now + followed.interval
        followed.interval = min(followed.interval * 2, MAX_POLL_S)
        return None

    def _observe(self, job_id: int, followed: _Followed | None) -> tuple[Outcome | None, str]:
        """Read the job (found by name, or by label after a restart) and its pods; once it
        has ended, keep the pod's log as trainer.log, and delete a failed job."""
        if followed is not None and followed.name != "?":
            name = followed.name
        else:
            page = self._call("GET", self._collection(),
                              query=[("labelSelector", f"{JOB_LABEL}={job_id}")])
            names = [_get(i, "metadata", "name") for i in page.get("items") or []]
            if not names:
                return Outcome(-1, "lost: the cluster has no job for it (deleted?)"), "?"
            name = str(names[0])
        try:
            obj = self._call("GET", f"{self._collection()}/{name}")
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return Outcome(-1, f"lost: {name} was deleted from the cluster"), name
            raise
        pods_page = self._call("GET", f"/api/v1/namespaces/{self.settings.namespace}/pods",
                               query=[("labelSelector", f"{JOB_LABEL}={job_id}")])
        pods = [p for p in pods_page.get("items") or [] if isinstance(p, dict)]
        judge = workflow_outcome if self.kind == "argo" else job_outcome
        outcome = judge(obj, pods)
        if outcome is None:
            return None, name
        self._keep_log(job_id, pods)
        if outcome.code != 0:
            self._call("DELETE", f"{self._collection()}/{name}",
                       {"propagationPolicy": "Background"})
        return outcome, name

    def _keep_log(self, job_id: int, pods: list[dict[str, Any]]) -> None:
        """The newest pod's log (its tail) into the work directory, as the local runner
        leaves it; a pod that never started has none."""
        path = self.work_root / f"job-{job_id}" / "trainer.log"
        started = [p for p in pods if _get(p, "status", "containerStatuses")]
        if not started:
            return
        pod = max(started, key=lambda p: str(_get(p, "metadata", "creationTimestamp") or ""))
        container = ARGO_CONTAINER if self.kind == "argo" else CONTAINER
        try:
            data = self._call(
                "GET", f"/api/v1/namespaces/{self.settings.namespace}/pods/"
                       f"{_get(pod, 'metadata', 'name')}/log",
                query=[("container", container), ("limitBytes", str(MAX_LOG_BYTES))])
        except Exception as exc:
            log.warning("retraining job %d: no log from its pod (%s)", job_id, exc)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())

    async def stop(self) -> None:
        """Nothing to stop here: cluster jobs outlive the control plane, which finds them
        again by label when it restarts."""
        self.jobs.clear()
