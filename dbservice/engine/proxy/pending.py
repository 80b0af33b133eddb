"""What a session remembers about each command still owed a reply (pure).

The session's FIFO holds, per forwarded command, its upper-case name (a ``str``: the
common case costs no allocation), or one of the small objects below for the few commands
whose replies change how the reply stream is read, a :class:`Local` reply the engine
itself sends in that position, or an :class:`Injected` command of the agent's own whose
reply the client never sees.
"""

from __future__ import annotations

from collections.abc import Callable


class Local:
    """A reply made by the engine (a refusal, an answered AUTH), sent in its turn."""

    __slots__ = ("close", "reply")

    def __init__(self, reply: bytes, *, close: bool = False) -> None:
        self.reply = reply
        self.close = close
        """Close the session once this reply is written (protocol errors)."""


class Sub:
    """A (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE: answered by ``left`` confirmations of
    ``kind`` (``-1``: an UNSUBSCRIBE without arguments, one per current subscription, at
    least one)."""

    __slots__ = ("kind", "left", "name")

    def __init__(self, name: str, left: int) -> None:
        self.name = name
        self.kind = name.lower().encode()
        self.left = left


class Special:
    """HELLO (switches the protocol on success), RESET, MONITOR."""

    __slots__ = ("name", "protover")

    def __init__(self, name: str, protover: int | None = None) -> None:
        self.name = name
        self.protover = protover


class Injected:
    """A command the agent itself wrote on the upstream connection (a renewed IAM
    ``AUTH``): its reply is dropped, not sent to the client, and ``on_reply(ok)`` is
    called with False when it was an error."""

    __slots__ = ("on_reply",)

    def __init__(self, on_reply: Callable[[bool], None]) -> None:
        self.on_reply = on_reply


Item = str | Local | Sub | Special | Injected
