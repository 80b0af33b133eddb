"""How a session's upstream connection becomes the session's db user.

A session is routed as one db user (``FLEETGATE.ROUTE <database> <db_user>``), checked
against the roles. Whatever the client then sends, the upstream connection may only ever
be that db user: the agent's hooks refuse ``AUTH``/``HELLO ... AUTH`` naming anyone else
before an :class:`UpstreamLogin` is asked anything.

An :class:`UpstreamLogin` is the part that differs per kind of database user:

* :meth:`UpstreamLogin.login` runs on the fresh upstream connection before any client
  byte is proxied. It returns True when the connection is already the db user (so client
  commands need no ``AUTH`` first), False when the client must authenticate itself.
* :meth:`UpstreamLogin.on_client_auth` decides what a client ``AUTH`` (or ``HELLO ...
  AUTH``) *as the session's db user* becomes: forwarded, replaced, or answered locally.
* :meth:`UpstreamLogin.credentials` gives the agent's own credentials again (a fresh IAM
  token, the managed password) for a live connection that a client ``RESET`` made
  ``default``; None when the client's own credentials log the session in.

:class:`ClientCredentials` is today's strategy: the client brings the db user's password
and its AUTH is forwarded unchanged. IAM tokens and agent-managed passwords plug in here
later: their ``login`` sends the agent's own ``AUTH`` (and is True), and their
``on_client_auth`` answers ``+OK`` without forwarding the client's secret.
"""

from __future__ import annotations

from typing import Protocol

from dbservice.engine.proxy import Action, Hello, Streams

DEFAULT_USER = "default"
"""The user a fresh Redis/Valkey connection runs as, and the one ``AUTH <password>``
(one argument) authenticates."""


class UpstreamLoginError(Exception):
    """The agent could not log in to the database; the message is shown to the client."""


class UpstreamLogin(Protocol):
    async def login(self, upstream: Streams, *, db_user: str) -> bool:
        """Make ``upstream`` the db user, if this strategy can. True when it now is."""
        ...

    def on_client_auth(self, username: bytes, password: bytes, hello: Hello | None) -> Action:
        """A client ``AUTH username password`` (``hello`` set for ``HELLO ... AUTH``);
        ``username`` is always the session's db user (others never get here)."""
        ...

    async def credentials(self, *, db_user: str) -> tuple[bytes, bytes] | None:
        """``(user, secret)`` for ``AUTH`` when this strategy logged the session in
        itself (after a ``RESET``), else None. Raises :class:`UpstreamLoginError`."""
        ...


class ClientCredentials:
    """The client authenticates with the db user's own password; the agent only makes
    sure it is the session's db user. A new connection runs as ``default``, so a session
    for ``default`` needs no AUTH first."""

    async def login(self, upstream: Streams, *, db_user: str) -> bool:
        return db_user == DEFAULT_USER

    def on_client_auth(self, username: bytes, password: bytes, hello: Hello | None) -> Action:
        return Action.forward()

    async def credentials(self, *, db_user: str) -> tuple[bytes, bytes] | None:
        return None
