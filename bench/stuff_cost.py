"""What turning a stored message into RETR's wire bytes costs, in ns an octet, without sockets.

The path of a Maildir RETR: the file read in 1 MiB chunks (a ``bytearray``, as the
reader's buffer), each chunk's LFs made CRLF (:class:`~pop3d.storage.wire.CrlfNormaliser`),
then byte-stuffed (:class:`~pop3d.protocol.replies.DotStuffer`), with the standard
library's regex and with :func:`pop3d.simdtext.stuff_dense` (StringZilla) for chunks dense
with dots.  The bench's three 20 MiB messages (bench/mkdata.py): ``large`` (base64, a dot
line every 997), ``dots`` (text, 11 % of lines led by a dot), ``alldots`` (every line).
The output is checked against a one-line-at-a-time reference.  Best of ``--repeat`` runs
(the machine is shared: the minimum is the least disturbed)::

    .venv/bin/python bench/stuff_cost.py [--repeat 7] [--size-mib 20] [--cache DIR]

Instruction counts, steadier on a shared machine (``--only``; subtract the ``none`` run)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/stuff_cost.py --cache /tmp/stuffdata --only dots simd
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mkdata import make_dotty, make_large
from pop3d import simdtext
from pop3d.protocol.limits import READ_CHUNK
from pop3d.protocol.replies import DenseStuffer, DotStuffer, stuff_dense
from pop3d.storage.wire import CrlfNormaliser


def _reference(data: bytes) -> bytes:
    """The wire form, one line at a time (RFC 1939 §3): CRLF line ends, dots stuffed."""
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" after a final LF
    out = [(b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines]
    if tail:
        out.append((b"." + tail if tail.startswith(b".") else tail) + b"\r\n")
    return b"".join(out)


def _run(data: bytes, dense: DenseStuffer | None) -> tuple[float, float, bytes]:
    """Seconds normalising, seconds stuffing, and the bytes a writev of the pieces sends."""
    normaliser = CrlfNormaliser()
    stuffer = DotStuffer() if dense is None else DotStuffer(dense)
    buffer = bytearray(READ_CHUNK)
    view = memoryview(data)
    pieces: list[bytes | memoryview] = []
    t_norm = t_stuff = 0.0
    clock = time.perf_counter
    for pos in range(0, len(data), READ_CHUNK):
        part = view[pos : pos + READ_CHUNK]
        if len(part) == READ_CHUNK:
            buffer[:] = part
            raw: bytes = buffer  # type: ignore[assignment]  # the reader passes its bytearray
        else:
            raw = bytes(part)
        t0 = clock()
        chunk = normaliser.feed(raw)
        t1 = clock()
        pieces += stuffer.feed(chunk)
        t2 = clock()
        t_norm += t1 - t0
        t_stuff += t2 - t1
    pieces.append(normaliser.finish())
    return t_norm, t_stuff, b"".join(pieces)


def _messages(size: int, cache: Path | None) -> dict[str, bytes]:
    """The bench's three messages, from ``cache`` if it has them (written there if not)."""
    names = ("large", "dots", "alldots")
    if cache is not None and all((cache / f"{n}-{size}").exists() for n in names):
        return {n: (cache / f"{n}-{size}").read_bytes() for n in names}
    rng = random.Random(1939)
    messages = {
        "large": make_large(rng, size),
        "dots": make_dotty(rng, size, 0.11),
        "alldots": make_dotty(rng, size, 1.0),
    }
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for n, data in messages.items():
            (cache / f"{n}-{size}").write_bytes(data)
    return messages


def main() -> None:
    """Print ns an octet for each message and each stuffer."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--size-mib", type=int, default=20)
    ap.add_argument("--cache", type=Path, help="keep the generated messages in this folder")
    ap.add_argument("--only", nargs=2, metavar=("MESSAGE", "STUFFER"),
                    help="one run of one message (large/dots/alldots) with one stuffer "
                    "(regex/simd/none: read only), no check: for callgrind's instruction "
                    "counts, the difference of STUFFER and none")
    args = ap.parse_args()
    messages = _messages(args.size_mib << 20, args.cache)
    stuffers: dict[str, DenseStuffer | None] = {"regex": stuff_dense}
    if simdtext.AVAILABLE:
        stuffers["simd"] = simdtext.stuff_dense
    else:
        print("StringZilla is not installed: the regex only", file=sys.stderr)
    if args.only:
        name, label = args.only
        if label != "none":
            _run(messages[name], stuffers[label])
        return
    print(f"{'message':8} {'stuffer':6} {'CRLF':>6} {'stuff':>6} {'total':>6}  ns/octet of wire")
    for name, data in messages.items():
        expected = _reference(data)
        for label, dense in stuffers.items():
            run: Callable[[], tuple[float, float, bytes]] = lambda: _run(data, dense)  # noqa: B023,E731
            best = min((run() for _ in range(args.repeat)), key=lambda r: r[0] + r[1])
            if best[2] != expected:
                raise SystemExit(f"{name}/{label}: output differs from the reference")
            n = len(expected) / 1e9
            print(f"{name:8} {label:6} {best[0] / n:6.3f} {best[1] / n:6.3f} "
                  f"{(best[0] + best[1]) / n:6.3f}")


if __name__ == "__main__":
    main()
