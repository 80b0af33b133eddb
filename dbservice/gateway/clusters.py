"""What the agent's listener needs to run the cluster engine: which databases are in
cluster mode, how to dial a node (the same host aliases and TLS as the configuration
endpoint), one :class:`ClusterState` per database shared by its sessions, and the
upstream of a per-node session (``fleetgate db connect NAME --node <shard>``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

from bus.schemas import DatabaseResource
from dbservice.engine.cluster.link import Dial, Link, LinkError
from dbservice.engine.cluster.session import ClusterSession
from dbservice.engine.cluster.state import ClusterState
from dbservice.engine.cluster.topology import Address, TopologyError
from dbservice.engine.login import UpstreamLogin
from dbservice.engine.proxy import SessionHooks, Streams, TcpConnector
from dbservice.engine.proxy.settings import CommandBuffers, ProxyLimits, ProxyTimeouts
from dbservice.upstream.dial import TLSContexts, resolve_alias
from fleetgate.addresses import split_host_port


def cluster_mode(resource: DatabaseResource) -> bool:
    """MemoryDB behind its cluster configuration endpoint (every MemoryDB cluster runs in
    cluster mode; a ``node`` endpoint is one node and is proxied as it is)."""
    aws = resource.spec.aws
    return aws is not None and aws.memorydb is not None and aws.memorydb.endpoint_type == "cluster"


class NodeNotFound(Exception):
    """``--node`` named no shard of the cluster; the message lists the shards."""


class ClusterEngines:
    """One per listener."""

    def __init__(
        self, *, aliases: Mapping[str, str], contexts: TLSContexts, connect_timeout: float
    ) -> None:
        self.aliases = aliases
        self.contexts = contexts
        self.connect_timeout = connect_timeout
        self.states: dict[str, ClusterState] = {}
        self._ids = itertools.count(1)

    def state(self, resource: DatabaseResource) -> ClusterState:
        state = self.states.get(resource.name)
        if state is None:
            state = self.states[resource.name] = ClusterState(resource.name)
        return state

    def dialer(self, resource: DatabaseResource) -> Dial:
        tls = resource.spec.tls
        memorydb = resource.spec.aws.memorydb if resource.spec.aws else None
        mode = "disabled" if memorydb is not None and not memorydb.tls_enabled else tls.mode
        context = self.contexts.get(mode, tls.ca_cert)
        aliases, timeout = self.aliases, self.connect_timeout

        async def dial(address: Address) -> Streams:
            host, port = resolve_alias(address[0], address[1], aliases)
            connector = TcpConnector(
                host,
                port,
                ssl=context,
                server_hostname=tls.server_name or address[0],
                connect_timeout=timeout,
            )
            return await connector.connect()

        return dial

    def session(
        self,
        client: Streams,
        seed: Streams,
        *,
        resource: DatabaseResource,
        login: UpstreamLogin,
        db_user: str,
        hooks: SessionHooks,
        timeouts: ProxyTimeouts,
        client_port: int = 0,
        eof_command: str | None = None,
        limits: ProxyLimits | None = None,
        buffers: CommandBuffers | None = None,
        on_link_closed: Callable[[], None] | None = None,
    ) -> ClusterSession:
        """The engine for one client, over ``seed`` (the logged-in connection to the
        configuration endpoint the listener made)."""
        return ClusterSession(
            client,
            seed,
            seed_address=split_host_port(resource.spec.uri, default_port=6379),
            state=self.state(resource),
            dial=self.dialer(resource),
            login=login,
            db_user=db_user,
            hooks=hooks,
            database=resource.name,
            limits=limits,
            timeouts=timeouts,
            connect_timeout=self.connect_timeout,
            client_id=next(self._ids),
            client_port=client_port,
            eof_command=eof_command,
            buffers=buffers,
            on_link_closed=on_link_closed,
        )

    async def node_upstream(
        self,
        seed: Streams,
        *,
        resource: DatabaseResource,
        login: UpstreamLogin,
        db_user: str,
        node: str,
    ) -> tuple[Streams, bool]:
        """For ``--node``: the logged-in connection to the primary of the shard named
        ``node`` (shard id, node id or a prefix of 8+ characters, or host:port), found
        through ``seed``, which is closed. NodeNotFound lists the shards."""
        dial = self.dialer(resource)
        address = split_host_port(resource.spec.uri, default_port=6379)

        async def keep(link: Link, streams: Streams) -> None:
            return None

        link = Link(address, dial=dial, prepare=keep, limits=ProxyLimits())
        link.start(seed)
        try:
            topology = await self.state(resource).refresh(link)
        finally:
            await link.aclose()
        shard = topology.find(node)
        if shard is None:
            known = ", ".join(
                f"{s.id} ({s.primary.host}:{s.primary.port}, {s.slots} slots)"
                for s in topology.shards
            )
            raise NodeNotFound(f"{resource.name} has no shard or node {node!r}; shards: {known}")
        streams = await dial(shard.primary.address)
        try:
            ready = await login.login(streams, db_user=db_user)
        except BaseException:
            streams[1].transport.abort()
            raise
        return streams, ready


__all__ = [
    "ClusterEngines",
    "LinkError",
    "NodeNotFound",
    "TopologyError",
    "cluster_mode",
]
