"""The agent's per-command hooks on their own: the db user gate, the roles' command
lists, and what each decision leaves in the audit trail."""

from __future__ import annotations

from pathlib import Path

from bus.access import Identity, Role
from bus.audit import AuditEvent, Outgoing, SessionQuery, SessionStart
from dbservice.access.audit import AuditEmitter
from dbservice.access.authorize import grant_for
from dbservice.access.spool import AuditSpool
from dbservice.engine.login import ClientCredentials
from dbservice.engine.proxy import Action
from dbservice.engine.proxy.commands import parse_hello
from dbservice.gateway.hooks import AgentHooks
from tests.kits.agent import wait_until

ALICE = Identity(user="alice", roles=("dev",))
DEV = Role.model_validate(
    {
        "name": "dev",
        "allow": {"db_labels": {"env": "dev"}, "db_users": ["app", "default"]},
        "deny": {"redis_commands": ["FLUSH*"]},
    }
)


class Trail:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def publish(self, event: Outgoing) -> None:
        self.events.extend(event.expand())  # a batch: one SessionQuery per command

    def queries(self) -> list[tuple[str, tuple[str, ...], bool]]:
        return [(e.command, e.args, e.success) for e in self.events if isinstance(e, SessionQuery)]


def hooks(db_user: str, trail: Trail) -> tuple[AgentHooks, AuditEmitter]:
    emitter = AuditEmitter(trail.publish)
    grant = grant_for(ALICE, [DEV], database="d", labels={"env": "dev"}, db_user=db_user)
    assert grant.allowed
    audit = emitter.session(ALICE, database="d", db_user=db_user, client_addr="127.0.0.1:1")
    login = ClientCredentials()
    return AgentHooks(
        grant=grant, audit=audit, db_user=db_user, login=login, authenticated=db_user == "default"
    ), emitter


async def test_app_session_gate_and_commands() -> None:
    trail = Trail()
    h, emitter = hooks("app", trail)
    async with emitter:
        assert (h.on_command("GET", 2, [b"GET", b"k"]) or b"").startswith(b"-NOAUTH ")
        assert h.on_command("AUTH", 3, [b"AUTH", b"app", b"pw"]) is None
        assert h.on_auth(b"app", b"pw") == Action.forward()
        assert not h.authenticated  # not until the server says yes
        h.on_reply("AUTH", False)
        assert h.authenticated
        assert h.on_command("GET", 2, [b"GET", b"k"]) is None
        assert (h.on_command("FLUSHDB", 1, [b"FLUSHDB"]) or b"") == (
            b"-NOPERM role dev denies the command FLUSHDB\r\n"
        )
        assert h.on_command("RESET", 1, [b"RESET"]) is None
        # RESET made the connection `default`: the engine logs it in again with the
        # client's last AUTH the server accepted before anything else goes on.
        relogin = h.on_reset()
        assert relogin is not None and await relogin == (b"AUTH", b"app", b"pw")
        assert h.authenticated
        assert h.on_command("GET", 2, [b"GET", b"k"]) is None
        await emitter.flush(5)
    assert trail.queries() == [
        ("GET", ("k",), False),
        ("AUTH", ("app", "******"), True),
        ("GET", ("k",), True),
        ("FLUSHDB", (), False),
        ("RESET", (), True),
        ("GET", ("k",), True),
    ]


async def test_failed_and_malformed_auth_keep_the_gate_closed() -> None:
    trail = Trail()
    h, emitter = hooks("app", trail)
    async with emitter:
        # A malformed AUTH goes to the server (its error comes back): no on_auth.
        assert h.on_command("AUTH", 4, [b"AUTH", b"a", b"b", b"c"]) is None
        assert h.on_command("AUTH", 3, [b"AUTH", b"app", b"bad"]) is None
        assert h.on_auth(b"app", b"bad") == Action.forward()
        hello = parse_hello([b"HELLO", b"3"])
        assert hello is not None and h.on_hello(hello) == Action.forward()
        h.on_reply("AUTH", True)  # the malformed one
        h.on_reply("AUTH", True)  # wrong password
        h.on_reply("HELLO", False)  # a protocol switch is no login
        assert not h.authenticated
        await emitter.flush(5)
    assert [q[1] for q in trail.queries()] == [("******",) * 3, ("app", "******"), ("3",)]


async def test_default_session_takes_one_argument_auth_and_no_other_user() -> None:
    trail = Trail()
    h, emitter = hooks("default", trail)
    async with emitter:
        assert h.authenticated and h.on_command("GET", 2, [b"GET", b"k"]) is None
        assert h.on_auth(None, b"pw") == Action.forward()
        assert h.on_auth(b"default", b"pw") == Action.forward()
        refused = h.on_auth(b"app", b"pw")
        assert refused.reply == (
            b"-ERR this session is db user 'default'; authenticating as 'app' is not allowed "
            b"(connect again with --db-user app)\r\n"
        )
        hello = parse_hello([b"HELLO", b"3", b"AUTH", b"app", b"pw", b"SETNAME", b"x"])
        assert hello is not None and h.on_hello(hello).reply is not None
        await emitter.flush(5)
    assert trail.queries()[-2:] == [
        ("AUTH", ("app", "******"), False),
        ("HELLO", ("3", "AUTH", "app", "******", "SETNAME", "x"), False),
    ]


async def test_a_command_seen_before_is_checked_and_audited_again() -> None:
    """The hooks remember which names the roles allow; the gate and the audit trail
    still apply to every command."""
    trail = Trail()
    h, emitter = hooks("app", trail)
    async with emitter:
        h.authenticated = True
        for _ in range(2):
            assert h.on_command("GET", 2, [b"GET", b"k"]) is None
            assert h.on_command("SET", 3, None) is None  # arguments not inspected
            assert (h.on_command("FLUSHDB", 1, [b"FLUSHDB"]) or b"").startswith(b"-NOPERM ")
        assert h.on_command("RESET", 1, [b"RESET"]) is None
        relogin = h.on_reset()  # authenticated by hand: nothing to log in with
        assert relogin is not None and await relogin is None
        assert (h.on_command("GET", 2, [b"GET", b"k"]) or b"").startswith(b"-NOAUTH ")
        await emitter.flush(5)
    assert trail.queries() == [
        ("GET", ("k",), True),
        ("SET", ("…(2 args not recorded)",), True),
        ("FLUSHDB", (), False),
    ] * 2 + [("RESET", (), True), ("GET", ("k",), False)]
    assert h.refused == 3


async def test_a_full_audit_spool_refuses_commands_instead_of_running_them_unaudited(
    tmp_path: Path,
) -> None:
    async def unreachable(_: Outgoing) -> None:
        raise TimeoutError("nats: timeout")

    spool = AuditSpool.open(tmp_path / "spool", max_bytes=2048)
    emitter = AuditEmitter(unreachable, retry_max=0.1, spool=spool)
    grant = grant_for(ALICE, [DEV], database="d", labels={"env": "dev"}, db_user="default")
    audit = emitter.session(ALICE, database="d", db_user="default", client_addr="127.0.0.1:1")
    h = AgentHooks(
        grant=grant, audit=audit, db_user="default", login=ClientCredentials(), authenticated=True
    )
    async with emitter:
        assert h.on_command("GET", 2, [b"GET", b"k"]) is None
        audit.flush()
        await wait_until(lambda: emitter.spooling, 5, "spooling")  # the publish failed
        while not emitter.full():
            emitter.emit(SessionStart(reason="x" * 500))
        for name, args in (("GET", [b"GET", b"k"]), ("DEL", None)):  # known, then streamed
            refused = h.on_command(name, 2, args) or b""
            assert refused.startswith(b"-ERR the agent's audit spool is full ("), refused
        reply = h.on_auth(None, b"pw").reply or b""  # a login is not run unrecorded either
        assert reply.startswith(b"-ERR the agent's audit spool is full ("), reply
        assert h.refused == 3 and emitter.dropped_total == 3
