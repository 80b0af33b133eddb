"""``fleetgate doctor`` against real parts: nats-server, the auth service on loopback
HTTPS with a real login; each failure is made for real (no login, another CA kept, the
service gone, NATS unreachable)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from bus import Bus
from bus.server import NatsServer
from client.doctor import clock_check
from dbservice.access.ca import CertificateAuthority
from sandbox.ports import free_port
from tests.kits.connect import World, world

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def w(bus: Bus, tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[World]:
    async with world(bus, tmp_path, nats_server.url) as env:
        await env.login()
        yield env


def lines(out: str) -> dict[str, str]:
    """check name -> its line (with the fix line, when there is one)."""
    found: dict[str, str] = {}
    name = ""
    for line in out.splitlines():
        if line.startswith(("ok  ", "FAIL")):
            name = line.split()[1]
            found[name] = line
        else:
            found[name] += "\n" + line
    return found


async def test_all_pass_when_logged_in(w: World) -> None:
    out = await w.fleetgate("doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    shown = lines(out.stdout)
    assert list(shown) == ["login", "auth", "clock", "nats", "client"]
    assert all(line.startswith("ok  ") for line in shown.values()), out.stdout
    assert "alice, valid until " in shown["login"]
    assert "reached with the configured credentials" in shown["nats"]
    doc = json.loads((await w.fleetgate("doctor", "--format", "json")).stdout)
    assert doc["ok"] is True
    assert [c["name"] for c in doc["checks"]] == list(shown)


async def test_each_failure_says_the_fix(w: World) -> None:
    nobody = await w.fleetgate("doctor", home=w.tmp / "nobody")
    assert nobody.returncode == 1
    shown = lines(nobody.stdout)
    assert shown["login"].startswith("FAIL  login   not logged in")
    assert "fix: fleetgate login --auth HOST:PORT --user NAME" in shown["login"]

    gone = await w.fleetgate("doctor", "--nats", f"nats://127.0.0.1:{free_port()}")
    assert gone.returncode == 1
    assert lines(gone.stdout)["nats"].startswith("FAIL  nats")
    assert "fix: check the server address" in lines(gone.stdout)["nats"]

    pinned = w.home / "auth-ca.pem"
    kept = pinned.read_text()
    pinned.write_text(CertificateAuthority.create(name="someone else").pem)
    try:
        other = await w.fleetgate("doctor")
    finally:
        pinned.write_text(kept)
    assert other.returncode == 1
    auth = lines(other.stdout)["auth"]
    assert auth.startswith("FAIL  auth") and "the kept CA" in auth and "does not verify" in auth

    profile = w.home / "profile.json"
    doc = json.loads(profile.read_text())
    profile.write_text(json.dumps(doc | {"auth": f"https://127.0.0.1:{free_port()}"}))
    away = await w.fleetgate("doctor", "--format", "json")
    assert away.returncode == 1
    checks = {c["name"]: c for c in json.loads(away.stdout)["checks"]}
    assert not checks["auth"]["ok"] and "is unreachable" in checks["auth"]["detail"]
    assert checks["login"]["ok"] and checks["client"]["ok"]


def test_clock_skew_against_the_date_header() -> None:
    now = datetime.now(UTC)
    assert clock_check(format_datetime(now, usegmt=True)).ok
    late = clock_check(format_datetime(now - timedelta(minutes=2), usegmt=True))
    assert not late.ok and "NTP" in late.fix
    assert late.detail.split(" s ")[0] in {"120", "121"} and "ahead of" in late.detail
    assert not clock_check("").ok
