"""What the agent decides per command of an authorised session (the proxy engine's
:class:`~dbservice.engine.proxy.SessionHooks`): the roles' command check, the db user gate for
``AUTH``/``HELLO``, and one ``db.session.query`` audit event per command.

Everything here runs on the command path, so it only looks things up and queues audit
events (:meth:`dbservice.access.audit.AuditEmitter.emit` never waits).

The db user gate:

* ``AUTH <user> <password>`` and ``HELLO <n> AUTH <user> <password>`` pass only when
  ``<user>`` is the session's db user; one-argument ``AUTH <password>`` logs in as
  ``default``, so it passes only for sessions of ``default``. Anything else is answered
  with an error and audited as refused; the server never sees it.
* Until the upstream connection is known to be the db user (the login strategy did it,
  or the server accepted the client's AUTH), every command but AUTH, HELLO and QUIT is
  refused with ``-NOAUTH``: a fresh connection runs as ``default``, and a session for
  ``app`` must never run a command as anybody else. A command pipelined behind an AUTH
  whose answer has not come back yet is refused the same way.
* ``RESET`` turns the server connection back into ``default``; the engine asks
  :meth:`AgentHooks.on_reset` for the command that logs it in again as the db user (the
  login strategy's IAM token or managed password, else the client's last AUTH the server
  accepted) and holds every later client command until that succeeded. Only a session
  with nothing to log in with (a password user that never authenticated) has its gate
  closed again.

Words the server reads differently from their bytes never decide anything here: the
server compares option and subcommand names as C strings without case (``AUTH\x00x``
is ``AUTH``; see :mod:`dbservice.engine.proxy.words`), and Redis 7 finds a command named
``FLUSHALL\x00<n>`` as ``FLUSHALL`` for some ``<n>``. So a command name with a NUL byte,
or a NUL byte in the subcommand of a command that has subcommands, is refused;
``HELLO`` is read as the server reads it. Replication commands (``SYNC``, ``PSYNC``,
``REPLCONF``) are refused: they turn the connection into a stream that is not
request/reply.

AUTH, HELLO and QUIT are not subject to the roles' command lists (they manage the
connection, not data); every other command is, before it is forwarded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Sequence

from dbservice.access.audit import MASK, SessionAudit
from dbservice.access.authorize import SessionGrant
from dbservice.engine.login import DEFAULT_USER, UpstreamLogin, UpstreamLoginError
from dbservice.engine.proxy import Action, Hello
from dbservice.engine.proxy.commands import parse_hello
from dbservice.engine.proxy.words import server_word

LOCAL_AUTH = (
    "credentials answered by the agent, never forwarded: the agent already logged the "
    "session in as this db user (IAM token or managed password)"
)
"""The audit reason of a client AUTH (or HELLO ... AUTH) whose credentials the login
strategy answered itself."""

CONNECTION_COMMANDS = frozenset({"AUTH", "HELLO", "QUIT"})
"""Allowed before authentication and not subject to the roles' command lists."""
_LOGIN_REPLIES = frozenset({"AUTH", "HELLO"})
REPLICATION_COMMANDS = frozenset({"SYNC", "PSYNC", "REPLCONF"})
"""Refused up front: a replica's commands. ``SYNC``/``PSYNC`` turn the connection into
an RDB payload and the replication stream, ``REPLCONF ACK`` gets no reply at all; none
of it is request/reply, so the agent could no longer tell commands and replies apart."""
CONTAINERS = frozenset(
    {"ACL", "CLIENT", "CLUSTER", "COMMAND", "COMMANDLOG", "CONFIG", "FUNCTION", "LATENCY",
     "MEMORY", "MODULE", "OBJECT", "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO"}
)  # fmt: skip
"""Commands whose first argument is a subcommand name (looked up by the server as a C
string: a NUL byte ends it)."""
_MASK = MASK.encode()
_PLAIN_MAX = 1024
"""Allowed command names a session remembers (a client sending random names cannot
grow it further; the others are checked each time)."""


def refusal(code: str, message: str) -> bytes:
    """``-<CODE> <message>`` as one RESP error line."""
    flat = " ".join(message.replace("\r", " ").replace("\n", " ").split())
    return f"-{code} {flat}\r\n".encode()


class AgentHooks:
    """One per session. ``authenticated``: whether the upstream already is the db user."""

    reply_names = _LOGIN_REPLIES
    """:meth:`on_reply` looks only at these: the engine leaves out the other replies."""

    def __init__(
        self,
        *,
        grant: SessionGrant,
        audit: SessionAudit,
        db_user: str,
        login: UpstreamLogin,
        authenticated: bool,
    ) -> None:
        self._check = grant.commands.check
        self._audit = audit
        self._login = login
        self.db_user = db_user
        self._db_user = db_user.encode()
        self.authenticated = authenticated
        self._auth_owed: deque[tuple[bytes, ...] | None] = deque()
        """Per forwarded AUTH/HELLO, oldest first: None when it does not log in as the db
        user, else the client's credentials it carries as an AUTH command (empty when
        the agent's login strategy replaced or answered them)."""
        self._creds: tuple[bytes, ...] | None = None
        """The client's last AUTH as the db user that the server accepted."""
        self.refused = 0
        self._plain: set[str] = set()
        """Names the roles allow that are neither connection commands nor RESET: once
        the session is authenticated, such a command is only audited (the roles are
        fixed for the session, so the check's answer does not change)."""
        self._allowed = audit.allowed

    # -- every command -------------------------------------------------------------------

    def on_command(self, name: str, argc: int, args: Sequence[bytes] | None) -> bytes | None:
        if name in self._plain and self.authenticated:  # the common case
            if args is not None:
                if self._allowed(args):
                    return None
            elif self._audit.query(self._shown(name, argc, args)):
                return None
            return self._unrecorded()
        if name in CONNECTION_COMMANDS:
            if (name == "AUTH" and argc in (2, 3)) or (
                name == "HELLO" and args is not None and parse_hello(args) is not None
            ):
                return None  # on_auth / on_hello decide and audit
            if name != "QUIT":  # malformed: the server answers with an error
                self._auth_owed.append(None)
            if name == "HELLO" and args is not None:
                args = _masked_hello(args)
            self._audit.query(self._shown(name, argc, args))
            return None
        if "\x00" in name:  # its arguments are not recorded: they may hold a password
            return self._refuse(
                name,
                argc,
                None,
                "ERR",
                f"the command name {name!r} contains a NUL byte: the server may read it as "
                "the command before the NUL, so the agent refuses it",
            )
        if name in REPLICATION_COMMANDS:
            return self._refuse(
                name,
                argc,
                args,
                "ERR",
                f"{name} is refused through fleetgate: replication turns the connection "
                "into a stream that is not request/reply; replicate from the server itself",
            )
        if name in CONTAINERS and args is not None and argc > 1 and b"\x00" in args[1]:
            sub = args[1].decode("latin-1")
            return self._refuse(  # CONFIG SET\x00 requirepass <pw>: not recorded
                name,
                argc,
                None,
                "ERR",
                f"the subcommand {sub!r} of {name} contains a NUL byte: the server reads "
                "it as the part before the NUL, so the agent refuses it",
            )
        if not self.authenticated:
            return self._refuse(
                name,
                argc,
                args,
                "NOAUTH",
                f"this session is db user {self.db_user!r}: authenticate first with "
                f"AUTH {self.db_user} <password>",
            )
        decision = self._check(name)
        if not decision.allowed:
            return self._refuse(name, argc, args, "NOPERM", decision.reason)
        # RESET: the engine asks on_reset how to log the connection in again.
        if name != "RESET" and name not in CONTAINERS and len(self._plain) < _PLAIN_MAX:
            self._plain.add(name)
        if args is not None:
            if self._allowed(args):
                return None
        elif self._audit.query(self._shown(name, argc, args)):
            return None
        return self._unrecorded()

    def on_reply(self, name: str, error: bool) -> None:
        if name in _LOGIN_REPLIES and self._auth_owed:
            owed = self._auth_owed.popleft()
            if owed is not None and not error:
                self.authenticated = True
                if owed:  # the client's own credentials: what a RESET logs in with again
                    self._creds = owed

    # -- RESET ---------------------------------------------------------------------------

    def on_reset(self) -> Awaitable[Sequence[bytes] | None] | None:
        if not self.authenticated:
            return None  # the gate is closed: the client has to log in as the db user
        return self._relogin()

    async def _relogin(self) -> Sequence[bytes] | None:
        try:
            creds = await self._login.credentials(db_user=self.db_user)
        except UpstreamLoginError as exc:
            raise UpstreamLoginError(
                f"after RESET the agent could not log the session in again as "
                f"{self.db_user!r}: {exc}"
            ) from None
        if creds is not None:
            return (b"AUTH", *creds)
        if self._creds is not None:
            return self._creds
        if self.db_user != DEFAULT_USER:  # cannot happen: authenticated by something
            self.authenticated = False
        return None

    # -- AUTH and HELLO ------------------------------------------------------------------

    def on_auth(self, username: bytes | None, password: bytes) -> Action:
        shown = (b"AUTH", password) if username is None else (b"AUTH", username, password)
        if username is None and self.db_user != DEFAULT_USER:
            return self._refuse_auth(
                shown,
                f"AUTH <password> logs in as 'default', but this session is db user "
                f"{self.db_user!r}: use AUTH {self.db_user} <password>",
            )
        user = username if username is not None else DEFAULT_USER.encode()
        if user != self._db_user:
            return self._refuse_auth(shown, self._other_user(user))
        creds = (b"AUTH", password) if username is None else (b"AUTH", user, password)
        return self._pass(shown, self._login.on_client_auth(user, password, None), creds)

    def on_hello(self, hello: Hello) -> Action:
        shown = hello.masked(_MASK)
        if hello.username is None or hello.password is None:
            self._audit.query(shown)
            self._auth_owed.append(None)
            return Action.forward()
        if hello.username != self._db_user:
            return self._refuse_auth(shown, self._other_user(hello.username))
        return self._pass(
            shown,
            self._login.on_client_auth(hello.username, hello.password, hello),
            (b"AUTH", hello.username, hello.password),
        )

    # -- helpers -------------------------------------------------------------------------

    def _other_user(self, user: bytes) -> str:
        shown = user.decode("utf-8", "replace")
        return (
            f"this session is db user {self.db_user!r}; authenticating as {shown!r} is not "
            f"allowed (connect again with --db-user {shown})"
        )

    def _pass(self, shown: Sequence[bytes], action: Action, creds: tuple[bytes, ...]) -> Action:
        answered = action.reply is not None or action.replacement is not None
        if not self._audit.query(shown, reason=LOCAL_AUTH if answered else ""):
            return Action.respond(self._unrecorded())
        if action.reply is None:
            self._auth_owed.append(() if answered else creds)
        return action

    def _refuse_auth(self, shown: Sequence[bytes], reason: str) -> Action:
        self.refused += 1
        self._audit.query(shown, success=False, reason=reason)
        return Action.respond(refusal("ERR", reason))

    def _unrecorded(self) -> bytes:
        """The answer to a command the audit could not record (the agent's spool is
        full): refused, never run unaudited; it was counted as not recorded."""
        self.refused += 1
        return refusal("ERR", self._audit.full_reason())

    def _refuse(
        self, name: str, argc: int, args: Sequence[bytes] | None, code: str, reason: str
    ) -> bytes:
        self.refused += 1
        self._audit.query(self._shown(name, argc, args), success=False, reason=reason)
        return refusal(code, reason)

    @staticmethod
    def _shown(name: str, argc: int, args: Sequence[bytes] | None) -> Sequence[bytes | str]:
        """The command for the audit trail (arguments of very large commands, and of
        the pub/sub and transaction commands the engine streams, are not recorded)."""
        if args is not None:
            return args
        if argc <= 1:
            return (name,)
        return (name, f"…({argc - 1} args not recorded)")


def _masked_hello(args: Sequence[bytes]) -> tuple[bytes, ...]:
    """A HELLO the server will refuse, for the audit trail: the argument two after
    every word the server would read as ``AUTH`` is masked (``AUTH\\x00`` included)."""
    out = list(args)
    for i in range(2, len(out) - 2):
        if server_word(args[i]) == b"AUTH":
            out[i + 2] = _MASK
    return tuple(out)
