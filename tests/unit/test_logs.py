"""Logging set-up shared by every command."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
from collections.abc import Iterator

import pytest

from fleetgate.heap import HeapTrimmer
from fleetgate.logs import (
    CONTEXT_FIELDS,
    bind_context,
    bound_context,
    log_context,
    log_format,
    setup_logging,
)


@pytest.fixture(autouse=True)
def _root_logger() -> Iterator[None]:
    """setup_logging rewires the root logger: put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_logs_follow_stderr_after_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run in-process (tests, embedding) may close the stderr it started with;
    later records go to the current one instead of failing on a closed file."""
    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    setup_logging("info", "json")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr("sys.stderr", second)
    logging.getLogger("fleetgate.test").warning("still heard")
    record = json.loads(second.getvalue())
    assert (record["level"], record["message"]) == ("warning", "still heard")


async def test_json_lines_carry_the_context_of_the_task_and_its_children(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a session's task binds is on its lines and on those of the tasks it spawns
    (an engine's warnings), never on the lines of the task that started it."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    setup_logging("info", "json")
    log = logging.getLogger("fleetgate.test")

    async def serve() -> None:
        bind_context(client_addr="127.0.0.1:5000")
        log.info("before the session")
        bind_context(session_id="abc123", user="alice", database="dev-cache")

        async def engine() -> None:
            log.warning("inside")

        await asyncio.create_task(engine())

    await asyncio.create_task(serve())
    log.info("outside")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["message"], {k: line.get(k) for k in CONTEXT_FIELDS}) for line in lines] == [
        ("before the session", {"session_id": None, "request_id": None, "user": None,
                                "database": None, "client_addr": "127.0.0.1:5000"}),
        ("inside", {"session_id": "abc123", "request_id": None, "user": "alice",
                    "database": "dev-cache", "client_addr": "127.0.0.1:5000"}),
        ("outside", dict.fromkeys(CONTEXT_FIELDS)),
    ]  # fmt: skip
    assert log_format() == "json"


async def test_text_lines_stay_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    setup_logging("info", "text")

    async def serve() -> None:
        bind_context(session_id="abc123", user="alice")
        logging.getLogger("fleetgate.test").info("hello")

    await asyncio.create_task(serve())
    assert out.getvalue().rstrip().endswith(" INFO    fleetgate.test: hello")
    assert "abc123" not in out.getvalue()
    assert log_format() == "text"


def test_a_bound_context_ends_with_its_block() -> None:
    """Requests served one after another in one task (an HTTP connection's) do not leak
    their ids into each other, nor into what comes after."""

    def connection() -> None:
        bind_context(client_addr="10.0.0.1:1")
        with bound_context(request_id="r1", client_addr="10.0.0.2:2"):
            assert dict(log_context()) == {"request_id": "r1", "client_addr": "10.0.0.2:2"}
        with bound_context(request_id="r2"):
            assert dict(log_context()) == {"request_id": "r2", "client_addr": "10.0.0.1:1"}
        assert dict(log_context()) == {"client_addr": "10.0.0.1:1"}

    contextvars.copy_context().run(connection)  # not this test process's context
    assert "client_addr" not in log_context()


def test_unknown_context_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown log context fields: \\['key'\\]"):
        bind_context(key="user input")


def test_listener_processes_log_in_the_agents_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent run in-process (no command line) starts its listener processes with the
    format it logs in: their sessions' JSON lines carry the session id too."""
    from dbservice.agent.app import default_argv

    monkeypatch.setattr("sys.stderr", io.StringIO())
    setup_logging("warning", "json")
    argv = default_argv()
    assert argv[argv.index("--log-format") + 1] == "json"
    assert argv[argv.index("--log-level") + 1] == "warning"


async def test_the_heap_trim_line_is_about_no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trim is scheduled when some connection closes (in its session's context), but
    is about the process: its line carries no session's fields."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    setup_logging("debug", "json")
    heap = HeapTrimmer(after=1, settle=0.0, every=0.0, trim=lambda: 0)

    async def session() -> None:
        bind_context(session_id="abc123", client_addr="127.0.0.1:5000")
        heap.closed()

    await asyncio.create_task(session())
    for _ in range(500):
        if heap.trims:
            break
        await asyncio.sleep(0.01)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    (line,) = [line for line in lines if line["message"].startswith("heap trimmed")]
    assert not set(CONTEXT_FIELDS) & set(line), line
