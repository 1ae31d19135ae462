"""The accept path (server/accept.py): caps before TLS, the handshake bound and deadline, PROXY.

Each test runs twice: on an in-process server (asyncio) and on a ``pop3d serve`` process
(uvloop).  The balancer here is a raw socket bound to 127.0.0.2 writing PROXY headers by
hand; tests/integration/test_haproxy.py does the same through a real HAProxy.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pop3d.testing import Pop3ServeProcess, Pop3TestServer, free_port
from tests.integration.helpers import WAIT, RawClient
from tests.integration.tls_support import Pki, assert_treated_as_tls, make_pki

pytestmark = pytest.mark.timeout(90)

#: The address the tests' "balancer" connects from (127.0.0.1 is the readiness probe's).
PROXY = "127.0.0.2"


@dataclass
class Server:
    """A running server, whichever way it was started."""

    port: int
    tls_port: int
    log: Callable[[], str]
    #: Stop it (SIGTERM for a process); return its exit status (0 in-process).
    stop: Callable[[], int]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture(params=["asyncio", "uvloop"])
def start(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> Iterator[Callable[..., Server]]:
    """Start a server with TLS on both loops: ``start(max_connections=8, ...)``."""
    caplog.set_level(logging.INFO, logger="pop3d")
    stops: list[Callable[[], object]] = []

    def factory(**overrides: object) -> Server:
        root = tmp_path / f"srv-{len(stops)}"
        users = {"alice": "secret"}
        sections = {"tls": pki.tls_section()}
        if request.param == "asyncio":
            srv = Pop3TestServer(
                root,
                users=users,
                sections=sections,
                tls_listen=["127.0.0.1:0"],
                **overrides,  # type: ignore[arg-type]
            ).start()
            stops.append(srv.stop)

            def stop_in_process() -> int:
                srv.stop()
                return 0

            return Server(srv.port, srv.tls_port, lambda: caplog.text, stop_in_process)
        tls_port = free_port()
        proc = Pop3ServeProcess(
            root,
            users=users,
            sections=sections,
            tls_listen=[f"127.0.0.1:{tls_port}"],
            workers=1,
            **overrides,  # type: ignore[arg-type]
        ).start()
        stops.append(proc.kill)
        return Server(proc.port, tls_port, proc.log_text, proc.stop)

    yield factory
    for stop in stops:
        stop()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (without waiting)."""
    sock.setblocking(False)  # noqa: FBT003
    try:
        return sock.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)  # noqa: FBT003
        sock.settimeout(WAIT)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class ProxiedClient(RawClient):
    """A RawClient that writes ``header`` first, from ``source``."""

    def __init__(self, port: int, header: bytes, source: str = PROXY) -> None:
        self.sock = connect(port, source)
        self.sock.sendall(header)
        self.buf = b""
        self.greeting = self.line()


def v1(client: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 {port} 110\r\n".encode()


def v2(client: str, port: int = 40000, *, ssl_client: bool = False) -> bytes:
    block = socket.inet_aton(client) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 110)
    if ssl_client:
        value = struct.pack("!BI", 1, 0) + b"\x21\x00\x07TLSv1.3"
        block += struct.pack("!BH", 0x20, len(value)) + value
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(block)) + block


# --------------------------------------------------------------------------- caps before TLS


def test_silent_flood_on_pop3s_is_capped_at_accept(
    start: Callable[..., Server], pki: Pki
) -> None:
    """Silent connections to POP3S are refused past the caps at once, the rest at the deadline.

    10 from one address and 10 from another, caps 5 per address and 8 in total: 12 are
    closed at accept (no TLS work), 8 held until ``handshake_timeout``; then 8 real
    sessions fit again (every count was released).
    """
    srv = start(max_connections=8, max_connections_per_ip=5, handshake_timeout=3)
    socks = [connect(srv.tls_port, "127.0.0.1") for _ in range(10)]
    socks += [connect(srv.tls_port, "127.0.0.3") for _ in range(10)]
    wait_until(lambda: sum(map(closed, socks)) >= 12, "refused connections not closed")
    held = [s for s in socks if not closed(s)]
    assert len(held) == 8
    wait_until(lambda: all(map(closed, held)), "silent connections outlived the deadline")
    for s in socks:
        s.close()
    wait_until(lambda: "handshake timeout" in srv.log(), "timeouts not logged")
    ctx = pki.client_context()
    sessions = []
    try:
        for source in ["127.0.0.1"] * 5 + ["127.0.0.3"] * 3:
            sessions.append(ctx.wrap_socket(connect(srv.tls_port, source),
                                            server_hostname="localhost"))
            assert sessions[-1].recv(100).startswith(b"+OK")
    finally:
        for tls in sessions:
            tls.close()


def test_pop3s_still_serves(start: Callable[..., Server], pki: Pki) -> None:
    """A TLS client logs in on the POP3S port, and a pipelined first command is answered."""
    srv = start()
    ctx = pki.client_context()
    with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=WAIT) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"CAPA\r\n")  # before the greeting arrives
        data = b""
        while not data.endswith(b"\r\n.\r\n"):
            chunk = tls.recv(4096)
            assert chunk
            data += chunk
        assert data.startswith(b"+OK")
        assert b"STLS" not in data
        assert b"\r\nUSER\r\n" in data  # inside TLS: plaintext logins allowed


def test_handshakes_in_flight_are_bounded(start: Callable[..., Server], pki: Pki) -> None:
    """With max_tls_handshakes = 1, a second handshake waits for the first to end."""
    srv = start(max_tls_handshakes=1, handshake_timeout=60)
    first = connect(srv.tls_port)
    first.sendall(b"\x16\x03\x01")  # the start of a ClientHello: a handshake begins
    done = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=WAIT) as raw, \
                    pki.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.recv(100).startswith(b"+OK")
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not done.wait(0.5), "the second handshake did not wait for a slot"
    first.close()  # the slot frees; the waiting handshake proceeds
    assert done.wait(WAIT)
    thread.join()
    assert not errors, errors


def test_stalled_handshake_is_closed_and_frees_its_slot(
    start: Callable[..., Server], pki: Pki
) -> None:
    """A handshake that stops halfway is closed at the deadline; its slot serves the next."""
    srv = start(max_tls_handshakes=1, handshake_timeout=1)
    with connect(srv.tls_port) as stalled:
        stalled.sendall(b"\x16\x03\x01\x02")  # holds the only slot, then says nothing
        assert stalled.recv(100) == b""  # closed at the deadline
    with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=WAIT) as raw, \
            pki.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.recv(100).startswith(b"+OK")
    wait_until(lambda: "handshake timeout" in srv.log(), "timeout not logged")


def test_stop_closes_connections_in_their_handshake(start: Callable[..., Server]) -> None:
    """SIGTERM (or stop()) closes connections still before their session, and exits 0."""
    srv = start(max_tls_handshakes=1, handshake_timeout=60, proxy_protocol_from=[f"{PROXY}/32"])
    silent = connect(srv.tls_port)
    halfway = connect(srv.tls_port)
    halfway.sendall(b"\x16\x03\x01\x02")  # holds the slot
    queued = connect(srv.tls_port)
    queued.sendall(b"\x16\x03\x01\x02")  # waits for it
    no_header = connect(srv.port, PROXY)
    # A session's greeting: the server has been through its accept callbacks since.
    session = RawClient("127.0.0.1", srv.port)
    assert session.greeting.startswith(b"+OK")
    assert srv.stop() == 0
    assert session.wait_eof().startswith(b"-ERR [SYS/TEMP]")
    session.close()
    for sock in (silent, halfway, queued, no_header):
        assert sock.recv(100) == b""
        sock.close()


def test_not_tls_on_pop3s_is_closed(start: Callable[..., Server]) -> None:
    """Cleartext on the POP3S port is closed at its first octets (no TLS state made)."""
    srv = start()
    with connect(srv.tls_port) as sock:
        sock.sendall(b"CAPA\r\n")
        assert sock.recv(100) == b""


# --------------------------------------------------------------------------- PROXY protocol


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_gives_the_client_address(
    start: Callable[..., Server], version: int
) -> None:
    """The session's log line, and per-address limits, use the address in the header."""
    srv = start(
        proxy_protocol_from=[f"{PROXY}/32"], max_connections_per_ip=2, plaintext_without_tls=True
    )
    header = v1 if version == 1 else v2
    first = ProxiedClient(srv.port, header("192.0.2.9", 41001))
    assert first.greeting.startswith(b"+OK")
    assert first.login(b"alice", b"secret").startswith(b"+OK")
    assert first.cmd(b"QUIT").startswith(b"+OK")
    first.close()
    wait_until(lambda: "peer=192.0.2.9:41001 user=alice" in srv.log(), "no session line")
    # Per address: the client's, not the balancer's (three connections from 127.0.0.2).
    a = ProxiedClient(srv.port, header("192.0.2.9"))
    b = ProxiedClient(srv.port, header("192.0.2.9"))
    c = ProxiedClient(srv.port, header("192.0.2.9"))
    d = ProxiedClient(srv.port, header("192.0.2.10"))
    assert a.greeting.startswith(b"+OK")
    assert b.greeting.startswith(b"+OK")
    assert c.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
    assert d.greeting.startswith(b"+OK")
    for client in (a, b, c, d):
        client.close()


def test_failed_logins_name_the_client(start: Callable[..., Server]) -> None:
    """A failed login through a balancer is logged (and penalised) for the header's client."""
    srv = start(proxy_protocol_from=[f"{PROXY}/32"], plaintext_without_tls=True)
    client = ProxiedClient(srv.port, v1("192.0.2.77"))
    assert client.login(b"alice", b"wrong").startswith(b"-ERR")
    client.close()

    def logged() -> bool:
        return any(
            "auth failed" in line and "192.0.2.77" in line and PROXY not in line
            for line in srv.log().splitlines()
        )

    wait_until(logged, "the failure was not logged with the client's address")


@pytest.mark.parametrize(
    "header",
    [b"PROXY UNKNOWN\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"],
    ids=["v1-unknown", "v2-local"],
)
def test_header_without_a_client_is_the_balancers_own(
    start: Callable[..., Server], header: bytes
) -> None:
    """v1 UNKNOWN and v2 LOCAL (health checks) are served as the balancer's own connection."""
    srv = start(proxy_protocol_from=[f"{PROXY}/32"])
    client = ProxiedClient(srv.port, header)
    assert client.greeting.startswith(b"+OK")
    assert client.cmd(b"QUIT").startswith(b"+OK")
    client.close()
    wait_until(lambda: f"session peer={PROXY}:" in srv.log(), "no session line")


def test_proxy_without_header_is_closed(start: Callable[..., Server]) -> None:
    """A balancer's connection must start with a header: anything else, or nothing, closes it."""
    srv = start(proxy_protocol_from=[f"{PROXY}/32"], handshake_timeout=1)
    with connect(srv.port, PROXY) as sock:
        sock.sendall(b"CAPA\r\n")
        assert sock.recv(100) == b""  # no greeting, no reply
    with connect(srv.port, PROXY) as sock:
        assert sock.recv(100) == b""  # silent: closed at the deadline
    with connect(srv.tls_port, PROXY) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello")  # TLS without the header
        assert sock.recv(100) == b""


def test_header_from_elsewhere_is_refused(start: Callable[..., Server]) -> None:
    """A PROXY header from an address not in proxy_protocol_from closes the connection."""
    srv = start(proxy_protocol_from=[f"{PROXY}/32"])
    for header in (v1("192.0.2.9"), v2("192.0.2.9")):
        with connect(srv.port, "127.0.0.3") as sock:
            assert sock.recv(100).startswith(b"+OK")  # greeted: not a balancer
            sock.sendall(header[:3])
            sock.sendall(header[3:])
            assert sock.recv(100) == b""
        with connect(srv.tls_port, "127.0.0.3") as sock:
            sock.sendall(header)
            assert sock.recv(100) == b""
    # Ordinary clients from elsewhere are served as before.
    with RawClient("127.0.0.1", srv.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")
    assert "PROXY header from an address not in proxy_protocol_from" in srv.log()


def test_secure_networks_and_tls_at_the_balancer(start: Callable[..., Server]) -> None:
    """secure_networks apply to the header's client; the v2 SSL TLV makes a session secure."""
    srv = start(
        proxy_protocol_from=[f"{PROXY}/32"],
        secure_networks=["192.0.2.0/24"],
        plaintext_without_tls=False,
    )
    inside = ProxiedClient(srv.port, v2("192.0.2.9"))
    assert inside.login(b"alice", b"secret").startswith(b"+OK")
    inside.close()
    outside = ProxiedClient(srv.port, v2("203.0.113.5"))
    assert outside.cmd(b"USER alice").startswith(b"-ERR [AUTH]")
    outside.close()
    over_tls = ProxiedClient(srv.port, v2("203.0.113.5", ssl_client=True))
    assert_treated_as_tls(over_tls)
    over_tls.close()


def test_proxy_header_before_implicit_tls(start: Callable[..., Server], pki: Pki) -> None:
    """On POP3S the header comes before the ClientHello, even in the same segment."""
    srv = start(proxy_protocol_from=[f"{PROXY}/32"])
    raw = connect(srv.tls_port, PROXY)
    raw.sendall(v2("198.51.100.4", 42424))
    ctx = pki.client_context()
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        buf = tls.recv(100)
        assert buf.startswith(b"+OK")
        tls.sendall(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
        while buf.count(b"\r\n") < 4:
            chunk = tls.recv(1000)
            assert chunk
            buf += chunk
        assert b"+OK" in buf.split(b"\r\n")[2]
    wait_until(lambda: "peer=198.51.100.4:42424 user=alice" in srv.log(), "no session line")


def test_ssl_errors_do_not_leak(start: Callable[..., Server]) -> None:
    """A handshake that fails is logged as such, without a traceback."""
    srv = start()
    with connect(srv.tls_port) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05\x00\x00\x00\x00\x00")  # not a ClientHello
        while sock.recv(100):  # perhaps an alert, then the close
            pass
    wait_until(lambda: "TLS handshake failed" in srv.log(), "failure not logged")
    assert "Traceback" not in srv.log()
