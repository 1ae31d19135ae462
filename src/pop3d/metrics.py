"""What pop3d counts, as one small API every part of the server calls.

The transport, the accept path and the LMTP listener report what happened through these
functions and nothing else; how the figures are kept and exposed (Prometheus text at
``[metrics] listen``, correct across worker processes) is this module's business alone.
Until metrics are enabled every function does nothing, at the cost of one call.

Labels are fixed vocabularies (never a user name or an address), so a hostile client
cannot grow the series without bound:

- ``connection_refused(cap)``: ``total``, ``per_ip``, ``handshakes``, ``proxy``.
- ``login(mechanism, result, seconds)``: ``mechanism`` as in the audit line (``USER``,
  ``APOP``, a SASL name); ``result`` ``ok``, ``failed`` or ``tempfail``; ``seconds`` from
  the credentials' arrival to the verdict.
- ``session_ended(result)``: ``quit`` (UPDATE done), ``quit_auth`` (QUIT before login),
  ``timeout``, ``disconnect``, ``error``, ``shutdown``, ``kicked``.
- ``lmtp_delivery(result)``: ``ok``, ``unknown_user``, ``over_quota``, ``tempfail``.

A value outside its vocabulary is counted as ``other``.

How (``prometheus_client`` in its multi-process mode): the supervisor makes a private
folder (``[server] run_dir``/metrics, emptied at each start, owned by the workers' user)
and calls :func:`enable` before it forks; each worker's counters live in memory-mapped
files of that folder named by its pid; the metrics process (:func:`serve`, forked by the
supervisor, unprivileged) adds them up at each scrape; the supervisor removes a dead
worker's gauges (:func:`process_dead`).  ``sessions_open`` is set by each worker once a
second from its connection table and summed over the live workers.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pop3d.protocol import sasl

log = logging.getLogger("pop3d.metrics")

_MECHANISMS = frozenset({"USER", "APOP", *sasl.REGISTRY})
_LOGIN_RESULTS = frozenset({"ok", "failed", "tempfail"})
_SESSION_RESULTS = frozenset(
    {"quit", "quit_auth", "timeout", "disconnect", "error", "shutdown", "kicked"}
)
_CAPS = frozenset({"total", "per_ip", "handshakes", "proxy"})
_LMTP_RESULTS = frozenset({"ok", "unknown_user", "over_quota", "tempfail"})

#: Auth latency buckets (s): a failure delay is not part of it; Argon2 takes ~50 ms.
_AUTH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: The metric objects once :func:`enable` ran (``None``: every function is a no-op).
_m: _Metrics | None = None
#: Whether :func:`enable` ran: a caller with work to do for a call (a label to work out)
#: reads this first (``metrics.on``, at the time of the call) and skips both while off.
on = False
_folder: Path | None = None


def _known(value: str, vocabulary: frozenset[str]) -> str:
    return value if value in vocabulary else "other"


class _Metrics:
    """The series, made once metrics are enabled."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415

        self.sessions = Counter("pop3d_sessions", "POP3 sessions ended, by result", ["result"])
        self.sessions_open = Gauge(
            "pop3d_sessions_open", "POP3 connections open now", multiprocess_mode="livesum"
        )
        self.logins = Counter(
            "pop3d_logins", "Authentications, by mechanism and result", ["mechanism", "result"]
        )
        self.auth_seconds = Histogram(
            "pop3d_auth_seconds",
            "Time from the credentials' arrival to the verdict",
            buckets=_AUTH_BUCKETS,
        )
        self.retrieved_messages = Counter(
            "pop3d_retrieved_messages", "Messages sent in full (RETR, TOP)"
        )
        self.retrieved_bytes = Counter(
            "pop3d_retrieved_bytes", "Octets of messages sent in full (wire octets)"
        )
        self.deleted = Counter("pop3d_deleted_messages", "Messages removed by UPDATE")
        self.lock_conflicts = Counter(
            "pop3d_lock_conflicts", "Logins refused because the maildrop was in use"
        )
        self.tls = Counter("pop3d_tls_handshakes", "TLS handshakes, by result", ["result"])
        self.refused = Counter(
            "pop3d_connections_refused", "Connections refused at accept, by cap", ["cap"]
        )
        self.lmtp = Counter(
            "pop3d_lmtp_deliveries", "LMTP recipients answered, by result", ["result"]
        )
        # Every series of the vocabularies exists from the start, at 0: a rate() over a
        # series that appears with its first event misses that event.
        for mechanism in _MECHANISMS:
            for result in _LOGIN_RESULTS:
                self.logins.labels(mechanism, result)
        for result in _SESSION_RESULTS:
            self.sessions.labels(result)
        for result in ("ok", "failed"):
            self.tls.labels(result)
        for cap in _CAPS:
            self.refused.labels(cap)
        for result in _LMTP_RESULTS:
            self.lmtp.labels(result)


def enable(folder: Path) -> None:
    """Count from now on, into ``folder`` (multi-process; call before forking workers)."""
    global _m, _folder, on  # noqa: PLW0603 (the module is the process's one set of metrics)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    from prometheus_client import values  # noqa: PLC0415

    # Chosen when prometheus_client is first imported; it may have been imported before.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _folder = folder
    if _m is None:
        _m = _Metrics()
    on = True


def enabled() -> bool:
    """Whether :func:`enable` ran in this process (``on``, for a caller that reads it)."""
    return on


def process_dead(pid: int) -> None:
    """Forget the live gauges of a worker that exited (its counters stay counted)."""
    if _folder is None:
        return
    from prometheus_client import multiprocess  # noqa: PLC0415

    multiprocess.mark_process_dead(pid, str(_folder))  # type: ignore[no-untyped-call]


def exposition(folder: Path, accept: str = "") -> tuple[bytes, str]:
    """The text of a scrape of ``folder``'s files, and its content type."""
    from prometheus_client import CollectorRegistry, exposition, multiprocess  # noqa: PLC0415

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    encoder, content_type = exposition.choose_encoder(accept)
    return encoder(registry), content_type


def serve(sock: socket.socket, ready: Callable[[], object]) -> int:
    """Serve ``GET /metrics`` on ``sock`` until killed (the metrics process's life)."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer  # noqa: PLC0415

    folder = _folder
    assert folder is not None

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") not in ("/metrics", "/metrics/"):
            start("404 Not Found", [("Content-Type", "text/plain")])
            return [b"pop3d serves its metrics at /metrics\n"]
        body, content_type = exposition(folder, environ.get("HTTP_ACCEPT", ""))
        start("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Scrapes are not logged (one every few seconds)."""

    server = WSGIServer(sock.getsockname()[:2], Quiet, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    host, port = sock.getsockname()[:2]
    server.server_name, server.server_port = socket.getfqdn(host), port
    server.setup_environ()
    server.set_app(app)
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("metrics listening on http://%s/metrics", shown)
    ready()
    server.serve_forever()
    return 0


def connection_refused(cap: str) -> None:
    """A connection was refused at accept by ``cap``."""
    if _m is not None:
        _m.refused.labels(_known(cap, _CAPS)).inc()


def tls_handshake(ok: bool) -> None:
    """A TLS handshake (POP3S or after STLS) ended, successfully or not."""
    if _m is not None:
        _m.tls.labels("ok" if ok else "failed").inc()


def login(mechanism: str, result: str, seconds: float) -> None:
    """An authentication reached its verdict."""
    if _m is not None:
        _m.logins.labels(_known(mechanism, _MECHANISMS), _known(result, _LOGIN_RESULTS)).inc()
        _m.auth_seconds.observe(seconds)


def session_ended(result: str) -> None:
    """A session ended."""
    if _m is not None:
        _m.sessions.labels(_known(result, _SESSION_RESULTS)).inc()


def sessions_open(count: int) -> None:
    """The calling worker has ``count`` POP3 connections open (set once a second)."""
    if _m is not None:
        _m.sessions_open.set(count)


def retrieved(octets: int) -> None:
    """One message (RETR, or TOP) of ``octets`` wire octets was sent in full."""
    if _m is not None:
        _m.retrieved_messages.inc()
        _m.retrieved_bytes.inc(octets)


def deleted(count: int) -> None:
    """UPDATE removed ``count`` messages."""
    if _m is not None:
        _m.deleted.inc(count)


def lock_conflict() -> None:
    """A login found its maildrop locked by another session ([IN-USE])."""
    if _m is not None:
        _m.lock_conflicts.inc()


def lmtp_delivery(result: str) -> None:
    """One LMTP recipient was answered."""
    if _m is not None:
        _m.lmtp.labels(_known(result, _LMTP_RESULTS)).inc()
