"""Speed of both engines' client-command parsers, this tree against another, side by side.

    git worktree add /tmp/old-parsers 9a32dc8      # any commit to compare with
    python benchmarks/parser_speed.py --old /tmp/old-parsers
    python benchmarks/parser_speed.py --old /tmp/old-parsers --rounds 5 --repeat 60

Each tree is timed in its own child process (its ``dbservice`` imported from that
tree), the trees alternating round by round; a round times every workload ``--repeat``
times and keeps the best. Printed: per workload, the best round of each tree in
milliseconds per ``--commands`` commands, and the ratio (this tree / the other: below
1.00 is faster). Workloads (keys of 16 bytes, as redis-benchmark's ``-r``):

* ``proxy ...``: the single-node engine's ``CommandParser`` with pass-through hooks;
  ``audited`` with ``inspect=("*",)`` (the agent's audit reads every argument);
* ``cluster ...``: the cluster engine's ``CommandReader``;
* ``SET mixed``: values of 3, 60, 700 and 5000 bytes in turn (1- to 4-digit lengths);
* ``x N``: all commands in one read; ``P1``: one command per read; ``P16``: 16 per read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

MIXED = (3, 60, 700, 5000)


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _key(i: int) -> bytes:
    return b"key:%012d" % i


def _commands(kind: str, count: int) -> list[bytes]:
    if kind == "GET":
        return [_cmd(b"GET", _key(i)) for i in range(count)]
    if kind == "SET":
        return [_cmd(b"SET", _key(i), b"xxx") for i in range(count)]
    # SET mixed
    return [_cmd(b"SET", _key(i), b"v" * MIXED[i % len(MIXED)]) for i in range(count)]


def _reads(commands: list[bytes], per_read: int) -> list[bytes]:
    return [b"".join(commands[i : i + per_read]) for i in range(0, len(commands), per_read)]


WORKLOADS: list[tuple[str, str, str, int]] = [
    # (label, engine, commands, commands per read; 0: all in one read)
    ("proxy GET x{n}", "proxy", "GET", 0),
    ("proxy SET x{n}", "proxy", "SET", 0),
    ("proxy SET audited x{n}", "audit", "SET", 0),
    ("proxy SET mixed x{n}", "proxy", "SET mixed", 0),
    ("proxy GET P16", "proxy", "GET", 16),
    ("proxy SET P1", "proxy", "SET", 1),
    ("proxy SET audited P1", "audit", "SET", 1),
    ("cluster SET x{n}", "cluster", "SET", 0),
    ("cluster SET mixed x{n}", "cluster", "SET mixed", 0),
    ("cluster SET P1", "cluster", "SET", 1),
]


def _runner(engine: str, reads: list[bytes], expected: int) -> Callable[[], None]:
    """A function feeding ``reads`` to a fresh parser of ``engine`` (this process's
    ``dbservice``) and checking that it saw ``expected`` commands."""
    import importlib
    from collections import deque

    try:  # the tree's layout: dbservice/engine/ since the restructuring, dbservice/ before
        importlib.import_module("dbservice.engine.proxy")
        base = "dbservice.engine"
    except ImportError:
        base = "dbservice"
    proxy = importlib.import_module(f"{base}.proxy")
    PassThroughHooks, ProxyLimits = proxy.PassThroughHooks, proxy.ProxyLimits

    limits = ProxyLimits()
    if engine == "cluster":
        CommandReader = importlib.import_module(f"{base}.cluster.resp").CommandReader

        def run_cluster() -> None:
            reader = CommandReader(limits)
            got = 0
            for data in reads:
                got += len(reader.feed(data))
            assert got == expected, got

        return run_cluster

    CommandParser = importlib.import_module(f"{base}.proxy.commands").CommandParser

    inspect = ("*",) if engine == "audit" else ()
    hooks = PassThroughHooks()

    def run_proxy() -> None:
        pending: deque[object] = deque()
        parser = CommandParser(
            hooks=hooks,
            limits=limits,
            forward=_drop,
            local=_drop,
            pending=pending,  # type: ignore[arg-type]
            inspect=inspect,
        )
        for data in reads:
            parser.feed(data)
        assert len(pending) == expected, len(pending)

    return run_proxy


def _drop(_: object) -> None:
    return None


def worker(tree: str, commands: int, repeat: int) -> dict[str, float]:
    """In a child process: import ``dbservice`` from ``tree``, time every workload;
    the best of ``repeat`` runs in milliseconds."""
    sys.path.insert(0, tree)
    import dbservice

    where = Path(dbservice.__file__).resolve()
    if not where.is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"dbservice came from {where}, not from {tree}")
    best: dict[str, float] = {}
    for label, engine, kind, per_read in WORKLOADS:
        all_commands = _commands(kind, commands)
        reads = _reads(all_commands, per_read or len(all_commands))
        run = _runner(engine, reads, commands)
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        best[label.format(n=commands)] = min(times) * 1000
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="a checkout of the tree to compare with")
    parser.add_argument("--new", default=str(ROOT), help="the tree to measure (default: this)")
    parser.add_argument("--commands", type=int, default=2000, help="commands per run")
    parser.add_argument("--repeat", type=int, default=40, help="runs per round (best kept)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.commands, args.repeat)))
        return 0
    trees = {"old": args.old, "new": args.new}
    best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
    for round_ in range(args.rounds):
        order = ["old", "new"] if round_ % 2 == 0 else ["new", "old"]
        for which in order:
            figures = _child(trees[which], args)
            for label, ms in figures.items():
                best[which][label] = min(ms, best[which].get(label, ms))
    print(
        f"best of {args.repeat} x {args.rounds} rounds, ms per {args.commands} commands; "
        f"old {args.old}, new {args.new}"
    )
    print(f"{'workload':28} {'old':>8} {'new':>8} {'new/old':>8}")
    for label in best["old"]:
        old, new = best["old"][label], best["new"][label]
        print(f"{label:28} {old:8.2f} {new:8.2f} {new / old:8.2f}")
    return 0


def _child(tree: str, args: Any) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--old",
            args.old,
            "--worker",
            tree,
            "--commands",
            str(args.commands),
            "--repeat",
            str(args.repeat),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
    )
    figures: dict[str, float] = json.loads(out.stdout)
    return figures


if __name__ == "__main__":
    sys.exit(main())
