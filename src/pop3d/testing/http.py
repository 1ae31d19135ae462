"""``pop3d testserver``: the scriptable test server, driven over a JSON HTTP API.

For test suites in any language: start it, read the JSON line it prints (ports, CA
certificate, users), then deliver, inspect, delete mail, set faults and read transcripts
over HTTP.  The API is described by the OpenAPI document at ``/openapi.json``; a small
page at ``/`` shows the mailboxes, their messages and the sessions' transcripts, live.

The HTTP side is the stdlib's ``ThreadingHTTPServer``: a loopback test tool with a dozen
JSON routes needs no framework, and pop3d's users get no new dependency for it.  It
listens on loopback only.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import email.utils
import json
import re
import signal
import sys
import tempfile
import threading
from email.message import EmailMessage
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from pop3d import __version__
from pop3d.testing.embedded import LOOPBACK
from pop3d.testing.faults import KINDS, FaultError, describe
from pop3d.testing.scripted import ScriptedPop3Server

__all__ = ["TestServerApi", "openapi", "run", "serve_http"]

#: Largest request body accepted (a message to deliver, a fault).
MAX_BODY = 32 * 1024 * 1024


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _message_json(srv: ScriptedPop3Server, user: str, index: int, *, raw: bool) -> dict[str, Any]:
    paths = srv.message_paths(user)
    if not 0 <= index < len(paths):
        raise _HttpError(HTTPStatus.NOT_FOUND, f"{user} has no message {index}")
    data = paths[index].read_bytes()
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    out: dict[str, Any] = {
        "index": index, "size": len(data), "file": paths[index].name,
        "subject": str(parsed.get("Subject", "")), "from": str(parsed.get("From", "")),
        "to": str(parsed.get("To", "")), "date": str(parsed.get("Date", "")),
    }
    if raw:
        out["raw"] = data.decode("utf-8", "replace")
        out["headers"] = [[k, str(v)] for k, v in parsed.items()]
    return out


def _json_object(body: bytes) -> dict[str, Any]:
    """The request's body as a JSON object (an empty body: an empty object)."""
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise _HttpError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    return value


def _to_message(body: bytes, content_type: str) -> bytes:
    """A message to deliver: raw RFC 5322, or JSON ``{"raw"}`` / ``{"subject", ...}``."""
    if not content_type.startswith("application/json"):
        return body
    spec = _json_object(body)
    if "raw" in spec:
        return str(spec["raw"]).encode("utf-8")
    message = EmailMessage()
    message["From"] = str(spec.get("from", "sender@example.org"))
    message["To"] = str(spec.get("to", "user@example.org"))
    message["Subject"] = str(spec.get("subject", ""))
    message["Date"] = email.utils.formatdate(localtime=True)
    message["Message-ID"] = email.utils.make_msgid(domain="pop3d.test")
    message.set_content(str(spec.get("body", "")))
    return message.as_bytes()


class TestServerApi:
    """The routes of the API over one :class:`ScriptedPop3Server`."""

    __test__ = False  # not a pytest test class

    def __init__(self, srv: ScriptedPop3Server, http_port: int = 0) -> None:
        self.srv = srv
        self.http_port = http_port

    def info(self) -> dict[str, Any]:
        """Where everything is (also what ``pop3d testserver`` prints)."""
        srv = self.srv
        return {
            "host": srv.host, "pop3": srv.port, "pop3s": srv.tls_port or None,
            "http": self.http_port, "url": f"http://{srv.host}:{self.http_port}/",
            "ca_cert": str(srv.ca_cert_path) if srv.certificates else None,
            "users": srv.users,
        }

    def handle(self, method: str, path: str, body: bytes, content_type: str) -> Any:
        """Answer one API request; return the JSON value (raises :class:`_HttpError`)."""
        srv = self.srv
        parts = [p for p in path.split("/") if p]
        match method, parts:
            case "GET", ["api", "server"]:
                return self.info()
            case "GET", ["api", "users"]:
                return [{"user": u, "password": p, "messages": len(srv.message_paths(u))}
                        for u, p in srv.users.items()]
            case "POST", ["api", "users", user]:
                password = _json_object(body).get("password")
                if password:
                    srv.set_user(user, str(password))
                return {"user": user, "password": srv.password(user)}
            case "GET", ["api", "mailboxes", user, "messages"]:
                self._known(user)
                return [_message_json(srv, user, i, raw=False)
                        for i in range(len(srv.message_paths(user)))]
            case "POST", ["api", "mailboxes", user, "messages"]:
                if not body:
                    raise _HttpError(HTTPStatus.BAD_REQUEST, "no message in the body")
                srv.deliver(user, _to_message(body, content_type))
                index = len(srv.message_paths(user)) - 1
                return _message_json(srv, user, index, raw=False)
            case "GET", ["api", "mailboxes", user, "messages", index]:
                self._known(user)
                return _message_json(srv, user, _index(index), raw=True)
            case "DELETE", ["api", "mailboxes", user, "messages"]:
                self._known(user)
                return {"deleted": srv.delete(user)}
            case "DELETE", ["api", "mailboxes", user, "messages", index]:
                self._known(user)
                paths = srv.message_paths(user)
                if not 0 <= _index(index) < len(paths):
                    raise _HttpError(HTTPStatus.NOT_FOUND, f"{user} has no message {index}")
                return {"deleted": srv.delete(user, _index(index))}
            case "POST", ["api", "reset"]:
                srv.reset()
                return {"reset": True}
            case "GET", ["api", "transcripts"]:
                return [s.to_json(lines=False) for s in srv.transcript.sessions]
            case "GET", ["api", "transcripts", ident]:
                session = srv.transcript.get(_index(ident))
                if session is None:
                    raise _HttpError(HTTPStatus.NOT_FOUND, f"no session {ident}")
                return session.to_json()
            case "DELETE", ["api", "transcripts"]:
                srv.transcript.clear()
                return {"cleared": True}
            case "GET", ["api", "faults"]:
                return [f.to_json() for f in srv.faults]
            case "GET", ["api", "faults", "catalogue"]:
                return describe()
            case "POST", ["api", "faults"]:
                try:
                    return srv.faults.add(_json_object(body)).to_json()
                except FaultError as exc:
                    raise _HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
            case "DELETE", ["api", "faults"]:
                srv.faults.clear()
                return {"cleared": True}
            case "DELETE", ["api", "faults", ident]:
                if not srv.faults.remove(_index(ident)):
                    raise _HttpError(HTTPStatus.NOT_FOUND, f"no fault {ident}")
                return {"removed": _index(ident)}
        raise _HttpError(HTTPStatus.NOT_FOUND, f"no route {method} {path}")

    def _known(self, user: str) -> None:
        if user not in self.srv.users:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no user {user}")


def _index(text: str) -> int:
    if not re.fullmatch(r"\d{1,9}", text):
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"not a number: {text[:20]!r}")
    return int(text)


def _page() -> bytes:
    return resources.files("pop3d.testing").joinpath("page.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    api: TestServerApi
    server_version = f"pop3d-testserver/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: the transcript is the log that matters."""

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value, indent=1).encode(), "application/json")

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        if self.command == "GET" and path in ("/", "/index.html"):
            self._send(200, _page(), "text/html; charset=utf-8")
            return
        if self.command == "GET" and path == "/openapi.json":
            self._json(200, openapi())
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(413, {"error": "body too large"})
            return
        body = self.rfile.read(length) if length else b""
        try:
            value = self.api.handle(self.command, path, body,
                                    self.headers.get("Content-Type", ""))
        except _HttpError as exc:
            self._json(exc.status, {"error": str(exc)})
            return
        except (ValueError, TypeError) as exc:
            self._json(400, {"error": str(exc)})
            return
        status = 201 if self.command == "POST" and "reset" not in path else 200
        self._json(status, value)

    do_GET = do_POST = do_DELETE = _dispatch  # noqa: N815


def serve_http(api: TestServerApi, host: str = LOOPBACK, port: int = 0) -> ThreadingHTTPServer:
    """Start the HTTP API in a thread; return its server (``.server_address``)."""
    handler = type("Handler", (_Handler,), {"api": api})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    api.http_port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, name="pop3d-testserver-http",
                     daemon=True).start()
    return httpd


# ---------------------------------------------------------------------- OpenAPI


def _op(summary: str, *, body: dict[str, Any] | None = None, ok: str = "200",
        params: tuple[str, ...] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary,
                          "responses": {ok: {"description": "done (JSON)"},
                                        "400": {"description": "bad request"},
                                        "404": {"description": "not found"}}}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True,
                             "schema": {"type": "integer" if p in ("index", "id") else
                                        "string"}} for p in params]
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    return op


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API."""
    fault_schema = {
        "type": "object", "required": ["kind"],
        "properties": {
            "kind": {"type": "string", "enum": list(KINDS)},
            "user": {"type": ["string", "null"], "description": "only this user's sessions"},
            "times": {"type": ["integer", "null"], "minimum": 1,
                      "description": "fire this many times, then disappear"},
        },
        "additionalProperties": True,
        "description": "; ".join(f"{k.name}: {k.summary} {dict(k.params)}"
                                 for k in KINDS.values()),
    }
    message_body = {
        "message/rfc822": {"schema": {"type": "string"}},
        "application/json": {"schema": {"type": "object", "properties": {
            "raw": {"type": "string"}, "from": {"type": "string"}, "to": {"type": "string"},
            "subject": {"type": "string"}, "body": {"type": "string"}}}},
    }
    msgs = "/api/mailboxes/{user}/messages"
    return {
        "openapi": "3.1.0",
        "info": {"title": "pop3d testserver", "version": __version__,
                 "description": "A real POP3 server for tests: mail, faults, transcripts."},
        "paths": {
            "/api/server": {"get": _op("ports, CA certificate, users")},
            "/api/users": {"get": _op("users, passwords, message counts")},
            "/api/users/{user}": {"post": _op(
                "create a user (random password unless given)", ok="201", params=("user",),
                body={"application/json": {"schema": {"type": "object", "properties": {
                    "password": {"type": "string"}}}}})},
            msgs: {
                "get": _op("list a mailbox", params=("user",)),
                "post": _op("deliver a message (the user is made if new)", ok="201",
                            params=("user",), body=message_body),
                "delete": _op("delete every message", params=("user",)),
            },
            msgs + "/{index}": {
                "get": _op("one message, raw and parsed headers", params=("user", "index")),
                "delete": _op("delete one message", params=("user", "index")),
            },
            "/api/reset": {"post": _op("empty mailboxes, remove faults, forget transcripts")},
            "/api/transcripts": {"get": _op("sessions (no lines)"),
                                 "delete": _op("forget every session")},
            "/api/transcripts/{id}": {"get": _op("one session's lines", params=("id",))},
            "/api/faults": {
                "get": _op("faults in force"),
                "post": _op("add a fault", ok="201", body={"application/json": {
                    "schema": fault_schema}}),
                "delete": _op("remove every fault"),
            },
            "/api/faults/catalogue": {"get": _op("every kind of fault and its parameters")},
            "/api/faults/{id}": {"delete": _op("remove one fault", params=("id",))},
        },
    }


# ---------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    """Run ``pop3d testserver`` until a signal; print where it listens as one JSON line."""
    users: dict[str, str] = {}
    for spec in args.user:
        name, _, password = spec.partition(":")
        users[name] = password
    with tempfile.TemporaryDirectory(prefix="pop3d-testserver-") as tmp:
        root = args.root or Path(tmp)
        srv = ScriptedPop3Server(root, {}, tls=not args.no_tls, port=args.pop3_port,
                                 tls_port=args.pop3s_port)
        for name, password in users.items():
            if password:
                srv.set_user(name, password)
            else:
                srv.password(name)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        with srv:
            api = TestServerApi(srv)
            httpd = serve_http(api, port=args.http_port)
            print(json.dumps(api.info()), flush=True)  # noqa: T201 (the command's output)
            try:
                stop.wait()
            finally:
                httpd.shutdown()
                httpd.server_close()
    print("pop3d testserver stopped", file=sys.stderr)  # noqa: T201
    return 0
