"""The load generator itself: its checks must pass on correct data and fail on a wrong byte.

A tiny POP3 responder in a thread plays the server; ``mode`` makes it misbehave.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sysconfig
import threading
import zlib
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3d.bench import client as client_mod
from pop3d.bench import loadgen, report
from pop3d.bench.client import Pop3Client, count_stuffed
from pop3d.bench.manifest import Manifest, stuff, to_wire, wire_entry
from pop3d.bench.options import Options
from pop3d.cli import main

MESSAGES = [
    b"Subject: one\n\nhello\n.\n..two dots\n.leading\nend\n",
    b".first line starts with a dot\n\nbody\n",
    b"Subject: three\n\n" + b"x" * 70_000 + b"\n.\n" + b"y" * 5000 + b"\n",
]
USERS = [f"u{i}" for i in range(1, 5)]


class FakePop3:
    """A minimal POP3 server; ``mode`` is "ok", "flip" (one wrong byte) or "nostuff"."""

    def __init__(self, mode: str = "ok", tls: ssl.SSLContext | None = None) -> None:
        self.mode = mode
        self.tls = tls
        self.wire = [to_wire(m) for m in MESSAGES]
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    def _body(self, n: int) -> bytes:
        wire = self.wire[n]
        if self.mode == "nostuff":
            return wire
        body = bytearray(stuff(wire))
        if self.mode == "flip":
            body[len(body) // 2] ^= 0x01
        return bytes(body)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK fake ready\r\n")
        sizes = [len(w) for w in self.wire]
        while line := await reader.readline():
            verb, _, arg = line.strip().partition(b" ")
            verb = verb.upper()
            if verb == b"STAT":
                writer.write(b"+OK %d %d\r\n" % (len(sizes), sum(sizes)))
            elif verb == b"LIST":
                rows = b"".join(b"%d %d\r\n" % (i, s) for i, s in enumerate(sizes, 1))
                writer.write(b"+OK\r\n" + rows + b".\r\n")
            elif verb == b"UIDL":
                rows = b"".join(b"%d uid-%d\r\n" % (i, i) for i in range(1, len(sizes) + 1))
                writer.write(b"+OK\r\n" + rows + b".\r\n")
            elif verb == b"RETR":
                writer.write(b"+OK\r\n" + self._body(int(arg) - 1) + b".\r\n")
            elif verb == b"QUIT":
                writer.write(b"+OK bye\r\n")
                await writer.drain()
                break
            else:  # USER, PASS, NOOP
                writer.write(b"+OK\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    m = Manifest({"box": Counter(wire_entry(x) for x in MESSAGES)}, dict.fromkeys(USERS, "box"))
    path = tmp_path / "manifest.json"
    m.dump(path)
    return path


@pytest.fixture
def fake() -> Iterator[FakePop3]:
    with FakePop3() as srv:
        yield srv


def _bench(port: int, manifest: Path, *extra: str) -> int:
    return main(["bench", "fetch", "-p", str(port), "-u", ",".join(USERS), "-c", "2",
                 "--count", "4", "-j", "1", "--manifest", str(manifest), "--no-progress",
                 "--json", *extra])


def test_body_checks_hold_for_every_chunking() -> None:
    """Size and CRC computed on the fly do not depend on where the chunks split."""
    wire = to_wire(MESSAGES[0]) + to_wire(MESSAGES[1])
    stream = b"+OK\r\n" + stuff(wire) + b".\r\n"

    class Transport(asyncio.Transport):
        def write(self, data: bytes | bytearray | memoryview) -> None:
            pass

    async def feed(step: int) -> tuple[int, int]:
        client = Pop3Client(asyncio.get_running_loop())
        client.connection_made(Transport())
        pending = asyncio.ensure_future(client.multi(b"RETR 1\r\n"))
        await asyncio.sleep(0)
        for i in range(0, len(stream), step):
            client.data_received(stream[i : i + step])
        body = await pending
        return body.octets, body.crc

    for step in (1, 2, 3, 4, 5, 7, 64, len(stream)):
        assert asyncio.run(feed(step)) == (len(wire), zlib.crc32(stuff(wire)))


def test_client_checksums_with_zlib_ng_when_installed() -> None:
    """The body check uses zlib-ng's CRC-32 when it is there (the bench's venv has it)."""
    zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")
    assert client_mod.crc32 is zlib_ng.crc32
    data = bytes(range(256)) * 4099
    with memoryview(data) as view:
        assert client_mod.crc32(view[7:], client_mod.crc32(data[:7])) == zlib.crc32(data)


def test_fetch_verifies_every_message(fake: FakePop3, manifest: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Against a correct server every message is checked and the run succeeds."""
    assert _bench(fake.port, manifest) == 0
    out = capsys.readouterr().out
    assert '"verified": 12' in out
    assert '"verify_failures": 0' in out


@pytest.mark.parametrize("mode", ["flip", "nostuff"])
def test_wrong_bytes_fail_the_run(mode: str, manifest: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """One flipped byte, or a line left unstuffed, is a verification failure."""
    with FakePop3(mode) as srv:
        assert _bench(srv.port, manifest) == 1
    out = capsys.readouterr().out
    assert '"verify_failures": 4' in out


@pytest.mark.parametrize(("flag", "resumed"), [("--tls", 0), ("--tls-resume", 3)])
def test_pop3s_full_handshakes_or_resumed(flag: str, resumed: int, manifest: Path,
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """POP3S: --tls makes a full handshake each session; --tls-resume offers the ticket
    the first session brought, and the server's resumptions are counted."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with FakePop3(tls=context) as srv:
        assert main(["bench", "fetch", "-p", str(srv.port), "-u", ",".join(USERS), "-c", "1",
                     "--count", "4", "-j", "1", "--manifest", str(manifest), "--no-progress",
                     "--json", flag]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] == 12
    assert out["tls_resumed"] == resumed


def test_idle_holds_and_probes(fake: FakePop3) -> None:
    """idle holds its connections for the run and times NOOPs on the probe session."""
    opts = Options(host="127.0.0.1", port=fake.port, users=tuple(USERS),
                           password="x", scenario="idle", idle_conns=3, duration=0.3)
    summary = loadgen.run(opts)
    assert summary["idle"] == {"requested": 3, "held": 3}
    assert summary["probe"]["count"] > 5
    assert summary["failures"] == 0


@pytest.mark.parametrize(
    "data",
    [b"", b".", b"\r\n.", b"a\r\n.b\r\n..\r\n", b"x." * 40 + b"\r\n." * 20 + b".\r\n.",
     b"\r\n.\r\n." + b"no dots here\r\n" * 30, b".\r\n" * 50],
)
def test_count_stuffed_matches_bytes_count(data: bytes) -> None:
    """The dot counter's shortcuts agree with a plain count of CRLF-dot."""
    assert count_stuffed(data) == data.count(b"\r\n.")


def test_canned_login_server_passes_the_login_checks(manifest: Path, tmp_path: Path) -> None:
    """bench/canned.py --login (the login ceiling of make bench) answers STAT per manifest."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from pop3d.testing import free_port, wait_for_port  # noqa: PLC0415

    port = free_port()
    canned = Path(__file__).parents[2] / "bench" / "canned.py"
    proc = subprocess.Popen([sys.executable, str(canned), "--port", str(port),
                             "--login", str(manifest), "--seconds", "30"])
    try:
        wait_for_port("127.0.0.1", port)
        opts = Options(host="127.0.0.1", port=port, users=tuple(USERS), password="x",
                               scenario="login", count=40, duration=10,
                               manifest=manifest)
        summary = loadgen.run(opts)
    finally:
        proc.terminate()
        proc.wait(10)
    assert summary["sessions"] == 40
    assert summary["failures"] == 0
    assert summary["verify_failures"] == 0


def _part(sessions: int, elapsed: float, octets: int, latencies: list[float],
          run_s: float, errors: dict[str, int]) -> dict[str, object]:
    lat = report._latency([array("d", latencies).tobytes()])
    return {"scenario": "login", "elapsed_s": elapsed, "setup_s": 0.1, "sessions": sessions,
            "failures": 1, "messages": sessions, "octets": octets, "verified": sessions,
            "verify_failures": 0, "latency": lat, "probe": None, "errors": errors,
            "sessions_per_s": sessions / elapsed,
            "loadgen_cpu": {"total_s": run_s + 0.5, "run_s": run_s, "cores": 1,
                            "utilization": run_s / elapsed, "bottleneck": False}}


def test_merge_adds_counts_and_recomputes_rates() -> None:
    """Slices of one scenario add up to one result, rates over the summed run time."""
    a = _part(300, 2.0, 3_000_000, [0.001] * 99 + [0.050], 1.0, {"timeout": 1})
    b = _part(100, 2.0, 1_000_000, [0.002] * 100, 1.9, {"timeout": 2, "reset": 1})
    m = report.merge([a, b])
    assert (m["sessions"], m["elapsed_s"], m["failures"]) == (400, 4.0, 2)
    assert m["sessions_per_s"] == 100.0
    assert m["messages_per_s"] == 100.0
    assert m["mb_per_s"] == 1.0
    assert m["errors"] == {"timeout": 3, "reset": 1}
    assert m["latency"]["count"] == 200
    assert m["latency"]["p50_ms"] == 2.0  # the larger of the slices' own
    assert m["latency"]["max_ms"] == 50.0
    assert m["loadgen_cpu"]["utilization"] == (1.0 + 1.9) / 4.0
    assert m["loadgen_cpu"]["bottleneck"] is False
    assert m["parts"] == 2
    assert report.merge([a]) is a


@given(st.lists(st.lists(st.floats(0.0001, 1.0), min_size=1, max_size=40),
                min_size=2, max_size=4))
def test_merged_percentiles_never_understate(slices: list[list[float]]) -> None:
    """A merged percentile is at or above the one of all the slices' values together."""
    parts = [report._latency([array("d", values).tobytes()]) for values in slices]
    whole = report._latency([array("d", v).tobytes() for v in slices])
    merged = report._merge_latency(parts)
    assert whole is not None
    assert merged is not None
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        assert merged[key] >= whole[key]


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """One TLS handshake in memory, then a server greeting (which brings the tickets)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, (end, out, peer_in) in enumerate(((tls, c_out, s_in), (srv, s_out, c_in))):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            break
    srv.write(b"+OK\r\n")
    c_in.write(s_out.read())
    assert tls.read(100) == b"+OK\r\n"
    return tls


def test_resuming_context_offers_its_session_without_a_copy(tmp_path: Path) -> None:
    """The generator offers its kept session through OpenSSL directly (CPython's setter
    copies and re-decodes it each time), and the server resumes it; a session from
    another context is refused by the layout check, so CPython's setter takes over."""
    cert, key = _self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    ctx = client_mod.client_context(resume=True)
    first = _handshake(server, ctx)
    assert not first.session_reused
    session = first.session
    assert session is not None
    ctx.session = session
    bare = ssl.MemoryBIO(), ssl.MemoryBIO()
    probe = ssl.SSLContext.wrap_bio(ctx, *bare, server_hostname="localhost")
    # the fast path is taken on the default (GIL) CPython build this project runs on
    fast = client_mod._set_session(ctx, probe, session)
    assert fast or sysconfig.get_config_var("Py_GIL_DISABLED")
    assert _handshake(server, ctx).session_reused
    other = client_mod.client_context(resume=True)
    probe = ssl.SSLContext.wrap_bio(other, *bare, server_hostname="localhost")
    assert not client_mod._set_session(other, probe, session)
    with pytest.raises(ValueError, match="different SSLContext"):
        probe.session = session
