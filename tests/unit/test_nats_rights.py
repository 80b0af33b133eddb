"""Each agent's own rights on the bus, the pure parts: the credentials the auth service
derives, the permissions it grants, how it checks nats-server's authorization requests,
and how audit readers check who published an event."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import nkeys
import pytest

from bus import AWSSpec, DatabaseResource, DatabaseSpec, MemoryDBSpec, Metadata, subjects
from bus.audit import (
    QueryBatch,
    SessionStart,
    Spooled,
    _current_subject,
    checked,
    encode_event,
    spooled,
)
from bus.settings import inbox_prefix
from dbservice.auth.admin import AdminError
from dbservice.auth.natsrights import (
    AgentAuthorizer,
    CalloutError,
    agent_permissions,
    decode_request,
    lease_filters,
    nats_credentials_for,
    new_issuer_seed,
)
from dbservice.auth.service import NatsCalloutSettings
from tests.kits.common import ROOT
from tests.kits.natsauth import encode_jwt, new_seed, public_key

SEED = new_issuer_seed()
HOST = "5f0e2a52-1111-4000-8000-000000000001"


def unb64(text: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def request(
    user: str,
    password: str,
    *,
    server_seed: bytes | None = None,
    names: str | None = None,
    **extra: Any,
) -> bytes:
    """An authorization request as nats-server signs it (its server NKey)."""
    seed = server_seed or new_seed(nkeys.PREFIX_BYTE_SERVER)
    server = public_key(seed)
    claims = {
        "aud": "nats-authorization-request",
        "sub": public_key(SEED),
        "exp": int(time.time()) + 2,
        "nats": {
            "server_id": {"id": names or server, "name": server},
            "user_nkey": public_key(new_seed()),
            "connect_opts": {"user": user, "pass": password},
            "type": "authorization_request",
            "version": 2,
        },
        **extra,
    }
    return encode_jwt(claims, seed).encode()


def test_credentials_are_derived_per_agent_and_stable() -> None:
    a = nats_credentials_for(HOST, SEED)
    assert a == nats_credentials_for(HOST, SEED)
    assert a.user == f"agent-{HOST}"
    assert a.password != nats_credentials_for(HOST.replace("1", "2"), SEED).password
    assert a.password != nats_credentials_for(HOST, new_issuer_seed()).password
    for bad in ("", "a.b", "a*", "a>", "x" * 129, "a b", "_", "-a", "é"):
        with pytest.raises(CalloutError, match="host_id"):
            nats_credentials_for(bad, SEED)


def test_an_admitted_agent_gets_a_user_jwt_with_its_own_rights() -> None:
    authorizer = AgentAuthorizer(SEED, ttl=60)
    creds = nats_credentials_for(HOST, SEED)
    raw = request(creds.user, creds.password)
    response, host_id, reason = authorizer.answer(raw)
    assert (host_id, reason) == (HOST, "")
    outer = unb64(response.decode().split(".")[1])
    asked = unb64(raw.decode().split(".")[1])
    assert outer["iss"] == authorizer.issuer
    assert outer["aud"] == asked["nats"]["server_id"]["id"]
    assert outer["sub"] == asked["nats"]["user_nkey"]
    user = unb64(outer["nats"]["jwt"].split(".")[1])
    assert user["sub"] == asked["nats"]["user_nkey"] and user["aud"] == "$G"
    assert 55 <= user["exp"] - time.time() <= 61
    assert user["nats"]["sub"] == {"allow": [f"_INBOX_agents.{HOST}.>"]}
    assert f"$KV.fleetgate_db_servers.*.{HOST}" in user["nats"]["pub"]["allow"]


@pytest.mark.parametrize(
    ("user", "password", "why"),
    [
        (f"agent-{HOST}", "guess", "wrong password"),
        ("agent-other", "x", "wrong password"),
        ("agent", "x", "not an agent"),
        ("agent-a.b", "x", "host_id"),
        ("admin", "x", "not an agent"),
    ],
)
def test_wrong_credentials_are_refused_with_a_reason(user: str, password: str, why: str) -> None:
    response, host_id, reason = AgentAuthorizer(SEED).answer(request(user, password))
    assert host_id == "" and why in reason
    outer = unb64(response.decode().split(".")[1])
    assert "jwt" not in outer["nats"] and why in outer["nats"]["error"]


def test_a_revoked_agent_is_refused() -> None:
    creds = nats_credentials_for(HOST, SEED)
    authorizer = AgentAuthorizer(SEED, revoked=lambda host_id: host_id == HOST)
    _, host_id, reason = authorizer.answer(request(creds.user, creds.password))
    assert host_id == "" and "revoked" in reason


def test_requests_not_signed_by_the_server_they_name_are_not_answered() -> None:
    creds = nats_credentials_for(HOST, SEED)
    good = request(creds.user, creds.password)
    header, payload, signature = good.decode().split(".")
    tampered = payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB")
    with pytest.raises(CalloutError):
        decode_request(f"{header}.{tampered}.{signature}".encode())
    other = public_key(new_seed(nkeys.PREFIX_BYTE_SERVER))
    with pytest.raises(CalloutError, match="another server"):
        decode_request(request(creds.user, creds.password, names=other))
    with pytest.raises(CalloutError, match="right kind"):  # signed by a user key
        decode_request(request(creds.user, creds.password, server_seed=new_seed()))
    with pytest.raises(CalloutError, match="expired"):
        decode_request(good, now=time.time() + 60)
    with pytest.raises(CalloutError, match="audience"):
        decode_request(request(creds.user, creds.password, aud="something-else"))
    for junk in (b"", b"a.b", b"not a jwt at all", b"\xff.\xff.\xff"):
        with pytest.raises(CalloutError):
            decode_request(junk)


def conf_allowed() -> set[str]:
    text = (ROOT / "deploy" / "nats" / "permissions" / "agent.conf").read_text()
    block = re.search(r"publish: \{\n\s*allow: \[\n(.*?)\n\s*\]", text, re.S)
    assert block is not None
    return set(re.findall(r'"([^"]+)"', block.group(1)))


def test_an_agent_may_read_what_the_agent_user_reads_and_write_only_its_own() -> None:
    """The per-agent rights are the shared agent user's (permissions/agent.conf), every
    write narrowed to the agent."""
    mine = set(agent_permissions(HOST)["pub"]["allow"])
    shared = conf_allowed()
    broad = {
        "$KV.fleetgate_db_servers.>",
        "$JS.hub.API.$KV.fleetgate_db_servers.>",
        "fleetgate.audit.>",
    }
    assert shared - mine == broad
    assert mine - shared == {
        f"$KV.fleetgate_db_servers.*.{HOST}",
        f"$JS.hub.API.$KV.fleetgate_db_servers.*.{HOST}",
        f"fleetgate.audit.*.*.{HOST}",
        f"fleetgate.audit.*.*.*.{HOST}",
    }
    scoped = set(agent_permissions(HOST, ["us-east-1.1.*"])["pub"]["allow"])
    assert "$KV.fleetgate_leases.us-east-1.1.*" in scoped
    assert "$KV.fleetgate_leases.>" not in scoped
    assert not [s for s in mine if re.search("fleetgate_(users|totp|login_failures)", s)]


def test_an_agent_s_inbox_is_its_own_under_one_prefix_for_all_agents() -> None:
    assert inbox_prefix(f"agent-{HOST}") == f"_INBOX_agents.{HOST}"
    assert inbox_prefix("agent") == "_INBOX_agent"  # the shared user reads none of them
    assert inbox_prefix("agent-") == "_INBOX_agent-"


def test_events_are_published_on_their_host_s_subject() -> None:
    event = SessionStart(user="alice", host_id=HOST)
    assert spooled(event).subject == f"fleetgate.audit.db.session.start.{HOST}"
    batch = QueryBatch(common={"host_id": HOST, "user": "alice"}, first_seq=1, queries=[])
    assert spooled(batch).subject == f"fleetgate.audit.db.session.query.{HOST}"
    # an older agent's spool (no host in the subject) goes out on its host's subject
    old = Spooled("fleetgate.audit.db.session.start", event.id, 1, encode_event(event))
    assert _current_subject(old) == spooled(event).subject
    old_batch = Spooled("fleetgate.audit.db.session.query", batch.id, 0, batch.encode())
    assert _current_subject(old_batch) == spooled(batch).subject


def test_readers_check_the_event_s_host_against_its_subject() -> None:
    event = SessionStart(user="alice", host_id=HOST)
    own = checked(event, subjects.audit_subject("db.session.start", HOST))
    assert (own.publisher, own.identity) == (HOST, "checked")
    legacy = checked(event, subjects.audit_subject("db.session.start"))
    assert (legacy.publisher, legacy.identity) == ("", "unchecked")
    forged = checked(event, subjects.audit_subject("db.session.start", "other"))
    assert (forged.publisher, forged.identity) == ("other", "mismatch")
    # on another type's subject (an agent allowed auth.login.<it> cannot pass off a
    # session start as someone else's either)
    moved = checked(event, subjects.audit_subject("auth.login", HOST))
    assert moved.identity == "mismatch"
    # what the message says of itself is never taken
    claims = SessionStart.model_validate_json(
        encode_event(event).replace(b'"identity":"unchecked"', b'"identity":"checked"')
    )
    assert claims.identity == "checked"
    assert checked(claims, subjects.audit_subject("db.session.start", "x")).identity == "mismatch"


def test_the_auth_service_s_callout_settings_say_what_is_wrong(tmp_path: Path) -> None:
    missing = NatsCalloutSettings(issuer_seed_file=str(tmp_path / "none.seed"))
    with pytest.raises(AdminError, match=r"none\.seed: cannot read it"):
        missing.authorizer()
    user_seed = tmp_path / "user.seed"
    user_seed.write_bytes(new_seed())
    with pytest.raises(AdminError, match="must be an account seed"):
        NatsCalloutSettings(issuer_seed_file=str(user_seed)).authorizer()
    junk = tmp_path / "junk.seed"
    junk.write_text("not a seed\n")
    with pytest.raises(AdminError, match="not an NKey seed"):
        NatsCalloutSettings(issuer_seed_file=str(junk)).authorizer()
    good = tmp_path / "issuer.seed"
    good.write_bytes(SEED + b"\n")
    authorizer = NatsCalloutSettings(issuer_seed_file=str(good), ttl="1h").authorizer()
    assert authorizer.issuer == public_key(SEED) and authorizer.ttl == 3600


def memorydb(name: str, region: str, account: str, **labels: str) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name=name, labels=labels),
        spec=DatabaseSpec(
            uri=f"{name}:6379",
            aws=AWSSpec(
                region=region, account_id=account, memorydb=MemoryDBSpec(cluster_name=name)
            ),
        ),
    )


def test_lease_filters_follow_the_databases_an_agent_may_serve() -> None:
    """An agent limited to labels may write the managed-user records of the accounts of
    the MemoryDB databases those labels select, and no other."""
    registry = [
        memorydb("a", "us-east-1", "111111111111", env="prod", team="pay"),
        memorydb("b", "eu-west-1", "111111111111", env="prod", team="pay"),
        memorydb("c", "us-east-1", "222222222222", env="dev", team="pay"),
        DatabaseResource(
            metadata=Metadata(name="self-hosted", labels={"env": "prod"}),
            spec=DatabaseSpec(uri="10.0.0.1:6379"),
        ),
    ]
    assert lease_filters(registry, {"env": "prod"}) == [
        "eu-west-1.111111111111.*",
        "us-east-1.111111111111.*",
    ]
    assert lease_filters(registry, {"team": "pay", "env": "dev"}) == ["us-east-1.222222222222.*"]
    assert lease_filters(registry, {"env": "staging"}) == []
    assert lease_filters(registry, None) == [">"]
    # an agent limited to nothing writes no managed-user record at all
    allowed = set(
        agent_permissions(HOST, lease_filters(registry, {"env": "staging"}))["pub"]["allow"]
    )
    assert not [s for s in allowed if "fleetgate_leases." in s and "$KV" in s]
