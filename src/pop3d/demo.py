"""The embedded default: a ready-to-use server on 127.0.0.1:1110 with a demo mailbox.

``pop3d serve`` without ``--config`` creates a data folder on first run (``./pop3d-data``
unless ``--data`` says otherwise) holding a passwd-file with the user ``demo`` (password
``demo``) and a Maildir with a few messages, then serves it on loopback only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pop3d.config import AuthConfig, Config, ListenAddress, ServerConfig, StorageConfig

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"  # noqa: S105 (the demo's published password)
DEMO_ADDRESS = ListenAddress("127.0.0.1", 1110)

_MESSAGES = (
    (
        "Welcome to pop3d",
        (
            "Hello!\n\nThis message was put here by pop3d on its first run.\n"
            "Read it with:  curl pop3://demo:demo@127.0.0.1:1110/1\n"
        ),
    ),
    (
        "A line that starts with a dot",
        (
            "The next line starts with a dot, which POP3 byte-stuffs on the wire:\n"
            ".like this\n.\nand the line above was a lone dot.\n"
        ),
    ),
    (
        "Non-ASCII text",
        "Grüße aus pop3d: 8-bit content is passed through intact.\n",
    ),
)


def default_config(data: Path) -> Config:
    """Return the embedded default configuration rooted at ``data``."""
    return Config(
        server=ServerConfig(listen=(DEMO_ADDRESS,)),
        auth=AuthConfig(passwd_file=data / "users"),
        storage=StorageConfig(maildir="mail/%u/Maildir", base=data),
    )


def ensure_demo_data(data: Path) -> bool:
    """Create the demo user and mailbox under ``data`` unless present.  True if created."""
    users = data / "users"
    if users.exists():
        return False
    maildir = data / "mail" / DEMO_USER / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    now = int(time.time())
    for i, (subject, body) in enumerate(_MESSAGES):
        text = (
            "From: pop3d <postmaster@localhost>\n"
            f"To: {DEMO_USER}@localhost\n"
            f"Subject: {subject}\n"
            "MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n"
            f"Message-ID: <demo{i}.{now}@localhost>\n"
            "\n" + body
        ).encode()
        name = f"{now + i}.M0P{os.getpid()}Q{i}.demo"
        (maildir / "tmp" / name).write_bytes(text)
        (maildir / "tmp" / name).rename(maildir / "new" / name)
    tmp = users.with_suffix(".tmp")
    tmp.write_text(
        "# pop3d demo users: user:{SCHEME}password  (see `pop3d user add`)\n"
        f"{DEMO_USER}:{{PLAIN}}{DEMO_PASSWORD}\n"
    )
    tmp.chmod(0o600)
    tmp.rename(users)
    return True
