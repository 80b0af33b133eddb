"""``fleetgate agent run -c FILE``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from bus.settings import ENV_PASSWORD, resolve_nats
from fleetgate import aio
from fleetgate.config import load_model, read_yaml


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    group = sub.add_parser("agent", help="serve databases: health checks and heartbeats")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = actions.add_parser(
        "run", help="serve the databases the config selects until SIGTERM/SIGINT"
    )
    run.add_argument("-c", "--config", required=True, help="agent YAML config file")
    # Internal: how the agent starts its listener processes (listener.processes > 1);
    # they read the agent's config, NATS URL, host_id and pid from stdin.
    run.add_argument("--listener-process", type=int, metavar="K", help=argparse.SUPPRESS)
    run.add_argument(
        "--nats",
        help="NATS server URL(s), comma-separated, over FLEETGATE_NATS_SERVERS (or "
        "FLEETGATE_NATS_URL) over the config file's nats section (docs/nats-client.md)",
    )
    common(run)
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from dbservice.agent.app import run_agent
    from dbservice.agent.config import AgentConfig

    if args.listener_process is not None:
        return _run_listener_process(args)
    config = load_model(AgentConfig, read_yaml(args.config), args.config)
    url = resolve_nats(args.nats, config.nats)
    argv = [sys.executable, "-m", "fleetgate", "agent", "run", "-c", args.config]
    argv += ["--log-level", args.log_level, "--log-format", args.log_format]
    return aio.run(run_agent(config, nats_url=url, process_argv=argv))


def _run_listener_process(args: argparse.Namespace) -> int:
    from dbservice.agent.app import run_agent
    from dbservice.agent.processes import ListenerProcess, tag_logs

    index = args.listener_process
    tag_logs(index)
    data = b"" if sys.stdin.isatty() else sys.stdin.buffer.read()
    spec, config = ListenerProcess.decode(index, data)
    # The leader's settings, its flag and environment applied: not again here (the
    # environment could name other servers than its --nats did); only the password a
    # user login may take from the environment.
    password = {ENV_PASSWORD: os.environ[ENV_PASSWORD]} if ENV_PASSWORD in os.environ else {}
    leaders = load_model(type(config.nats), spec.nats, f"listener process {index}: nats")
    url = resolve_nats(None, leaders, env=password)
    return aio.run(run_agent(config, nats_url=url, listener_process=spec))
