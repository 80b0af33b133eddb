"""``fleetgate configure iam``: valid JSON policy documents, least privilege."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleetgate.cli import main

CLUSTER = "arn:aws:memorydb:eu-west-1:111122223333:cluster/orders-prod"
ROLE = "arn:aws:iam::111122223333:role/fleetgate-agent"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    code = main(["configure", "iam", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def actions(policy: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        action = statement["Action"]
        found.update([action] if isinstance(action, str) else action)
    return found


def test_discovery_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, policy, _ = run(capsys, "--discovery")
    assert code == 0
    assert policy["Version"] == "2012-10-17"
    assert actions(policy) == {
        "memorydb:DescribeClusters",
        "memorydb:DescribeSubnetGroups",
        "memorydb:DescribeUsers",
        "memorydb:ListTags",
        "sts:GetCallerIdentity",
    }


def test_agent_policy_names_cluster_and_user_arns(capsys: pytest.CaptureFixture[str]) -> None:
    code, policy, _ = run(
        capsys, "--agent", "--cluster", CLUSTER, "--user", "alice", "--assume-role", ROLE
    )
    assert code == 0
    assert {"memorydb:Connect", "memorydb:DescribeUsers", "sts:AssumeRole"} <= actions(policy)
    connect = next(s for s in policy["Statement"] if s["Action"] == "memorydb:Connect")
    assert connect["Resource"] == [CLUSTER, "arn:aws:memorydb:eu-west-1:111122223333:user/alice"]
    assume = next(s for s in policy["Statement"] if s["Action"] == "sts:AssumeRole")
    assert assume["Resource"] == [ROLE]


def test_both_without_roles(capsys: pytest.CaptureFixture[str]) -> None:
    code, both, _ = run(capsys)
    assert code == 0
    assert set(both) == {"discovery", "agent"}
    assert "sts:AssumeRole" not in actions(both["agent"]) | actions(both["discovery"])
    connect = both["agent"]["Statement"][0]
    assert connect["Resource"] == [
        "arn:aws:memorydb:*:*:cluster/*",
        "arn:aws:memorydb:*:*:user/*",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cluster", "orders"], "is not a MemoryDB cluster ARN"),
        (["--cluster", "arn:aws:memorydb:us-east-1:1234:cluster/x"], "is not a MemoryDB cluster"),
        (["--assume-role", "fleetgate"], "is not an IAM role ARN"),
        (["--user", "9lives"], "is not a MemoryDB user name"),
    ],
)
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("fleetgate: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_format_json_prints_the_same_documents(capsys: pytest.CaptureFixture[str]) -> None:
    """``--format json`` (the only format: policies are JSON) prints exactly what the
    command prints without it; another format is a usage error."""
    assert run(capsys, "--agent", "--format", "json") == run(capsys, "--agent")
    assert run(capsys, "--format", "json") == run(capsys)
    with pytest.raises(SystemExit) as usage:
        main(["configure", "iam", "--format", "text"])
    assert usage.value.code == 2 and "invalid choice: 'text'" in capsys.readouterr().err
