"""The IAM login strategy: MemoryDB users whose authentication type is ``iam`` are logged
in by the agent with a token; everyone else keeps the client's own credentials.

:class:`IamLogin` is an :class:`~dbservice.engine.login.UpstreamLogin`:

* :meth:`IamLogin.login` asks :class:`~dbservice.upstream.iam.IamAuth` (shared by every
  session of the agent, so answers and tokens are cached) whether the session's db user
  is IAM-enabled; if so it sends ``AUTH <user> <token>`` on the fresh upstream connection
  and the session starts authenticated. A refusal becomes an
  :class:`~dbservice.engine.login.UpstreamLoginError` with the one-line reason.
* Then a client ``AUTH`` as the db user is answered ``+OK`` locally (its password is
  never forwarded: the connection already is that user) and ``HELLO v AUTH ...`` is
  forwarded without its AUTH clause.

:class:`IamLogins` is the factory the listener takes (``login=``): IAM for MemoryDB
records, :class:`~dbservice.engine.login.ClientCredentials` for anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from bus.schemas import DatabaseResource
from dbservice.engine.login import ClientCredentials, UpstreamLogin, UpstreamLoginError
from dbservice.engine.proxy import Action, Hello, Streams
from dbservice.upstream import auth as wire
from dbservice.upstream.auth import CommandInjector
from dbservice.upstream.iam import IamAuth, IamError, IamTarget, Role
from fleetgate.resp import OK


class IamLogin:
    """One per session (the listener builds one per connection)."""

    def __init__(
        self,
        auth: IamAuth,
        resource: DatabaseResource,
        *,
        matcher_role: Role | None = None,
        fallback: UpstreamLogin | None = None,
    ) -> None:
        self.auth = auth
        self.target = IamTarget.of(resource, matcher_role=matcher_role)
        self.fallback: UpstreamLogin = fallback or ClientCredentials()
        self.iam = False
        """True once this session's upstream logged in by IAM token."""
        self.db_user = ""

    async def login(self, upstream: Streams, *, db_user: str) -> bool:
        try:
            if not await self.auth.is_iam_user(self.target, db_user):
                return await self.fallback.login(upstream, db_user=db_user)
            await wire.login(self.auth, self.target, db_user, *upstream)
        except IamError as exc:
            raise UpstreamLoginError(str(exc)) from None
        self.iam, self.db_user = True, db_user
        return True

    def on_client_auth(self, username: bytes, password: bytes, hello: Hello | None) -> Action:
        if not self.iam:
            return self.fallback.on_client_auth(username, password, hello)
        if hello is None:
            return Action.respond(OK)
        return Action.replace(*hello.without_auth())

    async def credentials(self, *, db_user: str) -> tuple[bytes, bytes] | None:
        """A fresh token (cached across sessions) when this session is an IAM login."""
        if not self.iam:
            return await self.fallback.credentials(db_user=db_user)
        try:
            token = await self.auth.token(self.target, self.db_user)
        except IamError as exc:
            raise UpstreamLoginError(str(exc)) from None
        return self.db_user.encode(), token.encode()

    def keep_alive(
        self,
        injector: CommandInjector,
        *,
        every: float = wire.REAUTH_EVERY,
        retry: float = wire.REAUTH_RETRY,
    ) -> Coroutine[Any, Any, None] | None:
        """The re-authentication loop for this session (run it as a task beside the
        proxy, cancel it at the end): a fresh ``AUTH`` ``every`` seconds, ``retry``
        seconds after a refusal or when the session could not take it; None when the
        session is not an IAM login."""
        if not self.iam:
            return None
        return wire.keep_authenticated(
            injector, self.auth, self.target, self.db_user, every=every, retry=retry
        )


class IamLogins:
    """The listener's ``login`` factory: :class:`IamLogin` for MemoryDB clusters,
    :class:`ClientCredentials` otherwise; every session shares :attr:`auth`."""

    def __init__(
        self,
        auth: IamAuth | None = None,
        *,
        matcher_role: Callable[[DatabaseResource], Role | None] | None = None,
    ) -> None:
        self.auth = auth or IamAuth()
        self.matcher_role = matcher_role

    def __call__(self, resource: DatabaseResource) -> UpstreamLogin:
        aws = resource.spec.aws
        if aws is None or aws.memorydb is None:
            return ClientCredentials()
        role = self.matcher_role(resource) if self.matcher_role is not None else None
        return IamLogin(self.auth, resource, matcher_role=role)
