"""``pop3d who`` and ``pop3d kick USER``: the sessions of a running server, over admin sockets.

Every worker answers on its own UNIX socket, ``RUN_DIR/admin/PID.sock`` (``[server]
run_dir``).  The socket is bound by the worker while it is still root, before it drops
privileges: the file is root's, mode 0600, in a folder of mode 0700, so only root can
connect (the workers' user cannot, nor anyone else).  The supervisor removes a worker's
socket when it reaps it.  ``who``/``kick`` ask every socket of the folder and merge the
answers.

The exchange is one JSON line each way::

    {"command": "who"}             -> {"sessions": [{"user":..., "address":..., "since":...,
                                                     "state":..., "pid":...}, ...]}
    {"command": "kick", "user": U} -> {"kicked": N}

``kick`` closes the user's sessions without UPDATE (nothing is deleted), as an idle
timeout does; an UPDATE already running is let finish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pop3d import process

__all__ = ["add_parser", "ask", "bind", "serve"]

#: The longest request line accepted (a user name is at most a few hundred octets).
_MAX_REQUEST = 4096


def bind(path: Path) -> socket.socket:
    """Bind and listen on ``path`` with mode 0600 (call while still root)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)  # noqa: PTH101
    sock.listen(8)
    sock.setblocking(False)  # noqa: FBT003
    return sock


def sessions(ctx: Any) -> list[dict[str, object]]:
    """The sessions of this worker's connection table."""
    now_wall, now_mono = time.time(), time.monotonic()
    out: list[dict[str, object]] = []
    for conn in list(ctx.connections):
        core = conn.core
        started = getattr(conn, "_started", now_mono)
        out.append(
            {
                "user": conn.username or None,
                "address": conn.peer,
                "since": round(now_wall - (now_mono - started), 3),
                "state": core.state.name.lower() if core is not None else "closing",
                "pid": process.pid(),
            }
        )
    return out


def _answer(ctx: Any, request: object) -> dict[str, object]:
    if not isinstance(request, dict):
        return {"error": "expected a JSON object"}
    command = request.get("command")
    if command == "who":
        return {"sessions": sessions(ctx)}
    if command == "kick":
        user = request.get("user")
        if not isinstance(user, str) or not user:
            return {"error": "kick needs a user"}
        victims = [c for c in list(ctx.connections) if c.username == user]
        for conn in victims:
            conn.kick()
        return {"kicked": len(victims)}
    return {"error": "unknown command"}


async def serve(ctx: Any, sock: socket.socket) -> asyncio.AbstractServer:
    """Answer admin requests on ``sock`` for the sessions of ``ctx`` (a ServerContext)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                request = json.loads(line[:_MAX_REQUEST]) if line.endswith(b"\n") else None
            except ValueError:
                request = None
            writer.write(json.dumps(_answer(ctx, request)).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, sock=sock, limit=_MAX_REQUEST)


def ask(folder: Path, request: dict[str, object], timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send ``request`` to every worker's socket in ``folder``; their answers.

    A socket nobody listens on (a worker that just died) is skipped.

    Raises:
        FileNotFoundError: ``folder`` does not exist (no server has run with this config).
        PermissionError: ``folder`` cannot be read (not root).

    """
    answers = []
    for path in sorted(folder.iterdir()):
        if path.suffix != ".sock":
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
                sock.sendall(json.dumps(request).encode() + b"\n")
                with sock.makefile("rb") as f:
                    line = f.readline()
            except (ConnectionRefusedError, FileNotFoundError):
                continue
            with contextlib.suppress(ValueError):
                answer = json.loads(line)
                if isinstance(answer, dict):
                    answers.append(answer)
    return answers


# ---------------------------------------------------------------------- the commands


def add_parser(sub: Any) -> None:
    """Register ``who`` and ``kick``."""
    from pop3d import app  # noqa: PLC0415

    p = sub.add_parser("who", help="list the sessions of the running server")
    app.add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_who)
    p = sub.add_parser("kick", help="end a user's sessions (without UPDATE: nothing is deleted)")
    app.add_config_arguments(p)
    p.add_argument("user", help="the user whose sessions end")
    p.set_defaults(run=run_kick)


def _folder(args: argparse.Namespace, command: str) -> Path | int:
    from pop3d import app, checkconfig  # noqa: PLC0415
    from pop3d.errors import ConfigError  # noqa: PLC0415

    try:
        cfg = app.load_existing_config(args, command)
    except ConfigError as exc:
        print(f"pop3d {command}: {exc}", file=sys.stderr)  # noqa: T201
        return os.EX_CONFIG
    return checkconfig.run_dir_of(cfg) / "admin"


def _ask(args: argparse.Namespace, command: str, request: dict[str, object]) -> Any:
    folder = _folder(args, command)
    if isinstance(folder, int):
        return folder
    try:
        return ask(folder, request)
    except FileNotFoundError:
        print(  # noqa: T201
            f"pop3d {command}: no server runs with this configuration ({folder} is missing)",
            file=sys.stderr,
        )
        return os.EX_UNAVAILABLE
    except PermissionError:
        print(  # noqa: T201
            f"pop3d {command}: {folder}: permission denied (the admin sockets are root's)",
            file=sys.stderr,
        )
        return os.EX_UNAVAILABLE


def run_who(args: argparse.Namespace) -> int:
    """``pop3d who``: one line a session (user, address, since, state, pid)."""
    answers = _ask(args, "who", {"command": "who"})
    if isinstance(answers, int):
        return answers
    rows = sorted(
        (s for a in answers for s in a.get("sessions", [])), key=lambda s: s.get("since", 0)
    )
    if args.json:
        print(json.dumps({"sessions": rows}))  # noqa: T201
        return 0
    print(f"{'USER':<24} {'ADDRESS':<40} {'SINCE (UTC)':<20} {'STATE':<14} PID")  # noqa: T201
    for s in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(s["since"])))
        print(  # noqa: T201
            f"{s['user'] or '-':<24} {s['address']:<40} {since:<20} {s['state']:<14} {s['pid']}"
        )
    return 0


def run_kick(args: argparse.Namespace) -> int:
    """``pop3d kick USER``: end USER's sessions; exit 1 when there was none."""
    answers = _ask(args, "kick", {"command": "kick", "user": args.user})
    if isinstance(answers, int):
        return answers
    count = sum(int(a.get("kicked", 0)) for a in answers)
    print(f"ended {count} session(s) of {args.user}")  # noqa: T201
    return 0 if count else 1
