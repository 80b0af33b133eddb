"""The RESP proxy engine: one :class:`ProxySession` per client connection, forwarding
RESP2/RESP3 faithfully (pipelined, streamed, pub/sub both ways) while the agent decides
per command through :class:`SessionHooks`. No listener, TLS or identity here: those are
the agent's; it hands the engine connected stream pairs.
"""

from .errors import ProtocolError, ProxyError, UpstreamProtocolError, error_reply
from .hooks import Action, Hello, PassThroughHooks, SessionHooks
from .session import ProxySession, SessionStats, Streams
from .settings import ProxyLimits, ProxyTimeouts
from .upstream import TcpConnector, UpstreamConnector

__all__ = [
    "Action",
    "Hello",
    "PassThroughHooks",
    "ProtocolError",
    "ProxyError",
    "ProxyLimits",
    "ProxySession",
    "ProxyTimeouts",
    "SessionHooks",
    "SessionStats",
    "Streams",
    "TcpConnector",
    "UpstreamConnector",
    "UpstreamProtocolError",
    "error_reply",
]
