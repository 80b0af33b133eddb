"""``SessionAudit.allowed``, the command path's short way to ``query``: for any command it
buffers exactly what ``query`` buffers, and it counts commands for a full queue the
same way."""

from __future__ import annotations

import time

import pytest

from bus.access import Identity
from bus.audit import Outgoing
from dbservice.access.audit import AuditEmitter, BatchLimits, QueryRedaction, SessionAudit

COMMANDS: list[list[bytes]] = [
    [b"GET", b"k"],
    [b"SET", b"k", b"v"],
    [b"set", b"k", b"v"],  # the name as sent, upper-cased in the record
    [b"PING"],
    [b"MSET", b"a", b"1", b"b", b"2"],
    [b"SET", b"k", b"\xff\xfe"],  # not UTF-8: backslash escapes
    [b"GET", "ключ".encode()],
    [b"SET", b"k", b"x" * 300],  # cut
    [b"SET", b"k" * 300, b"v"],
    [b"GET", b"k" * 20],
    [b"RPUSH", b"l", *[b"%d" % i for i in range(100)]],  # more arguments than recorded
    [b"AUTH", b"app", b"secret"],  # masked
    [b"CONFIG", b"SET", b"requirepass", b"secret"],
    [b"HELLO", b"3", b"AUTH", b"app", b"secret"],
    [b"SET", b"k", b'quote " and \\ and \n'],
    [b"AUTH\x00", b"app", b"secret"],  # the server reads names up to a NUL: masked
    [b"hello\x00x", b"3", b"AUTH", b"app", b"secret"],
    [b"MIGRATE", b"h", b"1", b"k", b"0", b"5", b"AUTH\x00", b"secret"],
    [b"SET", b"k", "é".encode() * 200],  # cut between characters
]


async def _publish(event: Outgoing) -> None:
    raise AssertionError("not published in this test")


def _session(redaction: QueryRedaction, maxsize: int = 100_000) -> SessionAudit:
    emitter = AuditEmitter(
        _publish, host_id="agent-1", maxsize=maxsize, limits=BatchLimits(interval=60)
    )
    return emitter.session(
        Identity(user="alice", roles=("dev",)),
        database="db",
        db_user="app",
        client_addr="x:1",
        redaction=redaction,
    )


@pytest.mark.parametrize(
    "redaction",
    [
        QueryRedaction(),
        QueryRedaction(max_arg_len=8, max_args=2),
        QueryRedaction(redact_values=True),
    ],
    ids=["default", "short", "redacted"],
)
async def test_allowed_buffers_what_query_buffers(
    redaction: QueryRedaction, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_764_000_000.123456)
    slow, fast = _session(redaction), _session(redaction)
    for _ in range(2):  # first sight of a name and after
        for command in COMMANDS:
            slow.query(command)
            fast.allowed(command)
    assert fast._buffer == slow._buffer
    assert fast.commands == slow.commands == 2 * len(COMMANDS)


async def test_allowed_on_a_full_queue_counts_the_command_as_dropped() -> None:
    audit = _session(QueryRedaction(), maxsize=1)
    audit.allowed([b"GET", b"a"])  # buffered
    audit.flush()  # the queue is full now
    audit.allowed([b"GET", b"b"])
    audit.allowed([b"SET", b"c", b"\xff"])
    emitter = audit._emitter
    assert (audit.commands, emitter.dropped_total, emitter.backlog, audit._buffer) == (3, 2, 1, [])
