"""A small fake of the Kubernetes API: exactly the endpoints the cluster runner uses.

Jobs (batch/v1) and Argo Workflows: create, get, list by label, delete; pods: list by label,
and one pod's log. It speaks the API's JSON over HTTP on 127.0.0.1 port 0, insists on the
bearer token of the kubeconfig it writes, and validates every object it is sent against the
Kubernetes schemas (``kubernetes-validate``, strict) or our Argo Workflow schema, answering
422 like an API server would. What the cluster then does (pods, conditions, phases) is played
by the test: scripted statuses, or ``run_like_kubelet``, which runs the container's command
on this host with its volumes mapped to local directories.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate

REPO = Path(__file__).resolve().parent.parent
ARGO_SCHEMA = REPO / "packaging" / "kubernetes" / "schemas" / "workflow-argoproj-v1alpha1.json"
K8S_VERSION = "1.32.0"
TOKEN = "fake-cluster-bearer"
ROUTES = [
    ("jobs", re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$")),
    ("workflows", re.compile(r"^/apis/argoproj\.io/v1alpha1/namespaces/([^/]+)/workflows"
                             r"(?:/([^/]+))?$")),
    ("pods", re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?$")),
    ("log", re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")),
]


def validate(obj: dict[str, Any]) -> list[str]:
    """What is wrong with an object by the schemas (empty: valid)."""
    if obj.get("kind") == "Workflow":
        schema = json.loads(ARGO_SCHEMA.read_text())
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
                  for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)]
        spec = obj.get("spec", {})
        for template in spec.get("templates", []):
            if "container" in template:
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "main"},
                       "spec": {"securityContext": spec.get("securityContext", {}),
                                "containers": [{"name": "main", **template["container"]}],
                                "volumes": spec.get("volumes", [])}}
                errors += validate(pod)
        return errors
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message[:300]}"]
    return []


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, dict[str, Any]]] = {"jobs": {}, "workflows": {}}
        self.pods: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.deleted: list[str] = []
        self.refused: list[list[str]] = []
        self.namespaces = {"edgefleet"}
        self.on_create: Callable[[str, dict[str, Any]], None] = lambda kind, obj: None
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._serve(self, "GET")

            def do_POST(self) -> None:
                fake._serve(self, "POST")

            def do_DELETE(self) -> None:
                fake._serve(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ the cluster's side
    def set_pod(self, owner: dict[str, Any], name: str, status: dict[str, Any],
                log: bytes = b"") -> None:
        """A pod of a job or workflow (it carries the owner's pod labels)."""
        spec = owner["spec"]
        labels = (spec["template"]["metadata"]["labels"] if owner["kind"] == "Job"
                  else spec["podMetadata"]["labels"])
        with self.lock:
            self.pods[name] = {"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": name, "labels": dict(labels),
                                            "creationTimestamp": "2026-01-01T00:00:00Z"},
                               "status": status}
            self.logs[name] = log

    def set_status(self, kind: str, name: str, status: dict[str, Any]) -> None:
        with self.lock:
            self.objects[kind][name]["status"] = status

    # ------------------------------------------------------------------ HTTP
    def _serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.calls.append((method, url.path))
        if h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(h, 401, _status(401, "Unauthorized", "no or wrong token"))
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        for kind, pattern in ROUTES:
            m = pattern.match(url.path)
            if m and m.group(1) not in self.namespaces:  # RBAC: a Role in these only
                return self._send(h, 403, _status(403, "Forbidden", (
                    f'{kind} is forbidden: User "system:serviceaccount:edgefleet:'
                    f'edgefleet-control-plane" cannot {method.lower()} resource "{kind}" in '
                    f'the namespace "{m.group(1)}"')))
            if m:
                return self._route(h, method, kind, m.group(2), query, body)
        return self._send(h, 404, _status(404, "NotFound", url.path))

    def _route(self, h: BaseHTTPRequestHandler, method: str, kind: str,  # noqa: PLR0911
               name: str | None, query: dict[str, str], body: Any) -> None:
        with self.lock:
            if kind == "log" and method == "GET" and name is not None:
                if name not in self.logs:
                    return self._send(h, 404, _status(404, "NotFound", name))
                limit = int(query.get("limitBytes", "0")) or None
                return self._send_raw(h, 200, self.logs[name][:limit])
            store = self.pods if kind == "pods" else self.objects[kind]
            if method == "GET" and name is None:
                selector = query.get("labelSelector", "")
                key, _, value = selector.partition("=")
                items = [o for o in store.values()
                         if not selector or o["metadata"].get("labels", {}).get(key) == value]
                return self._send(h, 200, {"kind": "List", "items": items})
            if method == "GET" and name is not None:
                if name not in store:
                    return self._send(h, 404, _status(404, "NotFound", f"{kind} {name}"))
                return self._send(h, 200, store[name])
            if method == "DELETE" and name is not None and kind != "pods":
                gone = store.pop(name, None)
                if gone is None:
                    return self._send(h, 404, _status(404, "NotFound", f"{kind} {name}"))
                self.deleted.append(name)
                owner = gone["metadata"]["labels"]  # its pods go with it (background)
                for pod in [p for p, o in self.pods.items()
                            if owner.items() <= o["metadata"]["labels"].items()]:
                    del self.pods[pod]
                return self._send(h, 200, _status(200, "Success", "deleted"))
            if method == "POST" and name is None and kind != "pods":
                errors = validate(body)
                if errors:
                    self.refused.append(errors)
                    return self._send(h, 422, _status(422, "Invalid", "; ".join(errors)))
                obj_name = body["metadata"]["name"]
                if obj_name in store:
                    return self._send(h, 409, _status(409, "AlreadyExists", obj_name))
                store[obj_name] = body
        if method == "POST" and name is None and kind != "pods":
            self.on_create(kind, body)
            return self._send(h, 201, body)
        return self._send(h, 405, _status(405, "MethodNotAllowed", method))

    def _send(self, h: BaseHTTPRequestHandler, code: int, doc: Any) -> None:
        self._send_raw(h, code, json.dumps(doc).encode(), "application/json")

    @staticmethod
    def _send_raw(h: BaseHTTPRequestHandler, code: int, data: bytes,
                  content_type: str = "text/plain") -> None:
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def run_like_kubelet(fake: FakeKube, kind: str, obj: dict[str, Any], trainer: Path,
                     mounts: dict[str, Path], done: threading.Event) -> None:
    """Run the job's single container on this host, as a kubelet would on a node: its
    command (the image's entrypoint, ``trainer``, then its args) with the given volume mounts
    mapped to local directories (``{mountPath: local dir}``); then report the pod and the
    job's end the way the API does."""
    spec = obj["spec"]
    if kind == "jobs":
        container = spec["template"]["spec"]["containers"][0]
    else:
        container = spec["templates"][0]["container"]
    args = list(container["args"])
    for mount_path, local in mounts.items():
        args = [a.replace(mount_path, str(local), 1) if a.startswith(mount_path) else a
                for a in args]
    name = obj["metadata"]["name"]
    pod = f"{name}-pod"
    fake.set_pod(obj, pod, {"phase": "Running", "containerStatuses": [
        {"name": "trainer", "state": {"running": {}}}]})
    proc = subprocess.run([str(trainer), *args], capture_output=True, check=False)
    output = proc.stdout + proc.stderr
    fake.set_pod(obj, pod, {"phase": "Succeeded" if proc.returncode == 0 else "Failed",
                            "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                                "exitCode": proc.returncode,
                                "reason": "Completed" if proc.returncode == 0 else "Error"}}}]},
                 log=output)
    if kind == "jobs":
        cond = ({"type": "Complete", "status": "True"} if proc.returncode == 0 else
                {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                 "message": f"Container trainer for pod {pod} failed with exit code "
                            f"{proc.returncode} matching FailJob rule at index 1"})
        fake.set_status("jobs", name, {"conditions": [cond]})
    else:
        fake.set_status("workflows", name,
                        {"phase": "Succeeded" if proc.returncode == 0 else "Failed"})
    done.set()
