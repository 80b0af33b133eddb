"""Where each process of an agent keeps the audit events NATS cannot take yet."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from dbservice.access.spool import AuditSpool, SpoolError
from fleetgate.config import ConfigError

logger = logging.getLogger(__name__)

SPOOL_DIR = "audit-spool"
_PROCESS_SPOOL = re.compile(r"^audit-spool-(\d+)$")


def spool_dir(data_dir: Path, process: int) -> Path:
    """``<data_dir>/audit-spool`` for the agent process, ``audit-spool-<K>`` for its
    listener process K (each writes only its own)."""
    return data_dir / (SPOOL_DIR if process == 0 else f"{SPOOL_DIR}-{process}")


def open_spool(data_dir: Path, process: int, *, max_bytes: int, processes: int = 1) -> AuditSpool:
    """The process's spool, with what a previous run left in it (ConfigError when the
    directory cannot be used). The agent process (0) also takes over the spools of
    listener processes it no longer runs (``processes`` is lower than before)."""
    try:
        spool = AuditSpool.open(spool_dir(data_dir, process), max_bytes=max_bytes)
        if process == 0:
            for path in sorted(data_dir.iterdir()):
                found = _PROCESS_SPOOL.match(path.name)
                if found is not None and int(found.group(1)) >= processes and path.is_dir():
                    _adopt(spool, path)
    except SpoolError as exc:
        raise ConfigError(f"db_service.data_dir: {exc}") from None
    except OSError as exc:
        raise ConfigError(
            f"db_service.data_dir: {data_dir}: cannot read it ({exc.strerror or exc})"
        ) from None
    return spool


def _adopt(spool: AuditSpool, path: Path) -> None:
    """Move the events waiting in ``path`` (a former listener process's spool) into
    ``spool``, then delete it."""
    other = AuditSpool.open(path, max_bytes=spool.max_bytes)
    moved = 0
    while len(other):
        items = other.peek(1024)
        spool.append(items)
        other.ack(len(items))
        moved += sum(item.events for item in items)
    other.close()
    spool.sync()
    shutil.rmtree(path)
    if moved:
        logger.info("audit: %d events of %s moved to %s", moved, path, spool.directory)
