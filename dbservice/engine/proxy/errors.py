"""Errors of the RESP proxy engine, and how each becomes a RESP error reply.

::

    ProxyError
    ├── ProtocolError       the client sent malformed RESP: reply, then close
    └── UpstreamProtocolError  the server's reply stream could not be parsed: close

Messages never carry client data beyond one offending byte, so they are safe to log and
to send back.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of the engine's errors."""


class ProtocolError(ProxyError):
    """Malformed client input; :attr:`reply` is what the client receives before the
    connection closes (the same wording valkey-server uses)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def reply(self) -> bytes:
        return b"-ERR Protocol error: " + self.detail.encode("latin-1", "replace") + b"\r\n"


class UpstreamProtocolError(ProxyError):
    """The server sent something that is not RESP (or exceeds the reply limits)."""


def error_reply(message: str) -> bytes:
    """A RESP simple error from ``message`` (CR/LF folded, as clients cannot read them)."""
    text = message.replace("\r", " ").replace("\n", " ")
    if not text[:1].isupper() or " " not in text:
        text = "ERR " + text
    return b"-" + text.encode("utf-8", "replace") + b"\r\n"
