"""SIGHUP re-reads the whole configuration without dropping sessions; SIGTERM drains.

A reload starts new workers with the new configuration (greeting, mechanisms, users, log
level...) and retires the old ones once the new ones serve: sessions opened before go on
undisturbed and end normally (QUIT with UPDATE).  What needs a restart is logged so.  A
broken configuration is refused and the running one kept.
"""

from __future__ import annotations

import poplib
import signal
from pathlib import Path

import pytest

from pop3d.testing import Pop3ServeProcess, free_port

from .conftest import children, wait_until

pytestmark = pytest.mark.timeout(90)


def _reloaded(proc: Pop3ServeProcess, count: int) -> bool:
    return proc.log_text().count("configuration reloaded") >= count


def test_sighup_rereads_everything_and_keeps_sessions(tmp_path: Path) -> None:
    """New greeting, new mechanisms, new user after SIGHUP; the session opened before keeps
    its maildrop and QUIT still deletes; a changed listen address is logged as restart-only;
    the old workers leave once their sessions end."""
    with Pop3ServeProcess(
        tmp_path / "srv", users={"alice": "secret"}, workers=2, greeting="before reload"
    ) as proc:
        proc.add_message("alice", b"Subject: one\r\n\r\nbody\r\n")
        proc.add_message("alice", b"Subject: two\r\n\r\nbody\r\n")
        old = poplib.POP3(proc.host, proc.port, timeout=20)
        assert b"before reload" in old.getwelcome()
        old.user("alice")
        old.pass_("secret")
        old.dele(1)
        first_workers = children(proc.pid)

        proc.set_user("bob", "hunter2")  # the passwd-file
        text = proc.config_path.read_text()
        text = text.replace('greeting = "before reload"', 'greeting = "after reload"')
        text = text.replace("[auth]", '[auth]\nmechanisms = ["PLAIN", "LOGIN", "CRAM-MD5"]')
        text = text.replace(f'listen = ["127.0.0.1:{proc.port}"]',
                            f'listen = ["127.0.0.1:{proc.port}", "127.0.0.1:{free_port()}"]')
        proc.config_path.write_text(text)
        proc.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        assert wait_until(lambda: _reloaded(proc, 1)), proc.log_text()
        assert "[server] listen changed: it takes effect at the next restart" in proc.log_text()

        new = poplib.POP3(proc.host, proc.port, timeout=20)
        assert b"after reload" in new.getwelcome()
        assert "CRAM-MD5" in new.capa()["SASL"]
        new.user("bob")
        assert new.pass_("hunter2").startswith(b"+OK")
        new.quit()

        # The session of before the reload: its worker retired but serves it to the end.
        assert old.stat()[0] == 1  # message 1 is marked deleted in this session
        assert old.retr(2)[1][0] == b"Subject: two"
        old.quit()
        assert len(proc.messages("alice")) == 1
        assert wait_until(lambda: not (children(proc.pid) & first_workers))
        assert len(children(proc.pid)) == 2
        assert "died" not in proc.log_text()
        assert proc.stop() == 0


def test_broken_config_on_reload_keeps_the_running_one(tmp_path: Path) -> None:
    """A typo on SIGHUP is logged with file and key; the server goes on as it was."""
    with Pop3ServeProcess(tmp_path / "srv", users={"alice": "secret"}, workers=1) as proc:
        workers = children(proc.pid)
        proc.config_path.write_text(proc.config_path.read_text() + "\n[auth]\nbogus = 1\n")
        proc.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        assert wait_until(lambda: "reload failed" in proc.log_text())
        assert str(proc.config_path) in proc.log_text()
        assert children(proc.pid) == workers
        client = poplib.POP3(proc.host, proc.port, timeout=20)
        client.user("alice")
        assert client.pass_("secret").startswith(b"+OK")
        client.quit()
        assert proc.stop() == 0


def test_sigterm_closes_sessions_without_update_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM: open sessions are told and closed without UPDATE (nothing deleted); the
    server exits 0 within shutdown_grace plus a little."""
    with Pop3ServeProcess(
        tmp_path / "srv", users={"alice": "secret"}, workers=2,
        sections={"server": {"shutdown_grace": 3}},
    ) as proc:
        proc.add_message("alice", b"Subject: kept\r\n\r\nbody\r\n")
        client = poplib.POP3(proc.host, proc.port, timeout=20)
        client.user("alice")
        client.pass_("secret")
        client.dele(1)
        # Bounded by the stop's timeout: a server waiting for the idle session (600 s)
        # instead of its 3 s shutdown_grace fails it.
        assert proc.stop(signal.SIGTERM, timeout=20) == 0
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            client.quit()
        client.close()
        assert len(proc.messages("alice")) == 1


def test_sighup_applies_log_settings(tmp_path: Path) -> None:
    """[log] level = "warning" on reload: new workers log no INFO line, warnings still."""
    with Pop3ServeProcess(tmp_path / "srv", users={"alice": "secret"}, workers=1) as proc:
        first = children(proc.pid)
        proc.config_path.write_text(proc.config_path.read_text() + '\n[log]\nlevel = "warning"\n')
        proc.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        assert wait_until(lambda: children(proc.pid) and not children(proc.pid) & first)
        before = proc.log_text()
        client = poplib.POP3(proc.host, proc.port, timeout=20)
        client.user("alice")
        with pytest.raises(poplib.error_proto):
            client.pass_("wrong")
        client.quit()
        assert wait_until(lambda: "auth failed:" in proc.log_text()[len(before):])
        assert "session peer=" not in proc.log_text()[len(before):]
        assert proc.stop() == 0
