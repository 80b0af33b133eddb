"""deploy/nats: one source of each user's permissions, and the leaf link's stays what a
region's agents and discovery need (tests/integration/test_nats_topology.py runs them)."""

from __future__ import annotations

import re

import pytest

from tests.kits.common import ROOT

NATS = ROOT / "deploy" / "nats"
PERMISSIONS = NATS / "permissions"
HUB_PREFIX = "$JS.hub.API."
API_PREFIX = "$JS.API."
KV_PREFIX = "$KV."


def allowed(user: str, kind: str) -> set[str]:
    """The subjects a permissions file allows to publish or subscribe to."""
    text = (PERMISSIONS / f"{user}.conf").read_text()
    if kind == "publish":
        block = re.search(r"publish: \{\n\s*allow: \[\n(.*?)\n\s*\]", text, re.S)
    else:
        block = re.search(r"subscribe: \{ allow: \[(.*?)\] \}", text, re.S)
    assert block is not None, f"{user}.conf has no {kind} allow list"
    return set(re.findall(r'"([^"]+)"', block.group(1)))


USERS = sorted(p.stem for p in PERMISSIONS.glob("*.conf") if p.stem != "leaf")


@pytest.mark.parametrize("user", USERS)
def test_every_jetstream_call_is_allowed_from_behind_a_leaf_too(user: str) -> None:
    """A leaf node sends $JS.API.> and $KV.> to the hub's domain ($JS.hub.API.> and
    $JS.hub.API.$KV.>): a user allowed a call must be allowed its mapped form, and
    nothing else in that form."""
    subjects = allowed(user, "publish")
    direct = {s[len(API_PREFIX) :] for s in subjects if s.startswith(API_PREFIX)}
    direct |= {s for s in subjects if s.startswith(KV_PREFIX)}
    mapped = {s[len(HUB_PREFIX) :] for s in subjects if s.startswith(HUB_PREFIX)}
    assert direct == mapped


CALLOUT_LINK = {"publish": {"$SYS.REQ.USER.AUTH"}, "subscribe": {"$SYS._INBOX.>"}}
"""What a leaf's auth callout sends to the auth service at the hub, and its answer."""


def test_the_leaf_link_carries_what_agents_and_discovery_send_and_nothing_more() -> None:
    wanted: set[str] = set()
    for user in ("agent", "discovery"):
        wanted |= {s for s in allowed(user, "publish") if not s.startswith((API_PREFIX, KV_PREFIX))}
    # each agent's own user: writes narrower than the agent user's, replies under
    # _INBOX_agents.<host_id> (bus.settings.inbox_prefix)
    assert allowed("leaf", "publish") == wanted | CALLOUT_LINK["publish"]
    assert (
        allowed("leaf", "subscribe")
        == allowed("agent", "subscribe")
        | allowed("discovery", "subscribe")
        | {"_INBOX_agents.>"}
        | CALLOUT_LINK["subscribe"]
    )
    # what it must never carry: the auth service's buckets
    for subject in allowed("leaf", "publish"):
        assert not re.search(r"fleetgate_(users|totp|login_failures)", subject), subject


@pytest.mark.parametrize("config", ["nats-server.conf", "hub.conf", "leaf.conf"])
def test_configs_give_each_user_its_own_permissions_file(config: str) -> None:
    """Users are listed per config; their permissions come from permissions/<user>.conf
    only (included, never written inline)."""
    text = (NATS / config).read_text()
    included = set(re.findall(r"^include \./permissions/(\w+)\.conf$", text, re.M))
    for user, variable in re.findall(r"\{ user: ([\w-]+), [^}]*permissions: \$(\w+)", text):
        owner = variable.removesuffix("_PERMISSIONS").lower()
        assert owner in included, f"{config}: {user} uses {variable}, not included"
        assert owner == ("leaf" if user.startswith("leaf-") else user)
    assert "allow:" not in text, f"{config} writes permissions inline"
