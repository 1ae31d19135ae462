"""The defence keys of ``[server]`` and ``[auth]``: defaults, values, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3d.config import from_mapping
from pop3d.errors import ConfigError


def test_login_timeout_defaults_to_the_smaller_of_60_s_and_three_idle_timeouts(
    tmp_path: Path,
) -> None:
    """An unauthenticated connection is closed after min(60 s, 3 x idle_timeout)."""
    assert from_mapping({}, tmp_path).server.login_timeout == 60
    short = from_mapping({"server": {"idle_timeout": 5}}, tmp_path)
    assert short.server.login_timeout == 15
    set_ = from_mapping({"server": {"idle_timeout": 5, "login_timeout": 120}}, tmp_path)
    assert set_.server.login_timeout == 120


@pytest.mark.parametrize(
    "section",
    [
        {"server": {"login_timeout": 0}},
        {"server": {"login_timeout": "soon"}},
        {"auth": {"ipv6_penalty_prefix": 129}},
        {"auth": {"failure_delay": -1}},
    ],
)
def test_bad_defence_values_are_refused(tmp_path: Path, section: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        from_mapping(section, tmp_path)


def test_ipv6_penalty_prefix(tmp_path: Path) -> None:
    assert from_mapping({}, tmp_path).auth.ipv6_penalty_prefix == 64
    cfg = from_mapping({"auth": {"ipv6_penalty_prefix": 56}}, tmp_path)
    assert cfg.auth.ipv6_penalty_prefix == 56
