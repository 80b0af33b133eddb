"""A session's commands when the audit queue is full: counted as dropped, without the
cost of describing them (a saturated agent would otherwise spend most of its time on
events it then throws away)."""

from __future__ import annotations

import pytest

import dbservice.access.audit
from bus.access import Identity
from bus.audit import Outgoing, QueryBatch, SessionStart
from dbservice.access.audit import AuditEmitter, BatchLimits


async def test_queries_on_a_full_queue_are_counted_not_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def publish(event: Outgoing) -> None:  # never started: the queue only fills
        raise AssertionError("not published in this test")

    emitter = AuditEmitter(
        publish, host_id="agent-1", maxsize=2, limits=BatchLimits(commands=2, interval=60)
    )
    audit = emitter.session(
        Identity(user="alice", roles=("dev",)), database="db", db_user="app", client_addr="x:1"
    )
    audit.query([b"SET", b"k", b"v"])
    assert (emitter.backlog, emitter.dropped_total) == (0, 0)  # in the session's buffer
    audit.query([b"GET", b"k"])
    assert (emitter.backlog, emitter.dropped_total) == (2, 0)  # one batch of two

    def not_built(*args: object) -> None:
        raise AssertionError("a command for a full queue was described")

    monkeypatch.setattr(dbservice.access.audit, "describe_command", not_built)
    for _ in range(5):
        audit.query([b"GET", b"k"])
    audit.flush()
    assert (emitter.backlog, emitter.dropped_total, audit.commands) == (2, 5, 7)
    queued = list(emitter._queue)
    assert len(queued) == 1 and isinstance(queued[0], QueryBatch)
    assert [(q.command, q.args) for q in queued[0].event().queries] == [
        ("SET", ("k", "v")), ("GET", ("k",)),
    ]  # fmt: skip
    assert queued[0].first_seq == 1


async def test_numbering_skips_dropped_commands() -> None:
    published: list[Outgoing] = []

    async def publish(event: Outgoing) -> None:
        published.append(event)

    emitter = AuditEmitter(publish, maxsize=2, limits=BatchLimits(commands=10, interval=60))
    audit = emitter.session(Identity(user="alice"), database="db", db_user="app", client_addr="x")
    audit.start()
    audit.query([b"GET", b"a"])  # buffered
    emitter.emit(SessionStart())  # the queue is full now
    audit.query([b"GET", b"b"])  # dropped, and the buffer with it (no room either)
    async with emitter:
        assert await emitter.flush(5)
        audit.query([b"GET", b"c"])
        audit.end()
        assert await emitter.flush(5)
    events = [e for item in published for e in item.expand()]
    ids = [e.id.rsplit(":", 1)[1] for e in events if e.type == "db.session.query"]
    assert ids == ["3"] and emitter.dropped_total == 2  # the third command keeps its number
