"""The login service over real HTTPS on a loopback port, and its client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bus import Bus, login_failures, subjects
from bus.access import Role, User, get_user, put_role, put_user
from bus.audit import Login, ensure_audit_stream, read_events
from bus.server import NatsServer, wait_port_free
from bus.totp import claim_step
from client.login import LoginError, login, logout, status
from dbservice.access.audit import AuditEmitter
from dbservice.access.ca import CertificateAuthority, make_csr, new_key, verify_client_certificate
from dbservice.auth.admin import init_ca
from dbservice.auth.passwords import TOTP_STEP, hash_password, new_totp_secret, totp_code, totp_step
from dbservice.auth.service import AuthConfig, RunningService, start_service

PASSWORD = "correct horse battery"
CSR = make_csr(new_key(), "tests")
RATE_LIMIT = {"per_user": 3, "per_address": 6, "window": "1m"}


@dataclass
class AuthEnv:
    bus: Bus
    ca: CertificateAuthority
    ca_file: Path
    service: RunningService
    audit: AuditEmitter
    tmp: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    async def login(
        self, user: str, password: str = PASSWORD, *, at: int | None = None, **kwargs: object
    ) -> object:
        """Log in at the service (or at another instance's port ``at``)."""
        kwargs.setdefault("ca_file", str(self.ca_file))
        kwargs.setdefault("home", self.tmp / "home")
        address = self.address if at is None else f"127.0.0.1:{at}"
        return await asyncio.wait_for(login(address, user, password, **kwargs), 10)  # type: ignore[arg-type]

    async def post(
        self, user: str, password: str = PASSWORD, *, at: int | None = None
    ) -> tuple[int, str | None]:
        """A bare ``POST /v1/login``: status and Retry-After."""
        body = {"user": user, "password": password, "csr": CSR}
        status, headers, _ = await self.post_raw(json.dumps(body).encode(), at=at)
        return status, headers.get("Retry-After")

    async def post_raw(
        self, data: bytes, *, at: int | None = None, http: aiohttp.ClientSession | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """``POST /v1/login`` with ``data`` as the body: status, headers, JSON answer."""
        port = self.service.port if at is None else at
        url = f"https://127.0.0.1:{port}/v1/login"
        async with contextlib.AsyncExitStack() as stack:
            if http is None:  # else ``http``'s connector has the TLS context (one pool)
                tls = ssl.create_default_context(cafile=str(self.ca_file))
                http = await stack.enter_async_context(aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=tls),
                    timeout=aiohttp.ClientTimeout(total=30),
                ))  # fmt: skip
            headers = {"Content-Type": "application/json"}
            async with http.post(url, data=data, headers=headers) as response:
                text = await response.text()
                try:
                    answer = json.loads(text)
                except ValueError:
                    answer = text  # not JSON (a 500 page): the status tells
                return response.status, dict(response.headers), answer
        raise AssertionError("unreachable")

    async def logins(self) -> list[Login]:
        await self.audit.flush(5)

        async def read() -> list[Login]:
            subject = subjects.audit_filter("auth.login")
            return [e async for e in read_events(self.bus, subject=subject)]  # type: ignore[misc]

        return await asyncio.wait_for(read(), 10)


@pytest.fixture
async def env(bus: Bus, tmp_path: Path) -> AsyncIterator[AuthEnv]:
    result = await init_ca(bus, tmp_path / "ca")
    await ensure_audit_stream(bus)
    await put_role(bus, Role.model_validate({
        "name": "dev", "allow": {"db_labels": {"env": "dev"}, "db_users": ["app"]},
        "options": {"max_session_ttl": "2h"},
    }))  # fmt: skip
    await put_role(bus, Role(name="short", options={"max_session_ttl": "10m"}))  # type: ignore[arg-type]
    await put_user(bus, User(name="alice", roles=("dev",), db_users=("alice-rw",),
                             password_hash=hash_password(PASSWORD)))  # fmt: skip
    await put_user(bus, User(name="carol", roles=("dev", "short", "gone"),
                             password_hash=hash_password(PASSWORD)))  # fmt: skip
    config = AuthConfig.model_validate({
        "listen": "127.0.0.1:0", "ca_dir": str(tmp_path / "ca"), "host_id": "auth-1",
        "rate_limit": RATE_LIMIT,
    })  # fmt: skip
    emitter = AuditEmitter.for_bus(bus, host_id="auth-1")
    emitter.start()
    service = await start_service(config, bus=bus, ca=result.ca, audit=emitter)
    try:
        yield AuthEnv(bus, result.ca, result.cert_path, service, emitter, tmp_path)
    finally:
        await service.close()
        await emitter.aclose()


async def test_login_issues_a_capped_certificate_for_a_local_key(env: AuthEnv) -> None:
    result = await env.login("alice", ttl=10 * 3600)
    home = env.tmp / "home"
    key = home / "identity" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert result.ttl == 7200  # type: ignore[attr-defined]
    st = status(home)
    assert st is not None and not st.expired
    assert (st.identity.user, st.identity.roles, st.identity.db_users) == (
        "alice", ("dev",), ("alice-rw",),
    )  # fmt: skip
    from dbservice.access.ca import load_certs

    cert = load_certs((home / "identity" / "cert.pem").read_text())[0]
    assert verify_client_certificate(cert, [env.ca.cert]).user == "alice"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 7200 <= lifetime.total_seconds() <= 7200 + 61
    assert (home / "identity" / "ca.pem").read_text() == env.ca.pem
    (event,) = await env.logins()
    assert event.success and event.user == "alice" and event.client_addr == "127.0.0.1"
    assert event.host_id == "auth-1" and event.roles == ("dev",)

    removed = logout(home=home)
    assert home / "identity" in removed and status(home) is None


async def test_ttl_is_the_shortest_of_the_roles_and_the_request(env: AuthEnv) -> None:
    assert (await env.login("carol")).ttl == 600  # type: ignore[attr-defined]
    assert (await env.login("carol", ttl=120)).ttl == 120  # type: ignore[attr-defined]
    assert (await env.login("alice")).ttl == 7200  # type: ignore[attr-defined]


async def test_failed_logins_are_rate_limited_per_user_and_audited(env: AuthEnv) -> None:
    with pytest.raises(LoginError, match="invalid user name or password"):
        await env.login("nobody")
    for _ in range(3):
        with pytest.raises(LoginError, match="invalid user name or password"):
            await env.login("alice", "wrong password!")
    with pytest.raises(LoginError, match="too many failed logins"):
        await env.login("alice")  # even the right password, for now
    assert (await env.login("carol")).identity.user == "carol"  # type: ignore[attr-defined]
    reasons = [(e.user, e.success, e.reason) for e in await env.logins()]
    assert reasons == [
        ("nobody", False, "unknown user"),
        ("alice", False, "wrong password"),
        ("alice", False, "wrong password"),
        ("alice", False, "wrong password"),
        ("alice", False, "rate limited"),
        ("carol", True, ""),
    ]
    registry = env.service.service.metrics.registry
    for outcome, count in (("denied", 4), ("rate_limited", 1), ("ok", 1)):
        labels = {"endpoint": "password", "outcome": outcome}
        assert registry.get_sample_value("fleetgate_auth_logins_total", labels) == count
    assert registry.get_sample_value("fleetgate_auth_rate_limited_requests_total") == 1


async def test_failed_logins_are_rate_limited_per_address(env: AuthEnv) -> None:
    for i in range(6):
        with pytest.raises(LoginError, match="invalid"):
            await env.login(f"guess-{i}")
    with pytest.raises(LoginError, match="too many failed logins"):
        await env.login("alice")


async def test_second_factor(env: AuthEnv) -> None:
    secret = new_totp_secret()
    await put_user(env.bus, User(name="dave", roles=("dev",), password_hash=hash_password(PASSWORD),
                                 totp_secret=secret))  # fmt: skip
    with pytest.raises(LoginError, match="one-time code is required"):
        await env.login("dave")
    with pytest.raises(LoginError, match="invalid one-time code"):
        await env.login("dave", totp="000000" if totp_code(secret) != "000000" else "111111")
    code = totp_code(secret)
    assert (await env.login("dave", totp=code)).identity.user == "dave"  # type: ignore[attr-defined]
    assert [e.reason for e in await env.logins()][-1] == ""
    assert (await env.logins())[-1].method == "password+totp"
    # a code works once (RFC 6238 5.2): replayed, even within its 30 s, it is refused
    with pytest.raises(LoginError, match="already used: wait for the next one"):
        await env.login("dave", totp=code)
    assert (await env.logins())[-1].reason == "one-time code used again"


# RFC 6238 appendix B, SHA-1: the 20-byte seed "12345678901234567890" (in base32), the
# time, and the last six of the eight digits given there.
RFC6238_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
RFC6238_SHA1 = [
    (59, "287082"),
    (1111111109, "081804"),
    (1111111111, "050471"),
    (1234567890, "005924"),
    (2000000000, "279037"),
    (20000000000, "353130"),
]


@pytest.mark.parametrize(("at", "code"), RFC6238_SHA1)
def test_one_time_codes_match_the_rfc_6238_test_vectors(at: int, code: str) -> None:
    assert totp_code(RFC6238_SECRET, at) == code
    step = at // TOTP_STEP
    assert totp_step(RFC6238_SECRET, code, at) == step
    assert totp_step(RFC6238_SECRET, f" {code}\n", at + TOTP_STEP) == step  # drift, spaces
    assert totp_step(RFC6238_SECRET.lower(), code, at) == step  # base32 in any case
    assert totp_step(RFC6238_SECRET, code, at + 2 * TOTP_STEP) is None  # too late
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    assert totp_step(RFC6238_SECRET, wrong, at) is None


async def test_trusting_the_auth_service(env: AuthEnv) -> None:
    home = env.tmp / "fresh"
    with pytest.raises(LoginError, match=f"presents {env.ca.fingerprint}"):
        await env.login("alice", ca_file=None, home=home)
    with pytest.raises(LoginError, match="do not log in"):
        await env.login("alice", ca_file=None, ca_fingerprint="SHA256:00", home=home)
    asked: list[str] = []
    await env.login("alice", ca_file=None, home=home, confirm=lambda fp: asked.append(fp) or True)
    assert asked == [env.ca.fingerprint]
    assert (home / "auth-ca.pem").read_text() == env.ca.pem
    await env.login("alice", ca_file=None, home=home)  # pinned now, no question
    other = env.tmp / "pinned-by-fingerprint"
    await env.login("alice", ca_file=None, ca_fingerprint=env.ca.fingerprint, home=other)
    # A pinned CA that does not match the service is refused.
    (other / "auth-ca.pem").write_text(CertificateAuthority.create().pem)
    with pytest.raises(LoginError, match="not trusted"):
        await env.login("alice", ca_file=None, home=other)


async def test_unreachable_service_is_one_clear_error(env: AuthEnv, tmp_path: Path) -> None:
    with pytest.raises(LoginError, match="cannot"):
        await asyncio.wait_for(
            login("127.0.0.1:1", "alice", PASSWORD, ca_file=str(env.ca_file), home=tmp_path / "h"),
            10,
        )


async def _second_instance(env: AuthEnv, bus: Bus, host_id: str) -> RunningService:
    config = AuthConfig.model_validate({
        "listen": "127.0.0.1:0", "ca_dir": str(env.tmp / "ca"), "host_id": host_id,
        "rate_limit": RATE_LIMIT,
    })  # fmt: skip
    return await start_service(config, bus=bus, ca=env.ca, audit=env.audit)


async def _totp_user(env: AuthEnv, name: str) -> str:
    secret = new_totp_secret()
    await put_user(env.bus, User(name=name, roles=("dev",), password_hash=hash_password(PASSWORD),
                                 totp_secret=secret))  # fmt: skip
    return secret


async def test_a_one_time_code_works_once_across_instances(
    env: AuthEnv, nats_server: NatsServer
) -> None:
    secret = await _totp_user(env, "erin.o@example")  # dots and @: escaped in the KV key
    async with await Bus.connect(nats_server.url, name="auth-2") as bus_b:
        service_b = await _second_instance(env, bus_b, "auth-2")
        try:
            code = totp_code(secret)
            step = totp_step(secret, code)
            assert step is not None
            assert (await env.login("erin.o@example", totp=code)).identity.user  # type: ignore[attr-defined]
            with pytest.raises(LoginError, match="already used: wait for the next one"):
                await env.login("erin.o@example", totp=code, at=service_b.port)
            assert (await env.logins())[-1].reason == "one-time code used again"
            following = totp_code(secret, (step + 1) * TOTP_STEP)
            assert (
                await env.login("erin.o@example", totp=following, at=service_b.port)
            ).identity.user  # type: ignore[attr-defined]
            # and, accepted by B, it is refused by A
            with pytest.raises(LoginError, match="already used"):
                await env.login("erin.o@example", totp=following)
        finally:
            await service_b.close()


async def test_the_same_code_at_two_instances_at_once_works_once(
    env: AuthEnv, nats_server: NatsServer
) -> None:
    secret = await _totp_user(env, "frank")
    async with await Bus.connect(nats_server.url, name="auth-2") as bus_b:
        service_b = await _second_instance(env, bus_b, "auth-2")
        try:
            now = int(time.time() // TOTP_STEP)
            for round_ in range(2):
                step = now + round_  # this step and the next: both valid for 30 s at least
                code = totp_code(secret, step * TOTP_STEP)
                results = await asyncio.gather(
                    env.login("frank", totp=code, home=env.tmp / f"a{round_}"),
                    env.login("frank", totp=code, home=env.tmp / f"b{round_}", at=service_b.port),
                    return_exceptions=True,
                )
                refused = [r for r in results if isinstance(r, BaseException)]
                assert len(refused) == 1, results
                assert "already used" in str(refused[0])
        finally:
            await service_b.close()


async def _until_read(bus: Bus, user: str) -> None:
    """Wait until ``bus`` reads again after NATS came back."""
    deadline = time.monotonic() + 15
    while True:
        try:
            if await get_user(bus, user) is not None:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


class Gate:
    """Stands in for the service's verification semaphore: holds a login there."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def __aenter__(self) -> None:
        self.entered.set()
        await self.opened.wait()

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_no_nats_no_second_factor(env: AuthEnv, nats_server: NatsServer) -> None:
    secret = await _totp_user(env, "gina")
    async with await Bus.connect(nats_server.url, name="auth-3", request_timeout=2) as bus_c:
        service_c = await _second_instance(env, bus_c, "auth-3")
        try:
            # NATS goes away after the user was read: the code cannot be checked
            gate = Gate()
            service_c.service.verifications = gate  # type: ignore[assignment]
            code = totp_code(secret)
            attempt = asyncio.ensure_future(env.login("gina", totp=code, at=service_c.port))
            await asyncio.wait_for(gate.entered.wait(), 10)
            await asyncio.to_thread(nats_server.stop)
            gate.opened.set()
            with pytest.raises(LoginError, match="cannot reach NATS to check the one-time code"):
                await attempt
            # without NATS nothing is read at all: the same clear refusal
            with pytest.raises(LoginError, match="cannot reach NATS to check the failed-login"):
                await env.login("gina", totp=code, at=service_c.port)
            await asyncio.to_thread(wait_port_free, "127.0.0.1", nats_server.port)
            await asyncio.to_thread(nats_server.start)
            await _until_read(bus_c, "gina")
            await _until_read(env.bus, "gina")
            # back: the code was never accepted, so it works now, once
            assert (await env.login("gina", totp=code, at=service_c.port)).identity.user  # type: ignore[attr-defined]
            with pytest.raises(LoginError, match="already used"):
                await env.login("gina", totp=code)
        finally:
            await service_c.close()
    reasons = [(e.user, e.success, e.reason) for e in await env.logins()]
    assert reasons == [
        ("gina", False, "one-time code not checked: NATS unavailable"),
        ("gina", False, "failed-login limit not checked: NATS unavailable"),
        ("gina", True, ""),
        ("gina", False, "one-time code used again"),
    ]


async def test_racing_claims_of_one_step_exactly_one_wins(
    bus: Bus, nats_server: NatsServer
) -> None:
    async with await Bus.connect(nats_server.url, name="auth-2") as other:
        for step in (100, 101, 103):
            won = await asyncio.gather(
                *(claim_step(b, "hank", step) for b in (bus, other, bus, other))
            )
            assert sorted(won) == [False, False, False, True]
        assert not await claim_step(other, "hank", 102)  # earlier than the last accepted
        assert await claim_step(other, "hank.other", 102)  # another user: its own record


async def test_failed_logins_at_two_instances_add_up_to_one_per_user_limit(
    env: AuthEnv, nats_server: NatsServer
) -> None:
    async with await Bus.connect(nats_server.url, name="auth-2") as bus_b:
        service_b = await _second_instance(env, bus_b, "auth-2")
        b = service_b.port
        try:
            # a success clears the failures before it, wherever they were counted
            assert await env.post("alice.x", "wrong password!") == (401, None)
            assert await env.post("alice.x", "wrong password!", at=b) == (401, None)
            await put_user(env.bus, User(name="alice.x", roles=("dev",),
                                         password_hash=hash_password(PASSWORD)))  # fmt: skip
            assert (await env.login("alice.x", at=b)).identity.user == "alice.x"  # type: ignore[attr-defined]
            assert (
                await login_failures.recent(env.bus, "alice.x", window=60, now=time.time()) is None
            )
            # three failures spread over A and B: the limit of 3 for the name, at both
            for at in (None, b, None):
                assert await env.post("alice.x", "wrong password!", at=at) == (401, None)
            for at in (None, b):
                status, retry_after = await env.post("alice.x", at=at)  # even the right password
                assert status == 429 and retry_after is not None and 1 <= int(retry_after) <= 61
                with pytest.raises(LoginError, match="too many failed logins"):
                    await env.login("alice.x", at=at)
            seen = await login_failures.recent(env.bus, "alice.x", window=60, now=time.time())
            assert seen is not None and len(seen.record.times) == 3  # refusals count nothing
            # another user name is not affected, at either instance
            assert (await env.login("carol")).identity.user == "carol"  # type: ignore[attr-defined]
            assert (await env.login("carol", at=b)).identity.user == "carol"  # type: ignore[attr-defined]
        finally:
            await service_b.close()
    reasons = [(e.user, e.success, e.reason) for e in await env.logins()]
    assert reasons == [
        *[("alice.x", False, "unknown user")] * 2,
        ("alice.x", True, ""),
        *[("alice.x", False, "wrong password")] * 3,
        *[("alice.x", False, "rate limited")] * 4,
        *[("carol", True, "")] * 2,
    ]


async def test_the_per_address_limit_stays_per_instance(
    env: AuthEnv, nats_server: NatsServer
) -> None:
    async with await Bus.connect(nats_server.url, name="auth-2") as bus_b:
        service_b = await _second_instance(env, bus_b, "auth-2")
        try:
            for i in range(6):  # six names, once each: no name reaches its limit
                assert await env.post(f"guess-{i}", "x") == (401, None)
            status, retry_after = await env.post("carol")
            assert status == 429 and retry_after is not None
            assert (await env.login("carol", at=service_b.port)).identity.user == "carol"  # type: ignore[attr-defined]
        finally:
            await service_b.close()


async def test_no_nats_no_password_check(env: AuthEnv, nats_server: NatsServer) -> None:
    async with await Bus.connect(nats_server.url, name="auth-3", request_timeout=2) as bus_c:
        service_c = await _second_instance(env, bus_c, "auth-3")
        c = service_c.port
        try:
            # NATS goes away while a wrong password is checked: it was counted before
            gate = Gate()
            service_c.service.verifications = gate  # type: ignore[assignment]
            attempt = asyncio.ensure_future(env.login("alice", "wrong password!", at=c))
            await asyncio.wait_for(gate.entered.wait(), 10)
            await asyncio.to_thread(nats_server.stop)
            gate.opened.set()
            with pytest.raises(LoginError, match="invalid user name or password"):
                await attempt
            # no NATS: the limit cannot be read, so no password is checked
            gate.entered.clear()
            status, retry_after = await env.post("alice", at=c)
            assert (status, retry_after) == (503, "2") and not gate.entered.is_set()
            await asyncio.to_thread(wait_port_free, "127.0.0.1", nats_server.port)
            await asyncio.to_thread(nats_server.start)
            await _until_read(bus_c, "alice")
            await _until_read(env.bus, "alice")
            assert (await env.login("alice", at=c)).identity.user == "alice"  # type: ignore[attr-defined]
        finally:
            await service_c.close()
    reasons = [(e.user, e.host_id, e.success, e.reason) for e in await env.logins()]
    assert reasons == [
        ("alice", "auth-1", False, "wrong password"),
        ("alice", "auth-1", False, "failed-login limit not checked: NATS unavailable"),
        ("alice", "auth-1", True, ""),
    ]


async def test_racing_failures_are_all_counted(bus: Bus, nats_server: NatsServer) -> None:
    async with await Bus.connect(nats_server.url, name="auth-2") as other:
        now = time.time()
        added = await asyncio.gather(*(
            login_failures.add(b, "ivan", limit=10, window=60, now=now + i)
            for i, b in enumerate((bus, other, bus, other))
        ))  # fmt: skip
        assert added == [True] * 4
        seen = await login_failures.recent(other, "ivan", window=60, now=now + 4)
        assert seen is not None and seen.record.times == tuple(now + i for i in range(4))
        # bounded: the newest ``limit`` within the window, older ones dropped
        await login_failures.add(bus, "ivan", limit=3, window=60, now=now + 5)
        seen = await login_failures.recent(other, "ivan", window=60, now=now + 5)
        assert seen is not None and seen.record.times == (now + 2, now + 3, now + 5)
        await login_failures.add(bus, "ivan", limit=3, window=60, now=now + 63)
        seen = await login_failures.recent(other, "ivan", window=60, now=now + 63)
        assert seen is not None and seen.record.times == (now + 5, now + 63)


async def _instance(env: AuthEnv, host_id: str, **rate_limit: object) -> RunningService:
    config = AuthConfig.model_validate({
        "listen": "127.0.0.1:0", "ca_dir": str(env.tmp / "ca"), "host_id": host_id,
        "rate_limit": {**RATE_LIMIT, **rate_limit},
    })  # fmt: skip
    return await start_service(config, bus=env.bus, ca=env.ca, audit=env.audit)


async def test_attempts_sent_at_once_get_no_more_checks_than_the_limit(
    env: AuthEnv, nats_server: NatsServer
) -> None:
    """60 wrong passwords and the right one, all at once, at two instances: at most
    ``per_user`` (3) passwords are checked; every other attempt is refused unchecked."""
    await put_user(env.bus, User(name="zed", roles=("dev",), password_hash=hash_password(PASSWORD)))
    async with await Bus.connect(nats_server.url, name="auth-2") as bus_b:
        service_b = await _second_instance(env, bus_b, "auth-2")
        try:
            attempts = [
                env.post("zed", "wrong password!", at=service_b.port if i % 2 else None)
                for i in range(60)
            ]
            attempts.insert(30, env.post("zed"))
            statuses = [status for status, _ in await asyncio.gather(*attempts)]
            # at most 3 checks; a success (it needs the right password) clears the
            # failures before it, so at most 3 more can follow it
            wrong, right = statuses.count(401), statuses.count(200)
            assert wrong + right >= 1 and wrong <= 3 * (1 + right), sorted(statuses)
            assert set(statuses) - {200, 401} == {429}, sorted(statuses)
            if not right:  # the right one was refused unchecked; it still is, for now
                statuses.append((await env.post("zed"))[0])
                assert statuses[-1] == 429
        finally:
            await service_b.close()
    events = [e for e in await env.logins() if e.user == "zed"]
    assert len(events) == len(statuses)  # every attempt audited
    assert sum(e.reason == "rate limited" for e in events) == statuses.count(429)


async def test_attempts_from_one_address_sent_at_once_keep_its_limit(env: AuthEnv) -> None:
    statuses = [s for s, _ in await asyncio.gather(
        *(env.post(f"guess-{i}", "wrong password!") for i in range(30))
    )]  # fmt: skip
    assert statuses.count(401) == 6 and statuses.count(429) == 24, statuses  # per_address 6


async def test_malformed_login_bodies_get_400_with_a_reason_and_are_audited(env: AuthEnv) -> None:
    good = {"user": "alice", "password": PASSWORD, "csr": CSR}
    cases: list[tuple[bytes, str]] = [
        (b"[" * 20_000 + b"]" * 20_000, "the body is not valid JSON (recursion limit"),
        (json.dumps({**good, "ttl": float("nan")}).encode(), "ttl: NaN is not a duration"),
        (json.dumps({**good, "ttl": float("inf")}).encode(), "ttl: Input should be a finite"),
        (json.dumps({**good, "ttl": "nan"}).encode(), "ttl: NaN is not a duration"),
        (json.dumps({**good, "ttl": 10**400}).encode(), "ttl: "),
        (json.dumps({**good, "ttl": -1}).encode(), "ttl: a duration cannot be negative"),
        (json.dumps({**good, "totp": "١٢٣٤٥٦"}).encode(), "totp: a one-time code is six digits"),
        (json.dumps({**good, "csr": "-"}).encode(), "csr: not a PEM certificate request"),
        (json.dumps({**good, "user": 7}).encode(), "user: Input should be a valid string"),
        (json.dumps({"user": "alice"}).encode(), "password: Field required"),
        (b'{"user": "alice", "password": "\\ud800"}', "the body is not valid JSON"),
        (b"\xff\xfe{}", "the body is not valid JSON"),
    ]
    for body, reason in cases:
        status, _, answer = await env.post_raw(body)
        assert (status, answer["error"][: len(reason)]) == (400, reason), body[:80]
    status, _, answer = await env.post_raw(b'{"user": "' + b"x" * 70_000 + b'"}')
    assert status == 413 and "larger than 65536 bytes" in answer["error"]
    events = await env.logins()
    assert len(events) == len(cases) + 1
    assert all(not e.success and e.reason.startswith("malformed request: ") for e in events)
    assert [e.user for e in events[1:7]] == ["alice"] * 6
    assert (await env.login("alice")).identity.user == "alice"  # type: ignore[attr-defined]


def _fuzz_bodies(seed: int, count: int) -> list[bytes]:
    """Seeded malformed (and some well-formed) login bodies: wrong types, huge and
    non-finite numbers, odd unicode, missing and extra fields, bad JSON, deep nesting."""
    rng = random.Random(seed)
    values: list[object] = [
        None, True, False, 0, -1, 1.5, 1e308, -1e308, 10**400, float("nan"), float("inf"),
        float("-inf"), "", " ", "x" * 129, "y" * 1025, "z" * 20_000, "\u0000", "a\nb", "é",
        "\U0001f600", "\ud800", "١٢٣٤٥٦", " 123456 ", "12345678", "nan", "inf", "-5s", "1e999",
        "2h", "1h30m", [], {}, [1, 2], {"a": 1}, [[[[[]]]]], CSR[:-40], CSR.replace("A", "B", 1),
    ]  # fmt: skip
    fields = ["user", "password", "totp", "csr", "ttl", "extra"]
    bodies: list[bytes] = []
    raw = [
        b"", b"null", b"[]", b'"alice"', b"{", b"}", b"\xff\xfe", b'{"user": "alice",}',
        b'{"user": "alice"} trailing', b"{" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
        b'{"user": "alice", "password": "x", "csr": "-", "ttl": ' + b"[" * 500 + b"]" * 500 + b"}",
        "\ufeff{}".encode(), b'{"user": "alice", "user": 1}', b'{"user": "\\u0000"}',
    ]  # fmt: skip
    bodies.extend(raw)
    while len(bodies) < count:
        body: dict[str, object] = {"user": "alice", "password": PASSWORD, "csr": CSR}
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(fields)
            if rng.random() < 0.2:
                body.pop(name, None)
            else:
                body[name] = rng.choice(values)
        text = json.dumps(body)
        if rng.random() < 0.1:  # break the JSON itself somewhere
            cut = rng.randrange(len(text))
            text = text[:cut] + rng.choice(["", "\\", '"', "]", "\x00"]) + text[cut + 1 :]
        bodies.append(text.encode("utf-8", "surrogatepass"))
    return bodies


async def test_fuzzed_login_bodies_never_get_a_5xx_and_are_all_audited(env: AuthEnv) -> None:
    fuzz = await _instance(env, "auth-fuzz", per_user=1000, per_address=100_000)
    bodies = _fuzz_bodies(15, 300)
    try:
        tls = ssl.create_default_context(cafile=str(env.ca_file))
        connector = aiohttp.TCPConnector(ssl=tls, limit=8)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            answers = await asyncio.gather(
                *(env.post_raw(body, at=fuzz.port, http=http) for body in bodies)
            )
    finally:
        await fuzz.close()
    seen: dict[int, int] = {}
    for body, (code, _, answer) in zip(bodies, answers, strict=True):
        seen[code] = seen.get(code, 0) + 1
        assert code < 500, (code, answer, body[:200])
        if code != 200:
            assert isinstance(answer, dict) and answer.get("error"), (code, answer, body[:200])
    assert seen.get(400, 0) > len(bodies) // 2 and seen.get(200, 0) > 0, seen
    events = await env.logins()  # only the fuzzed instance was asked
    assert len(events) == len(bodies), seen
    assert sum(e.success for e in events) == seen.get(200, 0)
