"""The one table printer of the command line (db ls, db servers, auth users/roles ls,
managed ls, sandbox status)."""

from __future__ import annotations

import pytest

from fleetgate.cli.tables import print_table, table_lines


def test_columns_are_padded_to_their_widest_cell_two_spaces_apart() -> None:
    rows = [("NAME", "HEALTH", "LABELS"), ("orders-db", "2/2", "env=prod"), ("a", "", "")]
    assert table_lines(rows) == [
        "NAME       HEALTH  LABELS",
        "orders-db  2/2     env=prod",
        "a",
    ]


def test_the_last_column_is_never_padded_and_lines_end_without_spaces() -> None:
    rows = [("A", "LONG HEADER"), ("bb", "x")]
    assert table_lines(rows) == ["A   LONG HEADER", "bb  x"]


def test_a_narrower_gap_before_the_last_column_when_asked() -> None:
    rows = [("USER", "SECRET"), ("app", "fleetgate/app")]
    assert table_lines(rows, last_gap=" ") == ["USER SECRET", "app  fleetgate/app"]


def test_one_column_and_no_rows() -> None:
    assert table_lines([("ONE ",), ("two",)]) == ["ONE", "two"]
    assert table_lines([]) == []


def test_print_table_prints_the_lines(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([("K", "V"), ("key", "value")])
    assert capsys.readouterr().out == "K    V\nkey  value\n"


def test_db_servers_shows_a_failing_certificate_renewal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from datetime import UTC, datetime

    from bus import DatabaseResource, DatabaseSpec, Metadata
    from bus.servers import DbServerHeartbeat
    from fleetgate.cli.servers import print_servers, server_json

    server = DbServerHeartbeat(
        host_id="h1", hostname="agent-1", version="1", addr="10.0.0.1:6390",
        database=DatabaseResource(metadata=Metadata(name="db"), spec=DatabaseSpec(uri="x:1")),
        cert_expires=datetime(2030, 1, 1, tzinfo=UTC), cert_error="agent h1 was removed",
    )  # fmt: skip
    row = server_json(server)
    assert row["cert_error"] == "agent h1 was removed"
    print_servers([row])
    out = capsys.readouterr().out
    assert "certificate renewal failing (expires 2030-01-01T00:00:00+00:00): agent h1" in out
