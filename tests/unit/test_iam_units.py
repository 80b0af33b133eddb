"""Units of the IAM login: the agent strategy's answers to client AUTH/HELLO, and the
re-authentication loop over a fake injector (the engine does not offer one yet)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from bus.schemas import AWSSpec, DatabaseResource, DatabaseSpec, MemoryDBSpec, Metadata
from dbservice.engine.login import ClientCredentials
from dbservice.engine.proxy import Action, Hello
from dbservice.upstream import auth as wire
from dbservice.upstream.iam import IamAuth, IamTarget
from dbservice.upstream.iam_login import IamLogin, IamLogins


def memorydb(name: str = "orders") -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name=name),
        spec=DatabaseSpec(
            uri="clustercfg.orders.x.memorydb.us-east-1.amazonaws.com:6379",
            aws=AWSSpec(
                region="us-east-1",
                account_id="123456789012",
                memorydb=MemoryDBSpec(cluster_name=name, iam_users=("alice",)),
            ),
        ),
    )


class FakeAuth(IamAuth):
    def __init__(self, tokens: list[str]) -> None:
        super().__init__()
        self.tokens = tokens

    async def token(self, target: IamTarget, user: str) -> str:
        return self.tokens.pop(0)


class FakeInjector:
    def __init__(self, answers: list[bool | None]) -> None:
        self.answers = answers
        """Per attempt: None = cannot inject now, else the AUTH's success."""
        self.sent: list[tuple[bytes, ...]] = []

    def inject(self, args: Sequence[bytes], on_reply: Callable[[bool], None]) -> bool:
        answer = self.answers.pop(0)
        if answer is None:
            return False
        self.sent.append(tuple(args))
        asyncio.get_running_loop().call_soon(on_reply, answer)
        return True


def test_factory_picks_by_record() -> None:
    logins = IamLogins()
    assert isinstance(logins(memorydb()), IamLogin)
    plain = DatabaseResource(metadata=Metadata(name="cache"), spec=DatabaseSpec(uri="h:6379"))
    assert isinstance(logins(plain), ClientCredentials)


def test_client_auth_answered_locally_once_logged_in_by_iam() -> None:
    login = IamLogin(IamAuth(), memorydb())
    hello = Hello(3, b"alice", b"pw", b"app", (b"HELLO", b"3", b"AUTH", b"alice", b"pw"))
    assert login.on_client_auth(b"alice", b"pw", None) == Action.forward()  # not IAM yet
    login.iam = True
    assert login.on_client_auth(b"alice", b"pw", None) == Action.respond(b"+OK\r\n")
    assert login.on_client_auth(b"alice", b"pw", hello) == Action.replace(
        b"HELLO", b"3", b"SETNAME", b"app"
    )


async def test_keep_authenticated_renews_and_retries() -> None:
    slept: list[float] = []
    rounds = 0

    async def sleep(seconds: float) -> None:
        nonlocal rounds
        slept.append(seconds)
        rounds += 1
        if rounds > 4:
            raise asyncio.CancelledError

    injector = FakeInjector([True, None, False, True])
    auth = FakeAuth(["t1", "t2", "t3", "t4"])
    target = IamTarget.of(memorydb())
    with pytest.raises(asyncio.CancelledError):
        await wire.keep_authenticated(injector, auth, target, "alice", sleep=sleep)
    assert slept == [wire.REAUTH_EVERY, wire.REAUTH_EVERY, wire.REAUTH_RETRY, wire.REAUTH_RETRY,
                     wire.REAUTH_EVERY]  # fmt: skip
    assert injector.sent == [(b"AUTH", b"alice", b"t1"), (b"AUTH", b"alice", b"t3"),
                             (b"AUTH", b"alice", b"t4")]  # fmt: skip
    assert wire.REAUTH_EVERY < 12 * 3600


def test_keep_alive_only_for_iam_sessions() -> None:
    login = IamLogin(IamAuth(), memorydb())
    assert login.keep_alive(FakeInjector([])) is None
    login.iam, login.db_user = True, "alice"
    loop = login.keep_alive(FakeInjector([]))
    assert loop is not None
    loop.close()
