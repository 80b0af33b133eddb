"""Errors of the bus, wrapping nats-py's.

BusError
├── BusUnavailable      cannot reach NATS (connection refused, no servers, timeout)
└── RegistryError       a bucket operation failed (permissions, missing JetStream)
    └── JetStreamUnavailable   JetStream did not answer (perhaps for a while only)
"""

from __future__ import annotations


class BusError(Exception):
    """Base of every bus error."""


class BusUnavailable(BusError):
    """NATS cannot be reached; the message says where we looked."""


class RegistryError(BusError):
    """A KV or stream operation failed."""


class JetStreamUnavailable(RegistryError):
    """JetStream did not answer: not enabled there, or not for now (a leaf node's link
    to its hub being made, a JetStream leader being elected, a replicated stream being
    created on a busy cluster). :func:`bus.client.when_jetstream_answers` tries again."""
