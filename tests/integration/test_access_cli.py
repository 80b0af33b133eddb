"""The admin and user commands, run in-process against a real nats-server."""

from __future__ import annotations

import io
import json
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from bus.server import NatsServer
from dbservice.access.ca import load_certs, verify_client_certificate
from fleetgate.cli import main

ROLE = """\
kind: role
name: payments-dev
allow:
  db_labels: {"env": ["dev", "staging"], "team": "payments"}
  db_users: ["app", "{{internal.db_users}}"]
  redis_commands: ["*"]
deny:
  db_labels: {"pci": "true"}
  redis_commands: ["FLUSHALL", "FLUSHDB", "CONFIG*", "KEYS"]
options: {max_session_ttl: 30m}
"""


@pytest.fixture
def cli(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> pytest.MonkeyPatch:
    monkeypatch.setenv("FLEETGATE_NATS_URL", nats_server.url)
    monkeypatch.setenv("FLEETGATE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLEETGATE_CA_DIR", str(tmp_path / "ca"))
    return monkeypatch


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("fleetgate: error: "), err
    assert "Traceback" not in err
    return err


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_roles_and_users(
    cli: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    role = write(tmp_path / "role.yaml", ROLE)
    assert run(capsys, "roles", "create", "-f", role)[1] == "created role payments-dev\n"
    code, _, err = run(capsys, "roles", "create", "-f", role)
    assert code == 2 and "exists already" in one_error(err)
    assert run(capsys, "roles", "create", "-f", role, "--replace")[0] == 0
    code, out, _ = run(capsys, "roles", "ls")
    assert "payments-dev" in out and "env=dev|staging" in out and "30m" in out
    doc = json.loads(run(capsys, "roles", "ls", "--format", "json")[1])
    assert doc[0]["deny"]["redis_commands"][2] == "CONFIG*"

    code, _, err = run(capsys, "users", "add", "alice", "--roles", "payments-dev,ghost")
    assert code == 2 and "unknown role(s): ghost" in one_error(err)
    cli.setattr("sys.stdin", io.StringIO("short\n"))
    code, _, err = run(
        capsys, "users", "add", "alice", "--roles", "payments-dev", "--password-stdin"
    )
    assert code == 2 and "at least 8 characters" in one_error(err)
    cli.setattr("sys.stdin", io.StringIO("a good password\n"))
    code, out, _ = run(
        capsys, "users", "add", "alice", "--roles", "payments-dev", "--db-users", "alice-rw",
        "--password-stdin", "--totp",
    )  # fmt: skip
    assert code == 0 and "otpauth://totp/fleetgate:alice?secret=" in out
    code, _, err = run(capsys, "users", "add", "alice", "--roles", "payments-dev")
    assert code == 2 and "exists already" in one_error(err)
    code, _, err = run(capsys, "users", "add", "bad name", "--roles", "payments-dev")
    assert code == 2 and "not valid" in one_error(err)
    assert run(capsys, "users", "add", "ci-bot", "--roles", "payments-dev")[0] == 0
    code, out, _ = run(capsys, "users", "ls")
    assert "alice" in out and "password+totp" in out and "sign only" in out
    listed = json.loads(run(capsys, "users", "ls", "--format", "json")[1])
    assert {u["name"] for u in listed} == {"alice", "ci-bot"}
    assert "hash" not in json.dumps(listed) and "secret" not in json.dumps(listed)

    code, out, _ = run(capsys, "roles", "rm", "payments-dev")
    assert code == 0 and "still named by users alice, ci-bot" in out
    code, _, err = run(capsys, "roles", "rm", "payments-dev")
    assert code == 2 and "no role 'payments-dev'" in one_error(err)
    assert run(capsys, "users", "rm", "alice")[0] == 0
    code, _, err = run(capsys, "users", "rm", "alice")
    assert code == 2 and "no user 'alice'" in one_error(err)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nallow: [1\n", "not valid YAML at line"),
        ("name: x\nalow: {}\n", "alow: unknown field"),
        ("name: x\nallow: {db_lables: {}}\n", "allow.db_lables: unknown field"),
        ("name: x\noptions: {max_session_ttl: soon}\n", "not a duration"),
        ("kind: user\nname: x\n", "expected 'role'"),
        ("allow: {}\n", "name: required field is missing"),
        ("name: x\nallow: {db_labels: {env: '^(bad$'}}\n", "not a valid regex"),
    ],
)
def test_bad_role_files_give_one_clear_error(
    cli: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    text: str, message: str,
) -> None:  # fmt: skip
    code, _, err = run(capsys, "roles", "create", "-f", write(tmp_path / "r.yaml", text))
    assert code == 2 and message in one_error(err)


def test_missing_role_file(cli: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "roles", "create", "-f", "/nonexistent/role.yaml")
    assert code == 2 and "not found" in one_error(err)


def test_auth_init_sign_and_status(
    cli: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "auth", "sign", "--user", "ci-bot", "--out", str(tmp_path / "o"))
    assert code == 2 and "fleetgate auth init" in one_error(err)

    code, out, _ = run(capsys, "auth", "init", "--dir", str(tmp_path / "ca"))
    assert code == 0 and "fingerprint SHA256:" in out
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    assert run(capsys, "roles", "create", "-f", write(tmp_path / "role.yaml", ROLE))[0] == 0
    assert run(capsys, "users", "add", "ci-bot", "--roles", "payments-dev")[0] == 0

    code, _, err = run(capsys, "auth", "sign", "--user", "nobody", "--out", str(tmp_path / "o"))
    assert code == 2 and "no user 'nobody'" in one_error(err)
    out_dir = tmp_path / "bot"
    code, out, _ = run(
        capsys, "auth", "sign", "--user", "ci-bot", "--ttl", "1h", "--out", str(out_dir)
    )
    assert code == 0 and "capped by the user's roles" in out
    assert stat.S_IMODE((out_dir / "key.pem").stat().st_mode) == 0o600
    cert = load_certs((out_dir / "cert.pem").read_text())[0]
    ca = load_certs((tmp_path / "ca" / "ca.crt").read_text())
    ident = verify_client_certificate(cert, ca)
    assert (ident.user, ident.kind, ident.roles) == ("ci-bot", "bot", ("payments-dev",))
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() <= 30 * 60 + 61

    code, out, _ = run(
        capsys, "auth", "sign", "--host", "agent-1,10.0.0.7", "--out", str(tmp_path / "a")
    )
    assert code == 0 and "agent-1, 10.0.0.7" in out
    with pytest.raises(SystemExit):
        run(capsys, "auth", "sign", "--user", "ci-bot", "--ttl", "0s", "--out", "x")
    assert "--ttl: must be longer than zero" in capsys.readouterr().err

    code, _, err = run(capsys, "status")
    assert code == 1 and "not logged in" in err
    code, out, _ = run(capsys, "audit", "search", "--type", "auth.login", "--format", "json")
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert (event["user"], event["method"]) == ("ci-bot", "sign")


def logged_in_home(tmp_path: Path) -> Path:
    """A FLEETGATE_HOME (the ``cli`` fixture's) with an identity and a ``db connect``
    set-up for the database orders."""
    home = tmp_path / "home"
    (home / "identity").mkdir(parents=True)
    (home / "identity" / "cert.pem").write_text("x")
    (home / "db" / "orders").mkdir(parents=True)
    return home


def test_db_logout(
    cli: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home = logged_in_home(tmp_path)
    code, out, _ = run(capsys, "db", "logout", "orders")
    assert code == 0 and "removed" in out and not (home / "db" / "orders").exists()
    assert (home / "identity").exists()
    code, out, _ = run(capsys, "db", "logout")
    assert code == 0 and not (home / "identity").exists()
    assert run(capsys, "db", "logout")[1] == "nothing to remove\n"


def test_audit_search_filters(
    cli: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], nats_server: NatsServer
) -> None:
    import asyncio

    from bus import Bus
    from bus.access import Identity
    from bus.audit import ensure_audit_stream
    from dbservice.access.audit import AuditEmitter

    async def seed() -> None:
        async with await Bus.connect(nats_server.url, name="seed") as bus:
            await ensure_audit_stream(bus)
            async with AuditEmitter.for_bus(bus, host_id="agent-1") as emitter:
                for user, db in (("alice", "orders"), ("bob", "orders"), ("alice", "users")):
                    s = emitter.session(Identity(user=user), database=db, db_user="app",
                                        client_addr="10.0.0.9:5000")  # fmt: skip
                    s.start()
                    s.query([b"AUTH", b"app", b"hunter22"])
                    s.query([b"GET", b"k"])
                    s.end()
                eve = emitter.session(
                    Identity(user="eve"),
                    database="orders",
                    db_user="admin",
                    client_addr="10.0.0.66:1",
                )
                eve.start(success=False, reason="denied")

    asyncio.run(seed())
    code, out, _ = run(capsys, "audit", "search", "--user", "alice", "--db", "orders")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert "db.session.query  alice@orders(app)  10.0.0.9:5000  AUTH app ******" in lines[1]
    assert "hunter22" not in out
    code, out, _ = run(capsys, "audit", "search", "--type", "db.session.query", "--format", "json")
    assert [json.loads(x)["args"][-1] for x in out.splitlines()] == ["******", "k"] * 3
    code, out, _ = run(capsys, "audit", "search", "--type", "db.session.start", "--db", "orders")
    assert out.count("\n") == 3 and "FAILED: denied" in out
    code, out, _ = run(capsys, "audit", "search", "--type", "db.session", "--since", "5m")
    assert out.count("\n") == 13
    code, out, err = run(capsys, "audit", "search", "--since", "2099-01-01T00:00:00Z")
    assert out == "" and "no matching events" in err
    code, out, _ = run(capsys, "audit", "tail", "-n", "2", "--no-follow")
    assert out.count("\n") == 2 and "eve@orders(admin)" in out
    code, _, err = run(capsys, "audit", "search", "--since", "yesterday")
    assert code == 2 and "--since" in one_error(err)


def test_logout_refuses_paths(cli: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "db", "logout", "../identity")
    assert code == 2 and "not a database name" in one_error(err)


def test_sample_configs_load() -> None:
    from dbservice.auth.admin import parse_role
    from dbservice.auth.service import AuthConfig
    from fleetgate.config import load_model, read_yaml

    root = Path(__file__).resolve().parents[2] / "deploy"
    load_model(AuthConfig, read_yaml(root / "auth.yaml"), "auth.yaml")
    for path in (root / "roles").glob("*.yaml"):
        assert parse_role(read_yaml(path), str(path)).allow.db_labels


def test_logout_all(
    cli: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``fleetgate logout`` removes the identity, the profile and every database's state,
    names each, keeps the pinned auth CA, and is safe to repeat."""
    home = tmp_path / "home"
    (home / "identity").mkdir(parents=True)
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (home / "identity" / name).write_text("x")
    (home / "db" / "orders").mkdir(parents=True)
    (home / "profile.json").write_text("{}")
    (home / "auth-ca.pem").write_text("pinned")
    code, out, _ = run(capsys, "logout")
    assert code == 0
    assert sorted(out.splitlines()) == sorted(
        f"removed {home / part}" for part in ("identity", "db", "profile.json")
    )
    assert sorted(p.name for p in home.iterdir()) == ["auth-ca.pem"]
    assert run(capsys, "logout") == (0, "nothing to remove\n", "")
    with pytest.raises(SystemExit):
        main(["logout", "--help"])
    assert "pinned CA of the auth service stays" in " ".join(capsys.readouterr().out.split())


def test_admin_commands_print_json_results(
    cli: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``--format json`` on auth init/sign, roles create/rm, users add/rm/add-aws/rm-aws:
    one JSON document on standard output that says what was done; errors stay one
    ``fleetgate: error:`` line on standard error with nothing on standard output."""

    def as_json(*argv: str) -> Any:
        code, out, err = run(capsys, *argv, "--format", "json")
        assert code == 0, err
        return json.loads(out)

    ca_dir = tmp_path / "ca"
    init = as_json("auth", "init", "--dir", str(ca_dir))
    assert init == {
        "created": True,
        "dir": str(ca_dir),
        "key": f"{ca_dir}/ca.key",
        "cert": str(ca_dir / "ca.crt"),
        "fingerprint": init["fingerprint"],
    }
    assert init["fingerprint"].startswith("SHA256:")
    assert as_json("auth", "init", "--dir", str(ca_dir))["created"] is False

    role = write(tmp_path / "role.yaml", ROLE)
    assert as_json("roles", "create", "-f", role) == {"name": "payments-dev", "action": "created"}
    assert as_json("roles", "create", "-f", role, "--replace") == {
        "name": "payments-dev",
        "action": "replaced",
    }
    code, out, err = run(capsys, "roles", "create", "-f", role, "--format", "json")
    assert code == 2 and out == "" and "exists already" in one_error(err)

    cli.setattr("sys.stdin", io.StringIO("a good password\n"))
    added = as_json(
        "users", "add", "alice", "--roles", "payments-dev", "--db-users", "alice-rw",
        "--password-stdin", "--totp",
    )  # fmt: skip
    uri = added.pop("totp_uri")
    assert str(uri).startswith("otpauth://totp/") and "alice" in str(uri)
    assert added == {
        "name": "alice",
        "roles": ["payments-dev"],
        "db_users": ["alice-rw"],
        "password": True,
        "totp": True,
    }
    bot = as_json("users", "add", "ci-bot", "--roles", "payments-dev")
    assert bot == {
        "name": "ci-bot", "roles": ["payments-dev"], "db_users": [], "password": False,
        "totp": False, "totp_uri": None,
    }  # fmt: skip

    signed = as_json(
        "auth", "sign", "--user", "ci-bot", "--ttl", "1h", "--out", str(tmp_path / "b")
    )
    cert = load_certs((tmp_path / "b" / "cert.pem").read_text())[0]
    assert signed["user"] == "ci-bot" and signed["hosts"] is None and signed["capped"] is True
    assert signed["roles"] == ["payments-dev"] and signed["ttl"] <= 30 * 60
    assert datetime.fromisoformat(signed["expires"]) == cert.not_valid_after_utc
    assert signed["files"] == [str(tmp_path / "b" / f) for f in ("key.pem", "cert.pem", "ca.pem")]
    host = as_json(
        "auth", "sign", "--host", "agent-1,10.0.0.7", "--ttl", "2h", "--out", str(tmp_path / "a")
    )
    cert = load_certs((tmp_path / "a" / "cert.pem").read_text())[0]
    assert host["user"] is None and host["hosts"] == ["agent-1", "10.0.0.7"]
    assert host["ttl"] == 7200 and host["expires"].endswith("Z")
    assert datetime.fromisoformat(host["expires"]) == cert.not_valid_after_utc
    assert host["files"] == [str(tmp_path / "a" / f) for f in ("key.pem", "cert.pem", "ca.pem")]
    code, out, err = run(
        capsys, "auth", "sign", "--user", "nobody", "--out", "x", "--format", "json"
    )
    assert code == 2 and out == "" and "no user 'nobody'" in one_error(err)

    arn = "arn:aws:iam::123456789012:role/ci-*"
    rule = as_json("users", "add-aws", "ci", "--arn", arn, "--roles", "payments-dev")
    listed = json.loads(run(capsys, "users", "ls-aws", "--format", "json")[1])
    assert [rule] == listed and rule["arns"] == [arn]
    assert as_json("users", "rm-aws", "ci") == {"name": "ci", "removed": True}
    assert as_json("users", "rm", "alice") == {"name": "alice", "removed": True}
    code, out, err = run(capsys, "users", "rm", "alice", "--format", "json")
    assert code == 2 and out == "" and "no user 'alice'" in one_error(err)
    assert as_json("roles", "rm", "payments-dev") == {
        "name": "payments-dev",
        "removed": True,
        "still_named_by": ["ci-bot"],
    }


def test_logout_prints_what_it_removed_as_json(
    cli: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home = logged_in_home(tmp_path)
    (home / "auth-ca.pem").write_text("pinned")
    code, out, _ = run(capsys, "db", "logout", "orders", "--format", "json")
    assert code == 0 and json.loads(out) == {
        "name": "orders",
        "removed": [str(home / "db" / "orders")],
    }
    code, out, _ = run(capsys, "logout", "--format", "json")
    assert code == 0 and json.loads(out) == {
        "name": None,
        "removed": [str(home / "identity"), str(home / "db")],
    }
    assert run(capsys, "logout", "--format", "json") == (
        0,
        json.dumps({"name": None, "removed": []}, indent=2) + "\n",
        "",
    )
    code, out, err = run(capsys, "db", "logout", "../x", "--format", "json")
    assert code == 2 and out == "" and one_error(err)
