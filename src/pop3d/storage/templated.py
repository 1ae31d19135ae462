"""What the Maildir and mbox stores share: each user's mail found by a path template.

:class:`TemplatedStore` holds the template, its mail root (opened once; every path
below it follows no link, :mod:`pop3d.storage.beneath`), the default quota, the read
chunk size and the sessions' locks, and finds a user's mail: below the mail root, or
below the user's home for a ``%h`` template (:mod:`pop3d.storage.template`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

from pop3d.config import StorageConfig
from pop3d.protocol import limits
from pop3d.protocol.values import Principal
from pop3d.storage.beneath import MailRoot
from pop3d.storage.locking import SessionLocks, session_locks_for
from pop3d.storage.template import (
    check_template,
    home_root,
    mail_path,
    mail_rel,
    mail_root,
    uses_home,
)

__all__ = ["TemplatedStore"]


class TemplatedStore:
    """Finds a user's mail: the part the Maildir and mbox stores share.

    The base of :class:`~pop3d.storage.maildir.MaildirStore` and
    :class:`~pop3d.storage.mbox.MboxStore`.

    Args:
        template: the ``%u``/``%n``/``%d``/``%h`` template of a user's mail.
        base: folder a relative template is resolved against.
        quota: default quota in wire octets (``None``: unlimited); a user's record may
            override it (:mod:`pop3d.storage.quota`).
        chunk_size: raw octets read per chunk by the maildrop's ``read``.
        session_locks: how sessions lock a maildrop (:mod:`pop3d.storage.locking`);
            default: the lock table of the template's static folder, as
            ``[storage] lock_table`` unset.

    Raises:
        ConfigError: the template has an unknown escape.

    """

    #: The ``[storage]`` key that holds this kind of store's template.
    kind: ClassVar[str]

    def __init__(
        self,
        template: str,
        base: Path = Path(),
        *,
        quota: int | None = None,
        chunk_size: int = limits.READ_CHUNK,
        session_locks: SessionLocks | None = None,
    ) -> None:
        check_template(template)
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.template = template
        self.base = base
        #: The template's mail root, opened once; every path below it follows no link.
        self.mail_root = MailRoot(mail_root(template, base))
        self.quota = quota
        self.chunk_size = chunk_size
        #: How sessions lock a maildrop.
        self.session_locks: SessionLocks = (
            session_locks if session_locks is not None else session_locks_for(template, base)
        )

    @classmethod
    def from_config(cls, config: StorageConfig) -> Self:
        """Build the store of a ``[storage]`` section with a template of this kind."""
        template: str | None = getattr(config, cls.kind)
        if template is None:
            raise ValueError(f"[storage] has no {cls.kind} template")
        locks = session_locks_for(template, config.base, config.lock_table)
        return cls(template, config.base, quota=config.quota, session_locks=locks)

    def path_for(self, username: str, home: str | None = None) -> Path:
        """Return the path of the user's mail (``home``: the user's, for a ``%h`` template).

        Raises:
            UnsafeUserName: the name could escape the mail root.
            NoHome: the template uses ``%h`` and the user has no usable home.

        """
        return mail_path(self.template, username, self.base, home)

    def _located(self, principal: Principal) -> tuple[MailRoot, str, Path]:
        """Where the user's mail is: a root, the path below it, the full path.

        The root is the mail root, or for a ``%h`` template the user's home; the full
        path is :meth:`path_for`'s.

        Raises:
            UnsafeUserName: the name could escape the mail root.
            NoHome: the template uses ``%h`` and the user has no usable home.

        """
        username, home = principal.username, principal.attributes.get("home")
        path = self.path_for(username, home)
        rel = mail_rel(self.template, username, home)
        if uses_home(self.template):
            # Opened for this use and closed with it (one folder a user, not one a store).
            return MailRoot(Path(home_root(home)), may_create=False), rel, path
        return self.mail_root, rel, path
