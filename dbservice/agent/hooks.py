"""What the agent decides per command of an authorised session (the proxy engine's
:class:`~dbservice.proxy.SessionHooks`): the roles' command check, the db user gate for
``AUTH``/``HELLO``, and one ``db.session.query`` audit event per command.

Everything here runs on the command path, so it only looks things up and queues audit
events (:meth:`dbservice.audit.AuditEmitter.emit` never waits).

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
* ``RESET`` turns the server connection back into ``default``: the gate closes again.

AUTH, HELLO and QUIT are not subject to the roles' command lists (they manage the
connection, not data); every other command is, before it is forwarded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from dbservice.agent.login import DEFAULT_USER, UpstreamLogin
from dbservice.audit import SessionAudit
from dbservice.auth.authorize import SessionGrant
from dbservice.proxy import Action, Hello
from dbservice.proxy.commands import parse_hello

LOCAL_AUTH = (
    "credentials answered by the agent, never forwarded: the agent already logged the "
    "session in as this db user (IAM token or managed password)"
)
"""The audit reason of a client AUTH (or HELLO ... AUTH) whose credentials the login
strategy answered itself."""

CONNECTION_COMMANDS = frozenset({"AUTH", "HELLO", "QUIT"})
"""Allowed before authentication and not subject to the roles' command lists."""
_LOGIN_REPLIES = frozenset({"AUTH", "HELLO"})
_PLAIN_MAX = 1024
"""Allowed command names a session remembers (a client sending random names cannot
grow it further; the others are checked each time)."""


def refusal(code: str, message: str) -> bytes:
    """``-<CODE> <message>`` as one RESP error line."""
    flat = " ".join(message.replace("\r", " ").replace("\n", " ").split())
    return f"-{code} {flat}\r\n".encode()


class AgentHooks:
    """One per session. ``authenticated``: whether the upstream already is the db user."""

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
        self._auth_owed: deque[bool] = deque()
        """Per forwarded AUTH/HELLO, oldest first: whether it logs in as the db user."""
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
                self._allowed(args)
            else:
                self._audit.query(self._shown(name, argc, args))
            return None
        if name in CONNECTION_COMMANDS:
            if (name == "AUTH" and argc in (2, 3)) or (
                name == "HELLO" and args is not None and parse_hello(args) is not None
            ):
                return None  # on_auth / on_hello decide and audit
            if name != "QUIT":  # malformed: the server answers with an error
                self._auth_owed.append(False)
            self._audit.query(self._shown(name, argc, args))
            return None
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
        if name == "RESET":  # the server connection is `default` again
            self.authenticated = self.db_user == DEFAULT_USER
        elif len(self._plain) < _PLAIN_MAX:
            self._plain.add(name)
        if args is not None:
            self._allowed(args)
        else:
            self._audit.query(self._shown(name, argc, args))
        return None

    def on_reply(self, name: str, error: bool) -> None:
        if name in _LOGIN_REPLIES and self._auth_owed and self._auth_owed.popleft() and not error:
            self.authenticated = True

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
        return self._pass(shown, self._login.on_client_auth(user, password, None))

    def on_hello(self, hello: Hello) -> Action:
        if hello.username is None or hello.password is None:
            self._audit.query(hello.args)
            self._auth_owed.append(False)
            return Action.forward()
        if hello.username != self._db_user:
            return self._refuse_auth(hello.args, self._other_user(hello.username))
        return self._pass(
            hello.args, self._login.on_client_auth(hello.username, hello.password, hello)
        )

    # -- helpers -------------------------------------------------------------------------

    def _other_user(self, user: bytes) -> str:
        shown = user.decode("utf-8", "replace")
        return (
            f"this session is db user {self.db_user!r}; authenticating as {shown!r} is not "
            f"allowed (connect again with --db-user {shown})"
        )

    def _pass(self, shown: Sequence[bytes], action: Action) -> Action:
        if action.reply is None:
            self._auth_owed.append(True)
        answered = action.reply is not None or action.replacement is not None
        self._audit.query(shown, reason=LOCAL_AUTH if answered else "")
        return action

    def _refuse_auth(self, shown: Sequence[bytes], reason: str) -> Action:
        self.refused += 1
        self._audit.query(shown, success=False, reason=reason)
        return Action.respond(refusal("ERR", reason))

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
