"""A real NATS hub cluster and leaf nodes, run from the very configs of deploy/nats.

:class:`NatsTopology` starts the hub (3 ``nats-server`` processes of deploy/nats/hub.conf:
routes, JetStream, TLS for clients, routes and leaf nodes) and N leaf nodes of
deploy/nats/leaf.conf that dial out to the hub, each server with its own loopback ports
(client, cluster, leafnodes, monitoring) and its own store, and waits until the routes,
the leaf links and JetStream are up (monitoring: /routez, /leafz, /healthz). A server
can be SIGKILLed and started again on the same ports and store.

The configs are rendered for loopback by replacing their host names, ports and file
paths; every replaced text must be found, so a change to the deploy files that the kit
does not follow fails here, loudly. Clients trust the kit's CA through ``SSL_CERT_FILE``
(:meth:`NatsTopology.trust`): the client port requires TLS.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import random
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bus.server import NatsServer, config_string, wait_port_free
from tests.kits.common import CALLOUT_SEED, ROOT
from tests.kits.natsauth import public_key

DEPLOY = ROOT / "deploy" / "nats"
HUB_CONF = DEPLOY / "hub.conf"
LEAF_CONF = DEPLOY / "leaf.conf"

HUB_USERS = ("discovery", "agent", "auth", "reader", "auditor", "operator", "admin")
LEAF_USERS = ("discovery", "agent")


def free_port() -> int:
    """A free loopback port below Linux's ephemeral range (32768-60999), so that no
    outgoing connection (a route, a leaf link, a client) takes it while its server is
    down for a restart."""
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def password_of(user: str) -> str:
    return f"pw-{user}"


def user_url(port: int, user: str) -> str:
    return f"nats://{user}:{password_of(user)}@127.0.0.1:{port}"


def _replace(text: str, old: str, new: str, *, count: int | None = None) -> str:
    found = text.count(old)
    if not found or (count is not None and found != count):
        raise AssertionError(
            f"the kit expects {old!r} in the deploy config ({count or 'some'} times, "
            f"found {found}): update tests/kits/natscluster.py with the config"
        )
    return text.replace(old, new)


def _password_var(user: str) -> str:
    return "FLEETGATE_NATS_" + re.sub(r"[^A-Z0-9]", "_", user.upper()) + "_PASSWORD"


@dataclass
class Tls:
    """A CA and one certificate for every server of the kit (serverAuth and clientAuth:
    routes present it both ways), as files the configs name."""

    directory: Path

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kit NATS CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
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
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        self.ca_file.write_bytes(ca.public_bytes(pem))
        (self.directory / "server.pem").write_bytes(cert.public_bytes(pem))
        (self.directory / "server-key.pem").write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"


@dataclass
class Node:
    """One server of the topology: its name, ports and process."""

    name: str
    role: str  # "hub" or "leaf"
    client_port: int
    monitor_port: int
    server: NatsServer
    cluster_port: int = 0
    leaf_port: int = 0
    region: str = ""

    @property
    def running(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def url(self, user: str) -> str:
        return user_url(self.client_port, user)

    def monitor(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET a monitoring endpoint: (HTTP status, JSON body); (0, {}) when unreachable."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.monitor_port}{path}", timeout=2
            ) as answer:
                return answer.status, json.loads(answer.read() or b"{}")
        except urllib.error.HTTPError as exc:
            with contextlib.suppress(Exception):
                return exc.code, json.loads(exc.read() or b"{}")
            return exc.code, {}
        except (OSError, ValueError):
            return 0, {}

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
class NatsTopology:
    """A hub cluster of ``hubs`` servers and one leaf node per region."""

    directory: Path
    regions: Sequence[str] = ("us-east-1", "eu-west-1")
    hubs: int = 3
    leaf_admin: bool = False
    """Give every leaf a local ``admin`` user without permissions (a region that trusts
    its own people more): what it may do in the hub is still only the leaf link's."""
    hub_nodes: list[Node] = field(default_factory=list)
    leaf_nodes: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tls = Tls(self.directory / "tls")
        self.env: dict[str, str] = {
            _password_var(user): config_string(password_of(user)) for user in HUB_USERS
        }
        self.env["FLEETGATE_NATS_CALLOUT_ISSUER"] = public_key(CALLOUT_SEED)
        # every password the file names (its sample leaf users too), and the regions'
        for user in re.findall(r"\{ user: ([\w-]+), password:", HUB_CONF.read_text()):
            self.env[_password_var(user)] = config_string(password_of(user))
        for region in self.regions:
            self.env[_password_var(f"leaf-{region}")] = config_string(password_of(f"leaf-{region}"))
        for n in range(1, self.hubs + 1):
            name = f"hub-{n}"
            node = Node(
                name,
                "hub",
                free_port(),
                free_port(),
                server=NatsServer(self.directory / name / "store"),
                cluster_port=free_port(),
                leaf_port=free_port(),
            )
            self.hub_nodes.append(node)
        for node in self.hub_nodes:
            path = self.directory / node.name / "nats.conf"
            self._beside_permissions(path)
            path.write_text(self._hub_config(node))
            node.server = NatsServer(
                self.directory / node.name / "store",
                port=node.client_port,
                config_file=path,
                env={**self.env, "FLEETGATE_NATS_SERVER_NAME": node.name},
                jetstream=False,  # its store_dir is in the config
                monitor_port=node.monitor_port,
            )
        for region in self.regions:
            name = f"leaf-{region}"
            client_port, monitor_port = free_port(), free_port()
            path = self.directory / name / "nats.conf"
            self._beside_permissions(path)
            path.write_text(self._leaf_config(client_port, monitor_port))
            urls = ", ".join(
                f'"tls://{name}:{password_of(name)}@127.0.0.1:{hub.leaf_port}"'
                for hub in self.hub_nodes
            )
            users = (*LEAF_USERS, "admin") if self.leaf_admin else LEAF_USERS
            env = {
                **{_password_var(user): self.env[_password_var(user)] for user in users},
                "FLEETGATE_NATS_SERVER_NAME": name,
                "FLEETGATE_NATS_HUB_LEAF_URLS": f"[{urls}]",
                "FLEETGATE_NATS_CALLOUT_ISSUER": self.env["FLEETGATE_NATS_CALLOUT_ISSUER"],
            }
            server = NatsServer(
                self.directory / name / "store",
                port=client_port,
                config_file=path,
                env=env,
                jetstream=False,
                monitor_port=monitor_port,
            )
            self.leaf_nodes[region] = Node(
                name, "leaf", client_port, monitor_port, server, region=region
            )

    # -- configs --------------------------------------------------------------------------

    @staticmethod
    def _beside_permissions(config: Path) -> None:
        """nats-server reads an include relative to the including file: link the deploy
        permissions beside each rendered config."""
        config.parent.mkdir(parents=True, exist_ok=True)
        (config.parent / "permissions").symlink_to(DEPLOY / "permissions")

    def _common(self, text: str, client_port: int, monitor_port: int) -> str:
        text = _replace(text, "listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{client_port}", count=1)
        text = _replace(text, "http: 127.0.0.1:8222", f"http: 127.0.0.1:{monitor_port}", count=1)
        text = _replace(text, "/etc/nats/tls/", f"{self.tls.directory}/")
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
            raise AssertionError("hub.conf has no 'routes: [ ... ]' list the kit can fill")
        mine = "\n".join(f"    tls://127.0.0.1:{hub.cluster_port}" for hub in self.hub_nodes)
        text = text[: routes.start(1)] + mine + text[routes.end(1) :]
        if not self.regions:
            return text  # no leaf: the file's sample leaf users stay
        # the leaf users: one per region of the kit, made like the file's first one
        leaf_user = re.search(r"\n( *\{ user: leaf-[^\n]*\})", text)
        if leaf_user is None:
            raise AssertionError("hub.conf lists no leaf-* user for the kit to copy")
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

    def trust(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make this process's (and its children's) default TLS trust the kit's CA."""
        monkeypatch.setenv("SSL_CERT_FILE", str(self.tls.ca_file))

    def start(self, timeout: float = 30.0) -> NatsTopology:
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
            problem = self._not_ready(nodes)
            if not problem:
                return
            time.sleep(0.1)
        raise TimeoutError(f"NATS topology not ready after {timeout:.0f}s: {problem}")

    def _not_ready(self, nodes: Sequence[Node] | None) -> str:
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

    def restart(self, node: Node, timeout: float = 30.0) -> None:
        """Start a stopped server again on its ports and store; wait until it is back in."""
        for port in (node.client_port, node.cluster_port, node.leaf_port, node.monitor_port):
            if port:
                wait_port_free("127.0.0.1", port)
        node.server.start(timeout)
        self.wait_ready(timeout)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.server.stop()

    def __enter__(self) -> NatsTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def topology(
    directory: Path, regions: Sequence[str] = ("us-east-1", "eu-west-1"), hubs: int = 3
) -> Iterator[NatsTopology]:
    with NatsTopology(directory, regions=regions, hubs=hubs) as started:
        yield started
