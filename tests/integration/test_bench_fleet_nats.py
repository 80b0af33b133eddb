"""benchmarks/fleet_nats.py keeps working: its --quick run (the hub of 3, three leaves,
a watcher per region, the audit stream at R1 and R3) ends well and prints every figure."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.kits.common import ROOT, subprocess_env

BENCH = ROOT / "benchmarks" / "fleet_nats.py"
REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-2")


def test_the_fleet_benchmark_s_quick_run_measures_everything() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=90,
        env=subprocess_env(),
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"^first sync .*each serves its 40$", out, re.M), out
    for kind in ("paced", "burst"):
        for region in REGIONS:
            row = rf"^  {kind} +{region} +n=\d+ +p50 +[\d.]+ ms +p99 +[\d.]+ ms +max +[\d.]+ ms$"
            assert re.search(row, out, re.M), out
    assert re.search(r"^new watcher .*\(120 entries, serving 40\): [\d.]+s", out, re.M), out
    # the audit table: each workload from a hub client (R1 alone, R1 and R3 in the hub)
    # and from a leaf client (R1 and R3 in the hub), with the ratio R3/R1
    number = r"[\d,]+(?: \([\d,]+-[\d,]+\))?"
    for workload in ("session starts", "commands in 32s"):
        hub = rf"^  {workload} +hub +{number} +{number} +{number} +[\d.]+ +[\d.]+$"
        leaf = rf"^  {workload} +leaf +- +{number} +{number} +[\d.]+ +-$"
        assert re.search(hub, out, re.M), out
        assert re.search(leaf, out, re.M), out
    assert "Traceback" not in done.stderr, done.stderr
