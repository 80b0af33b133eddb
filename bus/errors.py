"""Errors of the bus, wrapping nats-py's.

BusError
├── BusUnavailable      cannot reach NATS (connection refused, no servers, timeout)
└── RegistryError       a bucket operation failed (permissions, missing JetStream)
"""

from __future__ import annotations


class BusError(Exception):
    """Base of every bus error."""


class BusUnavailable(BusError):
    """NATS cannot be reached; the message says where we looked."""


class RegistryError(BusError):
    """A KV or stream operation failed."""
