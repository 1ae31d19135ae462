"""[server] user/group: the processes that talk to clients hold no root and no capability.

Run as root (as CI runs): ``pop3d serve`` with ``user = "nobody"``, ``group = "nogroup"``
(Debian's), certificates readable by root only, Maildirs owned by nobody.  The workers'
ids, groups and capability sets are read from /proc; POP3S, DELE+QUIT and LMTP delivery
must still work, and delivered files belong to the mail user.
"""

from __future__ import annotations

import grp
import os
import poplib
import pwd
import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pop3d import privileges
from pop3d.config import ServiceConfig
from pop3d.errors import ConfigError
from pop3d.testing import Pop3ServeProcess, free_port, wait_for_port
from tests.integration.tls_support import make_pki

from .conftest import children, is_root, wait_until

pytestmark = pytest.mark.timeout(90)


def _has(user: str, group: str) -> bool:
    try:
        pwd.getpwnam(user)
        grp.getgrnam(group)
    except KeyError:
        return False
    return True


needs_root = pytest.mark.skipif(
    not is_root() or not _has("nobody", "nogroup"),
    reason="needs root and the Debian user nobody / group nogroup",
)


def _chown_tree(folder: Path, uid: int, gid: int) -> None:
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, uid, gid)


@needs_root
def test_workers_run_as_the_user_with_no_capabilities(open_root: Path) -> None:
    """Workers: uid/gid nobody/nogroup, only nobody's groups, no capability, no_new_privs;
    the supervisor (no client) keeps root; TLS, DELE+QUIT and LMTP still work."""
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup").gr_gid
    pki = make_pki(open_root / "pki")
    pki.key_file.chmod(0o600)  # root's alone: read before the drop
    tls_port, lmtp_port = free_port(), free_port()
    proc = Pop3ServeProcess(
        open_root / "srv",
        users={"alice": "secret"},
        sections={
            "server": {"user": "nobody", "group": "nogroup", "workers": 2},
            "tls": pki.tls_section(),
            "lmtp": {"listen": [f"127.0.0.1:{lmtp_port}"]},
        },
        tls_listen=[f"127.0.0.1:{tls_port}"],
    )
    message = b"Subject: one\r\n\r\nfirst\r\n"
    proc.add_message("alice", message)
    _chown_tree(proc.root / "mail", nobody.pw_uid, nogroup)
    os.chown(proc.passwd_file, 0, nogroup)
    proc.passwd_file.chmod(0o640)
    with proc:
        workers = set()

        def dropped() -> bool:
            nonlocal workers
            workers = children(proc.pid)
            return len(workers) == 2 and all(
                privileges.current(w).uid == nobody.pw_uid for w in workers
            )

        assert wait_until(dropped), proc.log_text()
        for worker in workers:
            now = privileges.current(worker)
            assert (now.uid, now.gid) == (nobody.pw_uid, nogroup)
            assert set(now.groups) <= set(os.getgrouplist("nobody", nogroup))
            assert 0 not in now.groups
            for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                assert now.capabilities.get(key, 0) == 0, key
            assert now.capabilities["CapBnd"] == 0
            assert now.no_new_privs
        assert privileges.current(proc.pid).uid == 0  # the supervisor serves no client
        assert "running as root" not in proc.log_text()

        # Implicit TLS with a key only root could read; RETR, then DELE + QUIT.
        wait_for_port("127.0.0.1", lmtp_port, process=proc.process, expect=b"220")
        client = poplib.POP3_SSL("127.0.0.1", tls_port, context=pki.client_context(), timeout=20)
        client.user("alice")
        client.pass_("secret")
        assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == message
        client.dele(1)
        client.quit()
        assert proc.messages("alice") == []

        with smtplib.LMTP("127.0.0.1", lmtp_port, timeout=20) as lmtp:
            lmtp.sendmail("bob@example.org", ["alice"], b"Subject: two\r\n\r\nsecond\r\n")
        [delivered] = proc.message_paths("alice")
        assert delivered.stat().st_uid == nobody.pw_uid
        assert proc.stop() == 0


@needs_root
def test_user_root_is_refused_unless_allowed(tmp_path: Path) -> None:
    """user = "root" stops serve and check-config with 78 naming allow_root; allowed, it passes."""
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    config = tmp_path / "pop3d.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nuser = "root"\n'
        '[auth]\npasswd_file = "users"\n'
    )
    for command in ("serve", "check-config"):
        done = subprocess.run(
            [sys.executable, "-m", "pop3d", command, "--config", str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert done.returncode == 78, done.stderr
        assert "allow_root" in done.stderr
        assert str(config) in done.stderr
        assert "Traceback" not in done.stderr
    allowed = config.read_text().replace('user = "root"', 'user = "root"\nallow_root = true')
    config.write_text(allowed)
    done = subprocess.run(
        [sys.executable, "-m", "pop3d", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not is_root(), reason="needs root")
def test_root_without_user_keeps_working_with_a_warning(
    serve: Callable[..., Pop3ServeProcess],
) -> None:
    """No [server] user, started as root: it serves (the embedded default's way) and warns once."""
    proc = serve(workers=1)
    assert wait_until(lambda: "running as root" in proc.log_text())
    client = poplib.POP3(proc.host, proc.port, timeout=20)
    client.user("alice")
    assert client.pass_("secret").startswith(b"+OK")
    client.quit()


def test_unknown_user_or_group_is_a_config_error() -> None:
    """resolve() names the key and what was not found."""
    with pytest.raises(ConfigError, match=r"\[server\] user: .*no-such-user-x"):
        privileges.resolve(ServiceConfig(user="no-such-user-x"))
    with pytest.raises(ConfigError, match=r"\[server\] group: .*no-such-group-x"):
        privileges.resolve(ServiceConfig(user="root", group="no-such-group-x", allow_root=True))
    assert privileges.resolve(ServiceConfig()) is None


@needs_root
def test_deliver_as_root_writes_as_the_mail_user(open_root: Path) -> None:
    """pop3d deliver started as root with [server] user: the message file is nobody's."""
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup").gr_gid
    root = open_root / "site"
    (root / "mail").mkdir(parents=True)
    os.chown(root / "mail", nobody.pw_uid, nogroup)
    (root / "users").write_text("alice:{PLAIN}secret\n")
    os.chown(root / "users", 0, nogroup)
    (root / "users").chmod(0o640)
    config = root / "pop3d.toml"
    config.write_text(
        '[server]\nuser = "nobody"\ngroup = "nogroup"\n'
        '[auth]\npasswd_file = "users"\n[storage]\nmaildir = "mail/%u/Maildir"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "pop3d", "deliver", "--config", str(config), "alice"],
        input=b"Subject: x\n\nbody\n", capture_output=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    [delivered] = (root / "mail" / "alice" / "Maildir" / "new").iterdir()
    assert (delivered.stat().st_uid, delivered.stat().st_gid) == (nobody.pw_uid, nogroup)
    assert (root / "mail" / "alice").stat().st_uid == nobody.pw_uid
