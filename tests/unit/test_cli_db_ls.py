"""``fleetgate db ls`` fits the terminal (COLUMNS, 100 by default) and ``--wide`` shows
every label; ``--format json`` keeps everything. The registry read (``_list``) is our
seam: the table and its widths are what is under test here."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bus import DatabaseResource
from bus.schemas import DatabaseSpec, Metadata
from fleetgate.cli import db as db_cli
from fleetgate.cli.main import main

MANY = {
    "account-id": "123456789012",
    "region": "eu-central-1",
    "engine": "valkey",
    "engine-version": "7.3",
    "endpoint-type": "cluster",
    "vpc-id": "vpc-0123456789abcdef0",
    "team": "payments-platform",
    "env": "production",
    "cost-center": "cc-4711-analytics",
    "fleetgate.dev/origin": "cloud",
}


def _resource(name: str, description: str, labels: dict[str, str]) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name=name, description=description, labels=labels),
        spec=DatabaseSpec(uri=f"{name}.example:6379"),
    )


RESOURCES = [
    _resource(
        "orders-prod-eu-central-1",
        "Orders of the European shops, primary cluster of the checkout service",
        MANY,
    ),
    _resource("cache", "", {"env": "dev"}),
]


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_list(url: Any) -> tuple[list[DatabaseResource], dict[str, tuple[int, int]]]:
        return list(RESOURCES), {"cache": (1, 1)}

    monkeypatch.setattr(db_cli, "_list", fake_list)


def _ls(capsys: pytest.CaptureFixture[str], *extra: str) -> list[str]:
    assert main(["db", "ls", "--nats", "nats://127.0.0.1:1", *extra]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.usefixtures("registry")
def test_fits_100_columns_with_the_most_useful_labels_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    lines = _ls(capsys)
    assert len(lines) == 3
    assert all(len(line) <= 100 for line in lines), [len(line) for line in lines]
    header, orders, cache = lines
    assert header.split() == ["NAME", "DESCRIPTION", "HEALTH", "LABELS"]
    assert orders.startswith("orders-prod-eu-central-1  Orders of the")
    assert "..." in orders  # the description is cut, visibly
    labels = orders[header.index("LABELS") :]
    assert labels.startswith("env=production, ")  # env first, then people's own tags
    assert labels.endswith(" more")
    hidden = int(labels.rsplit("+", 1)[1].split()[0])
    shown = labels.rsplit(", +", 1)[0].split(", ")
    assert len(shown) + hidden == 9  # every label but the hidden fleetgate.dev/ one
    assert "vpc-id=vpc-0123456789abcdef0" not in labels  # computed labels go last
    assert cache.split() == ["cache", "1/1", "env=dev"]


@pytest.mark.usefixtures("registry")
def test_without_columns_and_without_a_terminal_the_default_is_100(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    lines = _ls(capsys)
    assert max(len(line) for line in lines) <= 100
    assert "more" in lines[1]


@pytest.mark.usefixtures("registry")
def test_a_narrow_terminal_still_shows_names_whole(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    lines = _ls(capsys)
    assert all(len(line) <= 60 for line in lines), lines
    assert lines[1].startswith("orders-prod-eu-central-1  ")
    assert lines[1].endswith("  env=prod...")


@pytest.mark.usefixtures("registry")
def test_wide_shows_every_label_and_the_whole_description(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    lines = _ls(capsys, "--wide")
    orders = lines[1]
    assert RESOURCES[0].metadata.description in orders
    for key, value in MANY.items():
        if not key.startswith("fleetgate.dev/"):
            assert f"{key}={value}" in orders
    assert "more" not in orders and len(orders) > 100


@pytest.mark.usefixtures("registry")
def test_json_keeps_every_label_whatever_the_width(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["db", "ls", "--nats", "nats://127.0.0.1:1", "--format", "json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in docs] == ["orders-prod-eu-central-1", "cache"]
    assert docs[0]["labels"] == dict(sorted(MANY.items()))
    assert docs[1]["health"] == {"healthy": 1, "agents": 1}


def test_fit_labels_counts_what_does_not_fit() -> None:
    pairs = ["env=prod", "team=payments", "region=us-east-1"]
    assert db_cli.fit_labels(pairs, 100) == "env=prod, team=payments, region=us-east-1"
    assert db_cli.fit_labels(pairs, 32) == "env=prod, team=payments, +1 more"
    assert db_cli.fit_labels(pairs, 20) == "env=prod, +2 more"
    assert db_cli.fit_labels(pairs, 12) == "env=prod,..."
    assert db_cli.fit_labels(["a-very-long-label=value"], 12) == "a-very-lo..."
    assert db_cli.fit_labels([], 10) == ""
