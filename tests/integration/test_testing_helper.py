"""pop3d.testing, the helper we publish for other people's test suites, does what it says."""

from __future__ import annotations

import gc
import poplib
import shutil
import socket
import textwrap
import threading
import warnings
from pathlib import Path
from typing import cast

import pytest

import pop3d.testing
from pop3d.errors import ConfigError
from pop3d.server.connection import Pop3Protocol
from pop3d.testing import Pop3ServeProcess, Pop3TestServer

from .helpers import RawClient, server_send_queue, stalled_send_queue, wait_until

pytestmark = pytest.mark.timeout(60)


def test_docstring_example_runs(tmp_path: Path) -> None:
    """The module docstring's example test, run as written, passes."""
    doc = pop3d.testing.__doc__
    assert doc is not None
    block = doc.split("Example (pytest)::", 1)[1].split("The subprocess variant", 1)[0]
    code = textwrap.dedent(block)
    namespace: dict[str, object] = {}
    exec(compile(code, "pop3d.testing example", "exec"), namespace)
    test = namespace["test_fetch_deletes"]
    assert callable(test)
    test(tmp_path)


def test_stop_closes_sessions_without_update_and_leaves_no_thread(tmp_path: Path) -> None:
    """stop() ends open sessions without UPDATE, joins its thread, and can be called twice."""
    before = threading.active_count()
    srv = Pop3TestServer(tmp_path, users={"alice": "secret"}).start()
    srv.add_message("alice", b"Subject: a\n\nkeep me\n")
    with RawClient(srv.host, srv.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")
        assert client.cmd(b"DELE 1").startswith(b"+OK")
        srv.stop()
        client.wait_eof()
    srv.stop()
    assert srv.messages("alice") == [b"Subject: a\n\nkeep me\n"]
    assert threading.active_count() == before


@pytest.mark.skipif(not shutil.which("ss"), reason="no ss (iproute2)")
def test_stop_leaves_no_transport_unclosed(tmp_path: Path) -> None:
    """stop() closes a socket still closing behind replies nobody reads, then no transport
    is left for the garbage collector to warn about (``unclosed transport``).

    The QUIT is pipelined behind replies past the kernel's queue: the session has ended,
    its socket not.  Once, such a socket was no longer counted among the server's
    connections, so stop() did not close it and the garbage collector warned, in
    whichever later test it ran.
    """
    message = b"Subject: x\r\n\r\n" + b"y" * 60_000 + b"\r\n"
    users = {"probe": "pw", "quitter": "pw"}
    srv = Pop3TestServer(tmp_path, users=users).start()
    clients = []
    try:
        for user in users:
            srv.add_message(user, message)
        probe = RawClient(srv.host, srv.port)
        clients.append(probe)
        probe.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert probe.login(b"probe", b"pw").startswith(b"+OK")
        probe.send(b"RETR 1\r\n" * 300)
        kernel = stalled_send_queue(srv.port, probe.sock)
        client = RawClient(srv.host, srv.port)
        clients.append(client)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert client.login(b"quitter", b"pw").startswith(b"+OK")
        client.send(b"RETR 1\r\n" * ((kernel + (256 << 10)) // len(message) + 1) + b"QUIT\r\n")
        # The session has ended (no core), its connection not (list(): the loop's thread
        # changes the set).
        context = srv.context
        assert context is not None

        def ended_but_open() -> bool:
            sessions = cast("list[Pop3Protocol]", list(context.connections))
            return any(c.username == "quitter" and c.core is None for c in sessions)

        assert wait_until(ended_but_open)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            srv.stop()
            gc.collect()
        assert server_send_queue(srv.port, client.sock) < 0
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    finally:
        srv.stop()
        for c in clients:
            c.abort()


def test_messages_in_delivery_order_after_login(tmp_path: Path) -> None:
    """messages() lists new/ and cur/ in delivery order, also after the server moved them."""
    with Pop3TestServer(tmp_path, users={"alice": "secret"}) as srv:
        sent = [b"Subject: %d\n\n%d\n" % (i, i) for i in range(12)]
        for data in sent:
            srv.add_message("alice", data)
        client = poplib.POP3(srv.host, srv.port, timeout=10)
        client.user("alice")
        client.pass_("secret")
        client.quit()
        assert not list((srv.maildir("alice") / "new").iterdir())
        assert srv.messages("alice") == sent


def test_overrides_are_checked(tmp_path: Path) -> None:
    """An unknown override is a TypeError; an invalid value is the config's own error."""
    with pytest.raises(TypeError, match="idle_timout"):
        Pop3TestServer(tmp_path, idle_timout=2)
    with pytest.raises(ConfigError, match="idle_timeout"):
        Pop3TestServer(tmp_path, idle_timeout=0)


def test_hashed_passwords_are_stored_as_given(tmp_path: Path) -> None:
    """A password with a {SCHEME} prefix is written as is; others become {PLAIN}."""
    Pop3TestServer(tmp_path, users={"a": "{SHA256}abc=", "b": "pw"})
    assert (tmp_path / "users").read_text() == "a:{SHA256}abc=\nb:{PLAIN}pw\n"


def test_serve_process_start_failure_shows_log(tmp_path: Path) -> None:
    """A subprocess that cannot start raises with the server's log, and is not left running."""
    proc = Pop3ServeProcess(tmp_path, users={"alice": "secret"}, greeting=12)
    with pytest.raises(RuntimeError, match="exited with status 78") as info:
        proc.start()
    assert "greeting" in str(info.value)
    assert proc.process is not None
    assert proc.process.returncode == 78


def test_serve_process_moves_off_a_taken_port(tmp_path: Path) -> None:
    """If its free port is taken before the server binds, it starts on another one."""
    proc = Pop3ServeProcess(tmp_path, users={"alice": "secret"})
    taken = proc.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with proc:
            assert proc.port != taken
            with RawClient(proc.host, proc.port) as client:
                assert client.login(b"alice", b"secret").startswith(b"+OK")


def test_serve_process_fixed_busy_port_fails_clearly(tmp_path: Path) -> None:
    """An explicitly requested port that is busy is an error naming the port."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        proc = Pop3ServeProcess(tmp_path, users={"alice": "secret"}, port=port)
        with pytest.raises(RuntimeError, match=f"port {port} is in use"):
            proc.start()
