"""Where each process of an agent keeps the audit events NATS cannot take yet."""

from __future__ import annotations

from pathlib import Path

from dbservice.access.spool import AuditSpool, SpoolError
from fleetgate.config import ConfigError

SPOOL_DIR = "audit-spool"


def spool_dir(data_dir: Path, process: int) -> Path:
    """``<data_dir>/audit-spool`` for the agent process, ``audit-spool-<K>`` for its
    listener process K (each writes only its own)."""
    return data_dir / (SPOOL_DIR if process == 0 else f"{SPOOL_DIR}-{process}")


def open_spool(data_dir: Path, process: int, *, max_bytes: int) -> AuditSpool:
    """The process's spool, with what a previous run left in it (ConfigError when the
    directory cannot be used)."""
    try:
        return AuditSpool.open(spool_dir(data_dir, process), max_bytes=max_bytes)
    except SpoolError as exc:
        raise ConfigError(f"db_service.data_dir: {exc}") from None
