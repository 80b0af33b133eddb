"""Helpers for the cluster engine tests: the engine in front of a 3-shard stand-in on a
loopback port, in a background thread (so sync clients can drive it), as the proxy
engine's kit runs it (:class:`tests.kits.proxy.ThreadedServer`)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import redis

from dbservice.engine.cluster.testing import LoopbackCluster
from dbservice.engine.login import ClientCredentials, UpstreamLogin
from dbservice.engine.proxy import PassThroughHooks, ProxyLimits, SessionHooks
from dbservice.engine.proxy.settings import CommandBuffers, ProxyTimeouts
from sandbox.memorydb import ThreadedStandin
from tests.kits.proxy import ThreadedServer


class ClusterProxy(ThreadedServer[LoopbackCluster]):
    """``with ClusterProxy(standin) as proxy:`` the engine on ``proxy.port``; with
    ``client_tls`` its clients connect with TLS as they do to the agent
    (:meth:`connect`, :meth:`client`), by a certificate of the stand-in's CA."""

    thread_name = "cluster-proxy"

    def __init__(
        self,
        standin: ThreadedStandin,
        *,
        hooks: Callable[[], SessionHooks] = PassThroughHooks,
        limits: ProxyLimits | None = None,
        buffers: CommandBuffers | None = None,
        client_tls: bool = False,
        timeouts: ProxyTimeouts | None = None,
        login: Callable[[], UpstreamLogin] = ClientCredentials,
        db_user: str = "default",
    ) -> None:
        super().__init__()
        self.timeouts = timeouts
        self.login = login
        self.db_user = db_user
        self.standin = standin
        self.client_tls = client_tls
        self.hooks = hooks
        self.limits = limits
        self.buffers = buffers

    def _server(self) -> LoopbackCluster:
        tls = ssl.create_default_context(cafile=str(self.standin.ca_file))
        client_tls = None
        if self.client_tls:
            ca = self.standin.standin.ca
            directory = Path(self.standin.standin.config.dir) / "engine-tls"
            client_tls = ca.server_context(ca.issue_server_cert(), directory)
        return LoopbackCluster(
            self.standin.endpoint,
            tls=tls,
            hooks=self.hooks,
            limits=self.limits,
            buffers=self.buffers,
            client_tls=client_tls,
            timeouts=self.timeouts,
            login=self.login,
            db_user=self.db_user,
        )

    def client(self, protocol: int = 2, **kwargs: object) -> redis.Redis:
        if self.client_tls:
            kwargs = {"ssl": True, "ssl_ca_certs": str(self.standin.ca_file), **kwargs}
        return super().client(protocol, **kwargs)

    def connect(self, timeout: float = 60) -> socket.socket:
        """A raw connection to the engine (TLS with ``client_tls``)."""
        sock = super().connect(timeout)
        if not self.client_tls:
            return sock
        context = ssl.create_default_context(cafile=str(self.standin.ca_file))
        return context.wrap_socket(sock, server_hostname="localhost")
