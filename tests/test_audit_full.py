"""A session's query events when the audit queue is full: counted as dropped, without
the cost of building them (a saturated agent would otherwise spend most of its time
on events it then throws away)."""

from __future__ import annotations

import pytest

import dbservice.audit
from bus.access import Identity
from bus.audit import AuditEvent, SessionQuery
from dbservice.audit import AuditEmitter


async def test_queries_on_a_full_queue_are_counted_not_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def publish(event: AuditEvent) -> None:  # never started: the queue only fills
        raise AssertionError("not published in this test")

    emitter = AuditEmitter(publish, host_id="agent-1", maxsize=2)
    audit = emitter.session(
        Identity(user="alice", roles=("dev",)), database="db", db_user="app", client_addr="x:1"
    )
    audit.query([b"SET", b"k", b"v"])
    audit.query([b"GET", b"k"])
    assert (emitter.backlog, emitter.dropped_total) == (2, 0)

    def not_built(*args: object) -> None:
        raise AssertionError("an event for a full queue was built")

    monkeypatch.setattr(dbservice.audit, "describe_command", not_built)
    for _ in range(5):
        audit.query([b"GET", b"k"])
    assert (emitter.backlog, emitter.dropped_total, audit.commands) == (2, 5, 7)
    queued = [emitter._queue.get_nowait() for _ in range(2)]
    assert [(e.command, e.args) for e in queued if isinstance(e, SessionQuery)] == [
        ("SET", ("k", "v")), ("GET", ("k",)),
    ]  # fmt: skip
