"""The console's local web server (standard library only: the `fleet` extra adds nothing).

Security (docs/console.md):

* It binds to loopback unless told otherwise, and holds no credentials of its own: every
  request becomes an AdminService call with the operator's certificate, so the control plane
  authorizes (and audits) exactly as for the CLI. No new authentication surface on the control
  plane.
* A random session token (256 bits) is in the URL it prints, as Jupyter does. The first page
  load with ``?token=`` sets it as an HttpOnly, SameSite=Strict cookie and redirects to a URL
  without it; every other request needs the cookie (compared in constant time).
* The Host header must name the listening address (a DNS-rebinding page cannot reach it by
  another name); actions are POSTs that also need a custom header (a cross-site form cannot
  send one) and the page asks the operator to confirm first.
* Requests are small: GET only for pages and reads, POST with no body for actions; the
  standard library caps request lines and headers.
* Every asset is served from the package: no internet at run time.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import grpc

from fleet.console.api import ACTIONS, ConsoleApi
from fleetcore.errors import EdgefleetError

__all__ = ["ACTION_HEADER", "COOKIE", "ConsoleServer"]

log = logging.getLogger(__name__)

COOKIE = "edgefleet_console"
ACTION_HEADER = "X-Edgefleet-Action"
_ROLES = {"viewer": 1, "operator": 2, "admin": 3}
_ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
           "/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/style.css": ("style.css", "text/css; charset=utf-8")}
_SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                "style-src 'self'; script-src 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


class ConsoleServer:
    """``start()`` serves in a thread; ``url`` carries the session token."""

    def __init__(self, api: ConsoleApi, *, operator: str, role: str, host: str = "127.0.0.1",
                 port: int = 8800, token: str | None = None) -> None:
        self.api = api
        self.operator = operator
        self.role = role
        self.token = token or secrets.token_urlsafe(32)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fleet-console",
                                        daemon=True)
        shown = f"[{host}]" if ":" in host else host
        self.hosts = {f"{shown}:{self.port}", *(
            {f"localhost:{self.port}"} if host in ("127.0.0.1", "::1") else set())}

    @property
    def base(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/?token={self.token}"

    def allowed(self, action: str) -> bool:
        return _ROLES.get(self.role, 0) >= _ROLES[ACTIONS[action]]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def _asset(name: str) -> bytes:
    return (resources.files("fleet.console") / "static" / name).read_bytes()


def _handler(console: ConsoleServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fleet-console"
        timeout = 30

        # --- checks ------------------------------------------------------------------------
        def _host_ok(self) -> bool:
            return self.headers.get("Host", "") in console.hosts

        def _session(self) -> bool:
            cookies = self.headers.get("Cookie", "")
            for part in cookies.split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE and hmac.compare_digest(value.encode(),
                                                          console.token.encode()):
                    return True
            return False

        # --- GET ---------------------------------------------------------------------------
        def do_GET(self) -> None:
            if not self._host_ok():
                self._send(421, b"wrong host\n", "text/plain")
                return
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query, max_num_fields=8)
            offered = query.get("token", [""])[0]
            if url.path == "/" and offered:
                if not hmac.compare_digest(offered.encode(), console.token.encode()):
                    self._send(403, b"wrong or expired token: use the URL fleet console "
                                    b"printed\n", "text/plain")
                    return
                self.send_response(303)
                self.send_header("Location", "/")
                self.send_header("Set-Cookie", f"{COOKIE}={console.token}; HttpOnly; "
                                               "SameSite=Strict; Path=/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not self._session():
                self._send(403, b"no session: open the URL fleet console printed (it holds "
                                b"the token)\n", "text/plain")
                return
            if url.path in _ASSETS:
                name, content_type = _ASSETS[url.path]
                self._send(200, _asset(name), content_type)
                return
            if url.path.startswith("/api/"):
                self._api(url.path.removeprefix("/api/"), query)
                return
            self._send(404, b"not found\n", "text/plain")

        def _api(self, path: str, query: dict[str, list[str]]) -> None:
            parts = path.split("/")

            def arg(name: str, default: str = "") -> str:
                return query.get(name, [default])[0]

            routes: dict[str, Any] = {
                "session": lambda: {"operator": console.operator, "role": console.role,
                                    "actions": sorted(a for a in ACTIONS
                                                      if console.allowed(a))},
                "fleet": console.api.fleet,
                "models": console.api.models,
                "rollouts": console.api.rollouts,
                "experiments": console.api.experiments,
                "jobs": console.api.jobs,
                "audit": console.api.audit,
                "drift": lambda: console.api.drift(float(arg("hours", "24") or 24),
                                                   arg("device"), arg("model")),
            }
            if parts[0] == "device" and len(parts) == 2:
                self._answer(lambda: console.api.device(urllib.parse.unquote(parts[1])))
            elif parts[0] in routes and len(parts) == 1:
                self._answer(routes[parts[0]])
            else:
                self._send(404, b'{"error": "no such API"}\n', "application/json")

        # --- POST: actions -------------------------------------------------------------------
        def do_POST(self) -> None:
            if not self._host_ok() or not self._session():
                self._send(403, b'{"error": "no session"}\n', "application/json")
                return
            if self.headers.get(ACTION_HEADER) != "confirmed":
                self._send(400, b'{"error": "actions need the console page (and a '
                                b'confirmation)"}\n', "application/json")
                return
            if int(self.headers.get("Content-Length") or 0) > 0:
                self._send(413, b'{"error": "actions take no body"}\n', "application/json")
                return
            parts = urllib.parse.urlsplit(self.path).path.split("/")
            # /api/act/<group.verb>/<model>
            if len(parts) != 5 or parts[:3] != ["", "api", "act"] or parts[3] not in ACTIONS:
                self._send(404, b'{"error": "no such action"}\n', "application/json")
                return
            action, model = parts[3], urllib.parse.unquote(parts[4])
            self._answer(lambda: console.api.act(action, model))

        # --- replies -------------------------------------------------------------------------
        def _answer(self, call: Any) -> None:
            try:
                doc = call()
            except grpc.RpcError as exc:
                code = {grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
                        grpc.StatusCode.INVALID_ARGUMENT: 400,
                        grpc.StatusCode.FAILED_PRECONDITION: 409}.get(exc.code(), 502)
                self._json(code, {"error": f"{exc.code().name}: {exc.details()}"})
                return
            except (EdgefleetError, ValueError) as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, doc)

        def _json(self, code: int, doc: Any) -> None:
            self._send(code, json.dumps(doc).encode(), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in _SECURITY_HEADERS:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("console: " + format, *args)

    return Handler
