r"""Where a user's mail lives: the ``%u/%n/%d/%h`` path template, and who may become a path.

Rules of this file:

* A user name becomes part of a file system path only after :func:`check_username` has
  accepted it.  It refuses anything that could leave the mail root or name something
  other than the user's own folder: the empty name, ``/``, ``\``, NUL, any control or
  other non-printable character, ``.`` and ``..`` (as the whole name or as its local or
  domain part), a leading ``.`` in either part, and names longer than a path component
  may be.  Refusal is :class:`UnsafeUserName`, a :class:`TemporaryBackendError`, so a
  hostile name gets ``-ERR [SYS/TEMP]`` and never a path.
* Escapes are Dovecot's: ``%u`` the whole user name, ``%n`` the local part (before the
  first ``@``; the whole name when there is none), ``%d`` the domain (after the first
  ``@``), ``%h`` the user's home from the user database (passwd-file's home field, the
  SQL ``user_query``'s ``home`` column), ``%%`` a literal ``%``.  Any other ``%``
  sequence is a configuration error.
* **``%h`` only starts a template** (``%h/Maildir``, ``%h/mail/inbox``), as Dovecot's
  ``~/``: the home is then the user's mail root (:func:`home_root`, the operator's, from
  the user database; followed as written), and what follows it is the user's own
  (opened below it following no link).  The home must be an absolute path without
  ``.`` or ``..`` components and not ``/``; a user without one (or with an unusable
  one) is refused for that user alone, :class:`NoHome`, a
  :class:`PermanentBackendError` (``-ERR [SYS/PERM]``, logged), not a traceback.
* An escape that expands to nothing (``%d`` for a user without a domain) is refused
  rather than collapsing the path: with ``mail/%d/%n`` the user ``alice`` would otherwise
  land at ``mail/alice``, a parent of ``mail/alice/<anyone>`` for the user ``<anyone>@alice``.
* A relative result is resolved against ``base`` (the config file's folder).
* **A template cannot share mail by mistake** (:func:`check_template`, at config load and
  when a store is built): it must hold a per-user variable (``%u``, ``%n`` or ``%h``; ``%d``
  alone would give a whole domain one maildrop, and a template without any variable
  every user the same one), and none of its path components may be ``.`` or ``..``
  (a ``..`` after the variable could leave the user's folder, one before it the root).
* **The mail root** of a template (:func:`mail_root`) is the folder part of its text
  before the first variable, resolved against ``base`` (``mail/%u/Maildir`` ->
  ``<base>/mail``; ``/var/mail/%u`` -> ``/var/mail``; ``%u/Maildir`` -> ``<base>``).
  It belongs to the operator and may be reached through symbolic links.  Everything
  below it (:func:`mail_rel`, e.g. ``alice/Maildir``) may belong to the user, and the
  stores open it relative to the root without following any symbolic link
  (:mod:`pop3d.storage.beneath`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from pop3d.errors import ConfigError, NoHome, TemporaryBackendError
from pop3d.protocol import limits

_ESCAPES = frozenset("undh%")
#: How a template that takes the user's home starts.
HOME_PREFIX = "%h/"
#: Splits a checked template into literal text (even items) and escapes (odd items).
_ESCAPE = re.compile(r"(%.)", re.DOTALL)


class UnsafeUserName(TemporaryBackendError):
    """The user name cannot safely be part of a path (it could escape the mail root)."""


def uses_home(template: str) -> bool:
    """Whether ``template`` (checked) is one of the user's home: ``%h/...``."""
    return template.startswith(HOME_PREFIX)


def home_root(home: str | None) -> str:
    """The home of a user as the root of a ``%h`` template (without a trailing ``/``).

    Raises:
        NoHome: no home, or one that is not an absolute path, holds a ``.`` or ``..``
            component or a non-printable character, or is ``/``.

    """
    if not home:
        raise NoHome("the storage template uses %h and the user database gives no home")
    root = home.rstrip("/")
    parts = root.split("/")
    if not home.startswith("/") or not root or not home.isprintable() or any(
        part in {".", ".."} for part in parts
    ):
        raise NoHome("the user's home is not an absolute path without '.' or '..' (or is /)")
    return root


def split_username(username: str) -> tuple[str, str]:
    """Split ``local@domain`` at the first ``@``, as Dovecot does; domain is ``""`` if none."""
    local, _, domain = username.partition("@")
    return local, domain


def check_username(username: str) -> None:
    r"""Refuse a user name that could escape the mail root once put into a path.

    Raises:
        UnsafeUserName: the name is empty, too long, holds ``/``, ``\``, a control or
            non-printable character, or is (or has a local or domain part that is)
            ``.`` or ``..`` or starts with ``.``.

    """
    if not username:
        raise UnsafeUserName("empty user name")
    if len(username.encode("utf-8", "surrogatepass")) > limits.MAX_USERNAME:
        raise UnsafeUserName("user name too long")
    # isprintable() is False for every control (Cc), format (Cf), separator other than
    # the ASCII space, surrogate and unassigned code point, NUL included.
    if "/" in username or "\\" in username or not username.isprintable():
        raise UnsafeUserName("user name holds a path separator or non-printable character")
    local, domain = split_username(username)
    parts = (username, local, domain) if "@" in username else (username,)
    for part in parts:
        if part in {"", ".", ".."} or part.startswith("."):
            raise UnsafeUserName("user name is, or has a part that is, empty or dot-led")


def check_template(template: str, where: str = "[storage] template") -> None:
    """Refuse a template that is malformed or could share or leak mail (see the module head).

    ``where`` names the setting in the message (``"pop3d.toml: [storage] maildir"``).

    Raises:
        ConfigError: an escape other than ``%u``, ``%n``, ``%d``, ``%h``, ``%%``, or a
            trailing ``%``; no ``%u``, ``%n`` or ``%h``; ``%h`` other than at the start,
            as the whole first component; a ``.`` or ``..`` path component.

    """
    _check_escapes(template, where)
    variables = {part for part in _ESCAPE.split(template)[1::2] if part != "%%"}
    if "%h" in variables and (
        not uses_home(template) or template.count("%h") > 1 or not template[3:].strip("/")
    ):
        raise ConfigError(
            f"{where} = {template!r}: %h (the user's home) may only start the template, as"
            " its whole first component followed by the mail's path in it ('%h/Maildir')"
        )
    if not variables & {"%u", "%n", "%h"}:
        raise ConfigError(
            f"{where} = {template!r}: no per-user variable (%u, %n or %h): every user"
            + (" of a domain" if "%d" in variables else "")
            + " would log in to the same maildrop and read the others' mail"
        )
    if any(part in {".", ".."} for part in template.split("/")):
        raise ConfigError(
            f"{where} = {template!r}: a '.' or '..' path component could resolve outside"
            " the mail root or the user's own folder; write the path without them"
        )


def _check_escapes(template: str, where: str) -> None:
    """Refuse an empty template or one with an unknown ``%`` escape."""
    if not template:
        raise ConfigError(f"{where} is empty")
    i = 0
    while i < len(template):
        if template[i] == "%":
            if i + 1 >= len(template) or template[i + 1] not in _ESCAPES:
                raise ConfigError(
                    f"{where} = {template!r}: unknown escape at offset {i}"
                    " (use %u, %n, %d, %h or %%)"
                )
            i += 2
        else:
            i += 1


def expand(template: str, username: str, home: str | None = None) -> str:
    """Expand ``%u``, ``%n``, ``%d``, ``%h`` and ``%%`` in ``template`` for ``username``.

    ``home`` is the user's home from the user database (needed by ``%h`` only).

    Raises:
        UnsafeUserName: see :func:`check_username`; also when an escape used by the
            template expands to nothing.
        NoHome: the template uses ``%h`` and ``home`` is missing or unusable.
        ConfigError: the template has an unknown escape.

    """
    check_template(template)
    check_username(username)
    local, domain = split_username(username)
    values = {"u": username, "n": local, "d": domain, "%": "%"}
    if uses_home(template):
        values["h"] = home_root(home)
    out: list[str] = []
    for i, part in enumerate(_ESCAPE.split(template)):
        if i % 2 == 0:  # literal text
            out.append(part)
            continue
        value = values[part[1]]
        if not value:
            raise UnsafeUserName("the template needs a domain and the user name has none")
        out.append(value)
    return "".join(out)


def static_prefix(template: str) -> str:
    """Return the text of ``template`` before its first variable, ``%%`` as ``%``.

    Raises:
        ConfigError: the template has an unknown escape.

    """
    _check_escapes(template, "[storage] template")
    out: list[str] = []
    for i, part in enumerate(_ESCAPE.split(template)):
        if i % 2 == 0:
            out.append(part)
        elif part == "%%":
            out.append("%")
        else:
            break
    return "".join(out)


@functools.lru_cache(maxsize=65536)
def mail_path(template: str, username: str, base: Path, home: str | None = None) -> Path:
    """Return the path of ``username``'s mail: ``template`` expanded, resolved against ``base``.

    The path is not checked for existence; ``~`` is not expanded (the template is used as
    written, so no environment variable or home directory can redirect it).  Results are
    remembered (a login would otherwise pay a template expansion, a name check and Path
    objects each time); refusals are not.

    Raises:
        UnsafeUserName: the name could escape the mail root (see :func:`check_username`).
        NoHome: the template uses ``%h`` and ``home`` is missing or unusable.
        ConfigError: the template has an unknown escape.

    """
    path = Path(expand(template, username, home))
    return path if path.is_absolute() else base / path


@functools.lru_cache(maxsize=64)
def mail_root(template: str, base: Path) -> Path:
    """Return the mail root of ``template``: its static folder, resolved against ``base``.

    Raises:
        ConfigError: the template has an unknown escape.

    """
    prefix = static_prefix(template)
    slash = prefix.rfind("/")
    folder = prefix[:slash] if slash > 0 else "/" if slash == 0 else ""
    path = Path(folder) if folder else Path()
    return path if path.is_absolute() else base / path


@functools.lru_cache(maxsize=65536)
def mail_rel(template: str, username: str, home: str | None = None) -> str:
    """Return the path of ``username``'s mail relative to its root (``alice/Maildir``).

    The root is :func:`mail_root`, or for a ``%h`` template the user's home
    (:func:`home_root`).  It is never empty and has no empty, ``.`` or ``..`` component.

    Raises:
        UnsafeUserName: the name could escape the mail root (see :func:`check_username`).
        NoHome: the template uses ``%h`` and ``home`` is missing or unusable.
        ConfigError: the template is refused by :func:`check_template`.

    """
    check_template(template)
    expanded = expand(template, username, home)
    root = home_root(home) if uses_home(template) else None
    slash = len(root) if root is not None else static_prefix(template).rfind("/")
    parts = [part for part in expanded[slash + 1 :].split("/") if part]
    if not parts or any(part in {".", ".."} for part in parts):
        raise UnsafeUserName("the user's path would leave the mail root")
    return "/".join(parts)
