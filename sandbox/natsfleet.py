"""A NATS hub cluster and leaf nodes on loopback, run from the very configs of deploy/nats.

:class:`NatsFleet` starts the hub (``hubs`` ``nats-server`` processes of
deploy/nats/hub.conf: routes, JetStream in domain ``hub``, TLS for clients, routes and
leaf nodes) and one leaf node of deploy/nats/leaf.conf per region that dials out to the
hub, each server with its own loopback ports (client, cluster, leafnodes, monitoring) and
its own store, and waits until the routes, the leaf links and JetStream are up
(monitoring: /routez, /leafz, /healthz, /jsz). A server can be stopped or SIGKILLed and
started again on the same ports and store. ``fleetgate sandbox up --regions N`` and the
tests' kit (tests/kits/natscluster.py) both run it.

The configs are rendered for loopback by replacing their host names, ports and file
paths; every replaced text must be found, so a change to the deploy files that this
module does not follow fails here, loudly. Passwords reach the servers through their
environment (quoted: :func:`bus.server.config_string`), never through a file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bus.server import NatsServer, config_string, wait_port_free
from sandbox.ports import free_port
from sandbox.tlsca import TestCA

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "nats"
HUB_CONF = DEPLOY / "hub.conf"
LEAF_CONF = DEPLOY / "leaf.conf"

HUB_USERS = ("discovery", "agent", "auth", "reader", "auditor", "operator", "admin")
LEAF_USERS = ("discovery", "agent")
REGION_NAMES = ("us-east-1", "eu-west-1", "ap-southeast-2", "us-west-2", "eu-central-1")
"""The regions ``sandbox up --regions N`` runs, the first N of these."""


class DeployConfigChanged(AssertionError):
    """A deploy config no longer has the text this module renders for loopback."""


def password_var(user: str) -> str:
    """The environment variable deploy/nats/*.conf read ``user``'s password from."""
    return "FLEETGATE_NATS_" + re.sub(r"[^A-Z0-9]", "_", user.upper()) + "_PASSWORD"


def user_url(port: int, user: str, password: str) -> str:
    return f"nats://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}"


def _replace(text: str, old: str, new: str, *, count: int | None = None) -> str:
    found = text.count(old)
    if not found or (count is not None and found != count):
        raise DeployConfigChanged(
            f"sandbox/natsfleet.py expects {old!r} in the deploy config ({count or 'some'} "
            f"times, found {found}): update it with the config"
        )
    return text.replace(old, new)


def write_tls(directory: Path, ca: TestCA) -> Path:
    """The servers' TLS files the configs name, signed by ``ca``: ``ca.pem``, and one
    certificate for every server (``server.pem``, ``server-key.pem``) for localhost and
    127.0.0.1 with serverAuth and clientAuth (routes present it both ways). Returns the
    CA file, which clients trust."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    key_file = directory / "server-key.pem"
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory / "ca.pem"


def monitor(port: int, path: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
    """GET a monitoring endpoint on 127.0.0.1:``port``: (HTTP status, JSON body);
    (0, {}) when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(Exception):
            return exc.code, json.loads(exc.read() or b"{}")
        return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


@dataclass
class Node:
    """One server of the fleet: its name, ports and process."""

    name: str
    role: str  # "hub" or "leaf"
    client_port: int
    monitor_port: int
    server: NatsServer
    password: Callable[[str], str] = field(repr=False)
    cluster_port: int = 0
    leaf_port: int = 0
    region: str = ""

    @property
    def running(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.server.proc.pid if self.server.proc is not None else 0

    @property
    def address(self) -> str:
        return f"tls://127.0.0.1:{self.client_port}"

    @property
    def ports(self) -> list[int]:
        return [p for p in (self.client_port, self.cluster_port, self.leaf_port) if p] + [
            self.monitor_port
        ]

    def url(self, user: str) -> str:
        return user_url(self.client_port, user, self.password(user))

    def monitor(self, path: str) -> tuple[int, dict[str, Any]]:
        return monitor(self.monitor_port, path)

    def route_peers(self) -> set[str]:
        _, routez = self.monitor("/routez")
        return {str(r.get("remote_name") or r.get("remote_id")) for r in routez.get("routes") or []}

    def stream_state(self, stream: str) -> dict[str, Any] | None:
        """This server's own copy of a stream (/jsz): messages, last_seq...; None when it
        holds none (or is down)."""
        _, jsz = self.monitor("/jsz?accounts=true&streams=true")
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    return dict(detail.get("state") or {})
        return None

    def leaf_links(self) -> list[dict[str, Any]]:
        _, leafz = self.monitor("/leafz")
        return list(leafz.get("leafs") or [])


@dataclass
class NatsFleet:
    """A hub cluster of ``hubs`` servers and one leaf node per region, in ``directory``
    (``NAME/nats.conf`` and ``NAME/store`` per server). ``password(user)`` gives each
    user's password (the leaf links' users are ``leaf-REGION``); ``tls_dir`` holds the
    files of :func:`write_tls`."""

    directory: Path
    password: Callable[[str], str] = field(repr=False)
    tls_dir: Path
    regions: Sequence[str] = ("us-east-1", "eu-west-1")
    hubs: int = 3
    leaf_admin: bool = False
    """Give every leaf a local ``admin`` user without permissions (a region that trusts
    its own people more): what it may do in the hub is still only the leaf link's."""
    callout_issuer: str = ""
    """The public key (``A...``) of the auth callout's issuer that leaves name
    (``FLEETGATE_NATS_CALLOUT_ISSUER``): agents behind a leaf log in as themselves."""
    hub_nodes: list[Node] = field(default_factory=list)
    leaf_nodes: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        env = {password_var(user): config_string(self.password(user)) for user in HUB_USERS}
        # every password the file names (its sample leaf users too), and the regions'
        for user in re.findall(r"\{ user: ([\w-]+), password:", HUB_CONF.read_text()):
            env[password_var(user)] = config_string(self.password(user))
        for region in self.regions:
            env[password_var(f"leaf-{region}")] = config_string(self.password(f"leaf-{region}"))
        self.env = env
        for n in range(1, self.hubs + 1):
            name = f"hub-{n}"
            self.hub_nodes.append(
                Node(
                    name,
                    "hub",
                    free_port(),
                    free_port(),
                    NatsServer(self.directory / name / "store"),
                    self.password,
                    cluster_port=free_port(),
                    leaf_port=free_port(),
                )
            )
        for node in self.hub_nodes:
            path = self.directory / node.name / "nats.conf"
            self._beside_permissions(path)
            path.write_text(self._hub_config(node))
            node.server = NatsServer(
                self.directory / node.name / "store",
                port=node.client_port,
                config_file=path,
                env={**env, "FLEETGATE_NATS_SERVER_NAME": node.name},
                jetstream=False,  # its store_dir is in the config
                monitor_port=node.monitor_port,
            )
        for region in self.regions:
            name = f"leaf-{region}"
            client_port, monitor_port = free_port(), free_port()
            path = self.directory / name / "nats.conf"
            self._beside_permissions(path)
            path.write_text(self._leaf_config(client_port, monitor_port))
            secret = quote(self.password(name), safe="")
            urls = ", ".join(
                f'"tls://{name}:{secret}@127.0.0.1:{hub.leaf_port}"' for hub in self.hub_nodes
            )
            users = (*LEAF_USERS, "admin") if self.leaf_admin else LEAF_USERS
            server = NatsServer(
                self.directory / name / "store",
                port=client_port,
                config_file=path,
                env={
                    **{password_var(user): env[password_var(user)] for user in users},
                    "FLEETGATE_NATS_SERVER_NAME": name,
                    "FLEETGATE_NATS_HUB_LEAF_URLS": f"[{urls}]",
                    "FLEETGATE_NATS_CALLOUT_ISSUER": self.callout_issuer,
                },
                jetstream=False,
                monitor_port=monitor_port,
            )
            self.leaf_nodes[region] = Node(
                name, "leaf", client_port, monitor_port, server, self.password, region=region
            )

    # -- configs --------------------------------------------------------------------------

    @staticmethod
    def _beside_permissions(config: Path) -> None:
        """nats-server reads an include relative to the including file: link the deploy
        permissions beside each rendered config."""
        config.parent.mkdir(parents=True, exist_ok=True)
        link = config.parent / "permissions"
        if not link.is_symlink():
            link.symlink_to(DEPLOY / "permissions")

    def _common(self, text: str, client_port: int, monitor_port: int) -> str:
        text = _replace(text, "listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{client_port}", count=1)
        text = _replace(text, "http: 127.0.0.1:8222", f"http: 127.0.0.1:{monitor_port}", count=1)
        text = _replace(text, "/etc/nats/tls/", f"{self.tls_dir}/")
        _replace(text, "include ./permissions/", "")  # found beside the rendered file:
        return text

    def _hub_config(self, node: Node) -> str:
        text = self._common(HUB_CONF.read_text(), node.client_port, node.monitor_port)
        text = _replace(
            text, "store_dir: /var/lib/nats", f"store_dir: {node.server.store_dir}", count=1
        )
        text = _replace(text, "listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{node.cluster_port}")
        text = _replace(text, "listen: 0.0.0.0:7422", f"listen: 127.0.0.1:{node.leaf_port}")
        routes = re.search(r"routes: \[\n(.*?)\n  \]", text, re.S)
        if routes is None:
            raise DeployConfigChanged("hub.conf has no 'routes: [ ... ]' list to fill")
        mine = "\n".join(f"    tls://127.0.0.1:{hub.cluster_port}" for hub in self.hub_nodes)
        text = text[: routes.start(1)] + mine + text[routes.end(1) :]
        if not self.regions:
            return text  # no leaf: the file's sample leaf users stay
        # the leaf users: one per region, made like the file's first one
        leaf_user = re.search(r"\n( *\{ user: leaf-[^\n]*\})", text)
        if leaf_user is None:
            raise DeployConfigChanged("hub.conf lists no leaf-* user to copy")
        lines = [
            re.sub(r"leaf-[a-z0-9-]+", f"leaf-{region}", leaf_user.group(1)).replace(
                "LEAF_US_EAST_1", "LEAF_" + re.sub(r"[^A-Z0-9]", "_", region.upper())
            )
            for region in self.regions
        ]
        text = re.sub(r"\n *\{ user: leaf-[^\n]*\}", "", text)
        end = text.rindex("\n  ]\n")  # the end of the authorization's users
        return text[:end] + "\n" + "\n".join(lines) + text[end:]

    def _leaf_config(self, client_port: int, monitor_port: int) -> str:
        text = self._common(LEAF_CONF.read_text(), client_port, monitor_port)
        if self.leaf_admin:
            end = text.rindex("\n  ]\n")
            admin = "\n    { user: admin, password: $FLEETGATE_NATS_ADMIN_PASSWORD }"
            text = text[:end] + admin + text[end:]
            # a local user the auth callout does not ask about
            text = _replace(
                text,
                "auth_users: [ discovery, agent ]",
                "auth_users: [ discovery, agent, admin ]",
                count=1,
            )
        return text

    # -- life -----------------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        return [*self.hub_nodes, *self.leaf_nodes.values()]

    def hub_urls(self, user: str) -> str:
        """A comma-separated list of every hub server, logged in as ``user``."""
        return ",".join(hub.url(user) for hub in self.hub_nodes)

    def leaf_url(self, region: str, user: str) -> str:
        return self.leaf_nodes[region].url(user)

    def start(self, timeout: float = 30.0) -> NatsFleet:
        """Start every server (all at once: each waits only for its own start), then
        wait until the routes, JetStream and the leaf links are up."""
        try:
            for node in self.nodes:
                node.server.start(timeout)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0, *, nodes: Sequence[Node] | None = None) -> None:
        """Until every running hub server routes to the other running ones, has a healthy
        JetStream, and every leaf has its link to the hub."""
        deadline = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < deadline:
            problem = self.not_ready(nodes)
            if not problem:
                return
            time.sleep(0.1)
        raise TimeoutError(f"NATS not ready after {timeout:.0f}s: {problem}")

    def not_ready(self, nodes: Sequence[Node] | None = None) -> str:
        """What is not up yet ("" when everything is)."""
        running = [hub for hub in self.hub_nodes if hub.running]
        for hub in running:
            if nodes is not None and hub not in nodes:
                continue
            peers = hub.route_peers()
            want = {other.name for other in running if other is not hub}
            if not want <= peers:
                return f"{hub.name} routes to {sorted(peers)}, not all of {sorted(want)}"
            status, body = hub.monitor("/healthz")
            if status != 200:
                return f"{hub.name} /healthz: {status} {body}"
            _, jsz = hub.monitor("/jsz")
            if not (jsz.get("meta_cluster") or {}).get("leader"):
                return f"{hub.name}: no JetStream meta leader yet"
        for leaf in self.leaf_nodes.values():
            if not leaf.running or (nodes is not None and leaf not in nodes):
                continue
            if not leaf.leaf_links():
                return f"{leaf.name} has no link to the hub yet"
        return ""

    def kill(self, node: Node) -> None:
        """SIGKILL one server (a crash)."""
        node.server.kill()

    def restart(self, node: Node, timeout: float = 30.0, *, wait: bool = True) -> None:
        """Start a stopped server again on its ports and store; with ``wait``, until it
        is back in."""
        for port in node.ports:
            wait_port_free("127.0.0.1", port)
        node.server.start(timeout)
        if wait:
            self.wait_ready(timeout)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.server.stop()
