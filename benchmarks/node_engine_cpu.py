"""CPU per command of the single-node engine's common path, as the agent runs it: this
tree against another, side by side.

    git worktree add /tmp/old-node main        # any commit to compare with
    python benchmarks/node_engine_cpu.py --old /tmp/old-node
    python benchmarks/node_engine_cpu.py --old /tmp/old-node --rounds 5 --repeat 30
    python benchmarks/node_engine_cpu.py               # this tree alone

No sockets: pipelines of 16 GETs or SETs (16-byte keys, 3-byte values, as
redis-benchmark sends them) go through the engine's ``CommandParser`` (with
``inspect=("*",)``, as the agent runs it) and the server's replies through its
``ReplyParser``, with the agent's real hooks (``AgentHooks``: the roles' command check,
the db user gate) and its real audit trail (``SessionAudit``, batches handed to an
``AuditEmitter`` that encodes them as for NATS and lets them go, the event loop running it
every 8 reads). What goes to either side is dropped, but the writes are counted.
Each tree is timed in its own child process (its ``dbservice`` imported from that tree),
the trees alternating round by round; a round runs every workload ``--repeat`` times and
keeps the best. Printed: microseconds of process CPU per command, the ratio (new/old:
below 1.00 is faster), and the writes per read of the client's commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = 16


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _key(i: int) -> bytes:
    return b"key:%012d" % i


WORKLOADS: dict[str, tuple[Callable[[int], bytes], bytes]] = {
    "GET P16": (lambda i: _cmd(b"GET", _key(i)), b"$3\r\nxxx\r\n"),
    "SET P16": (lambda i: _cmd(b"SET", _key(i), b"xxx"), b"+OK\r\n"),
}


def _runner(kind: str, commands: int) -> tuple[Callable[[], Awaitable[None]], list[int]]:
    """A function running ``commands`` commands of ``kind`` through a fresh session's
    parsers, hooks and audit trail (this process's ``dbservice``); and a list that gets
    the number of writes to the server and to the client of the last run."""
    from bus.access import Identity, Role
    from dbservice.access.audit import AuditEmitter
    from dbservice.access.authorize import grant_for
    from dbservice.engine.login import ClientCredentials
    from dbservice.engine.proxy import ProxyLimits
    from dbservice.engine.proxy.commands import CommandParser
    from dbservice.engine.proxy.replies import ReplyParser
    from dbservice.gateway.hooks import AgentHooks

    identity = Identity(user="alice", roles=("dev",))
    role = Role.model_validate(
        {
            "name": "dev",
            "allow": {"db_labels": {"env": "dev"}, "db_users": ["default"]},
            "deny": {"redis_commands": ["FLUSH*"]},
        }
    )
    grant = grant_for(identity, [role], database="d", labels={"env": "dev"}, db_user="default")
    assert grant.allowed
    make, reply = WORKLOADS[kind]
    reads = [b"".join(make(i + j) for j in range(PIPELINE)) for i in range(0, commands, PIPELINE)]
    replies = reply * PIPELINE
    limits = ProxyLimits()
    counts = [0, 0]

    async def _publish(event: object) -> None:
        encode = getattr(event, "encode", None)  # a batch: encoded as for NATS
        if encode is not None:
            encode()

    async def run() -> None:
        emitter = AuditEmitter(_publish)
        emitter.start()
        audit = emitter.session(identity, database="d", db_user="default", client_addr="x:1")
        hooks = AgentHooks(
            grant=grant, audit=audit, db_user="default", login=ClientCredentials(),
            authenticated=True,
        )  # fmt: skip
        pending: deque[Any] = deque()
        sent = [0, 0]

        def to_server(data: object) -> None:
            sent[0] += 1

        def to_client(data: object) -> None:
            sent[1] += 1

        commands_ = CommandParser(
            hooks=hooks, limits=limits, forward=to_server, local=_fail, pending=pending,
            inspect=("*",),
        )  # fmt: skip
        replies_ = ReplyParser(
            hooks=hooks, limits=limits, write=to_client, pending=pending, on_close_reply=_fail
        )
        for i, data in enumerate(reads):
            commands_.feed(data)
            replies_.feed(replies)
            if i % 8 == 7:  # the emitter publishes (and frees) batches, as in the agent
                await asyncio.sleep(0)
        audit.end(reason="done")
        await emitter.aclose()
        assert not emitter.dropped_total
        assert not pending and audit.commands == commands, (len(pending), audit.commands)
        counts[:] = sent

    return run, counts


async def _timed(run: Callable[[], Awaitable[None]]) -> float:
    started = time.process_time()
    await run()
    return time.process_time() - started


def _fail(*_: object) -> None:
    raise AssertionError("the engine answered a command itself")


def worker(tree: str, commands: int, repeat: int) -> dict[str, list[float]]:
    """In a child process: import ``dbservice`` from ``tree``, time every workload; per
    workload the best of ``repeat`` runs in microseconds of CPU per command, and the
    writes per read to the server and to the client."""
    sys.path.insert(0, tree)
    import dbservice

    where = Path(dbservice.__file__).resolve()
    if not where.is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"dbservice came from {where}, not from {tree}")
    out: dict[str, list[float]] = {}
    for kind in WORKLOADS:
        run, counts = _runner(kind, commands)
        best = float("inf")
        for _ in range(repeat):
            best = min(best, asyncio.run(_timed(run)))
        reads = commands / PIPELINE
        out[kind] = [best / commands * 1e6, counts[0] / reads, counts[1] / reads]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="a checkout of the tree to compare with")
    parser.add_argument("--new", default=str(ROOT), help="the tree to measure (default: this)")
    parser.add_argument("--commands", type=int, default=16_000, help="commands per run")
    parser.add_argument("--repeat", type=int, default=20, help="runs per round (best kept)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.commands, args.repeat)))
        return 0
    trees = {"new": args.new} if args.old is None else {"old": args.old, "new": args.new}
    best: dict[str, dict[str, list[float]]] = {which: {} for which in trees}
    for round_ in range(args.rounds):
        order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
        for which in order:
            for kind, figures in _child(trees[which], args).items():
                kept = best[which].get(kind)
                if kept is None or figures[0] < kept[0]:
                    best[which][kind] = figures
    print(
        f"best of {args.repeat} x {args.rounds} rounds, us of CPU per command, pipeline "
        f"{PIPELINE}, AgentHooks + SessionAudit; "
        + ", ".join(f"{which} {tree}" for which, tree in trees.items())
    )
    if args.old is None:
        print(f"{'workload':10} {'us/cmd':>8} {'writes/read (server, client)':>30}")
        for kind, (us, up, down) in best["new"].items():
            print(f"{kind:10} {us:8.3f} {up:>20.2f}, {down:.2f}")
        return 0
    print(f"{'workload':10} {'old':>8} {'new':>8} {'new/old':>8}   writes/read old -> new")
    for kind in best["old"]:
        old, new = best["old"][kind], best["new"][kind]
        print(
            f"{kind:10} {old[0]:8.3f} {new[0]:8.3f} {new[0] / old[0]:8.2f}   "
            f"{old[1]:.2f}+{old[2]:.2f} -> {new[1]:.2f}+{new[2]:.2f}"
        )
    return 0


def _child(tree: str, args: Any) -> dict[str, list[float]]:
    command = [sys.executable, __file__, "--worker", tree]
    command += ["--commands", str(args.commands), "--repeat", str(args.repeat)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd="/")
    figures: dict[str, list[float]] = json.loads(out.stdout)
    return figures


if __name__ == "__main__":
    sys.exit(main())
