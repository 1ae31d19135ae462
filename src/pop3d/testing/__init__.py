r"""A real pop3d for the test suites of mail-fetching code (as GreenMail and Mailpit are).

Two ways to run one, with the same mailbox helpers:

* :class:`Pop3TestServer` runs the server *in-process*, in a background thread with its own
  event loop, on ``127.0.0.1`` port 0 (the kernel picks a free port).  Fast to start, and
  what most tests want.
* :class:`Pop3ServeProcess` runs ``pop3d serve --config FILE`` as a *subprocess* with a
  config file written for it, for tests that need a real process: signals, ``kill -9``,
  its memory use, its log on stderr.

For testing a mail *client* there is more (docs/testing-clients.md):
:class:`ScriptedPop3Server` (:mod:`pop3d.testing.scripted`) adds ``deliver``, parsed
mailboxes, transcripts, TLS from a throwaway CA and faults on demand
(:mod:`pop3d.testing.faults`); the pytest plugin (:mod:`pop3d.testing.plugin`) makes it
the ``pop3_server`` fixture; :mod:`pop3d.testing.http` is ``pop3d testserver``.

Both create, under a folder you give them (pytest's ``tmp_path``), a Dovecot passwd-file
with your users and a Maildir per user, and both offer:

* ``srv.host``, ``srv.port``: where to connect;
* ``srv.add_message(user, data) -> Path``: deliver ``data`` (bytes, as stored) to the
  user's Maildir ``new/``, atomically (``tmp/`` then rename), in delivery order;
* ``srv.messages(user) -> list[bytes]``: what is in the user's Maildir *now* (``new/`` and
  ``cur/``, in delivery order): after a client's ``DELE`` + ``QUIT`` the deleted messages
  are gone from it, after any other ending they are all still there;
* ``srv.set_user(user, password)``: add or change a user while the server runs (the
  passwd-file is rewritten atomically; the server notices within about a second);
* ``srv.stop()`` (also on leaving the ``with`` block).

Passwords are stored as ``{PLAIN}password`` unless they already start with a
``{SCHEME}`` prefix (``"{SHA512-CRYPT}$6$..."``), so APOP works for the plain ones.

Configuration overrides are keyword arguments named after the config keys of
``[server]``, ``[auth]`` and ``[storage]`` (``idle_timeout=2``, ``apop=True``,
``failure_delay=0.5``, ``quota="10M"``...); whole sections (``tls``) go in ``sections``.
Defaults differ from production in one place: ``failure_delay`` is 0, so failed logins
in tests are answered at once.

Example (pytest)::

    import poplib
    from pop3d.testing import Pop3TestServer

    def test_fetch_deletes(tmp_path):
        with Pop3TestServer(tmp_path, users={"alice": "secret"}) as srv:
            srv.add_message("alice", b"Subject: hi\r\n\r\nhello\r\n")
            client = poplib.POP3(srv.host, srv.port, timeout=10)
            client.user("alice")
            client.pass_("secret")
            assert client.retr(1)[1] == [b"Subject: hi", b"", b"hello"]
            client.dele(1)
            client.quit()
            assert srv.messages("alice") == []

The subprocess variant, for a test of a clean stop::

    with Pop3ServeProcess(tmp_path, users={"alice": "secret"}) as proc:
        ...                       # talk to proc.host, proc.port
        assert proc.stop() == 0   # SIGTERM, then the exit status
        assert "secret" not in proc.log_text()
"""

from __future__ import annotations

from typing import Any

from pop3d.testing.embedded import (
    LOOPBACK,
    MAILDIR_TEMPLATE,
    Pop3ServeProcess,
    Pop3TestServer,
    free_port,
    to_toml,
    wait_for_port,
)

__all__ = [
    "LOOPBACK",
    "MAILDIR_TEMPLATE",
    "Pop3ServeProcess",
    "Pop3TestServer",
    "ScriptedPop3Server",
    "free_port",
    "to_toml",
    "wait_for_port",
]


def __getattr__(name: str) -> Any:
    """``ScriptedPop3Server``, imported when first asked for (it brings the fault wire)."""
    if name == "ScriptedPop3Server":
        from pop3d.testing.scripted import ScriptedPop3Server  # noqa: PLC0415

        return ScriptedPop3Server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

