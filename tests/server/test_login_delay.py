"""LOGIN-DELAY (RFC 2449): the per-user stamps, the policy in Backends.open, the config."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from pop3d.config import from_mapping
from pop3d.errors import ConfigError, MaildropLocked
from pop3d.login_delay import LoginDelay
from pop3d.protocol.replies import RespCode
from pop3d.protocol.values import Principal
from pop3d.session import Backends, FailureDelays, resolve


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_login_within_the_delay_is_too_soon_and_after_it_is_not(tmp_path: Path) -> None:
    clock = Clock()
    delay = LoginDelay(60, tmp_path / "stamps", clock)
    assert not delay.too_soon("alice")  # never logged in
    delay.record("alice")
    assert (tmp_path / "stamps").stat().st_mode & 0o777 == 0o700
    clock.now += 59.5
    assert delay.too_soon("alice")
    assert not delay.too_soon("bob")  # per user
    clock.now += 0.5
    assert not delay.too_soon("alice")


def test_the_delay_counts_from_the_last_recorded_login(tmp_path: Path) -> None:
    clock = Clock()
    delay = LoginDelay(60, tmp_path, clock)
    delay.record("alice")
    clock.now += 30
    assert delay.too_soon("alice")  # checking does not move the stamp
    clock.now += 40
    assert not delay.too_soon("alice")
    delay.record("alice")
    clock.now += 30
    assert delay.too_soon("alice")


def test_a_stamp_from_the_future_does_not_lock_the_user_out(tmp_path: Path) -> None:
    """The clock was set back: the login is allowed, and its stamp puts the time right."""
    clock = Clock()
    delay = LoginDelay(60, tmp_path, clock)
    delay.record("alice")
    clock.now -= 3600
    assert not delay.too_soon("alice")
    delay.record("alice")
    clock.now += 1
    assert delay.too_soon("alice")


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "ünïcödé@example.org", "x" * 300])
def test_any_user_name_makes_one_safe_file(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "stamps"
    LoginDelay(60, folder).record(name)
    files = list(folder.iterdir())
    assert len(files) == 1
    assert len(files[0].name) == 32
    assert LoginDelay(60, folder).too_soon(name)


def test_other_processes_see_the_stamps(tmp_path: Path) -> None:
    """Two objects on one folder stand for two worker processes: they share the stamps."""
    LoginDelay(60, tmp_path).record("alice")
    assert LoginDelay(60, tmp_path).too_soon("alice")


def test_an_unusable_folder_allows_the_login_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    delay = LoginDelay(60, blocker / "stamps")
    delay.record("alice")
    assert not delay.too_soon("alice")
    assert "login of 'alice' not recorded" in caplog.text
    assert "login delay not checked for 'alice'" in caplog.text


def test_the_delay_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        LoginDelay(0, tmp_path)


class _Maildrop:
    def listing(self) -> Sequence[object]:
        return ()


class _Store:
    """Opens every maildrop, or says it is locked; counts the opens."""

    def __init__(self) -> None:
        self.opened = 0
        self.locked = False

    async def open(self, principal: Principal) -> _Maildrop:
        if self.locked:
            raise MaildropLocked("maildrop already locked")
        self.opened += 1
        return _Maildrop()


def _backends(store: _Store, delay: LoginDelay | None) -> Backends:
    return Backends(
        authenticator=None,  # type: ignore[arg-type]
        store=store,  # type: ignore[arg-type]
        delays=FailureDelays(0, 0),
        login_delay=delay,
    )


def _open(backends: Backends, principal: Principal) -> object:
    async def run() -> object:
        return await resolve(backends.open(principal))

    return asyncio.run(run())


def test_open_refuses_a_login_too_soon_without_touching_the_maildrop(tmp_path: Path) -> None:
    clock, store = Clock(), _Store()
    backends = _backends(store, LoginDelay(60, tmp_path, clock))
    alice = Principal("alice")
    assert not isinstance(_open(backends, alice), RespCode)
    assert _open(backends, alice) is RespCode.LOGIN_DELAY
    assert store.opened == 1
    clock.now += 60
    assert not isinstance(_open(backends, alice), RespCode)


def test_only_a_login_that_opened_its_maildrop_counts(tmp_path: Path) -> None:
    """An [IN-USE] refusal is not a login: the next attempt is not delayed by it."""
    store = _Store()
    backends = _backends(store, LoginDelay(60, tmp_path, Clock()))
    store.locked = True
    assert _open(backends, Principal("alice")) is RespCode.IN_USE
    store.locked = False
    assert not isinstance(_open(backends, Principal("alice")), RespCode)


def test_without_a_delay_every_login_opens() -> None:
    store = _Store()
    backends = _backends(store, None)
    for _ in range(3):
        assert not isinstance(_open(backends, Principal("alice")), RespCode)
    assert store.opened == 3


def test_config_reads_the_delay_and_the_stamp_folder(tmp_path: Path) -> None:
    default = from_mapping({}, tmp_path).auth
    assert default.login_delay == 0
    auth = from_mapping({"auth": {"login_delay": 300, "login_stamps": "var/logins"}}, tmp_path)
    assert auth.auth.login_delay == 300
    assert auth.auth.login_stamps == tmp_path / "var/logins"
    assert from_mapping({"auth": {"login_delay": 60}}, tmp_path).auth.login_stamps == (
        tmp_path / "login-stamps"
    )
    with pytest.raises(ConfigError, match="login_delay"):
        from_mapping({"auth": {"login_delay": -1}}, tmp_path)
    with pytest.raises(ConfigError, match="login_delay"):
        from_mapping({"auth": {"login_delay": "60"}}, tmp_path)
