"""Logging set-up shared by every command: text for people, JSON for collectors.

A service binds what a line is about (a client's address, then its session's id, user
and database) with :func:`bind_context` once, in the task that serves it; asyncio copies
the context into every task that one spawns, so each record made there carries it
(:class:`ContextFilter`), and JSON lines join the session's audit events by
``session_id``. Nothing is done per command: one set per connection, one read per record.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

CONTEXT_FIELDS = ("session_id", "request_id", "user", "database", "client_addr")
"""The fields a JSON line may carry about what it concerns (bounded: no client input
beyond the certificate's user, the routed database name and an HTTP request's id, which
is checked first: :mod:`dbservice.auth.requestid`)."""

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("fleetgate_log_context", default=_EMPTY)


def bind_context(**fields: str) -> None:
    """Add ``fields`` (of :data:`CONTEXT_FIELDS`) to the current context's log lines, for
    the rest of the current task and the tasks it spawns from now on (not its parent's)."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context fields: {sorted(unknown)}")
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v}}
    _context.set(MappingProxyType(merged))


@contextmanager
def bound_context(**fields: str) -> Iterator[None]:
    """:func:`bind_context` for the ``with`` block only (the previous context after it):
    for work that shares its task with other work, as requests of one HTTP connection."""
    token = _context.set(_context.get())
    try:
        bind_context(**fields)
        yield
    finally:
        _context.reset(token)


def log_context() -> Mapping[str, str]:
    """What :func:`bind_context` bound in the current context (empty when nothing)."""
    return _context.get()


class ContextFilter(logging.Filter):
    """Stamps each record with the context it was made in (``record.log_context``), at
    emission, so that a formatter run later still sees the right one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "log_context"):
            record.log_context = _context.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = getattr(record, "log_context", None)
        if context is None:  # a handler set up without the filter
            context = _context.get()
        out.update(context)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the stream
    that was current at set-up (which a caller may have replaced and closed since)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def log_format() -> str:
    """The format :func:`setup_logging` chose ("json" or "text"), for a child process."""
    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in handlers) else "text"


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = StderrHandler()
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "aiobotocore", "apscheduler", "nats", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
