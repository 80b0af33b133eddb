"""The audit spool on disk: order, acknowledgement, restarts, crashes, its bound."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bus.audit import Spooled
from dbservice.access.spool import AuditSpool, SpoolError
from dbservice.gateway.audit_spool import open_spool, spool_dir


def item(n: int, events: int = 1) -> Spooled:
    return Spooled("fleetgate.audit.auth.login", f"id-{n}", events, b'{"n":%d}' % n)


def drain(spool: AuditSpool, window: int = 3) -> list[str]:
    out: list[str] = []
    while len(spool):
        got = spool.peek(window)
        out.extend(i.id for i in got)
        spool.ack(len(got))
    return out


def test_order_across_segments_and_acknowledgements(tmp_path: Path) -> None:
    spool = AuditSpool.open(tmp_path / "s", max_bytes=1 << 20, segment_bytes=100)
    spool.append(item(i) for i in range(10))
    assert len(spool) == 10 and spool.pending_events == 10
    assert len([p for p in (tmp_path / "s").iterdir() if p.name.startswith("seg-")]) > 2
    first = spool.peek(4)
    assert [i.id for i in first] == ["id-0", "id-1", "id-2", "id-3"]
    spool.ack(2)  # the first two stored; the next two are published again
    assert [i.id for i in spool.peek(3)] == ["id-2", "id-3", "id-4"]
    assert drain(spool) == [f"id-{i}" for i in range(2, 10)]
    assert spool.pending_bytes == 0
    # acknowledged segments are deleted
    assert [p.name for p in (tmp_path / "s").iterdir() if p.name.startswith("seg-")] == []
    spool.append([item(10)])
    assert drain(spool) == ["id-10"]
    spool.close()


def test_a_restart_reads_what_was_not_acknowledged(tmp_path: Path) -> None:
    spool = AuditSpool.open(tmp_path / "s", max_bytes=1 << 20, segment_bytes=120)
    spool.append(item(i, events=2) for i in range(6))
    spool.peek(3)
    spool.ack(3)
    spool.close()
    again = AuditSpool.open(tmp_path / "s", max_bytes=1 << 20, segment_bytes=120)
    assert len(again) == 3 and again.pending_events == 6
    again.append([item(6)])  # after what was left, in the same run of files
    assert drain(again) == ["id-3", "id-4", "id-5", "id-6"]
    again.close()


def test_prepend_goes_before_everything_waiting_also_after_a_restart(tmp_path: Path) -> None:
    spool = AuditSpool.open(tmp_path / "s", max_bytes=1 << 20)
    spool.append([item(2), item(3)])
    spool.peek(1)
    spool.ack(1)
    spool.prepend([item(0), item(1)])
    spool.close()
    again = AuditSpool.open(tmp_path / "s", max_bytes=1 << 20)
    assert drain(again, window=10) == ["id-0", "id-1", "id-3"]


def test_a_line_cut_by_a_crash_is_dropped(tmp_path: Path) -> None:
    spool = AuditSpool.open(tmp_path / "s", max_bytes=1 << 20)
    spool.append([item(0), item(1)])
    spool.close()
    (segment,) = [p for p in (tmp_path / "s").iterdir() if p.name.startswith("seg-")]
    with segment.open("ab") as file:
        file.write(b'fleetgate.audit.auth.login id-2 1 {"n":')
    again = AuditSpool.open(tmp_path / "s", max_bytes=1 << 20)
    assert len(again) == 2
    again.append([item(3)])
    assert drain(again) == ["id-0", "id-1", "id-3"]


def test_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    directory.mkdir(mode=0o755)
    spool = AuditSpool.open(directory, max_bytes=1 << 20)
    spool.append([item(0)])
    spool.peek(1)
    spool.ack(0)
    spool.append([item(1)])
    spool.peek(1)
    spool.ack(1)
    spool.close()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_full_at_max_bytes(tmp_path: Path) -> None:
    spool = AuditSpool.open(tmp_path / "s", max_bytes=200)
    while not spool.full():
        spool.append([item(len(spool))])
    assert spool.pending_bytes >= 200
    spool.peek(2)
    spool.ack(2)
    assert not spool.full()


def test_an_unusable_directory_says_so(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError, match=r"the audit spool .*: cannot use it"):
        AuditSpool.open(tmp_path / "file" / "s", max_bytes=1 << 20)


def test_the_agent_takes_over_the_spools_of_listener_processes_it_no_longer_runs(
    tmp_path: Path,
) -> None:
    for process, first in ((0, 0), (1, 10), (3, 20)):
        spool = AuditSpool.open(spool_dir(tmp_path, process), max_bytes=1 << 20)
        spool.append(item(first + i) for i in range(2))
        spool.close()
    spool = open_spool(tmp_path, 0, max_bytes=1 << 20, processes=2)
    assert drain(spool, window=10) == ["id-0", "id-1", "id-20", "id-21"]
    assert not spool_dir(tmp_path, 3).exists()  # process 3 is gone: its events moved
    assert len(AuditSpool.open(spool_dir(tmp_path, 1), max_bytes=1 << 20)) == 2  # still its own
