"""``fleetgate discovery run -c FILE [--once]``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from bus.settings import resolve_nats
from fleetgate import aio
from fleetgate.config import load_model, read_yaml


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    group = sub.add_parser("discovery", help="find MemoryDB clusters in AWS and enrol them")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="poll AWS and keep the registry in step")
    run.add_argument("-c", "--config", required=True, help="discovery YAML config file")
    run.add_argument(
        "--once", action="store_true", help="poll once and exit (0 only if every fetcher succeeded)"
    )
    run.add_argument(
        "--nats",
        help="NATS server URL(s), comma-separated, over FLEETGATE_NATS_SERVERS (or "
        "FLEETGATE_NATS_URL) over the config file's nats section (docs/nats-client.md)",
    )
    common(run)
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from discovery.app import run_discovery
    from discovery.settings import DiscoveryConfig

    config = load_model(DiscoveryConfig, read_yaml(args.config), args.config)
    url = resolve_nats(args.nats, config.nats)
    return aio.run(run_discovery(config, nats_url=url, once=args.once))
