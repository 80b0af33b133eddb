"""Incremental reader of the server's reply stream (pure: bytes in, callbacks out).

It passes the server's bytes to the client unchanged, in pieces (a large value is never
held whole), and finds where each top-level reply ends so that:

* each reply is matched to the oldest command still owed one (``pending``), and the
  engine's own replies (refusals) are sent exactly in their turn;
* RESP3 push messages (``>``) pass through without being counted, except the
  subscription confirmations that answer (P|S)(UN)SUBSCRIBE;
* in RESP2, once subscribed, ``message``/``pmessage``/``smessage`` arrays are pushes
  too, and the subscription counts the server reports are followed, so an UNSUBSCRIBE
  without arguments is known to be answered after one confirmation per subscription;
* a successful ``HELLO 3`` switches to RESP3 reading, ``RESET`` back to RESP2, and after
  ``MONITOR`` everything is a pass-through stream;
* the reply to an :class:`Injected` command (the agent's own, written between two client
  commands) is dropped instead of written; it must be a short reply that arrives in one
  read, as ``AUTH``'s ``+OK`` or error line does.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from .errors import UpstreamProtocolError
from .hooks import SessionHooks
from .pending import Injected, Item, Local, Special, Sub
from .settings import ProxyLimits

logger = logging.getLogger(__name__)

_MAX_COUNT_LINE = 64
_LINE_TYPES = frozenset(b"+-:_,#(")
_BULK_TYPES = frozenset(b"$!=")
_AGG_TYPES = frozenset(b"*~%|>")
_MESSAGES = frozenset({b"message", b"pmessage", b"smessage"})
_CONFIRMATIONS = frozenset(
    {b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe",
     b"sunsubscribe"}
)  # fmt: skip
_INCOMPLETE = -1


def _count(data: bytes, start: int, end: int) -> int:
    try:
        return int(data[start:end])
    except ValueError:
        raise UpstreamProtocolError("invalid length in a reply") from None


class ReplyParser:
    """Feed it what the server sends; it calls ``write`` with bytes for the client and
    ``on_close_reply`` after writing a :class:`Local` reply that ends the session."""

    def __init__(
        self,
        *,
        hooks: SessionHooks,
        limits: ProxyLimits,
        write: Callable[[bytes | memoryview], None],
        pending: deque[Item],
        on_close_reply: Callable[[], None],
    ) -> None:
        self._hook_reply = hooks.on_reply
        self._reply_names: frozenset[str] | None = getattr(hooks, "reply_names", None)
        """The names whose replies the hooks want to hear of (``reply_names``); None:
        every one."""
        self._limits = limits
        self._write = write
        self._pending = pending
        self._on_close_reply = on_close_reply
        self.resp3 = False
        self.monitor = False
        self._rest = b""
        self._stack: list[int] = []
        self._bulk_left = 0
        self._frame_counted = False
        self._frame_error = False
        self._total = 0
        """Channels + patterns, as the server last reported."""
        self._channels = 0
        self._patterns = 0
        self._shard = 0
        self.replies = 0
        self.pushes = 0

    @property
    def at_boundary(self) -> bool:
        """No reply is half written to the client: an engine reply may go out now."""
        return not self._stack and not self._bulk_left and not self._rest

    @property
    def subscribed(self) -> bool:
        """The server has this connection in subscribed mode, as far as its
        confirmations said."""
        return bool(self._total or self._shard)

    @property
    def subscriptions(self) -> int:
        return self._channels + self._patterns + self._shard

    def feed(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
            self._rest = b""
        n = len(data)
        p = 0
        fwd = 0
        if self._stack or self._bulk_left:
            p = self._skip(data, 0, n)
            if self._stack or self._bulk_left:
                self._finish(data, fwd, p, n)
                return
            fwd = self._frame_done(data, fwd, p)
        pending = self._pending
        popleft = pending.popleft
        on_reply = self._hook_reply
        names = self._reply_names
        done = 0
        try:
            while p < n:
                t = data[p]
                if t == 36 and p + 3 < n and data[p + 2] == 13 and 48 <= data[p + 1] <= 57:
                    end = p + 6 + data[p + 1] - 48  # "$<digit>\r\n": no find/int
                    if end > n:
                        self._bulk_left = end - n
                        self._frame_counted, self._frame_error = True, False
                        p = n
                        break
                    p = end
                    error = False
                elif t in _LINE_TYPES:
                    e = data.find(b"\r\n", p + 1)
                    if e < 0:
                        if n - p > self._limits.max_reply_line:
                            raise UpstreamProtocolError("reply line too long")
                        break
                    p = e + 2
                    error = t == 45
                elif t in _BULK_TYPES:
                    e = data.find(b"\r\n", p + 1, p + _MAX_COUNT_LINE)
                    if e < 0:
                        if n - p >= _MAX_COUNT_LINE:
                            raise UpstreamProtocolError("bulk length line too long")
                        break
                    size = _count(data, p + 1, e)
                    end = e + 4 + size if size >= 0 else e + 2
                    if end > n:
                        self._bulk_left = end - n
                        self._frame_counted, self._frame_error = True, t == 33
                        p = n
                        break
                    p = end
                    error = t == 33
                else:
                    p, fwd = self._aggregate(data, p, n, fwd, t)
                    if p < 0:
                        p = -p - 1
                        break
                    continue
                # one complete top-level reply ends at p: the common case inline
                if pending and not self.monitor:
                    item = pending[0]
                    if type(item) is str:
                        popleft()
                        done += 1
                        if names is None or item in names:
                            on_reply(item, error)
                        if pending and type(pending[0]) is not str:
                            fwd = self._flush_locals(data, fwd, p)
                        continue
                fwd = self._reply_done(data, fwd, p, error)
        finally:
            self.replies += done
        self._finish(data, fwd, p, n)

    def _aggregate(self, data: bytes, p: int, n: int, fwd: int, t: int) -> tuple[int, int]:
        """A top-level aggregate at ``p``: returns (end, fwd) when complete, or
        (-where_parsing_stopped - 1, fwd) when it continues in the next read."""
        if t not in _AGG_TYPES:
            raise UpstreamProtocolError(f"unknown reply type {chr(t)!r}")
        if t == 62 or (t == 42 and not self.resp3 and self._subscribed()):
            q = self._pubsub_frame(data, p, n)
            if q == _INCOMPLETE:
                if n - p > self._limits.max_reply_line:
                    raise UpstreamProtocolError("pub/sub frame header too long")
                return -p - 1, fwd
            if self._stack or self._bulk_left:
                return -q - 1, fwd
            return q, self._frame_done(data, fwd, q)
        e = data.find(b"\r\n", p + 1, p + _MAX_COUNT_LINE)
        if e < 0:
            if n - p >= _MAX_COUNT_LINE:
                raise UpstreamProtocolError("aggregate length line too long")
            return -p - 1, fwd
        size = _count(data, p + 1, e)
        if size <= 0:
            return e + 2, self._reply_done(data, fwd, e + 2, False)
        if t == 37:  # '%' map
            size *= 2
        elif t == 124:  # '|' attribute: its pairs, then the value it describes
            size = size * 2 + 1
        self._stack.append(size)
        self._frame_counted, self._frame_error = True, False
        q = self._skip(data, e + 2, n)
        if self._stack or self._bulk_left:
            return -q - 1, fwd
        return q, self._frame_done(data, fwd, q)

    def _finish(self, data: bytes, fwd: int, p: int, n: int) -> None:
        if fwd < p:
            if fwd == 0 and p == n:
                self._write(data)
            else:
                self._write(memoryview(data)[fwd:p])
        if p < n:
            self._rest = data[p:]

    def _skip(self, data: bytes, p: int, n: int) -> int:
        """Skip nested elements of the current reply from ``p``."""
        stack = self._stack
        while True:
            left = self._bulk_left
            if left:
                if n - p < left:
                    self._bulk_left = left - (n - p)
                    return n
                p += left
                self._bulk_left = 0
            else:
                if not stack:
                    return p
                if p >= n:
                    return p
                t = data[p]
                if t in _LINE_TYPES:
                    e = data.find(b"\r\n", p + 1)
                    if e < 0:
                        if n - p > self._limits.max_reply_line:
                            raise UpstreamProtocolError("reply line too long")
                        return p
                    p = e + 2
                else:
                    e = data.find(b"\r\n", p + 1, p + _MAX_COUNT_LINE)
                    if e < 0:
                        if n - p >= _MAX_COUNT_LINE:
                            raise UpstreamProtocolError("length line too long")
                        return p
                    size = _count(data, p + 1, e)
                    p = e + 2
                    if t in _BULK_TYPES:
                        if size >= 0:
                            self._bulk_left = size + 2
                            continue
                    elif t in _AGG_TYPES:
                        if size > 0:
                            if t == 37:
                                size *= 2
                            elif t == 124:
                                size = size * 2 + 1
                            stack.append(size)
                            continue
                    else:
                        raise UpstreamProtocolError(f"unknown reply type {chr(t)!r}")
            # one element of the innermost aggregate is complete
            while stack:
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            if not stack:
                return p

    # -- matching replies to commands ------------------------------------------------------

    def _on_reply(self, name: str, error: bool) -> None:
        """Tell the hooks of a reply, when they want to hear of it."""
        names = self._reply_names
        if names is None or name in names:
            self._hook_reply(name, error)

    def _subscribed(self) -> bool:
        if self._total or self._shard:
            return True
        pending = self._pending
        return bool(pending) and type(pending[0]) is Sub

    def _frame_done(self, data: bytes, fwd: int, p: int) -> int:
        if self._frame_counted:
            return self._reply_done(data, fwd, p, self._frame_error)
        return self._flush_locals(data, fwd, p)

    def _reply_done(self, data: bytes, fwd: int, p: int, error: bool) -> int:
        pending = self._pending
        if self.monitor or not pending:
            return fwd
        item = pending[0]
        if type(item) is str:
            pending.popleft()
            self.replies += 1
            self._on_reply(item, error)
        elif type(item) is Local:  # cannot happen: locals at the head are flushed early
            return self._flush_locals(data, fwd, p)
        elif type(item) is Injected:
            # Everything before this reply went out when the item reached the head, so
            # data[fwd:p] is exactly its reply: dropped.
            pending.popleft()
            fwd = p
            try:
                item.on_reply(not error)
            except Exception:
                logger.exception("the callback of an injected command failed")
        else:
            pending.popleft()
            self.replies += 1
            if type(item) is Special:
                self._special_done(item, error)
                self._on_reply(item.name, error)
            elif type(item) is Sub:  # answered by something else than confirmations
                self._on_reply(item.name, error)
        if pending and type(pending[0]) is not str:
            return self._flush_locals(data, fwd, p)
        return fwd

    def _special_done(self, item: Special, error: bool) -> None:
        if error:
            return
        if item.name == "HELLO" and item.protover is not None:
            self.resp3 = item.protover == 3
        elif item.name == "RESET":
            self.resp3 = self.monitor = False
            self._total = self._channels = self._patterns = self._shard = 0
        elif item.name == "MONITOR":
            self.monitor = True

    def _flush_locals(self, data: bytes, fwd: int, p: int) -> int:
        pending = self._pending
        while pending and type(pending[0]) is Local:
            local = pending.popleft()
            assert type(local) is Local
            if fwd < p:
                self._write(memoryview(data)[fwd:p])
                fwd = p
            self._write(local.reply)
            if local.close:
                self._on_close_reply()
        if pending and type(pending[0]) is Injected and fwd < p:
            # The next reply is an injected command's: what came before it goes now,
            # so that reply can be dropped exactly.
            self._write(memoryview(data)[fwd:p])
            fwd = p
        return fwd

    def _pubsub_frame(self, data: bytes, p: int, n: int) -> int:
        """A ``>`` push, or a RESP2 array while subscribed, at ``p``: classify it by its
        first element. Returns where parsing stopped (the frame may continue in
        ``_stack``) or ``_INCOMPLETE`` when its first elements are not all here."""
        t = data[p]
        e = data.find(b"\r\n", p + 1, p + _MAX_COUNT_LINE)
        if e < 0:
            return _INCOMPLETE
        size = _count(data, p + 1, e)
        q = e + 2
        kind = b""
        if size >= 1 and q < n and data[q] == 36:
            e2 = data.find(b"\r\n", q + 1, q + _MAX_COUNT_LINE)
            if e2 < 0:
                return _INCOMPLETE
            end = e2 + 2 + _count(data, q + 1, e2)
            if end + 2 > n:
                return _INCOMPLETE
            kind = data[e2 + 2 : end]
            q = end + 2
        elif size >= 1 and q >= n:
            return _INCOMPLETE
        if kind in _CONFIRMATIONS and size == 3:
            return self._confirmation(data, q, n, kind)
        if size <= 0:
            counted = t != 62
            self._frame_counted, self._frame_error = counted, False
            return q
        if kind:
            if size > 1:
                self._stack.append(size - 1)
        else:
            self._stack.append(size)
        if kind in _MESSAGES or t == 62:
            self.pushes += 1
            self._frame_counted = False
        else:
            self._frame_counted, self._frame_error = True, False
        return self._skip(data, q, n)

    def _confirmation(self, data: bytes, q: int, n: int, kind: bytes) -> int:
        # channel: bulk or null
        if q >= n:
            return _INCOMPLETE
        if data[q] == 95:  # '_' RESP3 null
            e = data.find(b"\r\n", q + 1)
            if e < 0:
                return _INCOMPLETE
            q = e + 2
        else:
            e = data.find(b"\r\n", q + 1, q + _MAX_COUNT_LINE)
            if e < 0:
                return _INCOMPLETE
            size = _count(data, q + 1, e)
            q = e + 2 + (size + 2 if size >= 0 else 0)
            if q > n:
                return _INCOMPLETE
        if q >= n:
            return _INCOMPLETE
        e = data.find(b"\r\n", q + 1, q + _MAX_COUNT_LINE)
        if e < 0:
            return _INCOMPLETE
        count = _count(data, q + 1, e)
        q = e + 2
        before = self._follow(kind, count)
        pending = self._pending
        item = pending[0] if pending else None
        if type(item) is Sub and item.kind == kind:
            if item.left < 0:
                item.left = max(1, before)
            item.left -= 1
            if item.left <= 0:
                pending.popleft()
                self.replies += 1
                self._on_reply(item.name, False)
        else:
            self.pushes += 1  # unsolicited (a shard channel moved away, say)
        self._frame_counted = False  # any count was done above
        return q

    def _follow(self, kind: bytes, count: int) -> int:
        """Track subscriptions from a confirmation; return this kind's count before it."""
        if kind == b"subscribe":
            before = self._channels
            if count > self._total:
                self._channels += 1
            self._total = count
        elif kind == b"psubscribe":
            before = self._patterns
            if count > self._total:
                self._patterns += 1
            self._total = count
        elif kind == b"unsubscribe":
            before = self._channels
            if count < self._total:
                self._channels -= 1
            self._total = count
        elif kind == b"punsubscribe":
            before = self._patterns
            if count < self._total:
                self._patterns -= 1
            self._total = count
        else:
            before = self._shard
            self._shard = count
        return before
