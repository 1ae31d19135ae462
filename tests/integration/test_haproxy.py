"""pop3d behind a real HAProxy (Debian's), with deploy/haproxy/pop3d.cfg as it is shipped.

HAProxy connects to pop3d from 127.0.0.2 (``POP3D_SOURCE``), the address in pop3d's
``proxy_protocol_from``; clients connect to HAProxy from addresses of their own
(127.0.0.5, ...), which is what pop3d must see: in its log, its per-address limits and
its ``secure_networks``.  Both header versions (``send-proxy``, ``send-proxy-v2``), TLS
passed through to pop3d, and TLS ended at HAProxy (``send-proxy-v2-ssl``).
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pop3d.testing import Pop3ServeProcess, free_port
from tests.haproxy import haproxy_binary, start_haproxy
from tests.integration.helpers import WAIT, RawClient
from tests.integration.tls_support import Pki, assert_treated_as_tls, make_pki

pytestmark = pytest.mark.timeout(90)

#: The HAProxy configuration operators get; the tests run this very file.
CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "pop3d.cfg"

#: HAProxy's address towards pop3d.
PROXY = "127.0.0.2"


@dataclass
class HAProxy:
    """A running ``haproxy -db`` and its three frontends."""

    process: subprocess.Popen[bytes]
    pop3: int
    pop3s: int
    offload: int
    log: Path


@dataclass
class Setup:
    """pop3d behind HAProxy."""

    pop3d: Pop3ServeProcess
    haproxy: HAProxy


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def behind_haproxy(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., Setup]]:
    """Start pop3d (``pop3d serve``) and HAProxy in front: ``behind_haproxy(send_proxy=...)``."""
    if haproxy_binary() is None:
        pytest.skip("haproxy is not installed (scripts/setup.sh installs it)")
    started: list[tuple[Pop3ServeProcess, subprocess.Popen[bytes]]] = []

    def factory(
        send_proxy: str = "send-proxy-v2", source: str = PROXY, **overrides: object
    ) -> Setup:
        n = len(started)
        tls_port = free_port()
        pop3d = Pop3ServeProcess(
            tmp_path / f"pop3d-{n}",
            users={"alice": "secret"},
            sections={"tls": pki.tls_section()},
            tls_listen=[f"127.0.0.1:{tls_port}"],
            workers=1,
            proxy_protocol_from=[f"{PROXY}/32"],
            **overrides,  # type: ignore[arg-type]
        ).start()
        cert, key = pki.issue("haproxy", "localhost")
        pem = tmp_path / f"haproxy-{n}.pem"
        pem.write_bytes(cert.read_bytes() + key.read_bytes())
        ports = [free_port() for _ in range(3)]
        env = {
            "POP3D_BIND_POP3": f"127.0.0.1:{ports[0]}",
            "POP3D_BIND_POP3S": f"127.0.0.1:{ports[1]}",
            "POP3D_BIND_OFFLOAD": f"127.0.0.1:{ports[2]}",
            "POP3D_CERT": str(pem),
            "POP3D_NODE_POP3": f"127.0.0.1:{pop3d.port}",
            "POP3D_NODE_POP3S": f"127.0.0.1:{tls_port}",
            "POP3D_SEND_PROXY": send_proxy,
            "POP3D_SOURCE": source,
            "POP3D_MAXCONN": "1000",
        }
        log = tmp_path / f"haproxy-{n}.log"
        try:
            process = start_haproxy(CONFIG, env, log, ports)
        except RuntimeError:
            pop3d.kill()
            raise
        started.append((pop3d, process))
        return Setup(pop3d, HAProxy(process, ports[0], ports[1], ports[2], log))

    yield factory
    for pop3d, process in started:
        process.kill()
        process.wait(WAIT)
        pop3d.kill()


class Client(RawClient):
    """A POP3 client connecting from ``source`` (optionally in TLS)."""

    def __init__(
        self, port: int, source: str, context: ssl.SSLContext | None = None
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), WAIT, source_address=(source, 0))
        self.port_used = raw.getsockname()[1]
        self.sock = raw if context is None else context.wrap_socket(
            raw, server_hostname="localhost"
        )
        self.buf = b""
        self.greeting = self.line()


def wait_log(pop3d: Pop3ServeProcess, pattern: str) -> str:
    deadline = time.monotonic() + WAIT
    while not (found := re.search(pattern, pop3d.log_text())):
        assert time.monotonic() < deadline, f"{pattern!r} not in:\n{pop3d.log_text()}"
        time.sleep(0.02)
    return found.group(0)


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_log_and_limits_see_the_client_address(
    behind_haproxy: Callable[..., Setup], send_proxy: str
) -> None:
    """The session line names the client HAProxy saw; per-address caps count that client."""
    setup = behind_haproxy(send_proxy=send_proxy, max_connections_per_ip=2)
    with Client(setup.haproxy.pop3, "127.0.0.5") as client:
        assert client.greeting.startswith(b"+OK")
        assert client.login(b"alice", b"secret").startswith(b"+OK")  # 127/8 is secure
        assert client.cmd(b"QUIT").startswith(b"+OK")
        port = client.port_used
    wait_log(setup.pop3d, rf"session peer=127\.0\.0\.5:{port} user=alice")
    # Every connection comes from HAProxy's one address, yet the cap is per client.
    a = Client(setup.haproxy.pop3, "127.0.0.5")
    b = Client(setup.haproxy.pop3, "127.0.0.5")
    c = Client(setup.haproxy.pop3, "127.0.0.5")
    d = Client(setup.haproxy.pop3, "127.0.0.6")
    try:
        assert a.greeting.startswith(b"+OK")
        assert b.greeting.startswith(b"+OK")
        assert c.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
        assert d.greeting.startswith(b"+OK")
    finally:
        for client in (a, b, c, d):
            client.close()


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_pop3s_passed_through(
    behind_haproxy: Callable[..., Setup], pki: Pki, send_proxy: str
) -> None:
    """TLS through HAProxy to pop3d's POP3S port: the header first, then pop3d's handshake."""
    setup = behind_haproxy(send_proxy=send_proxy)
    with Client(setup.haproxy.pop3s, "127.0.0.7", pki.client_context()) as client:
        assert client.greeting.startswith(b"+OK")
        assert client.login(b"alice", b"secret").startswith(b"+OK")
        assert client.cmd(b"QUIT").startswith(b"+OK")
        port = client.port_used
    wait_log(setup.pop3d, rf"session peer=127\.0\.0\.7:{port} user=alice")


def test_tls_ended_at_haproxy_counts_as_secure(
    behind_haproxy: Callable[..., Setup], pki: Pki
) -> None:
    """send-proxy-v2-ssl: passwords allowed and no STLS offered; cleartext clients refused."""
    setup = behind_haproxy(plaintext_without_tls=False, secure_networks=[])
    with Client(setup.haproxy.offload, "127.0.0.8", pki.client_context()) as client:
        assert_treated_as_tls(client)
        assert client.cmd(b"QUIT").startswith(b"+OK")
    wait_log(setup.pop3d, r"session peer=127\.0\.0\.8:\d+ user=alice")
    # The same client in cleartext through HAProxy (no SSL TLV) may not send a password.
    with Client(setup.haproxy.pop3, "127.0.0.8") as client:
        assert client.cmd(b"USER alice").startswith(b"-ERR [AUTH]")


def test_direct_connection_from_the_proxy_network_needs_a_header(
    behind_haproxy: Callable[..., Setup],
) -> None:
    """A connection from HAProxy's address without a PROXY header is closed, ungreeted."""
    setup = behind_haproxy(handshake_timeout=2)
    address = ("127.0.0.1", setup.pop3d.port)
    with socket.create_connection(address, WAIT, source_address=(PROXY, 0)) as s:
        s.sendall(b"CAPA\r\n")
        assert s.recv(100) == b""  # closed at once, no greeting
    with socket.create_connection(address, WAIT, source_address=(PROXY, 0)) as s:
        assert s.recv(100) == b""  # silent: closed at handshake_timeout
    wait_log(setup.pop3d, r"handshake timeout for 127\.0\.0\.2:\d+")
    wait_log(setup.pop3d, r"refused 127\.0\.0\.2:\d+: not a PROXY protocol header")


def test_header_from_an_address_not_listed_is_refused(
    behind_haproxy: Callable[..., Setup],
) -> None:
    """HAProxy connecting from an address outside proxy_protocol_from: its header closes it."""
    setup = behind_haproxy(source="127.0.0.3")
    with Client(setup.haproxy.pop3, "127.0.0.5") as client:
        # pop3d greets a peer it does not take for a balancer, then sees the header: the
        # client may read that greeting, then the connection closes (TimeoutError if not).
        client.wait_eof()
    wait_log(setup.pop3d, "PROXY header from an address not in proxy_protocol_from")


def test_haproxy_version_is_known() -> None:
    """The HAProxy these tests ran against, for the record (docs/proxy-protocol.md)."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    out = subprocess.run([haproxy, "-v"], capture_output=True, check=True, timeout=WAIT)
    assert out.stdout.startswith(b"HAProxy version ")
