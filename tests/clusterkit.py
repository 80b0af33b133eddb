"""Helpers for the cluster engine tests: the engine in front of a 3-shard stand-in on a
loopback port, in a background thread (so sync clients can drive it), as the proxy
engine's kit runs it (:class:`tests.proxykit.ThreadedServer`)."""

from __future__ import annotations

import ssl
from collections.abc import Callable

from dbservice.engine.cluster.testing import LoopbackCluster
from dbservice.engine.proxy import PassThroughHooks, ProxyLimits, SessionHooks
from dbservice.engine.proxy.settings import CommandBuffers
from sandbox.memorydb import ThreadedStandin
from tests.proxykit import ThreadedServer


class ClusterProxy(ThreadedServer[LoopbackCluster]):
    """``with ClusterProxy(standin) as proxy:`` the engine on ``proxy.port``."""

    thread_name = "cluster-proxy"

    def __init__(
        self,
        standin: ThreadedStandin,
        *,
        hooks: Callable[[], SessionHooks] = PassThroughHooks,
        limits: ProxyLimits | None = None,
        buffers: CommandBuffers | None = None,
    ) -> None:
        super().__init__()
        self.standin = standin
        self.hooks = hooks
        self.limits = limits
        self.buffers = buffers

    def _server(self) -> LoopbackCluster:
        tls = ssl.create_default_context(cafile=str(self.standin.ca_file))
        return LoopbackCluster(
            self.standin.endpoint,
            tls=tls,
            hooks=self.hooks,
            limits=self.limits,
            buffers=self.buffers,
        )
