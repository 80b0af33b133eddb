"""The seam between the engine and the agent: what the agent decides per session.

The engine parses; the agent decides. A session calls, on the event loop and in
command order:

* :meth:`SessionHooks.on_command` for every complete command header (name upper-cased,
  argument count including the name, and the arguments only for the commands the engine
  or the hooks asked to inspect). Returning ``None`` forwards the original bytes; a
  ``bytes`` RESP reply (see :func:`~dbservice.engine.proxy.errors.error_reply`) is sent to the
  client instead, in order with the other replies. This is where the RBAC command check
  and the ``db.session.query`` audit event go. It must not block.
* :meth:`SessionHooks.on_auth` / :meth:`SessionHooks.on_hello` for ``AUTH`` and
  ``HELLO`` after ``on_command`` allowed them: the returned :class:`Action` forwards the
  command as sent, forwards a replacement (other credentials, or HELLO without AUTH), or
  answers the client without forwarding. Policies ("AUTH only as the session's db
  user", managed users, IAM) live in the agent's implementation.
* :meth:`SessionHooks.on_reply` for every reply the server sends to a forwarded command,
  in the same order as ``on_command`` allowed them (so a FIFO of timestamps in the
  agent gives per-command latency), with whether it was an error: this is how the agent
  learns whether an AUTH or HELLO succeeded. Push messages and pub/sub messages are not
  replies and are not reported. Hooks with a ``reply_names`` attribute (a frozenset of
  names) hear only of the replies to commands of those names: a call fewer per reply.
* :meth:`SessionHooks.on_reset` for a ``RESET`` the engine is about to forward: the
  server connection becomes ``default`` again, so the agent may have to log it in again
  as the session's db user before any later client command reaches the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .words import server_word


@dataclass(frozen=True, slots=True)
class Action:
    """What to do with an AUTH or HELLO. Build with :meth:`forward`, :meth:`replace` or
    :meth:`respond`."""

    replacement: tuple[bytes, ...] | None = None
    reply: bytes | None = None

    @classmethod
    def forward(cls) -> Action:
        """Send the command upstream as the client sent it."""
        return _FORWARD

    @classmethod
    def replace(cls, *args: bytes | str) -> Action:
        """Send this command upstream instead; its reply goes to the client."""
        if not args:
            raise ValueError("a replacement command needs at least a name")
        return cls(replacement=tuple(a.encode() if isinstance(a, str) else a for a in args))

    @classmethod
    def respond(cls, reply: bytes) -> Action:
        """Forward nothing; answer the client with this RESP reply."""
        return cls(reply=reply)


_FORWARD = Action()


@dataclass(frozen=True, slots=True)
class Hello:
    """A parsed ``HELLO [protover [AUTH username password] [SETNAME clientname]]``."""

    protover: int | None
    username: bytes | None
    password: bytes | None
    setname: bytes | None
    args: tuple[bytes, ...]
    """The command as sent, name first."""

    def without_auth(self) -> tuple[bytes, ...]:
        """The same HELLO with its AUTH clause removed (for :meth:`Action.replace`)."""
        out: list[bytes] = [b"HELLO"]
        if self.protover is not None:
            out.append(b"%d" % self.protover)
        if self.setname is not None:
            out += [b"SETNAME", self.setname]
        return tuple(out)

    def masked(self, mask: bytes = b"******") -> tuple[bytes, ...]:
        """The command as sent with the password of every AUTH clause replaced by
        ``mask`` (options spelled as sent, so an audit trail shows ``AUTH\\x00`` too)."""
        out = list(self.args)
        i = 2
        while i < len(out):
            if server_word(out[i]) == b"AUTH" and i + 2 < len(out):
                out[i + 2] = mask
                i += 3
            else:
                i += 2
        return tuple(out)

    def with_auth(self, username: bytes, password: bytes) -> tuple[bytes, ...]:
        """The same HELLO authenticating as ``username`` with ``password``."""
        out: list[bytes] = [b"HELLO", b"%d" % (self.protover or 2), b"AUTH", username, password]
        if self.setname is not None:
            out += [b"SETNAME", self.setname]
        return tuple(out)


class SessionHooks(Protocol):
    """Implemented by the agent, one instance per client session."""

    def on_command(self, name: str, argc: int, args: Sequence[bytes] | None) -> bytes | None:
        """Allow (``None``) or refuse with a RESP reply. ``args`` includes the name and is
        given only for inspected commands."""
        ...

    def on_auth(self, username: bytes | None, password: bytes) -> Action:
        """``AUTH [username] password`` from the client."""
        ...

    def on_hello(self, hello: Hello) -> Action:
        """``HELLO ...`` from the client (with or without AUTH)."""
        ...

    def on_reply(self, name: str, error: bool) -> None:
        """The server answered the oldest forwarded command still unanswered."""
        ...

    def on_reset(self) -> Awaitable[Sequence[bytes] | None] | None:
        """A ``RESET`` (without arguments) goes to the server now, which makes the
        connection ``default`` again. None: nothing to do. Otherwise the engine holds
        every later client command until the awaitable gives the command that logs the
        connection in again (an ``AUTH``; None: nothing to send), sends it right after
        the RESET with its reply kept from the client, and goes on only once it
        succeeded; when it fails (or the awaitable raises) the session ends."""
        ...


class PassThroughHooks:
    """Allows everything and forwards AUTH and HELLO unchanged (tests, benchmarks, and a
    base class for the agent's hooks)."""

    def on_command(self, name: str, argc: int, args: Sequence[bytes] | None) -> bytes | None:
        return None

    def on_auth(self, username: bytes | None, password: bytes) -> Action:
        return Action.forward()

    def on_hello(self, hello: Hello) -> Action:
        return Action.forward()

    def on_reply(self, name: str, error: bool) -> None:
        return None

    def on_reset(self) -> Awaitable[Sequence[bytes] | None] | None:
        return None
