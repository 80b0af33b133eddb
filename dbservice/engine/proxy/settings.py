"""Limits and timeouts of one proxy session (pure data, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Everything a client (or a server) can make a session hold is bounded here."""

    max_inline: int = 64 * 1024
    """Longest inline command line (valkey-server's PROTO_INLINE_MAX_SIZE)."""
    max_bulk: int = 512 * MiB
    """Largest declared bulk argument (valkey-server's ``proto-max-bulk-len``)."""
    max_multibulk: int = (1 << 31) - 1
    """Most arguments in one command (valkey-server's own bound, INT_MAX: a command is
    refused for its count exactly where the server refuses it)."""
    max_inspect: int = 64 * 1024
    """Largest command the engine reads whole to look at its arguments (AUTH, HELLO,
    CLIENT, and the names a hook asks for); larger AUTH/HELLO/CLIENT are refused."""
    max_reply_nesting: int = 128
    """Deepest aggregate nesting accepted in the replies the engines decode during
    connection set-up (AUTH, HELLO). Replies passed on to the client are never limited
    in depth: whatever the server sends reaches the client (a Lua script alone can nest
    about 8,000 levels)."""
    max_reply_line: int = 64 * MiB
    """Longest simple reply line (status, error, number) accepted from the server."""
    read_size: int = 256 * 1024
    """Bytes asked for per read on either side; payloads pass through in pieces of at
    most this size, so a large value is never held whole."""
    max_pending: int = 100_000
    """Commands forwarded but not yet answered before the engine stops reading the
    client (pipelining back-pressure on top of the sockets' own)."""
    write_high_water: int = 1 * MiB
    """Transport write-buffer high-water mark on both sides (``drain`` blocks above)."""
    max_command_buffer: int = 128 * MiB
    """Most bytes one session holds of a command still arriving (the agent's
    ``listener.max_command_buffer``). The cluster engine holds each command whole, so a
    command declaring more is refused; the single-node engine streams arguments and
    never holds more than ``max_inspect`` plus one read."""


@dataclass(frozen=True, slots=True)
class ProxyTimeouts:
    idle: float | None = None
    """Seconds without a byte in either direction before the session closes (None: never)."""
    close_grace: float = 2.0
    """After the client stops (EOF or protocol error), seconds to wait for the replies
    already owed before closing."""
    link_idle: float | None = 30.0
    """The cluster engine: seconds a session's connection to a node may stay unused
    (nothing sent, nothing owed) before it is closed, to be opened again, and logged in
    again, when the session next sends there (None: kept until the session ends). An
    idle session then holds no connection to the cluster, whatever it used before."""


BUFFER_FLOOR = 1 * MiB
"""What a session may always hold of a command still arriving, whatever the others
hold: :class:`CommandBuffers` refuses only sessions holding more."""


class CommandBuffers:
    """The bytes every session of one process holds of commands still arriving (the
    agent's ``listener.max_command_buffer_total``), shared by the sessions: each adds
    what it holds as it changes and takes it back when it ends. A session holding more
    than :data:`BUFFER_FLOOR` while the sum is over ``limit`` is refused."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        """Bytes held right now, all sessions together."""
