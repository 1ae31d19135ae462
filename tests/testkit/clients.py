"""Real POP3 clients driven against the test server: curl and fetchmail (poplib is in-process)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pop3d.testing.scripted import ScriptedPop3Server


@dataclass
class Run:
    status: int
    out: str
    err: str


def curl(srv: ScriptedPop3Server, user: str, path: str = "", *args: str,
         scheme: str = "pop3", timeout: float = 10.0) -> Run:
    """``curl scheme://user:pass@host:port/path`` (TLS trusting the server's CA)."""
    port = srv.tls_port if scheme == "pop3s" else srv.port
    host = "localhost" if scheme == "pop3s" or "--ssl-reqd" in args else srv.host
    url = f"{scheme}://{user}:{srv.password(user)}@{host}:{port}/{path}"
    done = subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), "--cacert", str(srv.ca_cert_path),
         *args, url],
        capture_output=True, text=True, timeout=timeout + 5, check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def fetchmail(srv: ScriptedPop3Server, user: str, work: Path, *options: str,
              tls: str = "none", timeout: int = 10) -> tuple[Run, list[bytes]]:
    """Run fetchmail once for ``user``; return the run and the messages its MDA got.

    ``options`` are more rc-file words (``keep``, ``fetchall``, ``uidl``...); ``tls`` is
    ``none``, ``stls`` (STLS required) or ``implicit``.
    """
    work.mkdir(parents=True, exist_ok=True)
    inbox = work / "inbox"
    inbox.mkdir(exist_ok=True)
    mda = work / "mda.sh"
    mda.write_text(f'#!/bin/sh\ncat > "{inbox}/$(date +%s%N).$$"\n', encoding="utf-8")
    mda.chmod(0o755)
    port = srv.tls_port if tls == "implicit" else srv.port
    host = srv.host
    # fetchmail upgrades with STLS whenever it is offered ("none" too): it always trusts
    # the test CA, and checks the certificate's name (CN) against "localhost".
    tls_words = {"implicit": "ssl", "stls": "sslproto tls1.2+", "none": ""}[tls]
    tls_words += f' sslcertck sslcertfile "{srv.ca_cert_path}" sslcommonname "localhost"'
    rc = work / "fetchmailrc"
    rc.write_text(
        f"set no syslog\n"
        f"poll {host} service {port} protocol pop3 timeout {timeout}\n"
        f'  user "{user}" password "{srv.password(user)}" is "{user}" here\n'
        f'  {tls_words} {" ".join(options)} mda "{mda}"\n',
        encoding="utf-8",
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(work)}
    done = subprocess.run(
        ["fetchmail", "--nodetach", "-f", str(rc), "--idfile", str(work / "ids"),
         "--pidfile", str(work / "pid"), "-v"],
        capture_output=True, text=True, timeout=timeout * 3 + 10, check=False, env=env,
        cwd=work,
    )
    got = [p.read_bytes() for p in sorted(inbox.iterdir())]
    return Run(done.returncode, done.stdout, done.stderr), got
