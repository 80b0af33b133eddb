"""A real NATS hub cluster and leaf nodes, run from the very configs of deploy/nats: the
sandbox's :class:`sandbox.natsfleet.NatsFleet` (one implementation), with the kit's
passwords (``pw-USER``) and a throwaway CA.

:class:`NatsTopology` starts the hub (3 ``nats-server`` processes of deploy/nats/hub.conf)
and N leaf nodes of deploy/nats/leaf.conf that dial out to the hub, and waits until the
routes, the leaf links and JetStream are up. A server can be SIGKILLed and started again
on the same ports and store. Clients trust the kit's CA through ``SSL_CERT_FILE``
(:meth:`NatsTopology.trust`): the client port requires TLS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from sandbox.natsfleet import NatsFleet, Node
from sandbox.natsfleet import user_url as _user_url
from sandbox.ports import free_port
from sandbox.tlsca import TestCA
from tests.kits.common import CALLOUT_SEED
from tests.kits.natsauth import public_key

__all__ = ["NatsTopology", "Node", "free_port", "password_of", "topology", "user_url"]


def password_of(user: str) -> str:
    return f"pw-{user}"


def user_url(port: int, user: str) -> str:
    return _user_url(port, user, password_of(user))


class NatsTopology(NatsFleet):
    """A hub cluster of ``hubs`` servers and one leaf node per region, the kit's way."""

    def __init__(
        self,
        directory: Path,
        regions: Sequence[str] = ("us-east-1", "eu-west-1"),
        hubs: int = 3,
        leaf_admin: bool = False,
    ) -> None:
        from sandbox.natsfleet import write_tls

        self.ca_file = write_tls(directory / "tls", TestCA.create("kit NATS CA"))
        super().__init__(
            directory,
            password=password_of,
            tls_dir=directory / "tls",
            regions=regions,
            hubs=hubs,
            leaf_admin=leaf_admin,
            callout_issuer=public_key(CALLOUT_SEED),
        )

    def trust(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make this process's (and its children's) default TLS trust the kit's CA."""
        monkeypatch.setenv("SSL_CERT_FILE", str(self.ca_file))

    def start(self, timeout: float = 30.0) -> NatsTopology:
        super().start(timeout)
        return self

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
