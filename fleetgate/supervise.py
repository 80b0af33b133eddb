"""One supervisor per process: named root tasks in an :class:`asyncio.TaskGroup`.

A service process (the agent, discovery) runs its long-running loops as *root tasks* of
one :class:`RootTasks`:

* every root is wrapped in :func:`guard`. A TaskGroup reacts only to exceptions, so a
  root that *returns* although it should run until stopped is turned into one; a root
  that fails is logged once, with its name, and stops the process (:class:`RootFailed`);
* the stop event (SIGTERM/SIGINT, :func:`fleetgate.aio.stop_on_signals`) and roots whose
  end is a normal stop raise :class:`Stopping`, which cancels the group without an error;
* leaving the ``async with`` waits for every root; a root still running 2 s after its
  cancellation is cancelled again, with a warning that names it (a cancellation can be
  lost: Python 3.11's ``asyncio.wait_for``, used by libraries, drops one that meets the
  result it waits for), so a stop never waits forever for one. Afterwards :attr:`RootTasks.failed`
  names the roots that failed (the process exits 1); anything else raised in the group
  (by the body, or a cancellation of the process itself) propagates, a lone exception
  unwrapped from its group.

What a process closes after its roots have stopped (sessions, workers, flushing audit
events) it closes in order after the ``async with``, each part awaiting its own tasks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal

logger = logging.getLogger(__name__)

RECANCEL_AFTER = 2.0
"""Seconds after which a root that was cancelled but runs on is cancelled again."""

OnReturn = Literal["fail", "stop", "done"]
"""What a root's return means: a failure (it should run until stopped), a normal stop
of the process, or nothing (a one-shot helper)."""


class Stopping(Exception):
    """Raised inside the group to stop it without an error."""


class RootFailed(Exception):
    """A root task failed or returned; it has been logged."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} failed")
        self.name = name


async def guard(
    name: str,
    coro: Coroutine[Any, Any, object],
    *,
    on_return: OnReturn = "fail",
    expected: tuple[type[BaseException], ...] = (),
) -> None:
    """Run ``coro``; log and raise :class:`RootFailed` when it fails (one line for an
    ``expected`` kind of error, with the traceback for anything else: a bug), and act on
    its return as ``on_return`` says. Cancellation passes through untouched."""
    try:
        await coro
    except Stopping:
        raise
    except Exception as exc:
        if isinstance(exc, expected):
            logger.error("%s failed (%s); stopping", name, str(exc) or type(exc).__name__)
        else:
            logger.error("%s failed; stopping", name, exc_info=exc)
        raise RootFailed(name) from exc
    if on_return == "stop":
        raise Stopping(name)
    if on_return == "fail":
        logger.error("%s ended, although it should run until stopped; stopping", name)
        raise RootFailed(name)


class RootTasks:
    """``async with RootTasks(stop) as roots: roots.start(name, coro)``: see the module
    docstring. ``expected`` are the kinds of error a root may fail with that need no
    traceback (the registry unreachable, a port taken)."""

    def __init__(
        self,
        stop: asyncio.Event | None = None,
        *,
        expected: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.stop = stop
        self.expected = expected
        self.failed: list[str] = []
        """Names of the roots that failed, in the order they were reported."""
        self.tasks: dict[str, asyncio.Task[None]] = {}
        """The roots started, by name (the group owns them)."""
        self._group: asyncio.TaskGroup | None = None

    async def __aenter__(self) -> RootTasks:
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = group
        if self.stop is not None:
            self.start("stop-signal", self.stop.wait(), on_return="stop")
        return self

    def start(
        self, name: str, coro: Coroutine[Any, Any, object], *, on_return: OnReturn = "fail"
    ) -> None:
        """Start ``coro`` as the root task ``name`` (the group owns it)."""
        if self._group is None:
            coro.close()
            raise RuntimeError("RootTasks.start outside its async with")
        self.tasks[name] = self._group.create_task(
            guard(name, coro, on_return=on_return, expected=self.expected), name=name
        )

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        group, self._group = self._group, None
        assert group is not None
        watchdog = asyncio.ensure_future(self._cancel_again())
        try:
            await group.__aexit__(kind, exc, tb)
        except BaseExceptionGroup as errors:
            _, rest = errors.split(Stopping)
            if rest is not None:
                failed, rest = rest.split(RootFailed)
                if failed is not None:
                    self.failed += [e.name for e in _leaves(failed) if isinstance(e, RootFailed)]
            if rest is None:
                return True  # whatever the body raised is in the group, handled
            leaves = _leaves(rest)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise rest from None
        finally:
            watchdog.cancel()
        return False

    async def _cancel_again(self) -> None:
        """While the group winds down: cancel again each root that was cancelled but has
        not ended within :data:`RECANCEL_AFTER` (see the module docstring)."""
        first_seen: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(RECANCEL_AFTER / 4)
            now = loop.time()
            for name, task in self.tasks.items():
                if task.done() or not task.cancelling():
                    continue
                since = first_seen.setdefault(name, now)
                if now - since >= RECANCEL_AFTER:
                    logger.warning(
                        "%s did not stop %.0fs after its cancellation; cancelling it again",
                        name,
                        now - since,
                    )
                    first_seen[name] = now
                    task.cancel()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _leaves(exc)
        else:
            out.append(exc)
    return out
