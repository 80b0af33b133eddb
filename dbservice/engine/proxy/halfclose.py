"""A client that half-closes: which owed replies it still gets (pure, both engines).

Valkey treats a client's EOF as the client leaving: it answers what it has already read
and run, and drops a command still blocked (``BLPOP`` ...) with the connection, so
nothing is taken on behalf of a client that left. The engines do the same: once the
client has sent its last byte (a plain-TCP half-close, or ``db connect``'s
:data:`~dbservice.route.EOF_COMMAND` for a client that half-closed on the tunnel's
side) they deliver the replies owed in order, but never wait for a command that may
block (:data:`BLOCKING`) nor while the connection is in subscribed or ``MONITOR``
mode: the server connection closes at once then. A client that can no longer read
(TLS ended, connection lost) gets nothing more: the server connection closes at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final

from .hooks import Action, Hello, SessionHooks

BLOCKING: Final = frozenset(
    {"BLMOVE", "BLMPOP", "BLPOP", "BRPOP", "BRPOPLPUSH", "BZMPOP", "BZPOPMAX", "BZPOPMIN",
     "WAIT", "WAITAOF", "XREAD", "XREADGROUP"}
)  # fmt: skip
"""Commands the server flags ``blocking`` (Valkey 9 ``COMMAND``): they may wait for
another client's write, so a client that left must not be waited for on them."""


def first_owed_blocks(names: Iterable[object]) -> bool:
    """Whether the first command still owed a reply (``names`` in order; non-``str``
    items are the engine's own and skipped) may block: ``BLOCKING`` outside ``MULTI``."""
    in_multi = False
    for name in names:
        if type(name) is not str:
            continue
        if name == "MULTI":
            in_multi = True
        elif name in ("EXEC", "DISCARD"):
            in_multi = False
        elif not in_multi:
            return name in BLOCKING
    return False


class EofSignal:
    """The session's hooks, with :data:`~dbservice.route.EOF_COMMAND` taken out of the
    command stream: never forwarded, audited or answered; ``on_eof()`` instead."""

    def __init__(self, hooks: SessionHooks, command: str, on_eof: Callable[[], None]) -> None:
        self._hooks = hooks
        self._command = command
        self._on_eof = on_eof
        self.reply_names: frozenset[str] | None = getattr(hooks, "reply_names", None)

    def on_command(self, name: str, argc: int, args: Sequence[bytes] | None) -> bytes | None:
        if name == self._command and argc == 1:
            self._on_eof()
            return b""
        return self._hooks.on_command(name, argc, args)

    def on_auth(self, username: bytes | None, password: bytes) -> Action:
        return self._hooks.on_auth(username, password)

    def on_hello(self, hello: Hello) -> Action:
        return self._hooks.on_hello(hello)

    def on_reply(self, name: str, error: bool) -> None:
        self._hooks.on_reply(name, error)

    def on_reset(self) -> Awaitable[Sequence[bytes] | None] | None:
        return self._hooks.on_reset()
