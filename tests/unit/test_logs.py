"""Logging set-up shared by every command."""

from __future__ import annotations

import io
import json
import logging

import pytest

from fleetgate.logs import setup_logging


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
