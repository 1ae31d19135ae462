"""Messages that exercise the wire rules: stuffing, line ends, 8-bit, no final newline."""

from __future__ import annotations

#: Name -> bytes as stored in the Maildir.
TRICKY: dict[str, bytes] = {
    "plain": b"From: a@example.org\nSubject: plain\n\nHello, world.\n",
    "crlf": b"From: a@example.org\r\nSubject: crlf\r\n\r\nAlready CRLF.\r\n",
    "dots": (
        b"Subject: dots\n\n.leading dot\n..two dots\n.\nlone dot above\n. space\n"
        b"end\n"
    ),
    "no-final-newline": b"Subject: no final newline\n\nlast line has no end",
    "bare-lf-mixed": b"Subject: mixed\r\n\nCRLF and\nbare LF\r\nmixed\n",
    "eight-bit": "Subject: 8bit\n\nGr\u00fc\u00dfe, \u4f60\u597d\n".encode() + b"\xff\xfe raw\n",
    "dot-last-no-newline": b"Subject: dot last\n\nbody\n.",
    "empty-body": b"Subject: empty body\n\n",
}


def wire(stored: bytes) -> bytes:
    """The message as POP3 sends it (before stuffing): CRLF line ends, a final CRLF."""
    if not stored:
        return b""
    text = stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def lines(stored: bytes) -> list[bytes]:
    """The message as poplib returns it: un-stuffed lines without their CRLF."""
    text = wire(stored)
    return text[:-2].split(b"\r\n") if text else []
