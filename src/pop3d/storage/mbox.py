"""mbox: serve, lock, expunge and append traditional Unix mailboxes (``/var/mail/%u``).

Rules of this file:

* **Format** (mboxrd, read the way qpopper and Dovecot read it).  A message starts with
  a ``From `` line (the "From_ line": ``From sender asctime-date``) at the start of the
  file or right after an empty line, and ends before the empty line that precedes the
  next From_ line (or at the end of the file, where one final empty line is dropped).
  A From_ line must also look like one (a ``hh:mm`` time in it), so a body line
  ``From here on...`` after an empty line in a badly quoted (mboxo) file does not cut
  a message in two.  The From_ line and the separating empty line are not part of the
  message.  Bytes before the first From_ line (not an mbox, or damage) are never listed
  and are kept, unchanged, by every rewrite.
* **Quoting.**  On read, a line that starts with one or more ``>`` followed by ``From ``
  loses one ``>``; on append, a line that starts with zero or more ``>`` and ``From ``
  gains one.  The two are exact inverses (however long the run of ``>``, however the
  line is cut across chunks), so what is appended comes back byte for byte on the wire.
  Files written by Postfix ``local`` or procmail (mboxo: only ``From `` is quoted) read
  the same way; a body line that was ``>From `` *before* such an MDA stored it comes
  back as ``From `` -- the loss is in mboxo itself.
* **Wire form**: after unquoting, :mod:`pop3d.storage.wire` (bare LF -> CRLF, final CRLF
  added).  Sizes are computed by the same code that reads, on the same bytes, so LIST
  and RETR agree to the octet.  Appended mail is stored with LF line ends (CRLF input
  becomes LF), as every mbox writer does.
* **UIDL**: the message's ``X-UIDL:`` header when it is 1-70 characters in 0x21-0x7E and
  no other message of the file carries the same one (a sender can forge the header, so a
  clash falls back for all holders: a client may fetch twice, but never skips a message);
  otherwise the BLAKE2b (128-bit, hex) of the From_ line and the message as stored.
  Neither depends on the message's offset, and the rewrite copies both byte for byte, so
  UIDLs survive other messages' deletion.  Identical messages (From_ line included, so
  delivered in the same second) get ``.2``, ``.3``... in file order.
* **Locks.**  Two kinds:

  - the *session lock* (one POP3 session per maildrop, :mod:`pop3d.storage.locking`),
    named ``.<name>.pop3d`` next to the mbox and taken through the store's
    ``SessionLocks``: by default one byte of the shared lock table
    (:mod:`pop3d.storage.lock_table`; no file is created), or with ``lock_table =
    "per-mailbox"`` ``flock`` on the file ``.<name>.pop3d`` itself.  Either belongs to an
    open file description, so two sessions conflict even in one process, and it dies
    with its holder (kill -9 included).  It is not the mbox lock: MDAs keep delivering
    while a session is open.
  - the *mbox lock*, taken briefly to scan, append and rewrite, and respected by MTAs and
    mail readers: first the dotlock ``<mbox>.lock`` (holding ``pid:host``: written to a
    temporary file of an unpredictable name, then hard-linked to the lock name, so that
    it is never seen empty; refreshed while held; one whose process on this host is dead
    is stale at once, one without a readable pid after :data:`STALE_DOTLOCK_AGE`, and a
    stale one is broken, as procmail and Dovecot do), then
    a write (or read) ``fcntl`` lock on the whole file -- an open-file-description lock
    (``F_OFD_SETLK``) where the kernel has it, which conflicts with classic ``fcntl``/
    ``lockf`` locks of other processes but is not silently dropped when another thread
    of ours closes the file.  Both are retried until :data:`LOCK_TIMEOUT`; a timeout is
    a :class:`TemporaryBackendError` (deliver exits 75, LMTP answers 451).  Dotlock
    first, then open, then ``fcntl``: the order of Postfix ``local`` and procmail.
* **Sessions see a snapshot.**  :meth:`MboxStore.open` scans under the mbox lock and
  keeps its file descriptor: messages appended later lie beyond the scanned end and are
  neither listed nor touched.  Before a message is sent its From_ line is checked at its
  offset, so a file rewritten in place by another program is reported, not misread.
* **Each worker remembers the last scan of an mbox** (:class:`_ScanCache`), valid while
  the file keeps its (device, inode, size, mtime, ctime): any write changes mtime and
  ctime (``utime`` can set back only the mtime), a rewrite by rename the inode.  A
  login then takes the session lock, opens the mbox and ``fstat``-s it on the event loop
  (:meth:`MboxStore.open_now`), with no mbox lock, thread or scan: what it serves is the
  octets scanned under the lock, unchanged since.  As for Maildir's listing cache, a
  scan is remembered only when mtime and ctime are older than :data:`_RACY_SECONDS`.  A
  session that finds its mbox not as scanned drops the entry; our own UPDATE does too.
* **Commit (UPDATE) rewrites by copy and rename**, the choice of stdlib ``mailbox`` and
  mutt-style writers, over in-place compaction (qpopper, Dovecot): under the mbox lock
  the file is scanned again (so mail appended during the session is found and kept, and
  a rewrite by another program is noticed), every message whose UID was not deleted is
  copied byte for byte, with the preamble, into a temporary file in the same folder,
  which is fsynced, given the mbox's mode and owner, and renamed over the mbox (checked
  first to still be the locked inode); then the folder is fsynced.  A kill -9 or a full
  disk at any point before the rename leaves the old mbox untouched (the temporary file
  is removed now or by the next commit); after it, the new one is complete.  Nothing is
  ever lost or duplicated.  In-place compaction needs a journal and a recovery step
  that other programs know nothing about, and a crash in the middle would leave an mbox
  that procmail appends to before we could repair it.  The cost of the rename: free
  space for a copy of the kept mail, and a writer that opened the file *before* taking
  the dotlock and locks only with ``fcntl`` could append to the old inode (Postfix,
  procmail and Dovecot take the dotlock before opening, or re-check the inode).
* **Append (delivery)**: the message is first spooled (already converted to mbox form)
  into an unlinked temporary file in the mbox's folder, outside any lock; then, under the
  mbox lock, a From_ line, the spooled body and the separating empty line are appended
  (an empty line is first added if the file does not end with one), and the file fsynced.
  Any failure (disk full, file size limit, quota) truncates the file back to its
  previous length.  A writer killed with SIGKILL cannot truncate: before appending it
  writes the *append journal* ``.<name>.pop3d-append`` (the mbox's inode, its size, the
  From_ line, the message's length), and removes it once the append is fsynced; the next
  pop3d to take the mbox lock (a session's scan, a delivery, a commit) finds it and cuts
  the partial message off (:meth:`_MboxLock._recover_append`).  A complete append is
  never cut, and a journal that is not a regular file of ours is ignored (another user
  may create files in a shared spool).  So no partial message of ours is left, except
  after a power cut (the journal is not fsynced) or for a foreign MDA's crash.
* **Quota** is counted in wire octets like the Maildir store's
  (:mod:`pop3d.storage.quota`); checking it costs a scan of the mbox under the lock.
* **Blocking I/O** (scans, copies, fsyncs, lock waits) runs in the default executor,
  each locked step as one call that takes and releases its locks, so a cancelled caller
  never leaves a lock behind.  Message reads on the event loop are
  ``preadv(RWF_NOWAIT)``: what the page cache does not hold is read in a thread.  A
  small message is read whole (:meth:`MboxMaildrop.read_inline`) and a QUIT without
  deletions answered (``commit_now``) on the loop.
* **No link is followed** below the template's mail root
  (:mod:`pop3d.storage.beneath`): the mbox's folder is opened with
  ``openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)``, and the mbox, its dotlock, the
  rewrite's temporary file and the delivery spool are opened, checked, renamed and
  unlinked relative to that folder, ``O_NOFOLLOW | O_NONBLOCK``, regular files only.
  A symbolic link (or FIFO, device...) as the mbox, or in its folder's path, refuses
  the login with ``[SYS/PERM]`` and a delivery with a temporary failure; one at the
  dotlock's name is an unbreakable foreign lock (a timeout), never followed.  Files
  pop3d creates get ``O_EXCL``; the temporary ones a random name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import secrets
import socket
import stat as st
import threading
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pop3d.errors import (
    LocalProtocolError,
    MessageVanished,
    PermanentBackendError,
    QuotaExceeded,
    TemporaryBackendError,
    WouldWait,
)
from pop3d.protocol import limits
from pop3d.protocol.values import MessageInfo, Principal
from pop3d.storage import lock_table
from pop3d.storage.base import MailboxStats
from pop3d.storage.beneath import DIR_FLAGS, MailRoot, is_link_refusal
from pop3d.storage.blocking import (
    in_thread,
    nowait_reads,
    pread_nowait,
    preadv_nowait,
    write_all,
)
from pop3d.storage.locking import SessionLock, SessionLocks, take_lock
from pop3d.storage.quota import quota_for
from pop3d.storage.templated import TemplatedStore
from pop3d.storage.wire import CrlfNormaliser, WireCounter, hold_cr, to_wire

__all__ = ["MboxMaildrop", "MboxStore"]

log = logging.getLogger(__name__)

#: Seconds to wait for the mbox lock (dotlock and ``fcntl``) before a temporary failure.
#: Postfix ``local`` retries for 20 s (deliver_lock_attempts x deliver_lock_delay);
#: an LMTP client waits minutes for the DATA reply, a POP3 client for QUIT less.
LOCK_TIMEOUT = 30.0

#: Age (seconds since last change) after which someone else's dotlock is stale: Postfix's
#: ``stale_lock_time`` is 500, procmail's ``LOCKTIMEOUT`` 1024, Dovecot's 120 (it
#: refreshes its own).  We refresh ours every :data:`DOTLOCK_REFRESH` seconds.
STALE_DOTLOCK_AGE = 300.0

#: How often a held dotlock's mtime is renewed during a long scan or copy.
DOTLOCK_REFRESH = 30.0

#: Pause between two attempts to take a busy lock.
LOCK_RETRY = 0.05

#: Octets read per system call while scanning or copying an mbox.
SCAN_CHUNK = 1 << 20

#: Longest From_ line recognised (Postfix writes sender addresses of up to ~1000 octets).
MAX_FROM_LINE = 4096

#: Header octets searched for X-UIDL (and Return-Path when appending).
MAX_HEADER_HASH = 64 * 1024

#: mboxes whose last scan a process remembers (see :class:`_ScanCache`)...
_SCAN_CACHE = 10_000
#: ...and the messages they may list in total (an mbox with more is not remembered).
_SCAN_CACHE_MESSAGES = 200_000
#: An mbox changed this recently is not remembered: the racy rule of the Maildir listing
#: cache and size index (storage/maildir.py), for file systems whose timestamps are coarse.
_RACY_SECONDS = 2
#: Messages up to this many octets in the file (From_ line included) may be answered whole
#: by :meth:`MboxMaildrop.read_inline` (one read from the page cache, on the loop).
_INLINE_READ_BYTES = 64 * 1024

_SEPARATOR = b"\nFrom "
#: What makes a From_ line a separator (beside the empty line before it): a time.
_FROM_LINE = re.compile(rb"From [^\n]*[0-9]:[0-9][0-9]")
_FROM_DATE = re.compile(
    rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) +(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    rb" +([0-9]{1,2}) +([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?(?: +[A-Za-z+-][A-Za-z0-9]*)?"
    rb" +([0-9]{4})"
)
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
           b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")  # fmt: skip
_X_UIDL = re.compile(rb"(?im)^X-UIDL:[ \t]*([\x21-\x7e]{1,%d})[ \t]*\r?$" % limits.MAX_UIDL)
_RETURN_PATH = re.compile(rb"(?im)^Return-Path:[ \t]*<([^<>\s]*)>")
_LONE_CRLF = re.compile(rb"(?<!\r)\r\n")
_HEADER_END = re.compile(rb"\n\r?\n")
_FROM = b"From "


# ----------------------------------------------------------------------------- quoting

#: The lines to requote, each with the line end before it (see :class:`_Requoter`).
_UNQUOTE_LINES = re.compile(rb"\n>(>*From )")
_QUOTE_LINES = re.compile(rb"\n(>*From )")
#: The same over a whole message (rarely run: only on one that holds ``>From``).
_UNQUOTE_WHOLE = re.compile(rb"(?m)^>(>*From )")


def _holds_quoted_from(data: bytes) -> bool:
    """Whether ``data`` holds ``>From `` (what every line to unquote holds).

    Each ``>`` is found with ``memchr`` and looked behind: mail has few (addresses in
    headers, quoted replies), base64 none, and this costs a fraction of ``in``, whose
    search for a six-octet needle steps through text octet by octet (2 ns an octet here).
    After a few ``>``, a dense run of them goes to ``bytes.find``.
    """
    find = data.find
    at = find(b">")
    for _ in range(16):
        if at < 0:
            return False
        if data.startswith(_FROM, at + 1):
            return True
        at = find(b">", at + 1)
    return at >= 0 and find(b">From ", at) >= 0


def _unquote_whole(data: bytes) -> bytes:
    """A whole message as stored, with one ``>`` taken off each ``>+From `` line."""
    if not _holds_quoted_from(data):
        return data
    return _UNQUOTE_WHOLE.sub(rb"\1", data)


class _Requoter:
    """Adds (``unquote=False``) or removes one ``>`` on lines matching ``>*From ``.

    Removing applies to ``>+From `` only, so the two directions are exact inverses.
    A chunk in which no line changes is returned as it is, the same object, after a few
    C-level searches (:meth:`_untouched`): most chunks of most messages cost no copy.
    Otherwise complete lines are rewritten with one regular expression per chunk,
    anchored on the line end before each line (a literal the regex engine searches fast,
    unlike a multi-line ``^``); only the head of a line cut by a chunk boundary goes
    through the small state machine below, whose state is two integers (however many
    ``>`` the line starts with).
    """

    __slots__ = ("_bol", "_gts", "_leads", "_matched", "_pattern", "_repl", "_unquote")

    def __init__(self, *, unquote: bool) -> None:
        self._unquote = unquote
        self._pattern = _UNQUOTE_LINES if unquote else _QUOTE_LINES
        self._repl = rb"\n\1" if unquote else rb"\n>\1"
        # A line starting with none of these is never changed; one to change holds
        # ">From " (unquoting) or "From " (quoting).
        self._leads: tuple[bytes, ...] = (b">",) if unquote else (b">", b"F")
        self._bol = True  # the next byte starts a line
        self._gts = -1  # >= 0: in an undecided line head: '>' seen so far...
        self._matched = 0  # ...then this many octets of "From "

    def _head(self, is_from: bool) -> bytes:
        gts, matched = self._gts, self._matched
        self._gts, self._matched = -1, 0
        if not is_from:
            return b">" * gts + _FROM[:matched]
        if self._unquote:
            return b">" * max(gts - 1, 0) + _FROM
        return b">" * (gts + 1) + _FROM

    def _untouched(self, data: bytes) -> bool:
        """Whether no line of ``data`` changes: none is ``>*From ``, whole or cut off.

        Three C-level searches: the first line (if it starts here) and the last (if the
        chunk cuts it) must not start with a lead, and no line in between may hold the
        needle (a line to change holds it; base64 has no ``>`` at all).
        """
        if self._gts >= 0 or (self._bol and data[:1] in self._leads):
            return False
        if _holds_quoted_from(data) if self._unquote else _FROM in data:
            return False
        last = data.rfind(b"\n")
        return last < 0 or data[last + 1 : last + 2] not in self._leads

    def feed(self, data: bytes) -> bytes:
        """Return ``data`` requoted, given everything fed before.

        ``data`` itself is returned when nothing in it changes (a ``bytearray`` too).
        """
        if self._untouched(data):
            if data:
                self._bol = data[-1] == 0x0A  # '\n'
            return data
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            if self._bol or self._gts >= 0:
                self._bol = False
                self._gts = max(self._gts, 0)
                while i < n and self._matched == 0 and data[i] == 0x3E:  # '>'
                    self._gts += 1
                    i += 1
                while i < n and self._matched < 5 and data[i] == _FROM[self._matched]:
                    self._matched += 1
                    i += 1
                if self._matched == 5:
                    out.append(self._head(is_from=True))
                elif i == n:
                    break  # still undecided: wait for more
                else:
                    out.append(self._head(is_from=False))
            first = data.find(b"\n", i)
            if first < 0:
                out.append(data[i:])
                break
            last = data.rfind(b"\n")
            if last > first:
                # The lines between: each led by the "\n" before it, which the pattern
                # starts with.
                out.append(data[i:first])
                out.append(self._pattern.sub(self._repl, data[first : last + 1]))
            else:
                out.append(data[i : first + 1])
            i = last + 1
            self._bol = True
        return b"".join(out)

    def finish(self) -> bytes:
        """Return what an undecided line head held back."""
        if self._gts >= 0:
            return self._head(is_from=False)
        return b""


class _MboxWriter:
    """Turns a message (CRLF or LF, any chunking) into mboxrd body form (LF, quoted).

    A CRLF becomes LF unless a CR precedes it (CR CR LF stays: as LF it would read
    back one CR short), and a message that ends in a CR without LF gets CRLF rather than
    LF; so the wire form of what is stored is exactly the wire form of what came in.
    """

    __slots__ = ("_held_cr", "_last", "_quote", "size", "wire")

    def __init__(self) -> None:
        self._quote = _Requoter(unquote=False)
        self._held_cr = False
        self._last = b""  # last octet converted (before quoting, which never ends a line)
        #: Octets of mbox form produced so far.
        self.size = 0
        #: Wire size of the message (fed by the caller with the original chunks).
        self.wire = WireCounter()

    def _to_lf(self, data: bytes) -> bytes:
        data, self._held_cr = hold_cr(data, self._held_cr)
        if self._last == b"\r" and data.startswith(b"\r\n"):
            out = b"\r\n" + _LONE_CRLF.sub(b"\n", data[2:])
        else:
            out = _LONE_CRLF.sub(b"\n", data)
        if out:
            self._last = out[-1:]
        return out

    def feed(self, data: bytes) -> bytes:
        """Return the mbox form of the next chunk."""
        return self._emit(self._quote.feed(self._to_lf(data)))

    def finish(self) -> bytes:
        """Return the held-back tail and a final line end if the message lacks one."""
        tail = b""
        if self._held_cr:
            self._held_cr = False
            tail = b"\r"
            self._last = b"\r"
        if self.size + len(tail) and self._last != b"\n":
            tail += b"\r\n" if self._last == b"\r" else b"\n"
        return self._emit(self._quote.feed(tail) + self._quote.finish())

    def _emit(self, out: bytes) -> bytes:
        self.size += len(out)
        return out


# ----------------------------------------------------------------------------- scanning


@dataclass(slots=True)
class _Message:
    """Where one message lies in the file, and what the session knows of it."""

    start: int  #: offset of the From_ line
    body: int  #: offset of the first octet of the message
    end: int  #: offset after its last octet (the separating empty line excluded)
    stop: int  #: offset of the next From_ line (or of the end of the file)
    from_line: bytes
    size: int  #: wire size
    digest: str
    xuidl: str | None
    date: float | None
    uid: str = ""


class _Builder:
    """Collects one message's size, header block and identity while it is scanned."""

    __slots__ = (
        "body",
        "counter",
        "digest",
        "from_line",
        "header",
        "header_done",
        "requote",
        "start",
    )

    def __init__(self, start: int, from_line: bytes, body: int) -> None:
        self.start = start
        self.from_line = from_line
        self.body = body
        self.requote = _Requoter(unquote=True)
        self.counter = WireCounter()
        self.header = bytearray()
        self.header_done = False
        self.digest = hashlib.blake2b(from_line, digest_size=16)

    def feed(self, data: bytes) -> None:
        if not self.header_done:
            self.header += data[: MAX_HEADER_HASH + 2 - len(self.header)]
            self.header_done = (
                len(self.header) > MAX_HEADER_HASH
                or self.header.startswith((b"\n", b"\r\n"))
                or _HEADER_END.search(self.header) is not None
            )
        self.digest.update(data)
        self.counter.feed(self.requote.feed(data))

    def finish(self, end: int, stop: int) -> _Message:
        self.counter.feed(self.requote.finish())
        header = bytes(self.header)
        found = _HEADER_END.search(header)
        if header.startswith((b"\n", b"\r\n")):
            header = b""
        elif found is not None:
            header = header[: found.start() + 1]
        header = header[:MAX_HEADER_HASH]
        size = self.counter.wire_size
        xuidl = _X_UIDL.search(header)
        return _Message(
            start=self.start,
            body=self.body,
            end=end,
            stop=stop,
            from_line=self.from_line,
            size=size,
            digest=self.digest.hexdigest(),
            xuidl=xuidl.group(1).decode("ascii") if xuidl else None,
            date=_from_date(self.from_line),
        )


def _from_date(from_line: bytes) -> float | None:
    """The delivery time an asctime date in a From_ line says (local time), if any."""
    m = _FROM_DATE.search(from_line)
    if m is None:
        return None
    mon, day, hour, minute, sec, year = m.groups()
    try:
        fields = (int(year), _MONTHS.index(mon) + 1, int(day), int(hour), int(minute))
        return time.mktime((*fields, int(sec or 0), 0, 0, -1))
    except (OverflowError, ValueError):
        return None


@dataclass(slots=True)
class _Scan:
    """An mbox as found by :func:`_scan`."""

    preamble: int  #: octets before the first From_ line
    messages: list[_Message]
    size: int  #: octets scanned


class _Scanner:
    """Finds the messages of an mbox in one pass of bounded reads (see the module head)."""

    def __init__(self, fd: int, limit: int, tick: Callable[[], None] | None) -> None:
        self.fd = fd
        self.limit = limit
        self.tick = tick
        self.buf = b""
        self.off = 0  # file offset of buf[0]
        self.ctx = b"\n\n"  # the two octets before buf[0]
        self.eof = False
        self.cur: _Builder | None = None
        self.preamble: int | None = None
        self.messages: list[_Message] = []

    def fill(self) -> None:
        pos = self.off + len(self.buf)
        want = min(SCAN_CHUNK, self.limit - pos)
        chunk = os.pread(self.fd, want, pos) if want > 0 else b""
        if not chunk:
            self.eof = True
            return
        self.buf += chunk
        if self.tick is not None:
            self.tick()

    def advance(self, n: int, *, feed: bool = True) -> None:
        if n <= 0:
            return
        data = self.buf[:n]
        if feed and self.cur is not None:
            self.cur.feed(data)
        self.ctx = (self.ctx + data[-2:])[-2:]
        self.buf = self.buf[n:]
        self.off += n

    def blank_before(self, j: int) -> int:
        """Length of the empty line that ends at buf[j] (an LF), or 0 if it is not empty."""
        before = self.buf[max(0, j - 2) : j]
        if len(before) < 2:
            before = (self.ctx + before)[-2:]
        if before.endswith(b"\n"):
            return 1
        if before == b"\n\r":
            return 2
        return 0

    def separator(self, p: int, blank: int, eol: int) -> None:
        """A From_ line at buf[p:eol+1], after an empty line of ``blank`` octets."""
        self.advance(p - blank)
        end = self.off
        self.advance(blank, feed=False)
        self.close_current(end)
        start = self.off
        from_line = self.buf[: eol - p + 1]
        self.advance(len(from_line), feed=False)
        self.cur = _Builder(start, from_line, self.off)

    def close_current(self, end: int) -> None:
        if self.cur is None:
            if self.preamble is None:
                self.preamble = self.off
        else:
            self.messages.append(self.cur.finish(end, self.off))
        self.cur = None

    def run(self) -> _Scan:
        self.fill()
        while not self.eof and len(self.buf) < MAX_FROM_LINE:
            self.fill()
        if self.buf.startswith(_FROM):
            eol = self.buf.find(b"\n", 0, MAX_FROM_LINE)
            if eol >= 0 and _FROM_LINE.match(self.buf, 0, eol + 1):
                self.separator(0, 0, eol)
        search = 0
        while True:
            j = self.buf.find(_SEPARATOR, search)
            if j < 0:
                if self.eof:
                    break
                keep = min(len(self.buf), len(_SEPARATOR) + 1)
                self.advance(len(self.buf) - keep)
                search = 0
                self.fill()
                continue
            p = j + 1
            eol = self.buf.find(b"\n", p, p + MAX_FROM_LINE)
            if eol < 0 and not self.eof and len(self.buf) < p + MAX_FROM_LINE:
                self.fill()
                continue
            blank = self.blank_before(j)
            if blank and eol >= 0 and _FROM_LINE.match(self.buf, p, eol + 1):
                self.separator(p, blank, eol)
                search = 0
            else:
                search = p
        # The end: one final empty line belongs to the format, not to the last message.
        tail = (self.ctx + self.buf)[-3:]
        strip = 1 if tail.endswith(b"\n\n") else 2 if tail.endswith(b"\n\r\n") else 0
        strip = min(strip, len(self.buf)) if self.cur is not None else 0
        self.advance(len(self.buf) - strip)
        end = self.off
        self.advance(strip, feed=False)
        self.close_current(end)
        preamble = self.preamble if self.preamble is not None else self.off
        return _Scan(preamble, self.messages, self.off)


def _assign_uids(messages: Sequence[_Message]) -> None:
    """Give each message its UIDL (see the module head), unique within the file."""
    xuidls = Counter(m.xuidl for m in messages if m.xuidl)
    seen: Counter[str] = Counter()
    for m in messages:
        uid = m.xuidl if m.xuidl and xuidls[m.xuidl] == 1 else m.digest
        seen[uid] += 1
        if seen[uid] > 1:
            uid = f"{m.digest}.{seen[uid]}"
        m.uid = uid


def _scan(fd: int, limit: int | None = None, tick: Callable[[], None] | None = None) -> _Scan:
    """Scan the mbox open at ``fd`` (its first ``limit`` octets)."""
    if limit is None:
        limit = os.fstat(fd).st_size
    scan = _Scanner(fd, limit, tick).run()
    _assign_uids(scan.messages)
    return scan


class _Snapshot:
    """The messages one scan found, as sessions use them; shared, and never changed."""

    __slots__ = ("by_uid", "infos", "messages")

    def __init__(self, messages: list[_Message]) -> None:
        #: In file order.
        self.messages = messages
        #: Each message by its UID.
        self.by_uid = {m.uid: m for m in messages}
        #: What a session lists.
        self.infos = tuple(MessageInfo(m.uid, m.size) for m in messages)


#: What identifies one state of an mbox: device, inode, size, mtime and ctime (ns).
_FileKey = tuple[int, int, int, int, int]


def _file_key(s: os.stat_result) -> _FileKey:
    return s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns


class _ScanCache:
    """The last scan of each mbox in this process, valid while the file stays the same.

    Any write to the file (an append, an in-place rewrite, even one of the same size)
    changes its mtime and ctime, and a rewrite by rename (ours at UPDATE, mutt's) its
    inode; ``utime`` can set an mtime back, never a ctime.  So an unchanged (device,
    inode, size, mtime, ctime) means unchanged octets, and a login opens the mbox, checks
    that with one ``fstat`` and skips the mbox lock and the scan.  As for the Maildir
    listing cache, a scan is remembered only when the file's mtime and ctime are older than
    :data:`_RACY_SECONDS` when its ``fstat`` is taken (under the mbox lock, before the
    scan): a write within the file system's timestamp granularity of it could otherwise
    leave both unchanged.  What a stale entry could still cost is bounded by the checks
    every session keeps: a message is sent only if its From_ line is at its offset and its
    octets add up to its listed size, and UPDATE never uses the cache: it scans again
    under the lock and deletes by UIDL, as when a file changes during a session.
    """

    def __init__(self) -> None:
        self._known: dict[Path, tuple[_FileKey, _Snapshot]] = {}
        self._messages = 0
        self._guard = threading.Lock()  # remember() runs in executor threads

    def knows(self, path: Path) -> bool:
        """Whether a scan of ``path`` is remembered (cheap: no system call)."""
        return path in self._known

    def recall(self, path: Path, s: os.stat_result) -> _Snapshot | None:
        """The remembered scan of ``path`` if ``s`` (its ``fstat`` now) is of the same file."""
        known = self._known.get(path)
        if known is None or known[0] != _file_key(s):
            return None
        return known[1]

    def remember(self, path: Path, s: os.stat_result, snapshot: _Snapshot, now_ns: int) -> None:
        """Remember ``snapshot``, the scan of ``path`` in the state ``s``, if it is not racy.

        ``now_ns`` is the time just before ``s`` was taken.
        """
        racy_after = now_ns - _RACY_SECONDS * 1_000_000_000
        count = len(snapshot.messages)
        with self._guard:
            self._drop(path)
            if max(s.st_mtime_ns, s.st_ctime_ns) >= racy_after or count > _SCAN_CACHE_MESSAGES:
                return
            if len(self._known) >= _SCAN_CACHE or self._messages + count > _SCAN_CACHE_MESSAGES:
                self._known.clear()
                self._messages = 0
            self._known[path] = (_file_key(s), snapshot)
            self._messages += count

    def forget(self, path: Path) -> None:
        """Drop what is remembered of ``path`` (changed by us, or found wrong)."""
        with self._guard:
            self._drop(path)

    def _drop(self, path: Path) -> None:
        known = self._known.pop(path, None)
        if known is not None:
            self._messages -= len(known[1].messages)


# ----------------------------------------------------------------------------- locking

_process_locks: dict[str, threading.Lock] = {}
_process_locks_guard = threading.Lock()


def _process_lock(path: Path) -> threading.Lock:
    """The lock that serialises this process's own threads on one mbox."""
    key = os.path.abspath(path)  # noqa: PTH100 (no symlink resolution wanted)
    with _process_locks_guard:
        return _process_locks.setdefault(key, threading.Lock())


def _host() -> str:
    return socket.gethostname() or "localhost"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, not ours to signal
    return True


_OPEN_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: What ``link()`` fails with where a file system has no hard links.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS})


@dataclass(frozen=True, slots=True)
class _Place:
    """Where an mbox is: the file ``name`` in the folder ``folder`` below the mail root."""

    root: MailRoot
    folder: str  #: relative to the root; "" for the root itself
    name: str
    path: Path  #: the full path, for messages and names only

    def open_folder(self) -> int:
        """Open the mbox's folder, following no link below the root.

        Raises:
            OSError: as :func:`pop3d.storage.beneath.open_beneath`.

        """
        if not self.folder:
            return os.dup(self.root.fd())
        return self.root.open(self.folder, DIR_FLAGS)

    def make_folder(self) -> int:
        """:meth:`open_folder`, creating the root and the folders below it (mode 0700).

        Raises:
            OSError: as :meth:`open_folder`, or a folder cannot be created.

        """
        fd = os.dup(self.root.fd(create=True))
        try:
            for part in filter(None, self.folder.split("/")):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd


def _lstat(name: str, dir_fd: int) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def _dotlock_stale(name: str, dir_fd: int, stale_age: float) -> os.stat_result | None:
    """Return the stat of a stale dotlock (to break it), ``None`` if it is alive or gone.

    A dotlock that is not a regular file (a planted link or FIFO) is never stale: it is
    not read, never broken, and the lock times out.
    """
    try:
        s = _lstat(name, dir_fd)
        if not st.S_ISREG(s.st_mode):
            return None
        if time.time() - s.st_mtime > stale_age:
            return s
        fd = os.open(name, os.O_RDONLY | _OPEN_FILE, dir_fd=dir_fd)
        try:
            if not st.S_ISREG(os.fstat(fd).st_mode):
                return None
            text = os.read(fd, 256).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None
    except OSError:
        return None
    pid, _, host = text.partition(":")
    if pid.isdigit() and host == _host() and not _pid_alive(int(pid)):
        return s
    return None


class _MboxLock:
    """The dotlock plus the ``fcntl`` lock of one mbox, held by one thread for one step."""

    def __init__(
        self, place: _Place, *, exclusive: bool, timeout: float, stale_age: float
    ) -> None:
        self.place = place
        self.path = place.path
        self.name = place.name
        self.exclusive = exclusive
        self.timeout = timeout
        self.stale_age = stale_age
        self.dotlock = place.name + ".lock"
        #: The mbox's folder while the lock is held (every name is looked up in it).
        self.dir_fd = -1
        #: Whether :meth:`acquire` created the mbox.
        self.created = False
        self.fd = -1
        self._dot_ino: int | None = None
        self._plock = _process_lock(place.path)
        self._plocked = False
        self._refreshed = 0.0

    def acquire(self, *, create: bool, mode: int = 0o600) -> bool:
        """Lock the mbox and open it (read-write if exclusive).  False: there is no mbox.

        Raises:
            TemporaryBackendError: a lock was not obtained in time, or an I/O error.

        """
        deadline = time.monotonic() + self.timeout
        if not self._plock.acquire(timeout=self.timeout):
            raise TemporaryBackendError("timed out waiting for the mbox lock")
        self._plocked = True
        try:
            self.dir_fd = self.place.make_folder() if create else self.place.open_folder()
            if not create:
                try:
                    _lstat(self.name, self.dir_fd)
                except FileNotFoundError:
                    self.release()
                    return False
            self._take_dotlock(deadline)
            self._recover_append(deadline)
            while True:
                flags = (os.O_RDWR if self.exclusive else os.O_RDONLY) | _OPEN_FILE
                try:
                    fd = os.open(self.name, flags, dir_fd=self.dir_fd)
                except FileNotFoundError:
                    if not create:
                        self.release()
                        return False
                    try:
                        fd = os.open(self.name, flags | os.O_CREAT | os.O_EXCL, mode,
                                     dir_fd=self.dir_fd)
                    except FileExistsError:
                        continue  # created by another meanwhile: open that one
                    self.created = True
                self.fd = fd
                _check_regular(fd)
                self._take_fcntl(deadline)
                try:
                    same = _lstat(self.name, self.dir_fd).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    return True
                # Replaced (renamed over) while we waited: lock the new one.
                os.close(fd)
                self.fd = -1
        except OSError as exc:
            self.release()
            if is_link_refusal(exc):
                raise PermanentBackendError(
                    "the mbox or a folder of its path is a symbolic link"
                ) from None
            raise TemporaryBackendError(f"cannot lock the mbox: {exc.strerror}") from None
        except BaseException:
            self.release()
            raise

    def _take_dotlock(self, deadline: float) -> None:
        while True:
            ino = self._link_dotlock()
            if ino is not None:
                self._dot_ino = ino
                self._refreshed = time.monotonic()
                return
            stale = _dotlock_stale(self.dotlock, self.dir_fd, self.stale_age)
            if stale is not None:
                with contextlib.suppress(FileNotFoundError):
                    again = _lstat(self.dotlock, self.dir_fd)
                    if (again.st_ino, again.st_mtime_ns) == (stale.st_ino, stale.st_mtime_ns):
                        log.warning("%s.lock: breaking a stale dotlock", self.path)
                        os.unlink(self.dotlock, dir_fd=self.dir_fd)
                continue
            if time.monotonic() >= deadline:
                raise TemporaryBackendError("timed out waiting for the mbox dotlock") from None
            time.sleep(LOCK_RETRY)

    def _link_dotlock(self) -> int | None:
        """Try once to create the dotlock, never empty; its inode, or None if it is held.

        ``pid:host`` goes into a new file of an unpredictable name (``O_EXCL``,
        ``O_NOFOLLOW``), which is then hard-linked to the lock name: the link is atomic
        and fails if the name exists (a link included, never followed), so the lock
        appears with its content or not at all -- a holder killed at any point leaves
        either no lock or one naming its dead pid, which the next taker breaks at once.
        Where the file system has no hard links, ``O_EXCL`` on the lock name itself.
        """
        content = f"{os.getpid()}:{_host()}\n".encode()
        temp = f".{self.dotlock}.{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FILE
        fd = os.open(temp, flags, 0o644, dir_fd=self.dir_fd)
        try:
            try:
                write_all(fd, content)
                ino = os.fstat(fd).st_ino
                try:
                    os.link(temp, self.dotlock, src_dir_fd=self.dir_fd,
                            dst_dir_fd=self.dir_fd, follow_symlinks=False)  # fmt: skip
                except FileExistsError:
                    return None
                except OSError as exc:
                    if exc.errno not in _NO_HARD_LINKS:
                        raise
                    return self._create_dotlock(content)
                return ino
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=self.dir_fd)
        finally:
            os.close(fd)

    def _create_dotlock(self, content: bytes) -> int | None:
        """The dotlock by ``O_EXCL`` create, then write (no hard links here)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FILE
        try:
            fd = os.open(self.dotlock, flags, 0o644, dir_fd=self.dir_fd)
        except FileExistsError:
            return None
        try:
            write_all(fd, content)
            return os.fstat(fd).st_ino
        except BaseException:
            os.unlink(self.dotlock, dir_fd=self.dir_fd)
            raise
        finally:
            os.close(fd)

    @property
    def journal(self) -> str:
        """The name of the append journal of this mbox (see :meth:`begin_append`)."""
        return f".{self.name}.pop3d-append"

    def begin_append(self, size: int, head: bytes, length: int) -> bool:
        """Before appending ``head`` + ``length`` octets at ``size``: say so in the journal.

        A writer killed mid-append (SIGKILL: no ``except`` runs to truncate back) leaves
        a partial message; the journal lets the next taker of the lock cut it off
        (:meth:`_recover_append`).  It is not fsynced: it guards against a killed
        process, whose writes the page cache keeps, not against a power cut.  False: a
        file we may not replace is at the journal's name (the append goes on without).
        """
        record = f"{os.fstat(self.fd).st_ino} {size} {length} {head.hex()}\n".encode()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FILE
        try:
            fd = os.open(self.journal, flags, 0o600, dir_fd=self.dir_fd)
        except FileExistsError:
            log.warning("%s: %s exists and is not ours: appending without a journal",
                        self.path, self.journal)  # fmt: skip
            return False
        try:
            write_all(fd, record)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.journal, dir_fd=self.dir_fd)
            raise
        finally:
            os.close(fd)
        return True

    def end_append(self) -> None:
        """The append is durable (or truncated back): forget the journal.

        A journal that cannot be removed does no harm: a complete append is never cut.
        """
        try:
            os.unlink(self.journal, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: cannot remove %s: %s", self.path, self.journal, exc.strerror)

    def _recover_append(self, deadline: float) -> None:
        """Under the dotlock: cut off the partial message of a writer killed mid-append.

        The journal counts only if it is a regular file of ours (our uid, root's, or the
        mbox owner's: ``pop3d deliver`` run as the recipient), names the mbox's inode, and
        what lies past the size it recorded is a prefix of the append it announced (its
        From_ line, then at most the message's length): then the mbox is truncated back
        to that size under a write ``fcntl`` lock.  A complete append (its final line end
        written, fsynced or not) is never cut: it is whole, merely unacknowledged.  Any
        other journal of ours is removed unused.  If the mbox cannot be written here (a
        reader without the right), the journal stays for the next writer.
        """
        try:
            found = _lstat(self.journal, self.dir_fd)
        except FileNotFoundError:
            return
        try:
            mbox = _lstat(self.name, self.dir_fd)
        except FileNotFoundError:
            mbox = None
        if not st.S_ISREG(found.st_mode) or found.st_uid not in (
            0, os.geteuid(), mbox.st_uid if mbox is not None else os.geteuid()
        ):
            return  # not ours: left alone (begin_append then appends without one)
        fd = os.open(self.journal, os.O_RDONLY | _OPEN_FILE, dir_fd=self.dir_fd)
        try:
            text = os.read(fd, 4096).decode("ascii", "replace").split()
        finally:
            os.close(fd)
        if mbox is not None and len(text) == 4 and all(t.isdigit() for t in text[:3]):
            try:
                self._cut_back(int(text[0]), int(text[1]), int(text[2]), text[3], deadline)
            except OSError as exc:
                log.warning("%s: cannot cut off a delivery killed mid-append: %s",
                            self.path, exc.strerror)  # fmt: skip
                return
        self.end_append()

    def _cut_back(self, ino: int, size: int, length: int, head_hex: str, deadline: float) -> None:
        try:
            head = bytes.fromhex(head_hex)
        except ValueError:
            return
        fd = os.open(self.name, os.O_RDWR | _OPEN_FILE, dir_fd=self.dir_fd)
        self.fd, saved = fd, self.exclusive
        self.exclusive = True
        try:
            self._take_fcntl(deadline)
            now = os.fstat(fd)
            past = now.st_size - size
            if now.st_ino != ino or not 0 < past < len(head) + length + 1:
                return
            if os.pread(fd, min(past, len(head)), size) != head[:past]:
                return
            os.ftruncate(fd, size)
            os.fsync(fd)
            log.warning("%s: cut off %d octets of a delivery killed mid-append", self.path, past)
        finally:
            self.fd, self.exclusive = -1, saved
            os.close(fd)  # drops the fcntl lock

    def _take_fcntl(self, deadline: float) -> None:
        kind = fcntl.F_WRLCK if self.exclusive else fcntl.F_RDLCK
        while True:
            try:
                if lock_table.AVAILABLE:
                    # OFD: owned by this descriptor, so threads of one process exclude
                    # each other too; MDAs' POSIX locks conflict with it as usual.
                    lock_table.ofd_setlk(self.fd, kind, 0, 0)
                else:  # POSIX locks (per process), where OFD locks cannot be packed
                    op = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
                    fcntl.lockf(self.fd, op | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise TemporaryBackendError("timed out waiting for the mbox lock") from None
                time.sleep(LOCK_RETRY)
                continue
            return

    def refresh(self) -> None:
        """Renew the dotlock's mtime if it is due, so nobody takes it for stale."""
        now = time.monotonic()
        if self._dot_ino is not None and now - self._refreshed >= DOTLOCK_REFRESH:
            self._refreshed = now
            with contextlib.suppress(OSError):
                os.utime(self.dotlock, dir_fd=self.dir_fd, follow_symlinks=False)

    def release(self) -> None:
        """Release whatever is held (safe to call twice)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # drops the fcntl lock
        if self._dot_ino is not None:
            ino, self._dot_ino = self._dot_ino, None
            with contextlib.suppress(OSError):
                # Still ours, not broken and retaken?
                if _lstat(self.dotlock, self.dir_fd).st_ino == ino:
                    os.unlink(self.dotlock, dir_fd=self.dir_fd)
        if self.dir_fd >= 0:
            dir_fd, self.dir_fd = self.dir_fd, -1
            os.close(dir_fd)
        if self._plocked:
            self._plocked = False
            self._plock.release()


def _check_exists(place: _Place) -> None:
    """Check that the mbox exists and is a regular file (no link followed on the way).

    Raises:
        TemporaryBackendError: it does not exist or cannot be examined.
        PermanentBackendError: it, or a folder of its path, is a symbolic link, or it is
            not a regular file.

    """
    try:
        fd = place.open_folder()
        try:
            mode = _lstat(place.name, fd).st_mode
        finally:
            os.close(fd)
        if st.S_ISREG(mode):
            return
    except FileNotFoundError:
        raise TemporaryBackendError("the mbox does not exist") from None
    except OSError as exc:
        if is_link_refusal(exc):
            raise PermanentBackendError("a folder of the mbox's path is a symbolic link") from None
        raise _os_error("cannot find the mbox", exc) from None
    raise PermanentBackendError("the mbox is a symbolic link or not a regular file")


def _check_regular(fd: int) -> None:
    if not st.S_ISREG(os.fstat(fd).st_mode):
        raise TemporaryBackendError("the mbox is not a regular file")


def _reopen(lock: _MboxLock) -> int:
    """Open the locked mbox read-only again: a new open file description of its inode.

    (A ``dup`` would share the locked description and keep the ``fcntl`` lock alive.)
    """
    locked = lock.fd
    fd = os.open(lock.name, os.O_RDONLY | _OPEN_FILE, dir_fd=lock.dir_fd)
    if os.fstat(fd).st_ino != os.fstat(locked).st_ino:
        os.close(fd)
        raise TemporaryBackendError("the mbox was replaced while it was scanned")
    return fd


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    """Write all of ``data`` at ``offset``; return the offset after it."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    return offset


# ----------------------------------------------------------------------------- helpers


def _copy(
    src: int, dst: int, *, start: int, length: int, out: int, tick: Callable[[], None]
) -> None:
    """Copy ``length`` octets at ``start`` of ``src`` to offset ``out`` of ``dst``."""
    while length > 0:
        n = min(length, 16 * SCAN_CHUNK)
        try:
            done = os.copy_file_range(src, dst, n, start, out)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, min(n, SCAN_CHUNK), start)
            done = os.pwrite(dst, data, out) if data else 0
        if done <= 0:
            raise TemporaryBackendError("the mbox shrank while it was copied")
        start += done
        out += done
        length -= done
        tick()


def _from_line(sender: str | None) -> bytes:
    """``From sender asctime-date``: the envelope line an appended message starts with."""
    text = (sender or "").strip().strip("<>")
    safe = "".join(c for c in text if "!" <= c <= "~") or "MAILER-DAEMON"
    return f"From {safe} {time.asctime()}\n".encode("ascii")


def _os_error(what: str, exc: OSError) -> TemporaryBackendError:
    return TemporaryBackendError(f"{what}: {exc.strerror or exc}")


# ----------------------------------------------------------------------------- store


class MboxStore(TemplatedStore):
    """Users' mbox files found by a path template.

    A ``MailStore``, a ``Deliverer`` and a ``MailboxInspector`` (storage/base.py).

    Args:
        template: the template of a user's mbox file, e.g. ``/var/mail/%u``; it,
            ``base``, ``quota``, ``chunk_size`` and ``session_locks`` as
            :class:`TemplatedStore` takes them.
        lock_timeout: seconds to wait for the mbox lock.
        stale_dotlock_age: age after which another program's dotlock is broken.

    """

    kind = "mbox"

    def __init__(
        self,
        template: str,
        base: Path = Path(),
        *,
        quota: int | None = None,
        lock_timeout: float = LOCK_TIMEOUT,
        stale_dotlock_age: float = STALE_DOTLOCK_AGE,
        chunk_size: int = limits.READ_CHUNK,
        session_locks: SessionLocks | None = None,
    ) -> None:
        super().__init__(
            template, base, quota=quota, chunk_size=chunk_size, session_locks=session_locks
        )
        self.lock_timeout = lock_timeout
        self.stale_dotlock_age = stale_dotlock_age
        self._scans = _ScanCache()

    def path_for(self, username: str, home: str | None = None) -> Path:
        """Return the user's mbox path (``home``: the user's, for a ``%h`` template).

        Raises:
            UnsafeUserName: the name could escape the mail root.
            NoHome: the template uses ``%h`` and the user has no usable home.
            TemporaryBackendError: the name would be another mbox's dotlock.

        """
        path = super().path_for(username, home)
        if path.name.endswith(".lock"):
            # It would be another user's dotlock in a shared spool (/var/mail/bob.lock).
            raise TemporaryBackendError("an mbox name may not end in .lock")
        return path

    def _place(self, principal: Principal) -> _Place:
        """Where the user's mbox is, below the mail root (for ``%h``, the user's home).

        Raises:
            UnsafeUserName: the name could escape the mail root.
            NoHome: the template uses ``%h`` and the user has no usable home.
            TemporaryBackendError: the name would be another mbox's dotlock.

        """
        root, rel, path = self._located(principal)
        folder, _, name = rel.rpartition("/")
        return _Place(root, folder, name, path)

    def forget(self, path: Path) -> None:
        """Drop the remembered scan of the mbox ``path`` (found changed, or rewritten)."""
        self._scans.forget(path)

    def lock_for(self, place: _Place, *, exclusive: bool) -> _MboxLock:
        """The mbox lock of ``place`` with this store's timeouts (not yet taken)."""
        return _MboxLock(
            place,
            exclusive=exclusive,
            timeout=self.lock_timeout,
            stale_age=self.stale_dotlock_age,
        )

    # -------------------------------------------------------------- MailStore

    async def open(self, principal: Principal) -> MboxMaildrop:
        """Take the session lock, scan the mbox under its lock, and snapshot the listing.

        A missing mbox file is an error, never an empty mailbox (as for Maildir: a wrong
        template must not look like an empty mailbox).  Delivery creates the file, and
        an expunge of every message leaves it empty, not removed.

        Raises:
            MaildropLocked: another session (any process on this host) holds it.
            TemporaryBackendError: the mbox is missing or unreadable, its lock not
                obtained in time, or the user name is unsafe.

        """
        with contextlib.suppress(WouldWait):
            return self.open_now(principal)
        place = self._place(principal)
        _check_exists(place)
        session = self._session_lock(place)
        scans = self._scans

        def snapshot() -> MboxMaildrop:
            lock = self.lock_for(place, exclusive=False)
            preamble = 0
            try:
                if not lock.acquire(create=False):
                    raise TemporaryBackendError("the mbox does not exist")
                now = time.time_ns()
                s = os.fstat(lock.fd)
                found = scans.recall(place.path, s)
                if found is None:
                    scan = _scan(lock.fd, s.st_size, tick=lock.refresh)
                    found, preamble = _Snapshot(scan.messages), scan.preamble
                    scans.remember(place.path, s, found, now)
                fd = _reopen(lock)
            except OSError as exc:
                raise _os_error("cannot read the mbox", exc) from None
            finally:
                lock.release()
            if preamble:
                log.warning("%s: %d octets before the first From_ line", place.path, preamble)
            return MboxMaildrop(place, self, session, fd, found)

        def late(done: asyncio.Future[MboxMaildrop]) -> None:
            if done.cancelled() or done.exception() is not None:
                session.close()
            else:
                done.result().release()

        try:
            return await in_thread(snapshot, late)
        except asyncio.CancelledError:
            raise
        except BaseException:
            session.close()
            raise

    def open_now(self, principal: Principal) -> MboxMaildrop:
        """:meth:`open` without waiting, when the mbox is the one last scanned.

        The login fast path (see :class:`_ScanCache`): the session lock is taken, the
        mbox opened and ``fstat``-ed; if it is the file remembered, its scan is the
        session's listing, with no mbox lock, thread or read.  The session lock comes
        first, as in :meth:`open`, so the file checked is the one after any UPDATE
        that held it.

        Raises:
            WouldWait: the mbox must be scanned (or examined): use :meth:`open`; nothing
                is left locked.
            MaildropLocked, TemporaryBackendError: as :meth:`open`.

        """
        place = self._place(principal)
        if not self._scans.knows(place.path):
            raise WouldWait
        try:
            folder = place.open_folder()
        except OSError:
            raise WouldWait from None  # open() says what is wrong
        try:
            session = self._session_lock(place, folder)
            fd = -1
            try:
                fd = os.open(place.name, os.O_RDONLY | _OPEN_FILE, dir_fd=folder)
                s = os.fstat(fd)
            except OSError:
                found = None  # missing, a link...: open() says what is wrong
            else:
                found = self._scans.recall(place.path, s) if st.S_ISREG(s.st_mode) else None
            if found is None:
                if fd >= 0:
                    os.close(fd)
                session.close()
                raise WouldWait
            return MboxMaildrop(place, self, session, fd, found)
        finally:
            os.close(folder)

    def _session_lock(self, place: _Place, folder: int | None = None) -> SessionLock:
        """Take the session lock ``.<name>.pop3d`` in the mbox's folder.

        ``folder``: the mbox's folder, if it is open already.

        Raises:
            MaildropLocked: another session holds it.
            TemporaryBackendError: it cannot be taken.

        """
        name = place.path.with_name(f".{place.name}.pop3d")
        if folder is not None:
            return take_lock(self.session_locks, name, folder)
        try:
            folder = place.open_folder()
        except OSError as exc:
            raise _os_error("cannot lock the mbox", exc) from None
        try:
            return take_lock(self.session_locks, name, folder)
        finally:
            os.close(folder)

    # -------------------------------------------------------------- MailboxInspector

    async def stat(self, principal: Principal) -> MailboxStats:
        """Count the user's messages and wire octets (under the mbox lock, briefly).

        ``oldest`` is the date of the oldest From_ line.

        Raises:
            TemporaryBackendError: the mbox is missing or unreadable, or the name unsafe.

        """
        place = self._place(principal)
        try:
            _check_exists(place)
        except PermanentBackendError as exc:  # the inspector's contract has one error
            raise TemporaryBackendError(str(exc)) from None

        def count() -> MailboxStats:
            lock = self.lock_for(place, exclusive=False)
            try:
                if not lock.acquire(create=False):
                    raise TemporaryBackendError("the mbox does not exist")
                scan = _scan(lock.fd, tick=lock.refresh)
            except OSError as exc:
                raise _os_error("cannot read the mbox", exc) from None
            finally:
                lock.release()
            dates = [m.date for m in scan.messages if m.date is not None]
            return MailboxStats(
                count=len(scan.messages),
                size=sum(m.size for m in scan.messages),
                oldest=min(dates, default=None),
            )

        try:
            return await in_thread(count)
        except PermanentBackendError as exc:
            raise TemporaryBackendError(str(exc)) from None

    # -------------------------------------------------------------- Deliverer

    async def deliver(
        self,
        principal: Principal,
        message: AsyncIterable[bytes],
        *,
        sender: str | None = None,
    ) -> None:
        """Append one message (mboxrd), creating the folder and the mbox if needed.

        Args:
            principal: the recipient.
            message: the message, in chunks of any size, CRLF or LF line ends.
            sender: the envelope sender for the From_ line; by default the address of a
                ``Return-Path:`` header at the top of the message, else ``MAILER-DAEMON``.

        Raises:
            QuotaExceeded: the user's wire size plus this message would exceed the quota.
            TemporaryBackendError: any I/O error (ENOSPC, EFBIG, EDQUOT...), a lock
                timeout, or an unsafe user name; nothing of the message is left behind.

        """
        place = self._place(principal)
        limit = quota_for(principal.attributes, self.quota)
        spool = _Spool(place)
        try:
            writer = _MboxWriter()
            head = bytearray()
            head_done = False
            async for chunk in message:
                if not head_done:
                    head += chunk[: MAX_HEADER_HASH - len(head)]
                    head_done = len(head) >= MAX_HEADER_HASH or bool(
                        head.startswith((b"\n", b"\r\n")) or _HEADER_END.search(head)
                    )
                writer.wire.feed(chunk)
                write_all(spool.fd, writer.feed(chunk))
            write_all(spool.fd, writer.finish())
            if sender is None:
                found = _RETURN_PATH.match(bytes(head))
                sender = found.group(1).decode("ascii", "replace") if found else None
            from_line = _from_line(sender)
            wire = writer.wire.wire_size
            length = writer.size
            owner = _owner(principal)
            job = _Append(place, spool.fd, length, from_line, wire, limit, owner)
            await in_thread(lambda: self._append(job))
        except OSError as exc:
            raise _os_error("delivery failed", exc) from None
        finally:
            spool.close()

    def _append(self, job: _Append) -> None:
        """Under the mbox lock: check the quota, append, fsync; on failure truncate back."""
        path, owner, limit = job.place.path, job.owner, job.limit
        lock = self.lock_for(job.place, exclusive=True)
        try:
            lock.acquire(create=True)
        except PermanentBackendError as exc:
            # Mail is retried, never bounced, for a maildrop its owner may repair.
            raise TemporaryBackendError(f"delivery refused: {exc}") from None
        created = lock.created
        try:
            fd = lock.fd
            size = os.fstat(fd).st_size
            if created and owner is not None and os.geteuid() == 0:
                with contextlib.suppress(OSError):
                    os.fchown(fd, *owner)
            if limit is not None:
                used = sum(m.size for m in _scan(fd, size, lock.refresh).messages)
                if used + job.wire > limit:
                    raise QuotaExceeded("message exceeds the mailbox quota")
            lead = _append_lead(os.pread(fd, 3, max(0, size - 3)))
            journal = lock.begin_append(size, lead + job.from_line, job.length)
            try:
                out = _pwrite_all(fd, lead + job.from_line, size)
                _copy(job.spool, fd, start=0, length=job.length, out=out, tick=lock.refresh)
                _pwrite_all(fd, b"\n", out + job.length)
                os.fsync(fd)
            except BaseException:
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError:
                    log.exception("%s: could not truncate a failed delivery", path)
                    journal = False  # kept: the next taker of the lock cuts it off
                raise
            finally:
                if journal:
                    lock.end_append()
            if created:
                os.fsync(lock.dir_fd)
        except OSError as exc:
            raise _os_error("delivery failed", exc) from None
        finally:
            lock.release()


def _append_lead(tail: bytes) -> bytes:
    """What goes before an appended From_ line, given the file's last three octets.

    The empty line that ends the file (LF or CRLF, which the scan leaves out of the last
    message) becomes the separator as it is; a file ending a line gets the empty line;
    one ending mid-line gets the line end and the empty line.  So an append never moves
    an earlier message's end: its octets and UIDL stay, in a CRLF mbox too.
    """
    if not tail or tail.endswith((b"\n\n", b"\n\r\n")):
        return b""
    return b"\n" if tail.endswith(b"\n") else b"\n\n"


def _rewrite(lock: _MboxLock, deleted: frozenset[str]) -> None:
    """Remove the messages ``deleted`` by copy and rename (see the module head)."""
    if not lock.acquire(create=False):
        return  # no mbox: nothing to delete
    tmp: str | None = None
    folder, name = lock.dir_fd, lock.name
    try:
        fd = lock.fd
        prefix = f".{name}.pop3d-rewrite."
        with os.scandir(folder) as it:
            stale = [e.name for e in it if e.name.startswith(prefix)]
        for old in stale:
            with contextlib.suppress(OSError):
                os.unlink(old, dir_fd=folder)
        scan = _scan(fd, tick=lock.refresh)
        keep = [m for m in scan.messages if m.uid not in deleted]
        if len(keep) == len(scan.messages):
            return
        runs: list[tuple[int, int]] = [(0, scan.preamble)] if scan.preamble else []
        for m in keep:
            if runs and runs[-1][0] + runs[-1][1] == m.start:
                runs[-1] = (runs[-1][0], runs[-1][1] + m.stop - m.start)
            else:
                runs.append((m.start, m.stop - m.start))
        tail = os.fstat(fd).st_size - scan.size  # cannot grow under our lock; be exact
        if tail > 0:
            runs.append((scan.size, tail))
        tmp = f"{prefix}{secrets.token_hex(8)}"
        out_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FILE, 0o600,
                         dir_fd=folder)
        try:
            out = 0
            for start, length in runs:
                _copy(fd, out_fd, start=start, length=length, out=out, tick=lock.refresh)
                out += length
            s = os.fstat(fd)
            os.fchmod(out_fd, st.S_IMODE(s.st_mode))
            with contextlib.suppress(PermissionError):
                os.fchown(out_fd, s.st_uid, s.st_gid)
            os.fsync(out_fd)
        finally:
            os.close(out_fd)
        if _lstat(name, folder).st_ino != os.fstat(fd).st_ino:
            raise TemporaryBackendError("the mbox was replaced during the rewrite")
        os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        tmp = None
        os.fsync(folder)
    except OSError as exc:
        raise _os_error("cannot rewrite the mbox", exc) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
        lock.release()


class _Spool:
    """An unlinked temporary file in the mbox's folder (created there, no link followed).

    Raises:
        TemporaryBackendError: the folder cannot be created or opened, or is a link.

    """

    def __init__(self, place: _Place) -> None:
        try:
            folder = place.make_folder()
        except OSError as exc:
            if is_link_refusal(exc):
                raise TemporaryBackendError(
                    "cannot spool the message: a folder of the mbox's path is a symbolic link"
                ) from None
            raise _os_error("cannot spool the message", exc) from None
        try:
            name = f".{place.name}.spool.{secrets.token_hex(8)}"
            #: The spool's descriptor (read-write).
            self.fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FILE, 0o600,
                              dir_fd=folder)
            os.unlink(name, dir_fd=folder)
        except OSError as exc:
            raise _os_error("cannot spool the message", exc) from None
        finally:
            os.close(folder)

    def close(self) -> None:
        """Close (and so free) the spool; idempotent."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


@dataclass(frozen=True, slots=True)
class _Append:
    """One spooled message waiting to be appended."""

    place: _Place
    spool: int  #: descriptor of the spool file (mbox form, without From_ line)
    length: int  #: octets in the spool
    from_line: bytes
    wire: int  #: wire size of the message (for the quota)
    limit: int | None  #: quota in wire octets
    owner: tuple[int, int] | None  #: uid/gid for a new mbox


def _owner(principal: Principal) -> tuple[int, int] | None:
    """The uid/gid a new mbox should belong to, from the user record's columns."""
    uid, gid = principal.attributes.get("uid", ""), principal.attributes.get("gid", "")
    if uid.isdigit() and gid.isdigit():
        return int(uid), int(gid)
    return None


# ----------------------------------------------------------------------------- maildrop


class MboxMaildrop:
    """One session's view of an mbox (a ``Maildrop``): the messages found at open."""

    def __init__(
        self,
        place: _Place,
        store: MboxStore,
        session: SessionLock,
        fd: int,
        snapshot: _Snapshot,
    ) -> None:
        self.path = place.path
        self._place = place
        self._store = store
        self._session: SessionLock | None = session
        self._fd = fd
        self._by_uid = snapshot.by_uid
        self._listing = snapshot.infos
        self._commit: asyncio.Future[None] | None = None

    def listing(self) -> Sequence[MessageInfo]:
        """Return the messages as they were at open, in file order."""
        return self._listing

    def read(self, uid: str) -> AsyncIterator[bytes]:
        """Stream message ``uid`` in its wire form; exactly its listed size in total.

        Raises:
            KeyError: ``uid`` is not in the listing.
            MessageVanished: the mbox was rewritten by another program and the message
                is no longer where it was.
            TemporaryBackendError: it cannot be read.

        """
        self._check_open()
        return _MessageStream(self, self._by_uid[uid], self._store.chunk_size)

    def read_inline(self, uid: str) -> bytes | None:
        """Return message ``uid`` whole, read now, if it is small and cached; else ``None``.

        The fast path of RETR/TOP for the common small message: one read of the message
        and its From_ line from the page cache (``preadv(RWF_NOWAIT)``) on the event loop,
        no task and no iterator; ``None`` if it is big or the read would wait for the
        disk (:meth:`read` then does it).  Same checks and errors as :meth:`read`, all
        made before anything is sent.
        """
        self._check_open()
        m = self._by_uid[uid]
        size = m.end - m.start
        if size > _INLINE_READ_BYTES or not nowait_reads():
            return None
        try:
            data = pread_nowait(self._fd, size, m.start)
        except OSError as exc:
            raise _os_error("cannot read the mbox", exc) from None
        if data is None or len(data) < size:
            return None  # not cached, or cut short: the stream reads (and reports) it
        head = len(m.from_line)
        if data[:head] != m.from_line:
            self.changed()
            raise MessageVanished("the mbox was changed by another program")
        out = to_wire(_unquote_whole(data[head:]))
        if len(out) != m.size:
            self.changed()
            raise TemporaryBackendError("the message changed since the mbox was opened")
        return out

    @property
    def fd(self) -> int:
        """The session's descriptor of the mbox (read-only); -1 once released."""
        return self._fd

    def changed(self) -> None:
        """The mbox was found not as scanned: the next session scans it again."""
        self._store.forget(self.path)

    def commit_now(self, deleted: Collection[str]) -> None:
        """:meth:`commit` without waiting: done when nothing of the listing is deleted.

        Raises:
            WouldWait: the mbox must be rewritten (copies, fsyncs: in a thread).

        """
        self._check_open()
        if any(uid in self._by_uid for uid in deleted):
            raise WouldWait

    async def commit(self, deleted: Collection[str]) -> None:
        """Remove the messages ``deleted`` (UIDs of the listing; others are ignored).

        Raises:
            TemporaryBackendError: the rewrite failed (lock timeout, disk full...); the
                mbox is then exactly as it was.

        """
        self._check_open()
        targets = frozenset(uid for uid in deleted if uid in self._by_uid)
        if not targets:
            return
        lock = self._store.lock_for(self._place, exclusive=True)
        self._commit = asyncio.get_running_loop().run_in_executor(None, _rewrite, lock, targets)
        try:
            await asyncio.shield(self._commit)
        finally:
            self.changed()  # a new file (its key differs): the old scan is of no use

    async def close(self) -> None:
        """Release the session lock (after a commit still running).  Changes nothing."""
        if self._commit is not None and not self._commit.done():
            self._commit.add_done_callback(lambda _: self.release())
            return
        self.release()

    def release(self) -> None:
        """Release the session lock synchronously (cleanup paths without a loop)."""
        session, self._session = self._session, None
        if session is not None:
            session.close()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _check_open(self) -> None:
        if self._session is None:
            raise LocalProtocolError("maildrop used after close()")


class _MessageStream:
    """The async iterator of :meth:`MboxMaildrop.read`: one message's wire form in chunks.

    The From_ line is checked at the message's offset first.  Then ``chunk_size`` octets
    at a time are read into one buffer kept for the stream, from the page cache on the
    loop (``preadv(RWF_NOWAIT)``; a thread hop costs more than such a read) or, what
    would wait for the disk, in a thread; unquoted (a chunk without ``>From`` goes through
    as it is) and CRLF-normalised into a new object, so the buffer is free for the next
    read.  The octets sent never exceed the listed size; a message that does not add up
    to it raises :class:`TemporaryBackendError` (after what was sent: the caller drops
    the connection).  A stream the peer stalls drops its buffer (``Shrinkable``).
    """

    __slots__ = ("_buffer", "_chunk", "_crlf", "_done", "_drop", "_m", "_pos", "_remaining",
                 "_unquote")  # fmt: skip

    def __init__(self, drop: MboxMaildrop, m: _Message, chunk_size: int) -> None:
        self._drop = drop
        self._m = m
        self._chunk = chunk_size
        self._pos = -1  # the From_ line is not checked yet
        self._remaining = m.size
        self._unquote = _Requoter(unquote=True)
        self._crlf = CrlfNormaliser()
        self._buffer: bytearray | None = None
        self._done = False

    def __aiter__(self) -> _MessageStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            while not self._done:
                out = await self._step()
                if out:
                    return out
        except BaseException:
            self._done = True
            self._buffer = None
            raise
        raise StopAsyncIteration

    def shrink(self) -> None:
        """Drop the read buffer (the peer stalls); the next read makes a new one."""
        self._buffer = None

    async def aclose(self) -> None:
        """Stop early (TOP, a dropped client)."""
        self._done = True
        self._buffer = None

    async def _step(self) -> bytes:
        """The next piece of the message (possibly empty); ``_done`` set at its end."""
        m = self._m
        fd = self._drop.fd  # -1 once released: reads fail (EBADF), never another file
        if self._pos < 0:
            try:
                head = pread_nowait(fd, len(m.from_line), m.start)
                if head is None:
                    head = await in_thread(lambda: os.pread(fd, len(m.from_line), m.start))
            except OSError as exc:
                raise _os_error("cannot read the mbox", exc) from None
            if head != m.from_line:
                self._drop.changed()
                raise MessageVanished("the mbox was changed by another program")
            self._pos = m.body
        pos = self._pos
        if pos >= m.end:
            self._done = True
            out = self._crlf.feed(self._unquote.finish()) + self._crlf.finish()
            if len(out) != self._remaining:
                self._mismatch()
            return out
        data = await self._read(fd, min(self._chunk, m.end - pos), pos)
        if not data:
            self._drop.changed()
            raise TemporaryBackendError("the mbox shrank while a message was sent")
        self._pos = pos + len(data)
        out = self._crlf.feed(self._unquote.feed(data))
        self._remaining -= len(out)
        if self._remaining < 0:
            self._mismatch()
        return out

    def _mismatch(self) -> None:
        self._drop.changed()
        raise TemporaryBackendError("the message changed while it was sent")

    async def _read(self, fd: int, n: int, pos: int) -> bytes:
        """Up to ``n`` octets at ``pos`` (fewer at the end of the file or of what is cached).

        A full chunk is the stream's buffer itself (a ``bytearray``): whatever is made of
        it must be a new object (the unquoter may return it; the normaliser never does).
        """
        buffer = self._buffer
        if buffer is None or len(buffer) < n:
            buffer = self._buffer = bytearray(max(n, min(self._chunk, self._m.end - pos)))
        try:
            view = memoryview(buffer)[:n] if n < len(buffer) else buffer
            got = preadv_nowait(fd, view, pos)
            if got is None:  # would wait for the disk
                return await in_thread(functools.partial(os.pread, fd, n, pos))
        except OSError as exc:
            raise _os_error("cannot read the mbox", exc) from None
        if got == len(buffer):
            return cast("bytes", buffer)
        return bytes(memoryview(buffer)[:got])

