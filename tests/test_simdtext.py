"""StringZilla's byte-stuffing (pop3d.simdtext) against a reference, for any bytes and any chunking.

The reference is the RFC 1939 rule applied one line at a time.  Each way of
:mod:`pop3d.simdtext` is checked on its own, then :func:`~pop3d.simdtext.stuff_dense` in
a :class:`~pop3d.protocol.replies.DotStuffer` (its first-dot and chunk-boundary state),
then the whole RETR and TOP path from stored LF octets through the CRLF normaliser.  The
core's dot walk hands big chunks only (64 KiB) to the dense stuffer; here ``_WALK_MIN`` is
1 so hypothesis's small examples reach it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d import simdtext
from pop3d.protocol import replies
from pop3d.protocol.replies import DotStuffer, Piece, TopFilter
from pop3d.storage.wire import CrlfNormaliser, to_wire

pytestmark = pytest.mark.skipif(not simdtext.AVAILABLE, reason="StringZilla not installed")


def stuffed_by_lines(data: bytes) -> bytes:
    """Every line (LF-ended) that starts with a dot gets another; the first line too."""
    return b"\n".join(b"." + ln if ln.startswith(b".") else ln for ln in data.split(b"\n"))


def stuffed_after_lfs(data: bytes) -> bytes:
    """What a :data:`~pop3d.protocol.replies.DenseStuffer` returns: the first octet is kept."""
    return data[:1] + stuffed_by_lines(data)[len(stuffed_by_lines(data[:1])) :]


def joined(pieces: list[Piece]) -> bytes:
    """What one writev of ``pieces`` sends."""
    return b"".join(pieces)


@contextmanager
def dense_everywhere() -> Iterator[None]:
    """Every chunk whose dots exceed the walk's budget goes to the dense stuffer."""
    with patch.object(replies, "_WALK_MIN", 1):
        yield


#: Text made of line-start dots, dots inside lines, CR, CRLF, bare LF and runs of lines.
TOKENS = st.lists(
    st.sampled_from([b".", b"..", b"\r\n", b"\r\n.", b"\n", b"\r", b"x", b"abc def",
                     b". a\r\n", b".line\r\n" * 8, b"plain line\r\n" * 3, b"\x00", b"a.b"]),
    max_size=600,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_split_way_matches_the_rule_for_any_bytes(data: bytes) -> None:
    assert joined(simdtext.stuff_by_split(data)) == stuffed_after_lfs(data)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=600), TOKENS.map(b"".join)))
def test_line_way_matches_the_rule_without_double_lf(data: bytes) -> None:
    """Stuff every line, take back the dot of lines without one: any bytes but LF LF."""
    while b"\n\n" in data:
        data = data.replace(b"\n\n", b"\n\r\n")
    assert joined(simdtext.stuff_by_lines(data)) == stuffed_after_lfs(data)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=3000), TOKENS.map(b"".join)))
def test_chosen_way_matches_the_core_regex(data: bytes) -> None:
    assert joined(simdtext.stuff_dense(data)) == joined(replies.stuff_dense(data))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=2000), TOKENS.map(b"".join)),
    st.lists(st.integers(1, 300), min_size=1, max_size=12),
)
def test_stuffer_with_simd_matches_the_rule_for_any_chunking(data: bytes, cuts: list[int]) -> None:
    """Chunk boundaries anywhere: after an LF, before a dot, between CR and LF."""
    chunks = []
    pos = i = 0
    while pos < len(data):
        chunks.append(data[pos : pos + cuts[i % len(cuts)]])
        pos += cuts[i % len(cuts)]
        i += 1
    with dense_everywhere():
        stuffer = DotStuffer(simdtext.stuff_dense)
        out = [p for chunk in chunks for p in stuffer.feed(chunk)]
    assert joined(out) == stuffed_by_lines(data)


@pytest.mark.parametrize("share", [0.0, 0.11, 0.5, 0.9, 0.97, 1.0])
@pytest.mark.parametrize("step", [1 << 20, 1 << 16, 65_537])
def test_big_chunks_of_any_dot_density(share: float, step: int) -> None:
    """3 MiB of CRLF text, ``share`` of its lines led by dots, through the real walk."""
    lines = []
    for i in range(48_000):
        line = b"lorem ipsum dolor sit amet %d the quick brown fox" % i
        if (i * 7919 % 1000) < share * 1000:
            line = (b".", b"..", b". ", b"...")[i % 4] + line
        lines.append(line)
    data = b"\r\n".join(lines) + b"\r\n"
    stuffer = DotStuffer(simdtext.stuff_dense)
    out = [p for i in range(0, len(data), step) for p in stuffer.feed(data[i : i + step])]
    assert joined(out) == stuffed_by_lines(data)


def test_all_dots_takes_the_line_way_and_few_pieces() -> None:
    """A chunk of dot lines is stuffed line-wise: a handful of pieces, not one per dot."""
    body = b"".join(b".%d dotted line of text\r\n" % i for i in range(40_000))
    chunk = b"Subject: dots\r\n\r\n" + body
    pieces = simdtext.stuff_dense(chunk)
    assert len(pieces) <= 4  # the two header lines and the rest
    assert joined(pieces) == stuffed_after_lfs(chunk)
    sparse = b"".join((b"." if i % 9 == 0 else b"") + b"line %d\r\n" % i for i in range(40_000))
    assert len(simdtext.stuff_dense(sparse)) == 1  # the split: one joined piece


def test_many_exceptions_fall_back_to_the_split() -> None:
    """A middle sample of dot lines in a chunk otherwise without them: still exact."""
    plain = b"".join(b"line %d\r\n" % i for i in range(20_000))
    dots = b"".join(b".line %d\r\n" % i for i in range(2_000))
    chunk = plain[: len(plain) // 2] + dots + plain[len(plain) // 2 :]
    pieces = simdtext.stuff_dense(chunk)
    assert len(pieces) == 1
    assert joined(pieces) == stuffed_after_lfs(chunk)


def wire_path(stored: bytes, step: int, top_lines: int | None) -> bytes:
    """RETR (or TOP) as the server runs it: normalise each read chunk, TOP-cut, stuff."""
    normaliser = CrlfNormaliser()
    top = TopFilter(top_lines) if top_lines is not None else None
    stuffer = DotStuffer(simdtext.stuff_dense)
    out: list[Piece] = []
    # the Maildir reader hands the normaliser its bytearray read buffer
    chunks = [normaliser.feed(cast("bytes", bytearray(stored[i : i + step])))
              for i in range(0, len(stored), step)]
    chunks.append(normaliser.finish())
    for chunk in chunks:
        out += stuffer.feed(chunk if top is None else top.feed(chunk))
        if top is not None and top.done:
            break
    out.append(stuffer.end())
    return joined(out)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=2000), TOKENS.map(b"".join)),
    st.integers(1, 700),
    st.one_of(st.none(), st.integers(0, 30)),
)
def test_retr_and_top_from_stored_octets(stored: bytes, step: int, top_lines: int | None) -> None:
    """Stored octets (LF, CRLF, lone CR) to the wire: CRLF, stuffed, terminated, any chunking."""
    data = to_wire(stored)
    if top_lines is not None:
        lines = data.split(b"\r\n")[:-1]
        if b"" in lines:
            blank = lines.index(b"")
            data = b"".join(ln + b"\r\n" for ln in lines[: blank + 1 + top_lines])
    expected = stuffed_by_lines(data)
    expected += b".\r\n" if not data or data.endswith(b"\n") else b"\r\n.\r\n"
    with dense_everywhere():
        assert wire_path(stored, step, top_lines) == expected
