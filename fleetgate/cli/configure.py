"""``fleetgate configure iam [--discovery] [--agent] [--cluster ARN ...] [--user NAME ...]
[--assume-role ARN ...]``: the least-privilege IAM policy documents fleetgate's processes
need, as JSON.

With one of ``--discovery``/``--agent`` the output is that policy document alone (ready
for ``aws iam put-role-policy --policy-document file://...``); with both or neither, a
JSON object ``{"discovery": ..., "agent": ...}``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from dbservice.upstream.policies import (
    ClusterArn,
    agent_policy,
    check_role_arn,
    check_user_name,
    discovery_policy,
)


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    group = sub.add_parser("configure", help="print what fleetgate needs from its surroundings")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    policy = actions.add_parser(
        "iam",
        help="print least-privilege IAM policies for discovery and the agent",
        description="Print the IAM policy documents (JSON) fleetgate's processes need.",
    )
    policy.add_argument("--discovery", action="store_true", help="the discovery service's policy")
    policy.add_argument("--agent", action="store_true", help="the database agent's policy")
    policy.add_argument(
        "--cluster",
        action="append",
        default=[],
        metavar="ARN",
        help="MemoryDB cluster ARN the agent connects to (repeat; default: every cluster)",
    )
    policy.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="NAME",
        help="MemoryDB user the agent logs in as by IAM (repeat; default: every user)",
    )
    policy.add_argument(
        "--assume-role",
        action="append",
        default=[],
        metavar="ARN",
        help="IAM role the process assumes (matcher or database assume_role_arn; repeat)",
    )
    policy.add_argument(
        "--format",
        default="json",
        choices=["json"],
        help="json: the policy document alone with one of --discovery/--agent, else one "
        "object with discovery and agent (the only format: policies are JSON)",
    )
    common(policy)
    policy.set_defaults(handler=_iam)


def _iam(args: argparse.Namespace) -> int:
    from fleetgate.cli.errors import UsageError

    try:
        clusters = [ClusterArn.parse(arn) for arn in args.cluster]
        roles = [check_role_arn(arn.strip()) for arn in args.assume_role]
        users = [check_user_name(name) for name in args.user]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    both = args.discovery == args.agent
    documents: dict[str, Any] = {}
    if args.discovery or both:
        documents["discovery"] = discovery_policy(roles=roles)
    if args.agent or both:
        documents["agent"] = agent_policy(clusters=clusters, users=users, roles=roles)
    out = documents if both else next(iter(documents.values()))
    print(json.dumps(out, indent=2))
    return 0
