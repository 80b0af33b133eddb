"""``fleetgate tokens`` and ``fleetgate agents`` against a real NATS server."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from bus import Bus, joins
from bus.schemas import utcnow
from bus.server import NatsServer
from fleetgate.cli import main


@pytest.fixture
def cli(nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("FLEETGATE_NATS_URL", nats_server.url)
    monkeypatch.setenv("FLEETGATE_HOME", str(tmp_path / "home"))
    return nats_server.url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tokens_are_shown_once_stored_hashed_listed_and_removed(
    cli: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "tokens", "add", "--type", "agent", "--ttl", "30m", "--labels", "team=pay,env=dev"
    )
    assert code == 0, err
    token = out.splitlines()[0]
    token_id, secret = joins.parse_token(token)
    assert len(secret) >= 32  # 192 random bits, base64url
    code, out, _ = run(capsys, "tokens", "ls", "--format", "json")
    [listed] = json.loads(out)
    assert listed["id"] == token_id and listed["state"] == "valid"
    assert listed["labels"] == {"team": "pay", "env": "dev"}
    assert secret not in out and "hash" not in listed
    code, out, _ = run(capsys, "tokens", "ls")
    assert token_id in out and secret not in out and "team=pay" in out
    code, out, _ = run(capsys, "tokens", "rm", token_id)
    assert code == 0 and "can no longer be used" in out
    code, _, err = run(capsys, "tokens", "rm", token_id)
    assert code == 2 and f"no join token '{token_id}'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as usage:
        run(capsys, "tokens", "add", "--type", "agent", "--labels", "nokey")
    assert usage.value.code == 2 and "expected key=value" in capsys.readouterr().err


def add_joined_agent(cli: str, labels: dict[str, str] | None = None) -> str:
    """Record a joined agent ``db-agent-1`` whose certificate has expired; its host id."""
    host_id = str(uuid.uuid4())

    async def add() -> None:
        async with await Bus.connect(cli, name="tests") as bus:
            await bus.provision(joins.AGENTS)
            now = utcnow()
            await joins.put_agent(bus, joins.JoinedAgent(
                host_id=host_id, hostname="db-agent-1", addr="10.0.0.5:6390", serial="ab",
                expires=now, joined_at=now, labels=labels or {},
            ))  # fmt: skip

    asyncio.run(add())
    return host_id


def test_agents_are_listed_and_removed(cli: str, capsys: pytest.CaptureFixture[str]) -> None:
    host_id = add_joined_agent(cli, labels={"team": "pay"})
    code, out, _ = run(capsys, "agents", "ls")
    assert code == 0 and host_id in out and "db-agent-1" in out and "(expired)" in out
    code, out, _ = run(capsys, "agents", "rm", host_id)
    assert code == 0 and "can no longer renew" in out
    code, out, _ = run(capsys, "agents", "ls", "--format", "json")
    assert json.loads(out) == []
    code, _, err = run(capsys, "agents", "rm", host_id)
    assert code == 2 and "no joined agent" in err


def test_an_aws_rule_is_added_listed_and_removed_and_bad_rules_say_why(
    cli: str, capsys: pytest.CaptureFixture[str]
) -> None:
    arn = "arn:aws:sts::123456789012:assumed-role/fleetgate-agent/*"
    code, out, err = run(
        capsys, "tokens", "add", "--type", "agent", "--method", "aws",
        "--allow", f"account=123456789012,arn={arn}", "--labels", "team=pay",
    )  # fmt: skip
    assert code == 0, err
    rule_id = out.splitlines()[0]
    assert "until removed" in out and f"tokens rm {rule_id}" in out
    code, out, _ = run(capsys, "tokens", "ls", "--format", "json")
    [listed] = json.loads(out)
    assert listed["id"] == rule_id and listed["method"] == "aws" and listed["state"] == "valid"
    assert listed["allow"] == {"account": "123456789012", "arn": arn}
    assert listed["expires"] is None and listed["labels"] == {"team": "pay"}
    code, out, _ = run(capsys, "tokens", "ls")
    assert f"aws account=123456789012,arn={arn}" in out and "never" in out
    code, out, _ = run(capsys, "tokens", "rm", rule_id)
    assert code == 0 and f"removed AWS join rule {rule_id}" in out
    assert "can no longer renew" in out
    bad = {
        "arn=role/x": "expected arn:aws:iam::ACCOUNT:role/NAME",
        "account=12,arn=" + arn: "account 12 and the account 123456789012 in the arn differ",
        "account=1234567890ab,arn=" + arn: "expected a 12-digit AWS account id",
        "account=123456789012": "arn is missing",
        f"arn={arn},arn={arn}": "arn is given twice",
        "role=x": "expected account=123456789012,arn=",
    }
    for text, why in bad.items():
        with pytest.raises(SystemExit) as usage:
            run(capsys, "tokens", "add", "--type", "agent", "--method", "aws", "--allow", text)
        err = capsys.readouterr().err
        assert usage.value.code == 2 and why in err, (text, err)
    code, _, err = run(capsys, "tokens", "add", "--type", "agent", "--method", "aws")
    assert code == 2 and "--method aws needs --allow" in err and "Traceback" not in err
    code, _, err = run(capsys, "tokens", "add", "--type", "agent", "--allow", f"arn={arn}")
    assert code == 2 and "--allow is for --method aws" in err


def test_tokens_add_and_rm_and_agents_rm_print_json(
    cli: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--format json``: tokens add prints the token with its id, expiry and labels (the
    record as tokens ls shows it); tokens rm and agents rm say what was removed; an error
    is one line on standard error and nothing on standard output."""
    code, out, err = run(
        capsys, "tokens", "add", "--type", "agent", "--ttl", "30m", "--labels", "team=pay",
        "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    added = json.loads(out)
    token_id, secret = joins.parse_token(added["token"])
    [listed] = json.loads(run(capsys, "tokens", "ls", "--format", "json")[1])
    assert added == {**listed, "token": added["token"]} and added["id"] == token_id
    assert added["labels"] == {"team": "pay"} and added["state"] == "valid"
    assert added["expires"] is not None and len(secret) >= 32
    code, out, _ = run(capsys, "tokens", "rm", token_id, "--format", "json")
    assert code == 0 and json.loads(out) == {
        "id": token_id, "method": "token", "removed": True, "spent_by": None,
    }  # fmt: skip
    code, out, err = run(capsys, "tokens", "rm", token_id, "--format", "json")
    assert code == 2 and out == "" and err.startswith("fleetgate: error: no join token")

    arn = "arn:aws:iam::123456789012:role/fleetgate-agent"
    code, out, err = run(
        capsys, "tokens", "add", "--type", "agent", "--method", "aws",
        "--allow", f"account=123456789012,arn={arn}", "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    rule = json.loads(out)
    assert rule["token"] is None and rule["method"] == "aws" and rule["expires"] is None
    assert rule["allow"] == {"account": "123456789012", "arn": arn}
    code, out, _ = run(capsys, "tokens", "rm", rule["id"], "--format", "json")
    assert json.loads(out)["method"] == "aws"

    host_id = add_joined_agent(cli)
    code, out, _ = run(capsys, "agents", "rm", host_id, "--format", "json")
    assert code == 0 and json.loads(out) == {"host_id": host_id, "removed": True}
    code, out, err = run(capsys, "agents", "rm", host_id, "--format", "json")
    assert code == 2 and out == "" and "no joined agent" in err
