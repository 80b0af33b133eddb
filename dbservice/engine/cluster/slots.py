"""Key slots as Redis Cluster computes them (pure)."""

from __future__ import annotations

from binascii import crc_hqx
from typing import Final

SLOTS: Final = 16384


def key_slot(key: bytes) -> int:
    """The slot of ``key``: CRC16 (XMODEM) of the key, or of its hash tag (the part
    between the first ``{`` and the next ``}``, when that part is not empty), mod 16384."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key, 0) & (SLOTS - 1)
