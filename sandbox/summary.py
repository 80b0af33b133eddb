"""What ``fleetgate sandbox up`` prints once the fleet is ready: what runs where, and
the next commands to type."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from sandbox.fleet import count_of
from sandbox.state import ENV_FILE, default_dir

if TYPE_CHECKING:
    from sandbox.fleet import Sandbox


def summary(sandbox: Sandbox, *, foreground: bool) -> str:
    st = sandbox.state
    d = sandbox.dir
    dir_flag = "" if d == default_dir() else f" --dir {d}"
    parts = {p.name: p for p in st.parts}
    clusters = count_of(len(st.databases), "MemoryDB cluster")
    agents = count_of(len(sandbox.agents), "agent")
    regions = ", ".join(sandbox.regions)
    if st.nats_servers:
        hubs = [n for n in st.nats_servers if n.role == "hub"]
        nats = f"a NATS hub of {len(hubs)} and {count_of(len(sandbox.regions), 'leaf node')}"
    else:
        nats = "NATS"
    lines = [
        f"ready in {st.ready_seconds}s: {clusters}, {agents}, "
        f"discovery, auth, {nats} and AWS (moto), all on 127.0.0.1",
        "",
    ]
    if st.nats_servers:
        for node in st.nats_servers:
            role = "hub (JetStream R3, domain hub)" if node.role == "hub" else (
                f"leaf of {node.region} for {', '.join(node.agents)}")  # fmt: skip
            lines.append(f"  nats       {node.name:<19} {node.address}  {role}")
        lines.append(f"             (deploy/nats/hub.conf and leaf.conf; TLS CA "
                     f"{st.nats_ca_file}, passwords in {d}/nats-users)")  # fmt: skip
    else:
        lines.append(
            f"  nats       {parts['nats'].address}  (users of deploy/nats/nats-server.conf, "
            f"passwords in {d}/nats-users)"
        )
    lines += [
        f"  aws        {parts['aws'].address}  (moto; {regions})",
        f"  auth       {parts['auth'].address}  (CA {sandbox.ca_fingerprint})",
    ]
    for agent in sandbox.agents:
        dbs = ", ".join(db.cluster for db in st.databases if db.agent == agent)
        lines.append(f"  {agent}    {parts[agent].address}  {parts[agent].detail}: {dbs}")
    lines += [
        "  roles      dev-access (env dev and staging, db user app), admin (everything)",
        "  managed    svc in every cluster: a password the agents set and rotate, "
        "nobody sees (fleetgate managed ls)",
        f"  user       alice (dev-access), password in {d}/alice.password",
        f"  state      {d} (logs in {d}/logs)",
        "",
        "next, in " + ("another shell" if foreground else "this shell") + ":",
        f'  eval "$(fleetgate sandbox env{dir_flag})"    # NATS (as operator), AWS for this shell',
        f"  fleetgate login --auth {parts['auth'].address.removeprefix('https://')} "
        f"--user alice --ca-file {d}/ca/ca.crt",
        "  fleetgate db ls",
    ]
    first = next((db for db in st.databases if db.env == "dev"), st.databases[0])
    lines += [
        f"  fleetgate db connect {first.name} --db-user app",
        f"  fleetgate sandbox status{dir_flag}",
        f"  fleetgate sandbox down{dir_flag}" + ("    # or Ctrl-C here" if foreground else ""),
    ]
    return "\n".join(lines)


def summary_doc(sandbox: Sandbox) -> dict[str, Any]:
    """:func:`summary` as one JSON object (``sandbox up --format json``): where each part
    answers, the databases, the login to use and the state directory."""
    st = sandbox.state
    d = sandbox.dir
    parts = {p.name: p for p in st.parts}
    auth = parts["auth"].address
    return {
        "state": st.state,
        "ready_seconds": st.ready_seconds,
        "dir": str(d),
        "env_file": str(d / ENV_FILE),
        "regions": list(sandbox.regions),
        "parts": [
            {"name": p.name, "pid": p.pid, "address": p.address, "diag": p.diag or None}
            for p in st.parts
        ],
        "nats_servers": [asdict(n) for n in st.nats_servers],
        "auth": {
            "address": auth,
            "ca_file": str(d / "ca" / "ca.crt"),
            "ca_fingerprint": sandbox.ca_fingerprint,
        },
        "agents": [
            {
                "name": agent,
                "region": region,
                "address": parts[agent].address,
                "databases": [db.name for db in st.databases if db.agent == agent],
            }
            for agent, region in sandbox.agents.items()
        ],
        "databases": [asdict(db) for db in st.databases],
        "user": {"name": "alice", "role": "dev-access", "password_file": str(d / "alice.password")},
        "login": f"fleetgate login --auth {auth.removeprefix('https://')} --user alice "
        f"--ca-file {d}/ca/ca.crt",
    }
