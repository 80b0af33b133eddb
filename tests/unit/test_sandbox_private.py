"""``make_private``: what an earlier sandbox run left becomes private, and a symlink in
it (the NATS servers' ``permissions`` link to deploy/nats) is neither followed nor
changed, nor does it stop the walk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sandbox.state import make_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_symlinked_directory_is_left_alone(tmp_path: Path) -> None:
    outside = tmp_path / "deploy"
    outside.mkdir(mode=0o755)
    (outside / "agent.conf").write_text("x")
    os.chmod(outside / "agent.conf", 0o644)
    box = tmp_path / "box"
    (box / "nats" / "hub-1").mkdir(parents=True, mode=0o755)
    (box / "nats" / "hub-1" / "permissions").symlink_to(outside)
    (box / "nats" / "hub-1" / "nats.conf").write_text("y")
    os.chmod(box / "nats" / "hub-1" / "nats.conf", 0o644)

    make_private(box)

    assert mode(box / "nats" / "hub-1") == 0o700
    assert mode(box / "nats" / "hub-1" / "nats.conf") == 0o600
    assert mode(outside) == 0o755  # the link's target is not the sandbox's
    assert mode(outside / "agent.conf") == 0o644
