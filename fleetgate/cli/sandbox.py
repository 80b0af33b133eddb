"""``fleetgate sandbox up|status|down|env``: the whole fleet on this machine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fleetgate import aio
from fleetgate.cli.errors import UsageError
from fleetgate.cli.output import add_format, print_json
from sandbox.state import (
    PRIVATE_UMASK,
    SHELL_NATS_USER,
    SandboxError,
    SandboxState,
    already_running,
    check_chosen_port,
    default_dir,
    held_lock,
    is_locked,
    make_private,
    nats_url_of,
    resolve_dir,
)

Common = Callable[[argparse.ArgumentParser], None]
DETACH_WAIT = 90.0
"""Seconds ``up --detach`` waits for the sandbox before giving up (it is ready in ~10)."""


def _count(text: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}")
    return int(text)


def _port(text: str) -> int:
    return _count(text, 1, 65535)


def register(sub: Any, common: Common) -> None:
    group = sub.add_parser(
        "sandbox",
        help="the whole fleet on this machine: AWS, NATS, MemoryDB, discovery, auth, agents",
    )
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start the sandbox (Ctrl-C stops it)")
    up.add_argument("--clusters", type=lambda t: _count(t, 1, 50),
                    help="MemoryDB clusters to create (default 4, or one per region)")  # fmt: skip
    up.add_argument("--shards", type=lambda t: _count(t, 1, 8), default=3,
                    help="shards per cluster (default 3)")  # fmt: skip
    up.add_argument("--regions", type=lambda t: _count(t, 1, 5), default=0, metavar="N",
                    help="NATS as a hub cluster (3 servers) and a leaf node per region, "
                    "N regions with an agent each (default: one server, 2 regions)")  # fmt: skip
    up.add_argument("--detach", action="store_true",
                    help="run in the background; return once it is ready")  # fmt: skip
    up.add_argument("--nats-port", type=_port, help="NATS client port (default: a free one)")
    up.add_argument("--auth-port", type=_port, help="auth service port (default: a free one)")
    up.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help="json: once ready, the summary as one JSON object on one line (state, dir, "
        "env_file, regions, parts, nats_servers, auth, agents, databases, user, login); "
        "progress goes to standard error (default text: progress and a summary)",
    )
    status = actions.add_parser("status", help="each part, its pid, address and health")
    status.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help="json: one object with the state, each part and database (default text: a table)",
    )
    down = actions.add_parser("down", help="stop everything the sandbox started")
    add_format(
        down,
        "one object with dir, outcome (stopped; cleaned up: its supervisor was gone and "
        "its leftover processes were stopped; not running; no sandbox), notes (what had "
        "to be stopped or killed) and ports (how many are free again)",
        text="notes, then one line",
    )
    env = actions.add_parser("env", help='print the exports for a shell: eval "$(... env)"')
    add_format(
        env,
        "one object, each variable's name to its value (FLEETGATE_NATS_URL with the "
        "sandbox's NATS login)",
        text="export lines for a shell",
    )
    handlers = ((up, _up), (status, _status), (down, _down), (env, _env))
    for parser, handler in handlers:
        parser.add_argument(
            "--dir", help=f"sandbox directory (default: $FLEETGATE_HOME/sandbox, {default_dir()})"
        )
        common(parser)
        parser.set_defaults(handler=_guard(handler))


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except SandboxError as exc:
            raise UsageError(str(exc)) from None

    return run


# -- up ------------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    from sandbox import parts

    parts.check()
    if args.clusters is None:
        args.clusters = max(4, args.regions)
    elif args.clusters < args.regions:
        raise SandboxError(
            f"--clusters {args.clusters} leaves a region without a database: give each of "
            f"the {args.regions} regions one (--clusters {args.regions} or more)"
        )
    if args.regions and args.nats_port:
        raise SandboxError(
            "--nats-port names the one NATS server; with --regions every server gets a "
            "free port (see fleetgate sandbox status): leave --nats-port out"
        )
    directory = resolve_dir(args.dir)
    if is_locked(directory):
        raise SandboxError(already_running(directory))
    _clean_up_after_a_killed_sandbox(directory, sys.stderr if args.format == "json" else sys.stdout)
    # Only the person running it may read what the sandbox and its processes write
    # (logs, configs, stores, the CA key, passwords).
    os.umask(PRIVATE_UMASK)
    make_private(directory)
    check_chosen_port(args.nats_port, "--nats-port")
    check_chosen_port(args.auth_port, "--auth-port")
    if args.detach:
        return _detach(args, directory)
    from sandbox.fleet import Options

    options = Options(
        dir=directory,
        clusters=args.clusters,
        shards=args.shards,
        nats_port=args.nats_port,
        auth_port=args.auth_port,
        regions=args.regions,
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return aio.run(_supervise(options, foreground=sys.stdout.isatty(), output=args.format))


def _clean_up_after_a_killed_sandbox(directory: Path, out: IO[str]) -> None:
    """Processes a killed supervisor left behind would hold ports and the old store."""
    from sandbox.health import stop_leftovers

    state = _load_quietly(directory)
    if state is not None:
        for note in stop_leftovers(directory, state):
            print(f"note: {note}", file=out, flush=True)


async def _supervise(options: Any, *, foreground: bool, output: str = "text") -> int:
    from sandbox.fleet import Progress, Sandbox
    from sandbox.summary import summary, summary_doc

    progress = Progress(sys.stderr if output == "json" else sys.stdout)
    with held_lock(options.dir):
        sandbox = Sandbox(options, progress)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # HUP: terminal closed
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(sandbox.start())
        stopped = asyncio.create_task(stop.wait())
        code = 0
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                await aio.cancel_and_wait(starting)  # its SandboxError: moot, it was stopped
                progress.line("sandbox", "interrupted while starting")
                code = 130
            else:
                starting.result()
                if output == "json":
                    print(json.dumps(summary_doc(sandbox)), flush=True)
                else:
                    print(summary(sandbox, foreground=foreground), flush=True)
                while not stop.is_set():
                    for note in sandbox.child_exits():
                        progress.line("sandbox", f"warning: {note}")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(stopped), 1)
        except SandboxError as exc:
            sandbox.state.state = "failed"
            sandbox.state.error = str(exc)
            sandbox.state.save()
            print(f"fleetgate: error: {exc}", file=sys.stderr, flush=True)
            if output != "json":  # standard output holds JSON or nothing
                print(f"fleetgate: error: {exc}", flush=True)
            code = 1
        finally:
            stopped.cancel()
            progress.line("sandbox", "stopping")
            if sandbox.state.state != "failed":
                sandbox.state.state = "stopping"
                sandbox.state.save()
            for note in await sandbox.stop():
                progress.line("sandbox", f"note: {note}")
            if sandbox.state.state != "failed":
                sandbox.state.state = "stopped"
            sandbox.state.save()
            progress.line("sandbox", "stopped")
        return code


def _detach(args: argparse.Namespace, directory: Path) -> int:
    """Run ``up`` again in a new session, output to files under DIR/logs; follow its
    progress until it is ready or has failed."""
    from sandbox.fleet import STARTED_ENV, command_age

    started = time.time() - command_age()
    logs = directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_path, log_path = logs / "sandbox.out", logs / "sandbox.log"
    argv = [sys.executable, "-m", "fleetgate", "sandbox", "up", "--dir", str(directory),
            "--clusters", str(args.clusters), "--shards", str(args.shards)]  # fmt: skip
    flags = (("--nats-port", args.nats_port), ("--auth-port", args.auth_port),
             ("--regions", args.regions))  # fmt: skip
    for flag, value in flags:
        if value:
            argv += [flag, str(value)]
    argv += ["--format", args.format]
    with out_path.open("wb") as out, log_path.open("ab") as err:
        log_start = err.tell()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            env={**os.environ, STARTED_ENV: str(started)},
        )
    shown = 0
    deadline = time.monotonic() + DETACH_WAIT
    while True:
        text = out_path.read_text(errors="replace")
        complete = text[: text.rfind("\n") + 1]
        if len(complete) > shown:
            sys.stdout.write(complete[shown:])
            sys.stdout.flush()
            shown = len(complete)
        state = _load_quietly(directory)
        ready = state is not None and state.pid == proc.pid and state.state == "ready"
        summarised = "\nnext" in complete or complete.startswith("{")  # text or JSON
        if ready and (summarised or proc.poll() is not None):
            return 0
        if proc.poll() is not None:
            _show_failure(complete, log_path, log_start)
            return 1
        if time.monotonic() > deadline:
            print(f"fleetgate: error: the sandbox is not ready after {DETACH_WAIT:.0f}s; it "
                  f"keeps starting in the background (pid {proc.pid}): see fleetgate sandbox "
                  f"status, its log {log_path}, or stop it with fleetgate sandbox down",
                  file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(0.1)


def _show_failure(shown: str, log_path: Path, log_start: int) -> None:
    """The supervisor's error lines (when its progress output did not show them), then
    where its whole log is."""
    if "fleetgate: error:" not in shown:
        with log_path.open("rb") as log:
            log.seek(log_start)
            lines = log.read().decode(errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("fleetgate: error:")]
        for line in errors or lines[-10:]:
            print(line, file=sys.stderr)
    print(f"fleetgate: error: the sandbox did not start; its log: {log_path}", file=sys.stderr)


def _load_quietly(directory: Path) -> SandboxState | None:
    try:
        return SandboxState.load(directory)
    except SandboxError:
        return None


# -- status, down, env ---------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    from sandbox.health import status

    return status(resolve_dir(args.dir), args.format)


def _down(args: argparse.Namespace) -> int:
    from sandbox.health import down

    return down(resolve_dir(args.dir), args.format)


def _env(args: argparse.Namespace) -> int:
    directory = resolve_dir(args.dir)
    state = SandboxState.load(directory)
    if state is None or not is_locked(directory):
        raise SandboxError(
            f"no sandbox running in {directory}: start one with fleetgate sandbox up"
        )
    # The NATS login is added here, read from its 0600 file: no other file holds it.
    url = nats_url_of(directory, state, SHELL_NATS_USER)
    if args.format == "json":
        print_json({**state.env, "FLEETGATE_NATS_URL": url})
        return 0
    sys.stdout.write((directory / "env").read_text())
    sys.stdout.write(f"export FLEETGATE_NATS_URL={shlex.quote(url)}\n")
    return 0
