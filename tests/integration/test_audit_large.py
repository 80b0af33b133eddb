"""Audit looks only at the bytes it keeps: describing a command costs the same for a
1 KB and a 64 MB argument, and a large value through the cluster engine (whose hooks
see whole arguments) does not stall the agent's other sessions."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bus.access import Identity, Role
from bus.audit import AuditEvent, Outgoing, SessionQuery
from dbservice.access.audit import AuditEmitter, BatchLimits, QueryRedaction, describe_command
from dbservice.access.authorize import grant_for
from dbservice.engine.login import ClientCredentials
from dbservice.gateway.hooks import AgentHooks
from sandbox.memorydb import StandinConfig, ThreadedStandin
from tests.kits.cluster import ClusterProxy

pytestmark = pytest.mark.timeout(180)


class Untouchable(bytes):
    """A large argument: slicing it is fine (that copies only what is kept), reading
    all of it is not."""

    def _whole(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the audit read a whole argument")

    decode = upper = lower = split = find = startswith = partition = _whole  # type: ignore[assignment]
    __iter__ = __contains__ = _whole  # type: ignore[assignment]


BIG = Untouchable(b"\xff" * (4 << 20))
CUT = "\\xff" * 256 + f"…(+{len(BIG) - 256} bytes)"


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        ([b"SET", b"k", BIG], ("k", CUT)),
        ([b"RPUSH", b"l", b"a", BIG], ("l", "a", CUT)),
        ([b"CONFIG", b"SET", b"requirepass", BIG], ("SET", "requirepass", "******")),
        ([b"CONFIG", b"SET", BIG, b"v"], ("SET", CUT, "v")),
        ([b"ACL", b"SETUSER", b"u", Untouchable(b">" + bytes(BIG))], ("SETUSER", "u", ">******")),
        ([b"HELLO", b"3", b"AUTH", b"u", BIG], ("3", "AUTH", "u", "******")),
        ([b"MIGRATE", b"h", b"1", BIG, b"0", b"5"], ("h", "1", CUT, "0", "5")),
    ],
)
def test_describe_command_reads_only_the_kept_bytes(
    args: list[bytes], shown: tuple[str, ...]
) -> None:
    assert describe_command(args)[1] == shown


def test_a_cut_never_splits_a_utf8_character() -> None:
    value = "é".encode() * 200  # 400 bytes, 256 on a character boundary
    assert describe_command([b"SET", b"k", value])[1][1] == "é" * 128 + "…(+144 bytes)"
    value = b"x" + "é".encode() * 200  # the 256th byte starts an "é": left out whole
    assert describe_command([b"SET", b"k", value])[1][1] == "x" + "é" * 127 + "…(+146 bytes)"
    value = b"xy" + "€".encode() * 100  # three-byte characters, one cut after its first two
    assert describe_command([b"SET", b"k", value])[1][1] == "xy" + "€" * 84 + "…(+48 bytes)"
    # not UTF-8: cut where the limit says, or before what could start a character
    assert describe_command([b"SET", b"k", b"\xff" * 300])[1][1] == "\\xff" * 256 + "…(+44 bytes)"
    assert describe_command([b"SET", b"k", b"\xe2" * 300])[1][1] == "\\xe2" * 255 + "…(+45 bytes)"


def test_describe_command_cost_does_not_grow_with_the_argument() -> None:
    small, large = os.urandom(1024), os.urandom(64 << 20)

    def cost(value: bytes) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(20):
                describe_command([b"SET", b"k", value])
            best = min(best, time.perf_counter() - started)
        return best / 20

    # The old code decoded all 64 MB (seconds); now both are microseconds.
    assert cost(large) < 20 * cost(small) + 0.002


async def _drop(event: Outgoing) -> None:
    return None


ROLE = Role.model_validate(
    {"name": "dev", "allow": {"db_labels": {"env": "dev"}, "db_users": ["default"]}}
)
ALICE = Identity(user="alice", roles=("dev",))


class AuditedHooks:
    """The agent's hooks with a real session audit, one per session (what the agent's
    listener builds), recording what the audit would publish."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def publish(self, event: Outgoing) -> None:
        self.events.extend(event.expand())

    def __call__(self) -> AgentHooks:  # called on the engine's event loop
        emitter = AuditEmitter(self.publish, limits=BatchLimits(commands=1))
        emitter.start()
        grant = grant_for(ALICE, [ROLE], database="d", labels={"env": "dev"}, db_user="default")
        audit = emitter.session(
            ALICE, database="d", db_user="default", client_addr="x:1", redaction=QueryRedaction()
        )
        return AgentHooks(
            grant=grant,
            audit=audit,
            db_user="default",
            login=ClientCredentials(),
            authenticated=True,
        )


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    config = StandinConfig(dir=tmp_path_factory.mktemp("cluster"), shards=3)
    with ThreadedStandin(config) as running:
        yield running


def test_a_large_value_does_not_stall_other_sessions_in_the_cluster_engine(
    standin: ThreadedStandin,
) -> None:
    hooks = AuditedHooks()
    with ClusterProxy(standin, hooks=hooks) as proxy:
        with proxy.client() as warm:  # topology and command table learnt
            assert warm.set("warm", "1")
        value = os.urandom(64 << 20)
        command = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s\r\n" % (len(value), value)
        latencies: list[float] = []
        stop = threading.Event()

        def ping() -> None:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as other:
                while not stop.is_set():
                    started = time.monotonic()
                    other.sendall(b"PING\r\n")
                    assert other.recv(64) == b"+PONG\r\n"
                    latencies.append(time.monotonic() - started)
                    time.sleep(0.01)

        pinger = threading.Thread(target=ping)
        pinger.start()
        try:
            while not latencies:
                time.sleep(0.01)
            with (
                proxy.probe() as probe,
                socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as big,
            ):
                started = time.monotonic()
                big.sendall(command)
                assert big.recv(64) == b"+OK\r\n"
                took = time.monotonic() - started
            time.sleep(0.2)
        finally:
            stop.set()
            pinger.join()
        # Once, the engine spent about 10 s describing the value for the audit, and every
        # other session of the agent waited as long; then it still held its loop for
        # 0.15-0.25 s at a time (joining and copying the 64 MB, and encrypting them for
        # the shard in one write). Now the value is collected as it arrives and written a
        # slice per turn: the loop's longest stall is a few milliseconds. The stall is
        # the CPU the engine's own loop spent while a tick of the probe was late, so it
        # does not count the time this loaded machine ran something else (the stand-in,
        # in this process, relays the 64 MB through its TLS fronts; other tests run).
        shown = (
            f"SET {took:.3f} s; loop stall max {max(probe.stalls):.3f} s, lag max "
            f"{max(probe.lags):.3f} s; PING max {max(latencies):.3f} s, median "
            f"{sorted(latencies)[len(latencies) // 2]:.3f} s"
        )
        assert max(probe.stalls) < 0.05, shown
        assert max(latencies) < 3.0, shown
        sets = [e for e in hooks.events if isinstance(e, SessionQuery) and e.command == "SET"]
        big_set = [e for e in sets if e.args[0] == "big"]
        assert len(big_set) == 1
        left_out = re.fullmatch(r".*…\(\+(\d+) bytes\)", big_set[0].args[1], re.DOTALL)
        assert left_out is not None  # 256 bytes kept, or up to 3 fewer (a cut character)
        assert len(value) - 256 <= int(left_out[1]) <= len(value) - 253
