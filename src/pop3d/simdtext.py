r"""Byte-stuffing at SIMD speed with StringZilla, where it is installed (``pop3d[fast]``).

The protocol core stuffs with the standard library only: a big chunk with many line-start
dots goes to a regex there, which costs ~100 ns a dot (a slice object per match).  The
server hands the core :func:`stuff_dense` instead when StringZilla imports
(:data:`STUFF_DENSE`).  The rule is the core's (RFC 1939 §3): every LF ends a line and a
dot after an LF gets another dot; a dot at the chunk's very start is the caller's.

Two ways, chosen per chunk from a 4 KiB sample of its middle:

* **Split** at every ``\n.`` and join with ``\n..``: StringZilla finds the pairs with SIMD
  and keeps the cuts as offsets, the join is one C loop; ~60 ns a dot.
* **Every line stuffed, the exceptions taken back**, where nearly every line starts with a
  dot: a dot after every LF (``bytes.replace``, one C pass), then the lines that did not
  start with one are found in a copy where every octet but ``.`` and LF reads ``a``
  (``\n.a``, a SIMD search), and the output is the pieces around their added dots.  The
  cost is a pass over the chunk plus a little per line without a dot; where those are more
  than one per 512 octets, the split is taken after all.
"""

from __future__ import annotations

from pop3d.protocol import replies
from pop3d.protocol.replies import DenseStuffer, Piece

try:
    import stringzilla as _sz
except ImportError:  # pop3d[fast] not installed: the core's regex stays
    _sz = None

#: StringZilla imported: :func:`stuff_dense` can be used.
AVAILABLE = _sz is not None

#: Every octet but ``.`` and LF reads ``a``: once a dot follows every LF, a line that did
#: not start with a dot shows as ``\n.a``.
_MARKS = bytes(b if b in (0x0A, 0x2E) else 0x61 for b in range(256))
#: The octets in the middle of a chunk that say whether nearly all its lines start with a dot.
_SAMPLE = 4096
#: ... at least 15 of 16 of the sample's lines.
_MOSTLY = 15 / 16
#: The whole-line way pays a pass over the chunk (~0.6 ns an octet: the replace and the
#: translation) and ~450 ns a line without a dot, the split ~60 ns a dot: it is taken
#: while lines without a dot are fewer than one per this many octets (docs/performance.md).
_OCTETS_PER_EXCEPTION = 512


def stuff_dense(chunk: bytes) -> list[Piece]:
    """Return ``chunk`` with a dot added after every LF that a dot follows, as pieces.

    A :data:`pop3d.protocol.replies.DenseStuffer`; needs :data:`AVAILABLE`.
    """
    assert _sz is not None
    mid = len(chunk) // 2
    sample = bytes(chunk[mid : mid + _SAMPLE])
    lines = sample.count(b"\n")
    if (
        lines
        and sample.count(b"\n.") >= lines * _MOSTLY
        # an LF after an LF would read "\n.\n", not "\n.a" (never in CRLF-normalised text)
        and _sz.find(chunk, b"\n\n") < 0
    ):
        stuffed = chunk.replace(b"\n", b"\n.")
        marks = _sz.translate(stuffed, _MARKS)
        if _sz.count(marks, b"\n.a") <= len(chunk) // _OCTETS_PER_EXCEPTION:
            return _take_back(chunk, stuffed, marks)
    return stuff_by_split(chunk)


def stuff_by_split(chunk: bytes) -> list[Piece]:
    r"""Stuff ``chunk`` by splitting it at every ``\n.`` (one piece)."""
    assert _sz is not None
    return [b"\n..".join(_sz.split(chunk, b"\n."))]


def stuff_by_lines(chunk: bytes) -> list[Piece]:
    """Stuff every line of ``chunk``, then take the dot back from lines without one.

    ``chunk`` must not hold two LFs in a row.
    """
    assert _sz is not None
    stuffed = chunk.replace(b"\n", b"\n.")
    return _take_back(chunk, stuffed, _sz.translate(stuffed, _MARKS))


def _take_back(chunk: bytes, stuffed: bytes, marks: bytes) -> list[Piece]:
    r"""The pieces of ``stuffed`` without the dots added to lines marked ``\n.a``."""
    assert _sz is not None
    view = memoryview(stuffed)
    # the dot added after a final LF belongs to the next chunk's first line: not sent
    end = len(stuffed) - 1 if chunk.endswith(b"\n") else len(stuffed)
    pieces: list[Piece] = []
    find = _sz.find
    pos = 0
    at = find(marks, b"\n.a")
    while at >= 0:
        pieces.append(view[pos : at + 1])
        pos = at + 2
        at = find(marks, b"\n.a", pos)
    if pos < end:
        pieces.append(view[pos:end])
    return pieces


#: What the server gives every session (``Pop3Settings.stuff_dense``): :func:`stuff_dense`
#: with StringZilla, else the core's regex.
STUFF_DENSE: DenseStuffer = stuff_dense if AVAILABLE else replies.stuff_dense
