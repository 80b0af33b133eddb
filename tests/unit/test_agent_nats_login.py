"""The agent's own NATS login from join/renew: kept in data_dir, used over its settings."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from bus.settings import NatsConnection, NatsSettings, resolve_nats
from dbservice.agent.join import (
    NATS_LOGIN_FILE,
    JoinRefused,
    keep_nats_login,
    read_nats_login,
    with_nats_login,
)
from fleetgate.config import ConfigError

HOST = "5f0e2a52-1111-4000-8000-000000000001"
LOGIN = {"user": f"agent-{HOST}", "password": "pw-1"}


def test_the_login_is_kept_private_replaced_when_it_changes_and_removed_when_gone(
    tmp_path: Path,
) -> None:
    assert keep_nats_login(tmp_path, HOST, {"nats": LOGIN})
    assert stat.S_IMODE((tmp_path / NATS_LOGIN_FILE).stat().st_mode) == 0o600
    assert read_nats_login(tmp_path) == (LOGIN["user"], "pw-1")
    assert not keep_nats_login(tmp_path, HOST, {"nats": LOGIN})  # the same: unchanged
    assert keep_nats_login(tmp_path, HOST, {"nats": {**LOGIN, "password": "pw-2"}})
    assert read_nats_login(tmp_path) == (LOGIN["user"], "pw-2")
    assert keep_nats_login(tmp_path, HOST, {"nats": {}})  # the service hands out none now
    assert read_nats_login(tmp_path) is None
    assert not keep_nats_login(tmp_path, HOST, {})


@pytest.mark.parametrize(
    "nats",
    [
        {"user": "agent-someone-else", "password": "x"},
        {"user": f"agent-{HOST}", "password": ""},
        {"user": f"agent-{HOST}"},
        ["not", "an", "object"],
    ],
)
def test_a_login_that_is_not_this_agents_is_refused(tmp_path: Path, nats: object) -> None:
    with pytest.raises(JoinRefused):
        keep_nats_login(tmp_path, HOST, {"nats": nats})
    assert not (tmp_path / NATS_LOGIN_FILE).exists()


def test_the_kept_login_is_used_over_the_configured_servers(tmp_path: Path) -> None:
    plain = NatsConnection.from_url("nats://10.0.0.5:4222")
    assert with_nats_login(plain, tmp_path) is plain  # nothing kept: as configured
    keep_nats_login(tmp_path, HOST, {"nats": LOGIN})
    used = with_nats_login(plain, tmp_path)
    assert (used.user, used.password) == (LOGIN["user"], "pw-1")
    assert used.servers == plain.servers
    assert used.inbox_prefix == f"_INBOX_agents.{HOST}"


@pytest.mark.parametrize(
    "connection",
    [
        lambda: NatsConnection.from_url("nats://agent:secret@10.0.0.5:4222"),
        lambda: resolve_nats(
            None, NatsSettings(user="agent"), env={"FLEETGATE_NATS_PASSWORD": "x"}
        ),
    ],
)
def test_configured_credentials_besides_a_kept_login_are_an_error(
    tmp_path: Path, connection: Callable[[], NatsConnection]
) -> None:
    keep_nats_login(tmp_path, HOST, {"nats": LOGIN})
    with pytest.raises(ConfigError, match=f"logs in to NATS as its own user agent-{HOST}"):
        with_nats_login(connection(), tmp_path)


def test_an_unreadable_kept_login_names_the_file(tmp_path: Path) -> None:
    (tmp_path / NATS_LOGIN_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=NATS_LOGIN_FILE):
        read_nats_login(tmp_path)
