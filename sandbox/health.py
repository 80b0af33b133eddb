"""``fleetgate sandbox status`` (each part: alive, answering, and what NATS says of the
agents and databases; with ``--regions``, the NATS topology and a verdict per link) and
``fleetgate sandbox down`` (stop, then make sure)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetgate.cli.tables import print_table
from sandbox.natsfleet import monitor
from sandbox.ports import port_answers, port_free
from sandbox.state import (
    NatsNode,
    Part,
    SandboxError,
    SandboxState,
    cmdline,
    is_locked,
    names_dir,
    nats_url_of,
    pid_alive,
)

SUPERVISOR_GRACE = 30.0
"""Seconds the supervisor has to stop everything after SIGTERM."""
UNKNOWN = "UNKNOWN: NATS is down"
NATS_DOWN = "NATS is down, so the agents' and databases' health cannot be judged"


@dataclass
class Fleet:
    """What NATS says: enrolled databases and, per database, agents and their health."""

    enrolled: set[str]
    served: dict[str, list[tuple[str, str]]]
    """database -> [(agent hostname, health status)]"""
    error: str = ""


def _fleet(nats_url: str, ca_file: str = "") -> Fleet:
    from bus import Bus
    from bus.errors import BusError
    from bus.settings import NatsSettings, NatsTLS, resolve_nats
    from fleetgate import aio

    settings = NatsSettings(tls=NatsTLS(ca_file=Path(ca_file))) if ca_file else NatsSettings()

    # nats-py closing a TLS connection makes asyncio warn about eof_received: not news
    logging.getLogger("asyncio").setLevel(logging.ERROR)

    async def read() -> Fleet:
        target = resolve_nats(nats_url, settings, env={})
        async with await Bus.connect(target, name="fleetgate-sandbox-status") as bus:
            enrolled = {r.name for r in await bus.list_resources(create=False)}
            served: dict[str, list[tuple[str, str]]] = {}
            for hb in await bus.list_db_servers(create=False):
                served.setdefault(hb.name, []).append((hb.hostname, hb.target_health.status))
            return Fleet(enrolled, served)

    try:
        return aio.run(read())
    except (BusError, OSError, TimeoutError) as exc:
        return Fleet(set(), {}, error=str(exc))


# -- the NATS topology (--regions) ---------------------------------------------------------


@dataclass
class ServerView:
    """What a hub server or leaf node's monitoring endpoints say, and the verdict."""

    name: str
    role: str
    verdict: str
    routes: list[str] = field(default_factory=list)
    """Hub: the hub servers it routes to."""
    jetstream: str = ""
    """Hub: "ok (meta leader hub-2)" or why JetStream is unavailable."""
    linked_to: str = ""
    """Leaf: the hub server its link is up to ("" while down)."""
    clients: list[str] = field(default_factory=list)
    """Leaf: the connection names of its clients (``fleetgate-agent agent-1``, ...)."""


@dataclass
class Link:
    name: str
    kind: str  # route, leaf, agent
    state: str


def _server_view(node: NatsNode, hubs: int) -> ServerView:
    view = ServerView(node.name, node.role, "")
    if not pid_alive(node.pid):
        view.verdict = "DOWN: process gone"
        return view
    code, _ = monitor(node.monitor_port, "/varz")
    if code != 200:
        view.verdict = f"DOWN: its monitoring port {node.monitor_port} does not answer"
        return view
    if node.role == "hub":
        _, routez = monitor(node.monitor_port, "/routez")
        view.routes = sorted(
            {str(r.get("remote_name") or r.get("remote_id")) for r in routez.get("routes") or []}
        )
        health, body = monitor(node.monitor_port, "/healthz?js-enabled-only=true")
        status, body = monitor(node.monitor_port, "/healthz") if health == 200 else (health, body)
        _, jsz = monitor(node.monitor_port, "/jsz")
        leader = (jsz.get("meta_cluster") or {}).get("leader")
        if status == 200 and leader:
            view.jetstream = f"ok (meta leader {leader})"
        else:
            why = body.get("error") or ("no meta leader" if not leader else f"healthz {status}")
            view.jetstream = f"UNAVAILABLE: {why}"
        want = hubs - 1
        routes = f"{len(view.routes)}/{want} routes"
        ok = len(view.routes) >= want and view.jetstream.startswith("ok")
        view.verdict = f"{'ok' if ok else 'DEGRADED'}: {routes}, JetStream {view.jetstream}"
        return view
    _, leafz = monitor(node.monitor_port, "/leafz")
    links = [str(link.get("name") or "?") for link in leafz.get("leafs") or []]
    view.linked_to = links[0] if links else ""
    _, connz = monitor(node.monitor_port, "/connz?limit=1024")
    conns = connz.get("connections") or []
    view.clients = sorted(str(c["name"]) for c in conns if c.get("name"))
    view.verdict = (
        f"ok: linked to the hub ({view.linked_to})"
        if links
        else "DOWN: no link to the hub (JetStream unavailable to its region)"
    )
    return view


def topology(state: SandboxState) -> tuple[list[ServerView], list[Link]]:
    """Each NATS server's view and a verdict per link: every route between two hub
    servers, every leaf's link to the hub, every agent's connection to its leaf."""
    hubs = [n for n in state.nats_servers if n.role == "hub"]
    views = {n.name: _server_view(n, len(hubs)) for n in state.nats_servers}
    links: list[Link] = []
    for i, a in enumerate(hubs):
        for b in hubs[i + 1 :]:
            up = b.name in views[a.name].routes or a.name in views[b.name].routes
            down = [n.name for n in (a, b) if views[n.name].verdict.startswith("DOWN")]
            why = f"DOWN: {', '.join(down)} down" if down else "DOWN: no route"
            links.append(Link(f"{a.name} <-> {b.name}", "route", "up" if up else why))
    for leaf in (n for n in state.nats_servers if n.role == "leaf"):
        view = views[leaf.name]
        if view.linked_to:
            state_ = f"up (to {view.linked_to})"
        elif view.verdict.startswith("DOWN: no link"):
            state_ = "DOWN: the leaf has no link to any hub server"
        else:
            state_ = f"DOWN: {leaf.name} is {view.verdict.removeprefix('DOWN: ')}"
        links.append(Link(f"{leaf.name} -> hub", "leaf", state_))
        for agent in leaf.agents:
            if view.verdict.startswith("DOWN") and not view.linked_to and not view.clients:
                state_ = f"DOWN: {leaf.name} does not answer"
            elif f"fleetgate-agent {agent}" in view.clients:
                state_ = "up"
            else:
                state_ = "DOWN: not connected"
            links.append(Link(f"{agent} -> {leaf.name}", "agent", state_))
    return list(views.values()), links


def _port_of(address: str) -> int | None:
    tail = address.rsplit(":", 1)[-1].rstrip("/")
    return int(tail) if tail.isdigit() else None


def _part_health(
    part: Part, fleet: Fleet, state: SandboxState, servers: dict[str, ServerView]
) -> str:
    if part.name.startswith("nats ") and part.name[5:] in servers:
        return servers[part.name[5:]].verdict
    if not pid_alive(part.pid):
        return "DOWN: process gone"
    port = _port_of(part.address)
    if port is not None and not port_answers(port):
        return f"DOWN: nothing answers on port {port}"
    if part.diag and (why := _not_ready(part.diag)):
        return f"NOT READY: {why}"  # its own word: NATS lost, not synced, a poll failed
    if part.name == "nats" and fleet.error:
        return f"DOWN: {fleet.error}"
    if fleet.error and (part.name == "discovery" or part.name.startswith("agent-")):
        return UNKNOWN  # what NATS would say of it cannot be read
    if part.name == "discovery":
        expected = {db.name for db in state.databases}
        found = len(expected & fleet.enrolled)
        word = "ok" if found == len(expected) else "WAITING"
        return f"{word}: {found}/{len(expected)} databases enrolled"
    if part.name.startswith("agent-"):
        mine = [db.name for db in state.databases if db.agent == part.name]
        healthy = sum(1 for db in mine if (part.name, "healthy") in fleet.served.get(db, []))
        word = "ok" if healthy == len(mine) else "DEGRADED"
        return f"{word}: {healthy}/{len(mine)} databases healthy (heartbeats)"
    if part.name.startswith("memorydb "):
        dead = [p for p in _valkey_pids(part) if not pid_alive(p)]
        return f"DOWN: valkey pids {dead} gone" if dead else "ok"
    return "ok"


def _not_ready(diag: str) -> str:
    """Why the process behind diagnostics URL ``diag`` says it is not ready (its
    ``/readyz``: the failing checks), or "" when it is."""
    try:
        with urllib.request.urlopen(f"{diag.rstrip('/')}/readyz", timeout=2) as answer:
            answer.read()
            return ""
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(Exception):
            failing = [
                line.strip()[5:]
                for line in exc.read().decode(errors="replace").splitlines()
                if line.strip().startswith("FAIL ")
            ]
            if failing:
                return "; ".join(failing)
        return f"/readyz answers {exc.code}"
    except (OSError, ValueError) as exc:
        return f"/readyz does not answer ({exc})"


def _valkey_pids(part: Part) -> list[int]:
    inner = part.detail.partition("[")[2].partition("]")[0]
    return [int(p) for p in inner.split(",") if p.strip().isdigit()]


def status(directory: Path, fmt: str) -> int:
    state = SandboxState.load(directory)
    if state is None:
        print(f"no sandbox in {directory}: start one with fleetgate sandbox up", file=sys.stderr)
        return 1
    running = is_locked(directory) and pid_alive(state.pid)
    if not running or state.state != "ready":
        what = state.state if running else f"not running (last state: {state.state})"
        print(f"sandbox in {directory}: {what}")
        if state.error:
            print(f"  {state.error}")
        left = _leftovers(directory, state)
        if not running and left:
            print(f"  processes left: {left}; fleetgate sandbox down stops them")
        return 1
    try:  # reads databases and heartbeats: the read-only user is enough
        fleet = _fleet(nats_url_of(directory, state, "reader"), state.nats_ca_file)
    except SandboxError as exc:
        fleet = Fleet(set(), {}, error=str(exc))
    views, links = topology(state)
    servers = {v.name: v for v in views}
    parts = [
        (p.name, p.pid, p.address or "-", _part_health(p, fleet, state, servers))
        for p in state.parts
    ]
    dbs = []
    for db in state.databases:
        agents = fleet.served.get(db.name, [])
        health = ", ".join(f"{a} {s}" for a, s in sorted(agents)) or "no agent"
        dbs.append((db.name, db.env, db.team, db.region, UNKNOWN if fleet.error else health))
    ok = (
        all(r[3].startswith("ok") for r in parts)
        and all(link.state.startswith("up") for link in links)
        and all(
            all(s == "healthy" for _, s in fleet.served.get(db.name, [("", "none")]))
            for db in state.databases
        )
    )
    if fmt == "json":
        doc = {
            "dir": str(directory), "pid": state.pid, "state": state.state, "healthy": ok,
            "ready_seconds": state.ready_seconds,
            "nats_error": fleet.error or None,
            "parts": [dict(zip(("name", "pid", "address", "health"), r, strict=True))
                      | ({"diag": p.diag} if p.diag else {})
                      for r, p in zip(parts, state.parts, strict=True)],
            "databases": [dict(zip(("name", "env", "team", "region", "agents"), d, strict=True))
                          for d in dbs],
            "topology": _topology_doc(state, views, links) if state.nats_servers else None,
        }  # fmt: skip
        print(json.dumps(doc, indent=2))
        return 0 if ok else 1
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started_at))
    print(f"sandbox in {directory}: {'running' if ok else 'DEGRADED'}, pid {state.pid}, "
          f"since {since} (ready in {state.ready_seconds}s)")  # fmt: skip
    if fleet.error:
        print(f"  {NATS_DOWN}: {fleet.error}")
    print()
    rows = [(name, str(pid), address, health) for name, pid, address, health in parts]
    print_table([("PART", "PID", "ADDRESS", "HEALTH"), *rows])
    diag = [(p.name, f"{p.diag}metrics  {p.diag}readyz") for p in state.parts if p.diag]
    if diag:
        print()
        print_table([("PART", "DIAGNOSTICS (docs/operations.md)"), *diag])
    if state.nats_servers:
        print()
        print_table([("NATS SERVER", "ROLE", "ROUTES / LINK", "JETSTREAM", "AGENTS"),
                     *(_server_row(state, v) for v in views)])  # fmt: skip
        print()
        print_table([("LINK", "KIND", "STATE"), *((k.name, k.kind, k.state) for k in links)])
    print()
    print_table([("DATABASE", "ENV", "TEAM", "REGION", "AGENTS"), *dbs])
    return 0 if ok else 1


def _server_row(state: SandboxState, view: ServerView) -> tuple[str, ...]:
    node = next(n for n in state.nats_servers if n.name == view.name)
    down = view.verdict if view.verdict.startswith("DOWN") else ""
    if view.role == "hub":
        routes = down or f"routes to {', '.join(view.routes) or 'none'}"
        return (view.name, "hub", routes, view.jetstream or "-", "-")
    link = down or f"linked to {view.linked_to}"
    agents = ", ".join(node.agents) or "-"
    return (view.name, f"leaf {node.region}", link, "the hub's, via the link", agents)


def _topology_doc(
    state: SandboxState, views: list[ServerView], links: list[Link]
) -> dict[str, Any]:
    nodes = {n.name: n for n in state.nats_servers}
    return {
        "servers": [
            {
                "name": v.name, "role": v.role, "pid": nodes[v.name].pid,
                "address": nodes[v.name].address, "region": nodes[v.name].region or None,
                "verdict": v.verdict, "routes": v.routes if v.role == "hub" else None,
                "jetstream": v.jetstream or None, "linked_to": v.linked_to or None,
                "agents": nodes[v.name].agents,
            }
            for v in views
        ],
        "links": [{"name": k.name, "kind": k.kind, "state": k.state} for k in links],
    }  # fmt: skip


# -- down --------------------------------------------------------------------------------


def _is_sandbox_process(pid: int, directory: Path) -> bool:
    """A process of this sandbox: valkey-server or nats-server with state under the
    directory, a ``fleetgate ... run -c DIR/config/...`` child, or the supervisor. Never
    the shell or the command that happens to name the directory."""
    if pid == os.getpid() or not pid_alive(pid):
        return False
    if not names_dir(pid, directory):
        return False
    args = cmdline(pid)
    d = str(directory)
    first = args.split(" ", 1)[0]
    if first.endswith(("valkey-server", "nats-server")):
        return True
    return " -m fleetgate " in f" {args}" and (
        f" -c {d}/config/" in args or (" sandbox up " in args and f"--dir {d}" in args)
    )


def _leftovers(directory: Path, state: SandboxState) -> list[int]:
    """Processes of this sandbox still alive: those recorded, and any found in /proc
    (the supervisor may have been killed before it recorded them)."""
    pids = set(state.pids)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pids.add(int(entry.name))
    return sorted(p for p in pids if _is_sandbox_process(p, directory))


def _describe(pid: int) -> str:
    args = cmdline(pid).split()
    if "fleetgate" in args:
        at = args.index("fleetgate")
        return " ".join(args[at : at + 3])
    return Path(args[0]).name if args else "?"


def _stop_order(pid: int) -> int:
    """Clients of NATS first (the fleetgate processes, which stop quickly while NATS
    still answers), then the valkey servers, NATS last."""
    first = cmdline(pid).split(" ", 1)[0]
    if first.endswith("nats-server"):
        return 2
    if first.endswith("valkey-server"):
        return 1
    return 0


def _wait_gone(pids: Sequence[int], seconds: float) -> list[int]:
    """Wait up to ``seconds`` for each to be gone (exited; a zombie counts as gone);
    those still there."""
    deadline = time.monotonic() + seconds
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if pid_alive(p)]
    return left


def stop_leftovers(directory: Path, state: SandboxState) -> list[str]:
    """Stop the sandbox's processes still alive (its supervisor is gone) in order:
    fleetgate processes, valkey servers, NATS last, each group SIGTERMed, given
    :data:`STOP_GRACE` seconds and SIGKILLed after, and waited for until it is gone
    before the next group. A note for each."""
    from sandbox.children import STOP_GRACE

    left = {pid: _describe(pid) for pid in _leftovers(directory, state)}
    notes = []
    for group in range(3):
        pids = [pid for pid in left if _stop_order(pid) == group]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        stubborn = _wait_gone(pids, STOP_GRACE)
        for pid in stubborn:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(stubborn, 5)
        for pid in pids:
            done = "killed" if pid in stubborn else "stopped"
            notes.append(f"{left[pid]} (pid {pid}) outlived the supervisor; {done}")
    return notes


def down(directory: Path, fmt: str = "text") -> int:
    """Stop the sandbox in ``directory``; say what was done (``fmt`` json: one object with
    dir, outcome, notes and ports)."""

    def done(outcome: str, text: str, notes: list[str], ports: int) -> int:
        if fmt == "json":
            doc = {"dir": str(directory), "outcome": outcome, "notes": notes, "ports": ports}
            print(json.dumps(doc, indent=2))
        else:
            print(text)
        return 0

    state = SandboxState.load(directory)
    if state is None:
        return done("no sandbox", f"no sandbox in {directory}: nothing to stop", [], 0)
    notes: list[str] = []
    supervisor = state.pid if pid_alive(state.pid) and "sandbox" in cmdline(state.pid) else None
    if supervisor is not None:
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + SUPERVISOR_GRACE
        while pid_alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(supervisor):
            os.kill(supervisor, signal.SIGKILL)
            notes.append(
                f"the supervisor (pid {supervisor}) did not stop in {SUPERVISOR_GRACE:.0f}s: killed"
            )
    notes += stop_leftovers(directory, state)
    deadline = time.monotonic() + 5
    busy = list(state.ports)
    while busy and time.monotonic() < deadline:
        busy = [p for p in busy if not port_free(p)]
        if busy:
            time.sleep(0.05)
    alive = [p for p in state.pids if _is_sandbox_process(p, directory)]
    for note in notes if fmt != "json" or alive or busy else ():
        print(f"note: {note}", file=sys.stdout if fmt != "json" else sys.stderr)
    if alive or busy:
        print(f"fleetgate: error: the sandbox in {directory} left processes {alive} and "
              f"ports in use {busy}", file=sys.stderr)  # fmt: skip
        return 1
    if supervisor is None and not notes:
        text = f"sandbox in {directory} is not running: nothing to stop"
        return done("not running", text, notes, len(state.ports))
    was = "stopped" if supervisor is not None else "was not running; cleaned up"
    text = f"sandbox in {directory} {was}: no process left, {len(state.ports)} ports free"
    return done(
        "stopped" if supervisor is not None else "cleaned up", text, notes, len(state.ports)
    )
