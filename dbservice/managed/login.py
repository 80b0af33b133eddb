"""The managed-user login strategy, composed with IAM and the client's own credentials.

:class:`ManagedLogin` is an :class:`~dbservice.engine.login.UpstreamLogin`. The db user
is known at login time, so the choice is made there, per session:

* a managed user of the database: the agent sends ``AUTH <user> <password>`` on the
  fresh upstream connection (:class:`~dbservice.managed.passwords.ManagedPasswords`);
  a client ``AUTH`` as that user is then answered ``+OK`` without being forwarded
  (its password goes nowhere; the audit event says it was answered by the agent) and
  ``HELLO v AUTH ...`` loses its AUTH clause;
* anyone else: the wrapped strategy (IAM for IAM-enabled MemoryDB users, else the
  client's credentials). A user is never both: IAM users are never managed.

:class:`ManagedLogins` is the listener's factory; it wraps the IAM factory.
"""

from __future__ import annotations

from collections.abc import Callable

from bus.schemas import DatabaseResource
from dbservice.engine.login import UpstreamLogin, UpstreamLoginError
from dbservice.engine.proxy import Action, Hello, Streams
from dbservice.managed.passwords import LoginRefused
from dbservice.managed.service import ManagedUsers
from fleetgate.resp import OK


class ManagedLogin:
    """One per session."""

    def __init__(
        self, service: ManagedUsers, resource: DatabaseResource, inner: UpstreamLogin
    ) -> None:
        self.service = service
        self.resource = resource
        self.inner = inner
        self.managed = False
        """True once this session's upstream logged in with the managed password."""

    async def login(self, upstream: Streams, *, db_user: str) -> bool:
        ref = self.service.managed(self.resource, db_user)
        if ref is None:
            return await self.inner.login(upstream, db_user=db_user)
        try:
            await self.service.passwords.login(ref, *upstream)
        except LoginRefused as exc:
            raise UpstreamLoginError(str(exc)) from None
        self.managed = True
        return True

    def on_client_auth(self, username: bytes, password: bytes, hello: Hello | None) -> Action:
        if not self.managed:
            return self.inner.on_client_auth(username, password, hello)
        if hello is None:
            return Action.respond(OK)
        return Action.replace(*hello.without_auth())

    async def credentials(self, *, db_user: str) -> tuple[bytes, bytes] | None:
        """The managed password (the one the last login used, cached) when this
        session logged in with it."""
        if not self.managed:
            return await self.inner.credentials(db_user=db_user)
        ref = self.service.managed(self.resource, db_user)
        if ref is None:
            raise UpstreamLoginError(f"{db_user!r} is no longer a managed user")
        try:
            secret = await self.service.passwords.password(ref)
        except LoginRefused as exc:
            raise UpstreamLoginError(str(exc)) from None
        return ref.user.encode(), secret.password.encode()

    def __getattr__(self, name: str) -> object:
        # The wrapped strategy's extras (an IAM session's keep_alive) stay reachable.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class ManagedLogins:
    """The listener's ``login`` factory: managed users first, then ``inner``'s choice."""

    def __init__(
        self,
        service: ManagedUsers,
        inner: Callable[[DatabaseResource], UpstreamLogin],
    ) -> None:
        self.service = service
        self.inner = inner

    def __call__(self, resource: DatabaseResource) -> UpstreamLogin:
        return ManagedLogin(self.service, resource, self.inner(resource))

    def __getattr__(self, name: str) -> object:
        # e.g. ``auth`` of the wrapped IamLogins
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
