"""benchmarks/proxy.py refuses settings it cannot run with one clear line, before it
starts anything (no traceback at the end of a long run)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.kits.common import ROOT, subprocess_env


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--idle-rounds", "0"],
            "--idle-rounds: give at least 1 (--idle 0 skips the idle sessions)",
        ),
        (["--latency-connections", "0"], "--latency-connections: give at least 1 connection"),
    ],
)
def test_settings_it_cannot_run_with_are_refused_at_once(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "proxy.py"), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().endswith(message), done.stderr
    assert "Traceback" not in done.stderr
