"""The no-loss soak (issue 15 item 4): real sessions, real deliveries, SIGKILLs, one ledger.

``python -m tests.soak.run --store maildir --minutes 10 [--seed N]`` (``make soak``) and the
CI test (``tests/soak/test_soak.py``, about 10 s a store) run :func:`run_soak`:

* a ``pop3d serve`` process (POP3 and ``[lmtp] listen``, its own process group) is killed
  with SIGKILL and restarted at random moments;
* POP3 client threads (raw sockets) run sessions of five kinds: fetch and delete (RETR,
  check, DELE, QUIT), fetch and keep, DELE then RSET then QUIT, a drop in the middle of a
  RETR (TCP reset), and a drop after DELE without QUIT;
* LMTP client threads (``smtplib.LMTP``) and ``pop3d deliver`` processes (some of them
  killed with SIGKILL at a random moment) deliver messages that each carry a unique id;
* every delivery is written in the ledger, *accepted* only when LMTP answered 250 or
  ``pop3d deliver`` exited 0.

The verdict, after a last SIGKILL and restart:

* every user can log in at once (no lock left behind by any killed process);
* every message the server lists is a ledger message, byte for byte what was delivered
  (as the wire form: CRLF, LMTP's ``Return-Path``/``Delivered-To`` in front), and listed
  at most once (no duplicate, no partial delivery);
* an accepted message removed by a ``QUIT`` answered ``+OK`` after its ``DELE`` is gone
  (and was retrieved, byte-identical, before the ``DELE``); an accepted message whose
  ``DELE`` was followed by a ``QUIT`` whose answer was lost (the kill came first) may be
  there or gone -- *ambiguous* -- unless a later session saw it again, which settles it
  as not removed; every other accepted message is still there;
* a delivery that was never acknowledged (the server or ``deliver`` was killed during it)
  may be there or not, but whole;
* the UIDL of a message never changes, across sessions and restarts.

Every random choice comes from one seed (printed first): a failing run is rerun with
``--seed``.  Thread scheduling and kill timing still differ between runs, so a rerun
explores the same choices, not the same interleaving.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from pop3d.testing import free_port
from tests.integration.helpers import RawClient

#: Users of the soak (few, so that sessions meet each other's locks).
USERS: dict[str, str] = {"alice": "pw-a", "bob": "pw-b", "carol": "pw-c", "dave": "pw-d"}

HOST = "127.0.0.1"

#: Seconds any single socket operation may take before the run counts a hang.
IO_TIMEOUT = 30.0

#: Most failures kept for the report (the run goes on counting them).
MAX_FAILURES_KEPT = 50

_ID = re.compile(rb"^X-Soak-Id: (\S+)\r$", re.MULTILINE)


# ------------------------------------------------------------------------------ messages


def wire(body: bytes) -> bytes:
    """What RETR must send for ``body`` (CRLF lines already): a final CRLF added if missing."""
    return body if body.endswith(b"\r\n") else body + b"\r\n"


#: Body lines chosen to trip quoting and stuffing: mbox separators and their quoted forms,
#: lone dots and dot-led lines, empty lines.
_TRICKY = (
    b"From someone@example.com Mon Jan  1 00:00:00 2024",
    b"From here on, it is a body line",
    b">From quoted@example.com Tue Feb  2 10:10:10 2021",
    b">>From twice",
    b".",
    b"..",
    b".leading dot",
    b"",
    b"",
    b" ",
    b"X-Soak-Id is not at the start of this line",
)


def make_body(rng: random.Random, msg_id: str) -> bytes:
    """A message with a unique id header and a body of tricky and random lines."""
    head = [
        f"Message-ID: <{msg_id}@soak.invalid>".encode(),
        f"X-Soak-Id: {msg_id}".encode(),
        f"Subject: soak {msg_id}".encode(),
        b"",
    ]
    roll = rng.random()
    count = rng.randint(2000, 6000) if roll < 0.03 else rng.randint(0, 60)
    lines = []
    for _ in range(count):
        if rng.random() < 0.3:
            lines.append(rng.choice(_TRICKY))
        else:
            width = rng.randint(0, 120) if rng.random() < 0.97 else rng.randint(1000, 5000)
            lines.append(rng.randbytes(width // 2 + 1).hex()[:width].encode())
    text = b"\r\n".join(head + lines)
    # Most end with CRLF; some do not (the server adds it, and counts it).
    return text + b"\r\n" if rng.random() < 0.9 else text


# ------------------------------------------------------------------------------ ledger


@dataclasses.dataclass
class Entry:
    """One delivery attempt and what became of it."""

    msg_id: str
    user: str
    via: str
    #: The octets RETR must return.
    expected: bytes
    #: LMTP answered 250 / ``pop3d deliver`` exited 0.
    accepted: bool = False
    #: DELE'd, then QUIT answered +OK.
    removed: bool = False
    #: DELE'd, then QUIT sent but its answer lost: may be gone.
    ambiguous: bool = False
    retrieved: int = 0
    uidl: str | None = None


class Ledger:
    """Every delivery attempt, every retrieval and every removal, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[str, Entry] = {}
        self.failures: list[str] = []
        self.failure_count = 0
        self.counts: Counter[str] = Counter()
        self._ids = itertools.count(1)

    def fail(self, what: str) -> None:
        with self.lock:
            self._fail(what)

    def _fail(self, what: str) -> None:
        self.failure_count += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(what)

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def new(self, seed: int, user: str, via: str, make: Callable[[str], bytes]) -> Entry:
        """Record an attempt before it starts; ``make(id)`` gives the expected octets."""
        with self.lock:
            msg_id = f"s{seed}-{next(self._ids)}"
        entry = Entry(msg_id, user, via, make(msg_id))
        with self.lock:
            self.entries[msg_id] = entry
        return entry

    def accept(self, entry: Entry) -> None:
        with self.lock:
            entry.accepted = True

    def seen(self, user: str, data: bytes, uidl: str, size: int | None) -> str | None:
        """Check one retrieved message; return its id when it is a whole ledger message."""
        found = _ID.search(data)
        with self.lock:
            if found is None:
                self.counts["corrupt"] += 1
                self._fail(f"{user}: a message without a soak id (uidl {uidl}, {len(data)} "
                           f"octets): {data[:200]!r}")
                return None
            msg_id = found.group(1).decode("ascii", "replace")
            entry = self.entries.get(msg_id)
            if entry is None or entry.user != user:
                self.counts["corrupt"] += 1
                self._fail(f"{user}: unknown message {msg_id} (uidl {uidl})")
                return None
            if data != entry.expected:
                self.counts["corrupt"] += 1
                self._fail(f"{user}: {msg_id} ({entry.via}, accepted={entry.accepted}) is not "
                           f"byte-identical: {len(data)} octets, {len(entry.expected)} expected")
                return None
            if size is not None and size != len(data):
                self._fail(f"{user}: {msg_id}: RETR said {size} octets, sent {len(data)}")
            if entry.removed:
                self._fail(f"{user}: {msg_id} came back after a QUIT answered +OK removed it")
            if entry.uidl is None:
                entry.uidl = uidl
            elif entry.uidl != uidl:
                self._fail(f"{user}: {msg_id}: UIDL changed from {entry.uidl} to {uidl}")
            # Seen after its ambiguous QUIT: that UPDATE did not remove it (sessions of a
            # maildrop never overlap, so this listing is later than that UPDATE).
            entry.ambiguous = False
            entry.retrieved += 1
            self.counts["retrieved"] += 1
            return msg_id

    def removed(self, ids: list[str], *, confirmed: bool) -> None:
        with self.lock:
            for msg_id in ids:
                entry = self.entries[msg_id]
                if confirmed:
                    entry.removed = True
                    entry.ambiguous = False
                elif not entry.removed:
                    entry.ambiguous = True


# ------------------------------------------------------------------------------ server


class Server:
    """``pop3d serve`` in its own process group, on fixed ports, killed and restarted."""

    def __init__(self, root: Path, store: str, workers: int) -> None:
        self.root = root
        self.store = store
        self.port = free_port()
        self.lmtp_port = free_port()
        while self.lmtp_port == self.port:
            self.lmtp_port = free_port()
        self.config = root / "pop3d.toml"
        self.log = root / "pop3d.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.starts = 0
        (root / "users").write_text(
            "".join(f"{u}:{{PLAIN}}{p}\n" for u, p in USERS.items()), encoding="utf-8"
        )
        if store == "maildir":
            storage = 'maildir = "mail/%u/Maildir"'
            for u in USERS:
                for sub in ("tmp", "new", "cur"):
                    (root / "mail" / u / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
        else:
            storage = 'mbox = "mbox/%u"'
            (root / "mbox").mkdir(exist_ok=True)
            for u in USERS:
                (root / "mbox" / u).touch()
        self.config.write_text(
            "[server]\n"
            f'listen = ["{HOST}:{self.port}"]\n'
            f"workers = {workers}\n"
            "idle_timeout = 60\n"
            "[auth]\n"
            'passwd_file = "users"\n'
            "failure_delay = 0\n"
            "[storage]\n"
            f"{storage}\n"
            "[lmtp]\n"
            f'listen = ["{HOST}:{self.lmtp_port}"]\n',
            encoding="utf-8",
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until both POP3 and LMTP greet."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pop3d", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.root,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        for port, greeting in ((self.port, b"+OK"), (self.lmtp_port, b"220")):
            while not _greets(port, greeting):
                if self.process.poll() is not None:
                    raise RuntimeError(f"pop3d serve exited with {self.process.returncode}; "
                                       f"log: {self.log}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pop3d serve did not greet on {port}; log: {self.log}")
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (supervisor and workers) and reap it."""
        if self._signal(signal.SIGKILL, None):
            self.kills += 1

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL what is left after 10 s."""
        self._signal(signal.SIGTERM, 10.0)

    def _signal(self, sig: int, grace: float | None) -> bool:
        """Signal the group and reap the server (SIGKILL after ``grace`` s); False: none."""
        process, self.process = self.process, None
        if process is None:
            return False
        for s in (sig, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, s)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                continue
            return True
        return True


def _greets(port: int, greeting: bytes) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            return s.recv(64).startswith(greeting)
    except OSError:
        return False


# ------------------------------------------------------------------------------ clients


@dataclasses.dataclass
class Context:
    """What every thread of one run shares."""

    seed: int
    server: Server
    ledger: Ledger
    stop: threading.Event
    deadline: float
    max_deliveries: int
    kill_gap: tuple[float, float]

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def may_deliver(self) -> bool:
        return self.running() and len(self.ledger.entries) < self.max_deliveries


def _unstuff(raw: bytes) -> bytes:
    """The message in a raw multi-line body (stuffed, ending ``.CRLF``)."""
    lines = raw[:-3].split(b"\r\n")[:-1] if raw != b".\r\n" else []
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


class _Client(RawClient):
    """A :class:`RawClient` whose socket is closed when the greeting never comes."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        try:
            super().__init__(host, port, timeout)
        except OSError:
            if hasattr(self, "sock"):
                self.sock.close()
            raise


def _connect(ctx: Context) -> RawClient | None:
    try:
        client = _Client(HOST, ctx.server.port, timeout=IO_TIMEOUT)
    except OSError:
        time.sleep(0.05)  # the server is down (being restarted)
        return None
    if not client.greeting.startswith(b"+OK"):
        client.close()
        return None
    return client


def _cmd(client: RawClient, line: bytes) -> bytes:
    """Send a command, return its status line; the server vanishing raises (a kill)."""
    reply = client.cmd(line)
    if not reply:
        raise ConnectionResetError("the server closed the connection")
    return reply


SESSION_KINDS = ("fetch-delete", "fetch-keep", "dele-rset-quit", "drop-mid-retr",
                 "drop-after-dele")
SESSION_WEIGHTS = (3, 2, 1, 2, 2)


def pop3_session(ctx: Context, rng: random.Random) -> None:
    """One POP3 session of a random kind, against a random user."""
    user = rng.choice(list(USERS))
    kind = rng.choices(SESSION_KINDS, SESSION_WEIGHTS)[0]
    client = _connect(ctx)
    if client is None:
        ctx.ledger.count("pop3 connect refused")
        return
    ledger = ctx.ledger
    quit_sent = False
    deleted: list[str] = []
    try:
        if not _cmd(client, b"USER " + user.encode()).startswith(b"+OK"):
            ledger.fail(f"{user}: USER refused")
            return
        reply = _cmd(client, b"PASS " + USERS[user].encode())
        if not reply.startswith(b"+OK"):
            ledger.count("login in use" if b"[IN-USE]" in reply else f"login: {reply!r}")
            _cmd(client, b"QUIT")
            return
        if not _cmd(client, b"UIDL").startswith(b"+OK"):
            ledger.fail(f"{user}: UIDL refused")
            return
        listing = [line.split(b" ", 1) for line in client.multiline()]
        uidls = {int(n): uid.decode("ascii", "replace") for n, uid in listing}
        numbers = sorted(uidls)
        # A few messages a session, so that maildrops grow while the soak runs.
        pick = rng.sample(numbers, rng.randint(0, min(len(numbers), 6)))
        ledger.count(f"session {kind}")
        if kind == "drop-mid-retr" and numbers:
            client.send(b"RETR %d\r\n" % rng.choice(numbers))
            with contextlib.suppress(OSError):
                client.sock.recv(rng.randint(1, 1 << 16))
            client.abort()
            return
        if kind in ("drop-after-dele", "dele-rset-quit"):
            for n in pick:
                if not _cmd(client, b"DELE %d" % n).startswith(b"+OK"):
                    ledger.fail(f"{user}: DELE {n} refused")
            if kind == "drop-after-dele":
                (client.abort if rng.random() < 0.5 else client.close)()
                return
            if not _cmd(client, b"RSET").startswith(b"+OK"):
                ledger.fail(f"{user}: RSET refused")
            pick = []
        for n in pick:
            status = _cmd(client, b"RETR %d" % n)
            if not status.startswith(b"+OK"):
                ledger.fail(f"{user}: RETR {n}: {status!r}")
                return
            size = int(status.split()[1]) if status.split()[1:2] != [] else None
            msg_id = ledger.seen(user, _unstuff(client.raw_multiline()), uidls[n], size)
            if kind == "fetch-delete" and msg_id is not None:
                if not _cmd(client, b"DELE %d" % n).startswith(b"+OK"):
                    ledger.fail(f"{user}: DELE {n} refused")
                    return
                deleted.append(msg_id)
        quit_sent = True
        reply = client.cmd(b"QUIT")
        if reply.startswith(b"+OK"):
            ledger.removed(deleted, confirmed=True)
            ledger.count("quit ok")
        else:
            ledger.removed(deleted, confirmed=False)
            ledger.count("quit lost" if not reply else "quit -ERR")
    except (OSError, ValueError, IndexError) as exc:
        # The server went away (killed) mid-session: nothing was removed unless QUIT went.
        if quit_sent:
            ledger.removed(deleted, confirmed=False)
            ledger.count("quit lost")
        else:
            ledger.count(f"pop3 dropped ({type(exc).__name__})")
    finally:
        client.close()


def lmtp_worker(ctx: Context, rng: random.Random) -> None:
    """Deliver over LMTP, several messages a connection, one recipient each."""
    while ctx.may_deliver():
        try:
            lmtp = smtplib.LMTP(HOST, ctx.server.lmtp_port, timeout=IO_TIMEOUT)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            for _ in range(rng.randint(1, 8)):
                if not ctx.may_deliver():
                    break
                user = rng.choice(list(USERS))
                sender = rng.choice(("", "sender@example.com"))

                def expected(msg_id: str, user: str = user, sender: str = sender) -> bytes:
                    return (f"Return-Path: <{sender}>\r\nDelivered-To: {user}\r\n".encode()
                            + wire(make_body(random.Random(msg_id), msg_id)))

                entry = ctx.ledger.new(ctx.seed, user, "lmtp", expected)
                body = make_body(random.Random(entry.msg_id), entry.msg_id)
                try:
                    refused = lmtp.sendmail(sender, [user], body)
                except smtplib.SMTPResponseException as exc:
                    ctx.ledger.count(f"lmtp refused {exc.smtp_code}")
                    raise
                if refused:
                    ctx.ledger.count("lmtp refused")
                else:
                    ctx.ledger.accept(entry)
                    ctx.ledger.count("lmtp accepted")
            lmtp.quit()
        except (OSError, smtplib.SMTPException):
            ctx.ledger.count("lmtp dropped")
        finally:
            lmtp.close()


def deliver_worker(ctx: Context, rng: random.Random) -> None:
    """Run ``pop3d deliver`` processes; kill some of them at a random moment."""
    while ctx.may_deliver():
        user = rng.choice(list(USERS))
        entry = ctx.ledger.new(
            ctx.seed, user, "deliver", lambda i: wire(make_body(random.Random(i), i))
        )
        body = make_body(random.Random(entry.msg_id), entry.msg_id)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pop3d", "deliver", "--config", str(ctx.server.config), user],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ctx.server.root,
        )
        killer = None
        if rng.random() < 0.2:
            killer = threading.Timer(rng.uniform(0.05, 1.0), _kill_quietly, (proc,))
            killer.start()
        try:
            _, err = proc.communicate(body, timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ctx.ledger.fail(f"pop3d deliver hung for 120 s ({entry.msg_id})")
            continue
        finally:
            if killer is not None:
                killer.cancel()
        if proc.returncode == 0:
            ctx.ledger.accept(entry)
            ctx.ledger.count("deliver accepted")
        elif proc.returncode == -signal.SIGKILL:
            ctx.ledger.count("deliver killed")
        else:
            ctx.ledger.count(f"deliver exit {proc.returncode}")
            if proc.returncode != 75:
                ctx.ledger.fail(f"pop3d deliver exited {proc.returncode}: {err[-300:]!r}")


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        if proc.poll() is None:
            proc.kill()


def chaos(ctx: Context, rng: random.Random) -> None:
    """Kill the server with SIGKILL at random moments and start it again."""
    low, high = ctx.kill_gap
    while not ctx.stop.wait(rng.uniform(low, high)) and ctx.running():
        ctx.server.kill()
        time.sleep(rng.uniform(0, 0.3))
        try:
            ctx.server.start()
        except (RuntimeError, TimeoutError) as exc:
            ctx.ledger.fail(f"restart failed: {exc}")
            ctx.stop.set()


def _forever(
    session: Callable[[Context, random.Random], None],
) -> Callable[[Context, random.Random], None]:
    """Run ``session`` again and again (with a short random pause) while the soak runs."""

    def loop(ctx: Context, rng: random.Random) -> None:
        while ctx.running():
            session(ctx, rng)
            time.sleep(rng.uniform(0, 0.05))

    return loop


def _guarded(
    ctx: Context, body: Callable[[Context, random.Random], None], rng: random.Random
) -> Callable[[], None]:
    """Turn a crash of the test machinery into a failure of the run, never a hang."""

    def run() -> None:
        try:
            body(ctx, rng)
        except Exception as exc:
            ctx.ledger.fail(f"soak thread crashed: {type(exc).__name__}: {exc}")
            ctx.stop.set()

    return run


# ------------------------------------------------------------------------------ verdict


@dataclasses.dataclass
class Report:
    """The ledger's counts and every failure found."""

    store: str
    seed: int
    seconds: float
    counts: Counter[str]
    failures: list[str]
    failure_count: int

    @property
    def ok(self) -> bool:
        return self.failure_count == 0

    def text(self) -> str:
        c = self.counts
        sessions = ", ".join(f"{k} {c['session ' + k]}" for k in SESSION_KINDS)
        other = ", ".join(
            f"{k} {v}" for k, v in sorted(c.items())
            if k.startswith(("login: ", "lmtp refused", "deliver exit", "pop3 dropped",
                             "lmtp dropped", "quit -ERR", "pop3 connect"))
        )
        verdict = "PASS" if self.ok else f"FAIL ({self.failure_count} failures)"
        lines = [
            (f"soak {self.store}: seed {self.seed}, {self.seconds:.0f} s, {c['kills']} "
             f"SIGKILLs of pop3d serve, {c['deliver killed']} of pop3d deliver"),
            (f"  delivered (accepted): {c['delivered']}  (LMTP 250: {c['lmtp accepted']}, "
             f"deliver exit 0: {c['deliver accepted']})"),
            f"  retrieved+deleted (QUIT +OK): {c['removed']}",
            f"  remaining (in the maildrop, byte-identical): {c['remaining']}",
            (f"  ambiguous (QUIT answer lost): {c['ambiguous']}  "
             f"(still there {c['ambiguous present']}, gone {c['ambiguous gone']})"),
            (f"  unacknowledged attempts: {c['unacked']}  (whole in the maildrop "
             f"{c['unacked present']}, absent {c['unacked absent']})"),
            (f"  retrievals checked: {c['retrieved']}; sessions: {sessions}; QUIT answered "
             f"{c['quit ok']}, lost {c['quit lost']}; IN-USE refusals {c['login in use']}"),
            f"  server log: {c['server log warnings/errors']} warnings/errors",
            (f"  lost: {c['lost']}, duplicated: {c['duplicated']}, corrupt or unknown: "
             f"{c['corrupt']}, resurrected: {c['resurrected']}"),
            f"  other events: {other or 'none'}",
            f"  verdict: {verdict}",
        ]
        lines += [f"  - {f}" for f in self.failures]
        return "\n".join(lines)


def final_check(ctx: Context) -> None:
    """Log in as every user at once, read everything, and settle the ledger."""
    ledger = ctx.ledger
    present: Counter[str] = Counter()
    for user in USERS:
        try:
            refused = _read_all(ctx, user, present)
            if refused is not None:
                _empty_dotlock(ctx, user)
                ledger.fail(f"{user}: cannot log in after the final restart (a lock left "
                            f"behind?): {refused!r}")
        except (OSError, ValueError, IndexError) as exc:
            ledger.fail(f"{user}: the final session failed: {type(exc).__name__}: {exc}")
    c = ledger.counts
    for msg_id, entry in ledger.entries.items():
        n = present[msg_id]
        if n > 1:
            c["duplicated"] += 1
            ledger.fail(f"{entry.user}: {msg_id} is listed {n} times")
        if not entry.accepted:
            c["unacked"] += 1
            c["unacked present" if n else "unacked absent"] += 1
        if entry.removed:
            c["removed"] += entry.accepted
            if n:
                c["resurrected"] += 1  # seen() has already reported it
        elif not entry.accepted:
            pass
        elif entry.ambiguous:
            c["ambiguous"] += 1
            c["ambiguous present" if n else "ambiguous gone"] += 1
        elif n == 0:
            c["lost"] += 1
            ledger.fail(f"{entry.user}: {msg_id} ({entry.via}, accepted, never removed) is lost")
        if entry.accepted and n and not entry.removed:
            c["remaining"] += 1
    c["delivered"] = sum(e.accepted for e in ledger.entries.values())
    _check_log(ctx)
    if c["delivered"] != c["removed"] + c["remaining"] + c["ambiguous gone"] + c["lost"]:
        ledger.fail("the ledger does not add up")


def _empty_dotlock(ctx: Context, user: str) -> None:
    """After a refused login: say so if an empty mbox dotlock is why (a regression: pop3d
    links its dotlock into place with its pid already written, so a SIGKILL cannot leave
    one empty)."""
    if ctx.server.store != "mbox":
        return
    dotlock = ctx.server.root / "mbox" / f"{user}.lock"
    with contextlib.suppress(FileNotFoundError):
        if dotlock.stat().st_size == 0:
            ctx.ledger.fail(f"{user}: an empty dotlock was left behind")


def _check_log(ctx: Context) -> None:
    """A traceback in the server's log is a failure; warnings and errors are counted."""
    text = ctx.server.log.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("Traceback"):
            ctx.ledger.fail(f"pop3d logged a traceback (see {ctx.server.log})")
        elif " WARNING " in line or " ERROR " in line:
            ctx.ledger.count("server log warnings/errors")


def _read_all(ctx: Context, user: str, present: Counter[str]) -> bytes | None:
    """One session that reads every message (no DELE); the PASS reply if it was refused."""
    ledger = ctx.ledger
    try:
        # Longer than any lock timeout of the server, so that its answer arrives.
        client = _Client(HOST, ctx.server.port, timeout=2 * IO_TIMEOUT)
    except OSError as exc:
        ledger.fail(f"the restarted server refused a connection: {exc}")
        return None
    with client:
        client.cmd(b"USER " + user.encode())
        reply = client.cmd(b"PASS " + USERS[user].encode())
        if not reply.startswith(b"+OK"):
            return reply
        if not client.cmd(b"UIDL").startswith(b"+OK"):
            ledger.fail(f"{user}: UIDL refused after the final restart")
            return None
        for line in client.multiline():
            n, uid = line.split(b" ", 1)
            status = client.cmd(b"RETR " + n)
            if not status.startswith(b"+OK"):
                ledger.fail(f"{user}: RETR {n!r} after the final restart: {status!r}")
                continue
            data = _unstuff(client.raw_multiline())
            msg_id = ledger.seen(user, data, uid.decode(), int(status.split()[1]))
            if msg_id is not None:
                present[msg_id] += 1
        if not client.cmd(b"QUIT").startswith(b"+OK"):
            ledger.fail(f"{user}: QUIT without DELE was refused")
    return None


def run_soak(
    store: str,
    seconds: float,
    root: Path,
    *,
    seed: int | None = None,
    pop3_clients: int = 3,
    lmtp_clients: int = 2,
    deliver_clients: int = 1,
    workers: int = 2,
    kill_gap: tuple[float, float] = (1.0, 8.0),
    max_deliveries: int = 20000,
    log: Callable[[str], None] = print,
) -> Report:
    """Run the soak for ``seconds`` in the folder ``root``; return the verdict."""
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 32)
    log(f"soak {store}: seed {seed} (rerun with --seed {seed}), {seconds:.0f} s, in {root}")
    root.mkdir(parents=True, exist_ok=True)
    server = Server(root, store, workers)
    ledger = Ledger()
    started = time.monotonic()
    ctx = Context(seed, server, ledger, threading.Event(), started + seconds, max_deliveries,
                  kill_gap)

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}/{name}")

    server.start()
    def loop(body: Callable[[Context, random.Random], None], name: str) -> threading.Thread:
        return threading.Thread(target=_guarded(ctx, body, rng(name)), name=name)

    threads = [loop(chaos, "chaos")]
    threads += [loop(_forever(pop3_session), f"pop3-{i}") for i in range(pop3_clients)]
    threads += [loop(lmtp_worker, f"lmtp-{i}") for i in range(lmtp_clients)]
    threads += [loop(deliver_worker, f"deliver-{i}") for i in range(deliver_clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # The last SIGKILL (whatever the server was doing) and the restart the verdict uses.
        server.kill()
        server.start()
        final_check(ctx)
    finally:
        ctx.stop.set()
        server.stop()
    ledger.counts["kills"] = server.kills - 1  # the final one is not random
    return Report(store, seed, time.monotonic() - started, Counter(ledger.counts),
                  ledger.failures, ledger.failure_count)


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path is not None:
        yield Path(path)
        return
    import tempfile  # noqa: PLC0415 (only the CLI without --workdir needs it)

    with tempfile.TemporaryDirectory(prefix="pop3d-soak-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.soak.run``: run the soak on each store given; exit 1 on a failure."""
    parser = argparse.ArgumentParser(prog="python -m tests.soak.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", action="append", choices=("maildir", "mbox"),
                        help="store to soak (repeat for both; default both)")
    parser.add_argument("--minutes", type=float, default=10.0, help="per store (default 10)")
    parser.add_argument("--seed", type=int, help="seed of every random choice")
    parser.add_argument("--workdir", help="keep the run's files here (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=2, help="[server] workers")
    args = parser.parse_args(argv)
    ok = True
    for store in args.store or ["maildir", "mbox"]:
        with _workdir(args.workdir and str(Path(args.workdir) / store)) as root:
            report = run_soak(store, args.minutes * 60, root, seed=args.seed,
                              workers=args.workers)
            print(report.text(), flush=True)
            ok = ok and report.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
